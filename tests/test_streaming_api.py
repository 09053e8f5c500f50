"""The public streaming API (`StreamingEncoder`, `StreamingDecoder`), `.ecdc` files through it
(`compress_iter`, `decompress_iter`), the command on a long file under a memory limit, and a
bounded fuzz of the `.ecdc` reader."""

import importlib
import io
import json
import os
import random
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf
import torch

import encodec_fast
from encodec_fast import model as model_module
from encodec_fast.compress import compress_iter, decompress_iter
from encodec_fast.lm import lm_threads
from encodec_fast.streaming import StreamingDecoder, StreamingEncoder
from encodec_fast.testing import lm_pair, make_signal, rel_err
from test_lm_coding import split_header, with_lms

upc = importlib.import_module("encodec.compress")


def random_sizes(total: int, seed: int, small: bool) -> list:
    """Chunk sizes summing to `total`: 1-sample and odd sizes mixed with large ones."""
    gen = random.Random(seed)
    sizes, left = [], total
    while left > 0:
        n = gen.choice([1, 2, 7, 319, 321, 4801]) if small else gen.choice([1, 333, 9_999, 24_001, 70_000])
        n = min(n, left)
        sizes.append(n)
        left -= n
    return sizes


def push_all(stream, x: torch.Tensor, sizes) -> list:
    outs, a = [], 0
    for n in sizes:
        outs.append(stream.push(x[:, a:a + n]))
        a += n
    return outs


@pytest.mark.parametrize("bandwidth, seconds, chunking", [
    (1.5, 3.37, "large"), (6.0, 2.51, "small"), (24.0, 3.0, "whole"), (12.0, 0.01, "small")])
def test_streaming_encoder_24khz_equals_whole_file_codes_bit_for_bit(pair_24, bandwidth, seconds, chunking):
    _, ours = pair_24
    ours.set_target_bandwidth(bandwidth)
    x = make_signal(24000, int(24000 * seconds), 1, seed=int(seconds * 100))
    (ref, _), = ours.encode(x[None])
    sizes = [x.shape[-1]] if chunking == "whole" else random_sizes(x.shape[-1], 7, chunking == "small")
    enc = StreamingEncoder(ours, bandwidth)
    outs = push_all(enc, x, sizes) + [enc.flush()]
    got = torch.cat(outs, dim=-1)
    assert torch.equal(got, ref[0])
    if seconds > 2.5:  # codes came out before the end, at most `latency_samples` after their audio
        assert sum(o.shape[-1] for o in outs[:-1]) > 0
    with pytest.raises(RuntimeError):
        enc.push(x[:, :10])


@pytest.mark.parametrize("arch, sizes", [("small", [24_000] * 5 + [7_123]), ("small", [4_801] * 30),
                                         ("24khz", [4_801] * 30), ("small", [1] * 300 + [60_000]),
                                         ("small", [50_000, 1_600])])
def test_exact_streaming_encoder_gives_the_whole_file_embeddings_bit_for_bit(pair_24, monkeypatch, arch, sizes):
    """Stronger than equal codes: the encoder's output of every call, joined, equals
    `model.encoder` of the whole signal bit for bit (a 1e-7 difference flips a code only at a
    near-tie). The small model's last convolution (128 channels) runs short calls on another
    path than oneDNN unless they are padded (75-frame calls differed); unaligned calls gave
    the ELUs' scalar tails (4801-sample pushes differed); a signal just under `min_split`
    (51,520 samples for the small model) is one call, as the whole file."""
    from encodec_fast import streaming
    model = encodec_fast.EncodecModel.encodec_model_24khz_small() if arch == "small" else pair_24[1]
    x = make_signal(24000, sum(sizes), 1, seed=len(sizes))
    embs = []
    real = streaming._codes_of
    monkeypatch.setattr(streaming, "_codes_of", lambda m, emb, bw: (embs.append(emb.clone()), real(m, emb, bw))[1])
    enc = StreamingEncoder(model, 24.0 if arch == "small" else 6.0)
    push_all(enc, x, sizes)
    enc.flush()
    with torch.no_grad():
        whole = model.encoder(x[None])
    got = torch.cat(embs, dim=-1)
    assert got.shape == whole.shape and torch.equal(got, whole), (got - whole).abs().max()


def test_low_latency_mode_gives_each_frame_at_once_and_agrees_with_the_whole_file(pair_24):
    _, ours = pair_24
    ours.set_target_bandwidth(6.0)
    x = make_signal(24000, 24000 * 2, 1, seed=4)
    (ref, _), = ours.encode(x[None])
    enc = StreamingEncoder(ours, exact=False)
    assert enc.latency_samples == 0
    # 40 samples at a time: the first 7 frames come with sample 2240 (the last convolution's
    # reflect padding at the start reads 7 frames), then each frame with its last sample
    out_at = {}
    for a in range(0, 4000, 40):
        n = enc.push(x[:, a:a + 40]).shape[-1]
        if n:
            out_at[a + 40] = n
    assert out_at == {2240: 7, **{320 * f: 1 for f in range(8, 13)}}
    enc = StreamingEncoder(ours, exact=False)
    parts = [enc.push(x[:, a:a + 480]) for a in range(0, x.shape[-1], 480)]
    tail = enc.flush()
    codes = torch.cat(parts + [tail], dim=-1)
    assert tail.shape[-1] <= 1 and codes.shape == ref[0].shape
    assert (codes == ref[0]).float().mean() >= 0.99  # measured per chunk size by the `streaming` benchmark


@pytest.mark.parametrize("bandwidth, seconds, chunking, stacked", [(3.0, 2.73, "large", False),
                                                                  (24.0, 1.0, "small", False),
                                                                  (12.0, 0.4, "whole", False),
                                                                  (6.0, 4.1, "large", True)])
def test_streaming_encoder_48khz_segments_equal_whole_file(pair_48, bandwidth, seconds, chunking, stacked,
                                                          monkeypatch):
    _, ours = pair_48
    ours.set_target_bandwidth(bandwidth)
    if stacked:  # segments stacked into one encoder / decoder call, as on CUDA (both sides)
        monkeypatch.setattr(model_module, "BATCH_ON_CPU", True)
    x = make_signal(48000, int(48000 * seconds), 2, seed=5)
    ref = ours.encode(x[None])
    sizes = [x.shape[-1]] if chunking == "whole" else random_sizes(x.shape[-1], 3, chunking == "small")
    enc = StreamingEncoder(ours, bandwidth)
    segments = [s for out in push_all(enc, x, sizes) + [enc.flush()] for s in out]
    assert len(segments) == len(ref)
    for (codes, scale), (rc, rs) in zip(segments, ref):
        assert torch.equal(codes, rc[0]) and torch.equal(scale, rs[0])
    whole = ours.decode(ref)[0, :, :x.shape[-1]]
    dec = StreamingDecoder(ours, length=x.shape[-1])
    audio = torch.cat([dec.push(c, s) for c, s in segments] + [dec.flush()], dim=-1)
    assert audio.shape == whole.shape and rel_err(audio, whole) <= 1e-5
    if len(segments) > 1:
        assert dec.latency_samples == 480
    # several segments per call (as decompress reads them): the same samples
    grouped = StreamingDecoder(ours, length=x.shape[-1])
    outs, a = [], 0
    for n in [2, 1, 3] * len(segments):
        if a >= len(segments):
            break
        outs.append(grouped.push_segments(segments[a:a + n]))
        a += n
    audio2 = torch.cat(outs + [grouped.flush()], dim=-1)
    assert audio2.shape == whole.shape and rel_err(audio2, whole) <= 1e-5


@pytest.mark.parametrize("frames", [[1], [3, 1, 8], [75], [1000]])
def test_streaming_decoder_24khz_equals_whole_decode(pair_24, frames):
    _, ours = pair_24
    ours.set_target_bandwidth(6.0)
    x = make_signal(24000, 24000 * 2 + 17, 1, seed=6)
    (codes, _), = ours.encode(x[None])
    whole = ours.decode([(codes, None)])[0]
    dec = StreamingDecoder(ours)
    outs, a, i = [], 0, 0
    while a < codes.shape[-1]:
        n = frames[i % len(frames)]
        outs.append(dec.push(codes[0, :, a:a + n]))
        a, i = a + n, i + 1
    outs.append(dec.flush())
    got = torch.cat(outs, dim=-1)
    assert got.shape == whole.shape and rel_err(got, whole) <= 1e-5
    if frames == [1]:  # causal: after the first 7 frames each frame gives its 320 samples at once
        assert [o.shape[-1] for o in outs[7:-1]] == [320] * (codes.shape[-1] - 7)


def test_streaming_bad_input_is_refused(pair_24, pair_48):
    _, ours = pair_24
    enc = StreamingEncoder(ours)
    for bad, error in ((torch.zeros(2, 100), ValueError), (torch.zeros(100), ValueError),
                       (torch.zeros(1, 10, dtype=torch.int16), TypeError),
                       (torch.full((1, 10), float("nan")), ValueError)):
        with pytest.raises(error):
            enc.push(bad)
    with pytest.raises(ValueError, match="bandwidth"):
        StreamingEncoder(ours, 5.0)
    with pytest.raises(ValueError, match="empty"):
        StreamingEncoder(ours).flush()
    dec = StreamingDecoder(ours)
    with pytest.raises(ValueError, match="codes must be in"):
        dec.push(torch.full((8, 3), 1024))
    with pytest.raises(ValueError, match="codebooks"):
        dec.push(torch.zeros(99, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="scale"):
        StreamingDecoder(pair_48[1]).push(torch.zeros(4, 150, dtype=torch.long))
    with pytest.raises(ValueError, match="segments"):
        dec.push_segments([(torch.zeros(8, 3, dtype=torch.long), None)])
    with pytest.raises(ValueError, match="codes must be in"):  # one bad segment among good ones
        StreamingDecoder(pair_48[1]).push_segments([(torch.zeros(4, 150, dtype=torch.long), torch.ones(1)),
                                                    (torch.full((4, 150), -1), torch.ones(1))])


# ---------------------------------------------------------------------------------------------
# .ecdc through the streaming path


@pytest.mark.parametrize("name, bandwidth, seconds, length_known", [
    ("24khz", 6.0, 3.1, True), ("24khz", 1.5, 2.2, False), ("48khz", 6.0, 2.3, True), ("48khz", 24.0, 1.1, False)])
def test_compress_iter_bytes_equal_upstream_and_decompress_iter_the_audio(name, bandwidth, seconds, length_known,
                                                                         request):
    up, ours = request.getfixturevalue(f"pair_{name[:2]}")
    up.set_target_bandwidth(bandwidth)
    ours.set_target_bandwidth(bandwidth)
    x = make_signal(ours.sample_rate, int(ours.sample_rate * seconds), ours.channels, seed=11)
    ref = upc.compress(up, x, use_lm=False)
    chunks = [x[:, a:a + n] for a, n in zip(np.cumsum([0] + random_sizes(x.shape[-1], 2, False))[:-1],
                                            random_sizes(x.shape[-1], 2, False))]
    pieces = list(compress_iter(ours, iter(chunks), x.shape[-1] if length_known else None))
    assert b"".join(pieces) == ref
    if length_known and name == "24khz":  # the header first, then the payload as it is made
        assert len(pieces) > 2 and pieces[0] == ref[:len(pieces[0])]
    stream = decompress_iter(io.BytesIO(ref), model=ours)
    assert (stream.sample_rate, stream.channels, stream.length) == (ours.sample_rate, ours.channels, x.shape[-1])
    audio = torch.cat(list(stream), dim=-1)
    whole = ours.decode(ours.encode(x[None]))[0, :, :x.shape[-1]]
    assert audio.shape == x.shape and rel_err(audio, whole) <= 1e-5


@pytest.mark.parametrize("name", ["24khz", "48khz"])
def test_lm_files_through_the_streaming_path_equal_upstream(name, request, monkeypatch):
    up, ours = request.getfixturevalue(f"pair_{name[:2]}")
    up_lm, our_lm = lm_pair(32 if name == "24khz" else 16, 262 if name == "24khz" else 525, seed=5)
    with_lms(monkeypatch, f"encodec_{name}", up, ours, up_lm, our_lm)
    up.set_target_bandwidth(6.0)
    ours.set_target_bandwidth(6.0)
    seconds = 4.5 if name == "24khz" else 1.5  # 24 kHz: 337 frames, over one LM chunk of 256
    x = make_signal(ours.sample_rate, int(ours.sample_rate * seconds), ours.channels, seed=12)
    with lm_threads(1):
        ref = upc.compress(up, x, use_lm=True)
        chunks = [x[:, a:a + 9_999] for a in range(0, x.shape[-1], 9_999)]
        plain = b"".join(compress_iter(ours, iter(chunks), x.shape[-1], use_lm=True, checksum=False))
        checked = b"".join(compress_iter(ours, iter(chunks), None, use_lm=True))
    assert plain == ref
    meta, payload = split_header(checked)
    assert payload == split_header(ref)[1] and "crc" in meta
    out = torch.cat(list(decompress_iter(io.BytesIO(checked), model=ours)), dim=-1)
    expected, _ = encodec_fast.decompress(encodec_fast.compress(ours, x), model=ours)
    assert out.shape == x.shape and rel_err(out, expected) <= 1e-5


def test_truncated_and_mislabelled_streams(pair_24):
    _, ours = pair_24
    ours.set_target_bandwidth(6.0)
    x = make_signal(24000, 24000 * 3, 1, seed=13)
    data = encodec_fast.compress(ours, x)
    for cut in (len(data) - 1, len(data) // 2, 40):
        with pytest.raises(EOFError, match="truncated"):
            list(decompress_iter(io.BytesIO(data[:cut]), model=ours))
    with pytest.raises(ValueError, match="announced"):
        list(compress_iter(ours, iter([x]), x.shape[-1] + 5))
    with pytest.raises(ValueError, match="announced"):
        list(compress_iter(ours, iter([x]), x.shape[-1] - 5))
    with pytest.raises(ValueError, match="channel"):
        list(compress_iter(ours, iter([torch.zeros(2, 100)])))


# ---------------------------------------------------------------------------------------------
# The command on a long file, in bounded memory

CHILD = textwrap.dedent("""
    import resource, sys
    import torch, encodec_fast, encodec_fast.cli, encodec_fast.compress, encodec_fast.streaming
    import encodec_fast.tokenize.loading
    # The address space the imports took, plus a budget: whole-file processing of the test file
    # needs several GB more, the streaming path a few hundred MB.
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    budget = int(float(sys.argv[1]) * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (vm + budget, vm + budget))
    status = encodec_fast.cli.main(sys.argv[2:])
    print("maxrss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)
    sys.exit(status)
""")


def run_limited(budget_gb: float, *args):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-c", CHILD, str(budget_gb), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=900)


@pytest.mark.slow
def test_the_command_on_a_long_file_runs_in_bounded_memory(tmp_path, checkpoint_24):
    """2 minutes at 44.1 kHz stereo in, 24 kHz mono codes: whole-file encoding takes about 3 GB
    (upstream 7.1 GB at 5 min), so a 2 GB budget over the imports fails a regression to it."""
    seconds = 120
    src = make_signal(44100, int(44100 * 7.3), 2, seed=14).numpy()
    path = tmp_path / "long.flac"
    with sf.SoundFile(str(path), "w", 44100, 2, subtype="PCM_16") as f:
        for _ in range(int(seconds / 7.3) + 1):
            f.write(src.T)
    ecdc_path, wav_path = tmp_path / "long.ecdc", tmp_path / "long_out.wav"
    proc = run_limited(2.0, path, ecdc_path, "--checkpoint", checkpoint_24, "-b", "6")
    assert proc.returncode == 0, proc.stderr
    proc = run_limited(2.0, ecdc_path, wav_path, "--checkpoint", checkpoint_24)
    assert proc.returncode == 0, proc.stderr
    info = sf.info(str(wav_path))
    frames = sf.info(str(path)).frames
    assert info.samplerate == 24000 and info.channels == 1 and info.frames == -(-frames * 24000 // 44100)
    # the header states the resampled length and 6 kbps' 8 codebooks (bytes against the library
    # and upstream: the tests above, on shorter signals)
    head = ecdc_path.read_bytes()
    meta = json.loads(head[9:9 + struct.unpack("!I", head[5:9])[0]])
    assert meta["al"] == info.frames and meta["nc"] == 8
    # a corrupt file leaves the earlier output untouched
    before = wav_path.read_bytes()
    (tmp_path / "cut.ecdc").write_bytes(head[:len(head) // 2])
    proc = run_limited(2.0, tmp_path / "cut.ecdc", wav_path, "--checkpoint", checkpoint_24, "-f")
    assert proc.returncode == 1 and "truncated" in proc.stderr
    assert wav_path.read_bytes() == before and not list(tmp_path.glob(".*part*"))


@pytest.mark.slow
def test_the_command_reads_stdin_and_writes_stdout(tmp_path, checkpoint_24, pair_24):
    x = make_signal(24000, 24000 * 2, 1, seed=15)
    path = tmp_path / "a.wav"
    encodec_fast.save_audio(x, path, 24000)
    args = [sys.executable, "-m", "encodec_fast"]
    data = subprocess.run(args + ["-", "-", "--checkpoint", str(checkpoint_24)], input=path.read_bytes(),
                          capture_output=True, timeout=600)
    assert data.returncode == 0, data.stderr
    _, ours = pair_24
    ours.set_target_bandwidth(6.0)
    wav, _ = encodec_fast.read_audio(path)
    assert data.stdout == encodec_fast.compress(ours, wav)
    out = subprocess.run(args + ["-", "-", "--checkpoint", str(checkpoint_24)], input=data.stdout,
                         capture_output=True, timeout=600)
    assert out.returncode == 0, out.stderr
    audio, sr = sf.read(io.BytesIO(out.stdout), dtype="float32", always_2d=True)
    assert sr == 24000 and audio.shape == (48000, 1)


# ---------------------------------------------------------------------------------------------
# Fuzzing the reader: every malformed file gives ValueError or EOFError, nothing else

OTHER_TYPES = [None, True, False, 0, -1, 1.5, 2 ** 70, "", "x", "encodec_24khz", [], [1], {}, {"a": 1}, 1e308]


def mutations(data: bytes, gen: random.Random, count: int):
    meta, payload = split_header(data)
    for i in range(count):
        kind = i % 5
        if kind == 0:  # a header field set to another JSON type or value
            m = dict(meta)
            m[gen.choice(["m", "al", "nc", "lm", "crc"])] = gen.choice(OTHER_TYPES)
            head = json.dumps(m).encode()
            yield b"ECDC\x00" + struct.pack("!I", len(head)) + head + payload
        elif kind == 1:  # bit flips
            out = bytearray(data)
            for _ in range(gen.randint(1, 8)):
                out[gen.randrange(len(out))] ^= 1 << gen.randrange(8)
            yield bytes(out)
        elif kind == 2:  # truncation
            yield data[:gen.randrange(len(data))]
        elif kind == 3:  # inserted bytes
            pos = gen.randrange(len(data))
            yield data[:pos] + bytes(gen.randrange(256) for _ in range(gen.randint(1, 9))) + data[pos:]
        else:  # a key dropped or the metadata replaced by another JSON value
            m = dict(meta)
            m.pop(gen.choice(list(m)))
            head = json.dumps(m if gen.random() < 0.5 else gen.choice(OTHER_TYPES)).encode()
            yield b"ECDC\x00" + struct.pack("!I", len(head)) + head + payload


@pytest.mark.parametrize("use_lm, count", [(False, 200), (True, 60)])
def test_reader_fuzz_gives_only_clear_errors(pair_24, lms_24_small, monkeypatch, use_lm, count):
    up, ours = pair_24
    ours.set_target_bandwidth(3.0)
    # (a plain file whose header is mutated to say "lm": true is decoded with this LM too)
    with_lms(monkeypatch, "encodec_24khz", up, ours, *lms_24_small)
    x = make_signal(24000, 9_000, 1, seed=16)
    with lm_threads(1):
        data = encodec_fast.compress(ours, x, use_lm=use_lm)
    gen = random.Random(17 + use_lm)
    outcomes = {"ok": 0, "ValueError": 0, "EOFError": 0}
    for bad in mutations(data, gen, count):
        try:
            audio = torch.cat(list(decompress_iter(io.BytesIO(bad), model=ours)), dim=-1)
            assert torch.isfinite(audio).all()
            outcomes["ok"] += 1
        except EOFError:
            outcomes["EOFError"] += 1
        except ValueError:
            outcomes["ValueError"] += 1
    assert outcomes["ValueError"] > count // 4 and outcomes["EOFError"] > 0, outcomes


@pytest.fixture(scope="module")
def lms_24_small():
    return lm_pair(32, 262, seed=7)


def test_streaming_follows_the_models_precision_mode():
    """A model set to bf16 streams in bf16 (as its `encode` and `decode` run): the encoder's and the
    decoder's layers see the mode, the codes agree with the whole-file bf16 encode (bf16 rounding
    depends on how the signal is cut, so not bit for bit), the audio comes back in fp32."""
    from encodec_fast import precision
    model = encodec_fast.EncodecModel.encodec_model_24khz_small().set_precision("bf16")
    model.set_target_bandwidth(6.0)
    seen = []
    hooks = [m.register_forward_hook(lambda *a: seen.append((precision.current(), torch.is_autocast_enabled("cpu"))))
             for m in (model.encoder.model[0], model.decoder.model[0])]
    x = make_signal(24000, 24000 * 2, 1, seed=9)
    (ref, _), = model.encode(x[None])
    enc = StreamingEncoder(model, 6.0)
    codes = torch.cat(push_all(enc, x, [4_800] * 10) + [enc.flush()], dim=-1)
    assert codes.shape == ref[0].shape
    assert (codes == ref[0]).double().mean() > 0.95  # 1.0 here; bf16 rounding may depend on the cuts
    exact = encodec_fast.EncodecModel.encodec_model_24khz_small()
    exact.set_target_bandwidth(6.0)
    (exact_codes, _), = exact.encode(x[None])
    assert (codes != exact_codes[0]).double().mean() > 0.02  # it did run in bf16 (~11% of codes differ)
    dec = StreamingDecoder(model)
    audio = torch.cat([dec.push(codes[:, :40]), dec.push(codes[:, 40:]), dec.flush()], dim=-1)
    assert audio.dtype == torch.float32 and audio.shape[-1] >= x.shape[-1] - 320
    assert seen and set(seen) == {("bf16", True)}
    for h in hooks:
        h.remove()
