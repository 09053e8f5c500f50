"""LM-coded `.ecdc` files against upstream encodec 0.1.1 (random LM weights, injected where
upstream would download them), the cached LM step against upstream's step, the CRC, bad data,
and the command's --lm."""

import importlib
import io
import json
import struct

import encodec
import pytest
import torch
from torch.nn import functional as F

import encodec_fast
from encodec_fast import ecdc
from encodec_fast.lm import LMStream, lm_threads
from encodec_fast.testing import lm_pair, make_signal, rel_err

upc = importlib.import_module("encodec.compress")  # `encodec.compress` is the function
ours_compress = importlib.import_module("encodec_fast.compress")  # likewise


@pytest.fixture(scope="module")
def lms_24():
    return lm_pair(32, 262, seed=5)


@pytest.fixture(scope="module")
def lms_48():
    return lm_pair(16, 525, seed=6)


def split_header(data: bytes):
    (length,) = struct.unpack("!I", data[5:9])
    return json.loads(data[9:9 + length]), data[9 + length:]


def with_lms(monkeypatch, name, up, ours, up_lm, our_lm):
    monkeypatch.setattr(up, "get_lm_model", lambda: up_lm, raising=False)
    monkeypatch.setattr(ours, "get_lm_model", lambda *a, **k: our_lm, raising=False)
    monkeypatch.setitem(upc.MODELS, name, lambda: up)


@pytest.mark.parametrize("name,bandwidth,seconds", [("24khz", 6.0, 4.0), ("48khz", 3.0, 2.5)])
def test_lm_files_byte_identical_and_cross_decodable(name, bandwidth, seconds, request, monkeypatch):
    """4 s at 24 kHz is 300 frames: the LM's window (262) fills and slides. 2.5 s at 48 kHz is
    three segments, each coded with a fresh LM state, back to back."""
    up, ours = request.getfixturevalue(f"pair_{name[:2]}")
    up_lm, our_lm = request.getfixturevalue(f"lms_{name[:2]}")
    with_lms(monkeypatch, f"encodec_{name}", up, ours, up_lm, our_lm)
    up.set_target_bandwidth(bandwidth)
    ours.set_target_bandwidth(bandwidth)
    wav = make_signal(ours.sample_rate, int(seconds * ours.sample_rate), ours.channels, seed=3)
    # One thread for both whole runs: upstream's own tests run that way, and upstream's encoder
    # itself gives a few other codes on another thread count (4 of 2400 here), as its LM does.
    with lm_threads(1):
        ref = upc.compress(up, wav, use_lm=True)
        plain = encodec_fast.compress(ours, wav, use_lm=True, checksum=False)
        checked = encodec_fast.compress(ours, wav, use_lm=True)
        plain_file = encodec_fast.compress(ours, wav)
    assert plain == ref
    meta, payload = split_header(checked)
    ref_meta, ref_payload = split_header(ref)
    assert payload == ref_payload and {k: v for k, v in meta.items() if k != "crc"} == ref_meta
    assert isinstance(meta["crc"], int)
    # Both sides decode both files to the same audio as the plain (non-LM) file.
    with lm_threads(1):
        expected, _ = encodec_fast.decompress(plain_file, model=ours)
    for data in (ref, checked):
        out, sr = encodec_fast.decompress(data, model=ours)
        # The same codes (the CRC checks them); the audio differs only by the decoder's numerics:
        # `expected` ran on one thread, segment by segment through the streaming decoder.
        assert sr == ours.sample_rate and out.shape == wav.shape and rel_err(out, expected) <= 1e-5
        with lm_threads(1):
            up_out, _ = upc.decompress(data)
        assert rel_err(up_out, expected) <= 1e-5


def test_cached_lm_step_equals_upstream_step_bit_for_bit(lms_24):
    """LMStream against upstream's LM called one frame at a time, over 300 frames (the window of
    262 fills and slides) at 24 kbps (32 codebooks)."""
    up, ours = lms_24
    codes = torch.randint(0, 1024, (1, 32, 300), generator=torch.Generator().manual_seed(0))
    with lm_threads(1), torch.no_grad():
        stream = LMStream(ours)
        states, offset = None, 0
        inputs = torch.zeros(1, 32, 1, dtype=torch.long)
        for t in range(codes.shape[-1]):
            ref, states, offset = up(inputs, states, offset)
            got = stream.step(inputs)
            assert torch.equal(got, ref), f"frame {t}"
            inputs = 1 + codes[:, :, t:t + 1]


@pytest.mark.parametrize("K,chunks,norm_first,past", [(6, [60], False, 40), (1, [1, 2, 31, 1, 40, 15], False, 40),
                                                      (2, [33, 1, 1, 50], False, 40), (32, [90], False, 40),
                                                      (8, [45, 45], True, 40), (3, [10, 40], False, 20)])
def test_encoder_order_gives_the_decoder_steps_bits(K, chunks, norm_first, past):
    """`run_known` / `run_inputs` (the encoder's order: layer by layer over chunks of known
    frames, row-wise products batched) against `step` (the decoder's frame-by-frame order): the
    same probabilities, bit for bit, past a full window, for chunks of any size (a chunk of one
    frame included), every codebook count, a pre-norm variant of the layers, and a window (20)
    shorter than the block of exact rows (32), where every frame projects its whole window."""
    torch.manual_seed(9)
    ours = encodec_fast.LMModel(32, 1024, num_layers=5, dim=200, past_context=past,
                                  norm_first=norm_first).eval()
    T = sum(chunks)  # a short window so that it slides within T frames
    codes = torch.randint(0, 1024, (1, K, T), generator=torch.Generator().manual_seed(K))
    inputs = torch.cat([torch.zeros_like(codes[..., :1]), 1 + codes[..., :-1]], dim=2)
    with lm_threads(1):
        known = LMStream(ours)
        parts, start = [], 0
        for c in chunks:
            parts.append(known.run_inputs(inputs[..., start:start + c]))
            start += c
        got = torch.cat(parts)
        assert torch.equal(got, LMStream(ours).run_known(codes))
        stream = LMStream(ours)
        for t in range(T):
            assert torch.equal(stream.step(inputs[..., t:t + 1])[..., 0], got[t]), f"frame {t}"


def test_encoder_falls_back_to_steps_where_batched_products_differ(monkeypatch):
    """On a machine whose batched products give other bits (simulated: rows of several frames in
    one product), the check fails once, warns, and the encoder runs `step`, projecting every
    window whole as upstream does: the same bits as upstream's LM."""
    lm_module = importlib.import_module("encodec_fast.lm")
    monkeypatch.setattr(lm_module, "_rowwise_linear", lambda x, w, b: F.linear(x, w, b))
    monkeypatch.setattr(lm_module, "_product_checks", {})
    torch.manual_seed(3)
    up = encodec.model.LMModel(4, 1024, num_layers=2, dim=200, past_context=40).eval()
    ours = encodec_fast.LMModel(4, 1024, num_layers=2, dim=200, past_context=40).eval()
    ours.load_state_dict(up.state_dict())
    codes = torch.randint(0, 1024, (1, 4, 50), generator=torch.Generator().manual_seed(2))
    with lm_threads(1), torch.no_grad():
        with pytest.warns(RuntimeWarning, match="frame by frame"):
            stream = LMStream(ours)
        assert stream.exact_rows == 41
        got = stream.run_known(codes)
        states, offset = None, 0
        inputs = torch.zeros(1, 4, 1, dtype=torch.long)
        for t in range(codes.shape[-1]):
            ref, states, offset = up(inputs, states, offset)
            assert torch.equal(ref[..., 0], got[t]), f"frame {t}"
            inputs = 1 + codes[:, :, t:t + 1]
    assert list(lm_module._product_checks.values()) == [False]


def test_files_decode_on_another_thread_count(pair_24, lms_24, monkeypatch):
    """The LM always runs on one thread: a file written with the process on 2 threads decodes
    with the process on 1 and the other way round, the checksum confirming the codes. (The
    files themselves may differ: the SEANet encoder's codes depend on the thread count too, in
    upstream as here; that changes what is coded, not whether it decodes.)"""
    up, ours = pair_24
    with_lms(monkeypatch, "encodec_24khz", up, ours, *lms_24)
    ours.set_target_bandwidth(3.0)
    wav = make_signal(24000, 36000, 1, seed=4)
    old = torch.get_num_threads()
    files = {}
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            files[threads] = (encodec_fast.compress(ours, wav, use_lm=True), encodec_fast.compress(ours, wav))
        for threads, other in ((1, 2), (2, 1)):
            torch.set_num_threads(threads)
            lm_file, plain_file = files[other]
            out, _ = encodec_fast.decompress(lm_file, model=ours)  # raises if the checksum fails
            expected, _ = encodec_fast.decompress(plain_file, model=ours)
            assert rel_err(out, expected) <= 1e-6
    finally:
        torch.set_num_threads(old)


def test_crc_catches_a_decode_with_other_lm_numerics(pair_24, lms_24, monkeypatch):
    """What a non-portable LM does to a file (here: other LM weights): with the checksum the
    decode raises; upstream's files (no checksum) decode to wrong codes or fail in the coder."""
    up, ours = pair_24
    with_lms(monkeypatch, "encodec_24khz", up, ours, *lms_24)
    ours.set_target_bandwidth(6.0)
    wav = make_signal(24000, 24000, 1, seed=5)
    data = encodec_fast.compress(ours, wav, use_lm=True)
    _, other = lm_pair(32, 262, seed=77)
    monkeypatch.setattr(ours, "get_lm_model", lambda *a, **k: other)
    with pytest.raises((ValueError, EOFError)) as info:
        encodec_fast.decompress(data, model=ours)
    assert isinstance(info.value, EOFError) or "checksum" in str(info.value) or "corrupt" in str(info.value)


def test_truncated_and_corrupt_lm_files(pair_24, lms_24, monkeypatch):
    up, ours = pair_24
    with_lms(monkeypatch, "encodec_24khz", up, ours, *lms_24)
    ours.set_target_bandwidth(6.0)
    data = encodec_fast.compress(ours, make_signal(24000, 12000, 1, seed=6), use_lm=True)
    for cut in (len(data) - 1, len(data) // 2, 70):
        with pytest.raises(EOFError):
            encodec_fast.decompress(data[:cut], model=ours)
    for pos in range(len(data) - 40, len(data), 7):  # payload bytes flipped: the CRC or the coder says so
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        with pytest.raises((ValueError, EOFError)):
            encodec_fast.decompress(bytes(bad), model=ours)
    meta, payload = split_header(data)
    meta["crc"] = "not a number"
    header = io.BytesIO()
    ecdc.write_ecdc_header(header, meta)
    with pytest.raises(ValueError, match="crc"):
        encodec_fast.decompress(header.getvalue() + payload, model=ours)
    # A header announcing absurdly more audio than the payload can hold: refused before decoding
    # (no LM run until the data ends, no allocation for 2**40 samples); a merely longer one runs
    # out of data.
    # (past a week of audio, the header itself is refused)
    for length, error, match in ((2 ** 40, ValueError, "audio length"), (2 ** 34, ValueError, "can hold at most"),
                                 (24000, EOFError, "sooner than expected")):
        meta, payload = split_header(data)
        meta["al"] = length
        header = io.BytesIO()
        ecdc.write_ecdc_header(header, meta)
        with pytest.raises(error, match=match):
            encodec_fast.decompress(header.getvalue() + payload, model=ours)


def test_codes_crc_is_order_and_value_sensitive():
    a = torch.randint(0, 1024, (8, 20))
    b = a.clone()
    b[3, 7] ^= 1
    assert ours_compress.codes_crc([a]) != ours_compress.codes_crc([b])
    assert ours_compress.codes_crc([a, b]) != ours_compress.codes_crc([b, a])


def test_command_lm_round_trip(tmp_path, checkpoint_24, lms_24):
    """encodec-fast --lm with a local LM checkpoint: compress, then decompress the LM file."""
    from encodec_fast import audio
    from test_cli import run  # the command tests' subprocess helper
    lm_path = tmp_path / "lm.th"
    torch.save(lms_24[1].state_dict(), lm_path)
    wav_path = tmp_path / "in.wav"
    audio.save_audio(make_signal(24000, 24000, 1, seed=8), wav_path, 24000)
    out = tmp_path / "in.ecdc"
    proc = run(wav_path, out, "--lm", "--checkpoint", checkpoint_24, "--lm-checkpoint", lm_path)
    assert proc.returncode == 0, proc.stderr
    meta, _ = split_header(out.read_bytes())
    assert meta["lm"] is True and "crc" in meta
    back = tmp_path / "back.wav"
    proc = run(out, back, "--checkpoint", checkpoint_24, "--lm-checkpoint", lm_path)
    assert proc.returncode == 0, proc.stderr
    assert back.exists()
