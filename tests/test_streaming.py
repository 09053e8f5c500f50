"""Long inputs in bounded memory: `encode_long` / `encode_pieces` against the whole-file
`encode`, the streaming resampler and reader against whole-file conversion, bit for bit."""

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from encodec_fast.audio import StreamingResampler, convert_audio, resampled_length
from encodec_fast.streaming import chunk_bounds, encode_long, encode_pieces
from encodec_fast.testing import make_signal
from encodec_fast.tokenize import read_codes, tokenize
from encodec_fast.tokenize.loading import load_item, stream_item
from encodec_fast.tokenize.sources import Item


def long_signal(sr: int, num_samples: int, channels: int, seed: int) -> torch.Tensor:
    """A long real-like signal, cheaply: 7.3 s of `make_signal` repeated under a slow gain."""
    base = make_signal(sr, int(sr * 7.3), channels, seed=seed)
    x = base.repeat(1, -(-num_samples // base.shape[-1]))[:, :num_samples]
    gain = 0.6 + 0.4 * torch.sin(torch.arange(num_samples, dtype=torch.float64) * (2 * math.pi / (sr * 23.0)))
    return (x * gain.float()).contiguous()


def pieces_of(x: torch.Tensor, sizes) -> list:
    out, a, i = [], 0, 0
    while a < x.shape[-1]:
        n = sizes[i % len(sizes)]
        out.append(x[..., a:a + n])
        a, i = a + n, i + 1
    return out


@pytest.mark.parametrize("sr, target, channels, seconds", [
    (44100, 24000, 1, 330.0),   # 30,000-frame calls of 147 samples: 4 calls
    (48000, 24000, 1, 260.0),   # 2,000,000-frame calls of 2 samples: 3 calls
    (16000, 24000, 2, 290.0),   # 666,667-frame calls of 2 samples, stereo: 3 calls
    (22050, 48000, 2, 610.0),   # 30,000-frame calls of 147 samples, stereo: 3 calls
    (44100, 24000, 1, None),    # output past 2**24 samples, where torchaudio's float32 length rule bites
])
def test_streaming_resampler_equals_one_call(sr, target, channels, seconds):
    if seconds is None:  # the first length past 31e6 whose output length float32 rounding shortens
        length = next(n for n in range(31_000_000, 31_001_000)
                      if math.ceil(np.float32(n * 80 / 147)) != math.ceil(n * 80 / 147))
    else:
        length = int(sr * seconds) + 7
    x = long_signal(sr, length, channels, seed=length % 1000)
    ref = convert_audio(x, sr, target, channels)
    assert ref.shape[-1] == resampled_length(length, sr, target)
    stream = StreamingResampler(sr, target, length)
    outs = [stream.push(p) for p in pieces_of(x, [sr * 9 + 1, 1, 12345, sr * 31])] + [stream.finish()]
    assert sum(o.shape[-1] > 0 for o in outs) >= 2  # output came out before the end
    got = torch.cat(outs, dim=-1)
    assert got.shape == ref.shape and torch.equal(got, ref)
    if seconds is None:
        assert ref.shape[-1] == math.ceil(length * target / sr) - 1


def test_streaming_resampler_refuses_a_wrong_length():
    stream = StreamingResampler(16000, 24000, 100)
    stream.push(torch.ones(1, 60))
    with pytest.raises(ValueError, match="announced"):
        stream.push(torch.ones(1, 41))
    with pytest.raises(ValueError, match="announced"):
        stream.finish()


@pytest.mark.parametrize("sr, channels, model_channels, span", [
    (48000, 5, 1, (1.3, 17.9)),   # the mean of 5 channels, block by block; resampled
    (24000, 1, 1, (None, None)),  # no conversion at all
    (16000, 1, 2, (2.0, None)),   # mono duplicated for the stereo model, resampled to 48 kHz
    (44100, 2, 2, (None, 19.0)),
])
def test_stream_item_equals_load_item(tmp_path, sr, channels, model_channels, span):
    path = tmp_path / "a.flac"
    sf.write(str(path), make_signal(sr, int(sr * 20.3), channels, seed=channels).numpy().T, sr)
    item = Item("a", str(path), *span)
    rate = 24000 if model_channels == 1 else 48000
    whole, source_rate, source_channels, length = load_item(item, rate, model_channels)
    assert (source_rate, source_channels, length) == (sr, channels, whole.shape[-1])
    pieces = list(stream_item(item, rate, model_channels, block_seconds=3.1))
    assert len(pieces) >= 5 or sr != rate  # read block by block (resampled output comes at the end)
    got = torch.cat(pieces, dim=-1)
    assert got.shape == whole.shape and torch.equal(got, whole)
    assert load_item(item, rate, model_channels, long_after=length - 1)[0] is None  # too long: nothing decoded


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
             stream_seconds=4.0, quiet=True)
    (row,) = read_codes(tmp_path / "out")
    data, sr = sf.read(str(tmp_path / "long.flac"), dtype="float32", always_2d=True)
    from encodec_fast.audio import convert_audio
    x = convert_audio(torch.from_numpy(data.T.copy()), sr, 24000, 1)
    ours.set_target_bandwidth(6.0)
    (ref, _), = ours.encode(x[None])
    assert np.array_equal(row["codes"], ref[0].numpy())


def test_encode_pieces_checks_the_announced_length(pair_24):
    _, ours = pair_24
    x = make_signal(24000, 24000 * 5, 1, seed=14)[None]
    ref = ours.encode(x)
    got = encode_pieces(ours, pieces_of(x, [7001, 24000 * 2]), x.shape[-1], chunk_seconds=2.0)
    assert torch.equal(got[0][0], ref[0][0])
    with pytest.raises(ValueError, match="ended after"):
        encode_pieces(ours, pieces_of(x[..., :-5], [24000]), x.shape[-1], chunk_seconds=2.0)
    with pytest.raises(ValueError, match="more than"):
        encode_pieces(ours, pieces_of(x, [24000]), x.shape[-1] - 5, chunk_seconds=2.0)


def test_long_inputs_that_go_bad_midway_are_errors(tmp_path, pair_24):
    """A NaN 6 s into a streamed file, a FLAC cut in half: each an error line, no row, the job goes on."""
    _, ours = pair_24
    wav = make_signal(16000, 16000 * 9, 1, seed=15).numpy().T.copy()
    wav[16000 * 6 + 5] = np.nan
    sf.write(str(tmp_path / "nan.wav"), wav, 16000, subtype="FLOAT")
    sf.write(str(tmp_path / "cut.flac"), make_signal(16000, 16000 * 9, 1, seed=16).numpy().T, 16000)
    data = (tmp_path / "cut.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[: len(data) // 2])
    sf.write(str(tmp_path / "ok.wav"), make_signal(16000, 16000 * 9, 1, seed=17).numpy().T, 16000)
    summary = tokenize([tmp_path], tmp_path / "out", model=ours, bandwidth=6.0, workers=1, chunk_seconds=2.0,
                       stream_seconds=4.0, quiet=True)
    assert (summary.tokenized, summary.failed) == (1, 2)
    errors = {e["id"]: e["error"] for e in map(json.loads,
                                               (tmp_path / "out" / "_errors.jsonl").read_text().splitlines())}
    assert "NaN or infinite" in errors["nan.wav"] and "unreadable audio" in errors["cut.flac"]
    assert [r["id"] for r in read_codes(tmp_path / "out")] == ["ok.wav"]
