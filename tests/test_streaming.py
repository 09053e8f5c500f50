"""Long inputs in bounded memory: `encode_long` against the whole-file `encode`, bit for bit."""

import numpy as np
import soundfile as sf
import torch

from encodec_fast.streaming import chunk_bounds, encode_long
from encodec_fast.tokenize import read_codes, tokenize
from helpers import make_signal


def test_chunk_bounds_cover_the_input_with_long_chunks():
    assert chunk_bounds(10, 4) == [(0, 4), (4, 10)]
    assert chunk_bounds(12, 4) == [(0, 4), (4, 8), (8, 12)]
    assert chunk_bounds(3, 4) == [(0, 3)]
    for length in range(1, 60):
        bounds = chunk_bounds(length, 7)
        assert bounds[0][0] == 0 and bounds[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all(b - a >= 7 for a, b in bounds[:-1]) and (len(bounds) == 1 or bounds[-1][1] - bounds[-1][0] >= 7)


def test_chunked_24khz_codes_equal_the_whole_file(pair_24):
    """61.7 s (not a whole number of frames) in chunks of 20 s (20, 20, 21.7): the convolutions'
    contexts, the strides' remainders, the LSTM state and both edges' padding carried over."""
    _, ours = pair_24
    ours.set_target_bandwidth(24.0)  # all 32 codebooks
    x = make_signal(24000, int(24000 * 61.7) + 13, 1, seed=11)[None]
    (ref, _), = ours.encode(x)
    (got, scale), = encode_long(ours, x, chunk_seconds=20.0)
    assert scale is None and got.shape == ref.shape and torch.equal(got, ref)


def test_chunked_48khz_segments_equal_the_whole_file(pair_48):
    _, ours = pair_48
    ours.set_target_bandwidth(6.0)
    x = make_signal(48000, int(48000 * 5.5), 2, seed=12)[None]
    ref = ours.encode(x)
    got = encode_long(ours, x, chunk_seconds=2.0)
    assert len(got) == len(ref)
    for (c, s), (rc, rs) in zip(got, ref):
        assert torch.equal(c, rc) and torch.equal(s, rs)


def test_tokenize_streams_long_inputs(tmp_path, pair_24):
    _, ours = pair_24
    wav = make_signal(22050, int(22050 * 9.3), 2, seed=13)
    sf.write(str(tmp_path / "long.flac"), wav.numpy().T, 22050)
    tokenize([tmp_path / "long.flac"], tmp_path / "out", model=ours, bandwidth=6.0, workers=0, chunk_seconds=2.0,
             quiet=True)
    (row,) = read_codes(tmp_path / "out")
    data, sr = sf.read(str(tmp_path / "long.flac"), dtype="float32", always_2d=True)
    from encodec_fast.audio import convert_audio
    x = convert_audio(torch.from_numpy(data.T.copy()), sr, 24000, 1)
    ours.set_target_bandwidth(6.0)
    (ref, _), = ours.encode(x[None])
    assert np.array_equal(row["codes"], ref[0].numpy())
