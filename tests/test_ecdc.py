"""`.ecdc` files: bytes identical to upstream's, decodable both ways, and bad files rejected."""

import importlib
import io
import random
import struct

import encodec.binary
import pytest
import torch

import encodec_fast
from encodec_fast import ecdc
from encodec_fast.testing import make_signal, rel_err

upc = importlib.import_module("encodec.compress")  # `encodec.compress` is the function


@pytest.mark.parametrize("bits", [1, 3, 8, 10, 13])
def test_pack_codes_matches_upstream_bitpacker(bits):
    rng = random.Random(bits)
    for K, T in [(1, 1), (2, 7), (8, 151), (32, 3)]:
        codes = torch.randint(0, 2 ** bits, (K, T), generator=torch.Generator().manual_seed(K * T))
        buf = io.BytesIO()
        packer = encodec.binary.BitPacker(bits, buf)
        for t in range(T):
            for k in range(K):
                packer.push(int(codes[k, t]))
        packer.flush()
        assert ecdc.pack_codes(codes.numpy(), bits) == buf.getvalue()
        back = ecdc.unpack_codes(buf.getvalue(), K, T, bits)
        assert (back == codes.numpy()).all()
    assert rng  # seeded for reproducibility of the case list


def test_bitpacker_api_round_trip():
    buf = io.BytesIO()
    p = ecdc.BitPacker(10, buf)
    for v in (1, 2, 1023):
        p.push(v)
    p.flush()
    assert buf.getvalue() == bytes([0x01, 0x08, 0xF0, 0x3F])
    buf.seek(0)
    u = ecdc.BitUnpacker(10, buf)
    assert [u.pull(), u.pull(), u.pull()] == [1, 2, 1023]


@pytest.mark.parametrize("name,bandwidth,length", [
    ("24khz", 1.5, 48077), ("24khz", 6.0, 24000), ("24khz", 24.0, 53760), ("24khz", 3.0, 1),
    ("48khz", 3.0, 68000), ("48khz", 12.0, 48000), ("48khz", 24.0, 777)])
def test_bytes_identical_and_cross_decodable(name, bandwidth, length, request, monkeypatch):
    up, ours = request.getfixturevalue(f"pair_{name[:2]}")
    up.set_target_bandwidth(bandwidth)
    ours.set_target_bandwidth(bandwidth)
    wav = make_signal(ours.sample_rate, length, ours.channels, seed=length)
    ref = upc.compress(up, wav, use_lm=False)
    data = encodec_fast.compress(ours, wav, use_lm=False)
    assert data == ref
    # ours reads upstream's file
    out, sr = encodec_fast.decompress(ref, model=ours)
    # upstream reads ours (its decompress builds the model by name: hand it ours' weights)
    monkeypatch.setitem(upc.MODELS, f"encodec_{name}", lambda: up)
    if length != 53760:  # encodec 0.1.1 miscounts the frames of this length (upstream issue #35)
        up_out, up_sr = upc.decompress(data)
        assert sr == up_sr and out.shape == up_out.shape == wav.shape
        assert rel_err(out, up_out) <= 1e-5
    assert out.shape == wav.shape


def test_length_upstream_0_1_1_cannot_decode(pair_24, monkeypatch):
    """Upstream 0.1.1 computes the frame count in floats and fails on 53760 samples; we don't."""
    up, ours = pair_24
    ours.set_target_bandwidth(6)
    wav = make_signal(24000, 53760, 1)
    data = encodec_fast.compress(ours, wav)
    monkeypatch.setitem(upc.MODELS, "encodec_24khz", lambda: up)
    with pytest.raises(EOFError):
        upc.decompress(data)
    out, _ = encodec_fast.decompress(data, model=ours)
    assert out.shape == wav.shape


def test_file_object_variants(pair_48, tmp_path):
    _, ours = pair_48
    ours.set_target_bandwidth(6)
    wav = make_signal(48000, 50000, 2)
    path = tmp_path / "x.ecdc"
    with open(path, "wb") as f:
        encodec_fast.compress_to_file(ours, wav, f, use_lm=False)
    with open(path, "rb") as f:
        out, sr = encodec_fast.decompress_from_file(f, model=ours)
    assert sr == 48000 and out.shape == wav.shape
    assert path.read_bytes() == encodec_fast.compress(ours, wav)


@pytest.fixture(scope="module")
def good_file(pair_48):
    _, ours = pair_48
    ours.set_target_bandwidth(6)
    return encodec_fast.compress(ours, make_signal(48000, 60000, 2, seed=3))


def test_truncated_files_raise_eof(good_file, pair_48):
    _, ours = pair_48
    for cut in [0, 3, 8, 20, len(good_file) - 1, len(good_file) - 200]:
        with pytest.raises(EOFError):
            encodec_fast.decompress(good_file[:cut], model=ours)


def test_corrupt_files_raise_value_error(good_file, pair_48, pair_24):
    _, ours = pair_48
    bad = [b"RIFF" + good_file[4:], good_file[:4] + b"\x01" + good_file[5:],
           good_file[:5] + struct.pack("!I", 10 ** 9) + good_file[9:]]
    meta_len = struct.unpack("!I", good_file[5:9])[0]
    for new_meta in [b"{not json", b"[1, 2]", b'{"m": "encodec_48khz", "al": -5, "nc": 4, "lm": false}',
                     b'{"m": "other", "al": 5, "nc": 4, "lm": false}',
                     b'{"m": "encodec_48khz", "al": 5, "nc": 99, "lm": false}',
                     b'{"m": "encodec_48khz", "al": 5.5, "nc": 4, "lm": false}',
                     b'{"m": "encodec_48khz", "nc": 4, "lm": false}']:
        bad.append(good_file[:5] + struct.pack("!I", len(new_meta)) + new_meta + good_file[9 + meta_len:])
    # a NaN segment scale
    body = 9 + meta_len
    bad.append(good_file[:body] + struct.pack("!f", float("nan")) + good_file[body + 4:])
    for data in bad:
        with pytest.raises(ValueError):
            encodec_fast.decompress(data, model=ours)
    with pytest.raises(ValueError, match="Hz"):
        encodec_fast.decompress(good_file, model=pair_24[1])
    with pytest.raises(TypeError):
        encodec_fast.decompress("not bytes")


def test_random_garbage_never_hangs(good_file, pair_48):
    _, ours = pair_48
    gen = random.Random(0)
    for _ in range(30):
        data = bytearray(good_file)
        for _ in range(gen.randint(1, 20)):
            data[gen.randrange(len(data))] = gen.randrange(256)
        try:
            out, _ = encodec_fast.decompress(bytes(data), model=ours)
            assert torch.isfinite(out).all()
        except (ValueError, EOFError):
            pass


def test_bad_compress_inputs(pair_24):
    _, ours = pair_24
    wav = make_signal(24000, 1000, 1)
    with pytest.raises(ValueError, match="single waveform"):
        encodec_fast.compress(ours, wav[None])
    bad = wav.clone()
    bad[0, 10] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        encodec_fast.compress(ours, bad)
    unnamed = encodec_fast.EncodecModel.encodec_model_24khz(pretrained=False)
    with pytest.raises(ValueError, match="not supported"):
        encodec_fast.compress(unnamed, wav)
