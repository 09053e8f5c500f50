"""Clips of different lengths in one call per op (`RaggedRows`, the GPU path of `encode_batch`),
run here on CPU: the padding each row gets, length buckets, codes against clip-by-clip encoding."""

import math

import pytest
import torch

import encodec_fast.model as model_module
from encodec_fast import ops
from encodec_fast.model import bucket_length
from encodec_fast.modules.groups import RaggedRows
from encodec_fast.ops.conv import pad1d
from encodec_fast.testing import make_signal


@pytest.mark.parametrize("mode", ["reflect", "constant"])
@pytest.mark.parametrize("left,fixed_right,stride", [(6, 0, 1), (3, 3, 1), (7, 0, 2), (3, 0, 4), (2, 1, 8),
                                                     (0, 0, 5), (9, 4, 1), (1, 0, 2)])
def test_rows_padded_as_pad1d_pads_each_alone(mode, left, fixed_right, stride):
    gen = torch.Generator().manual_seed(left * 100 + fixed_right * 10 + stride)
    lengths = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 17, 40]  # many no longer than the padding
    T = max(lengths) + 5  # the batch is wider than its longest row (a bucket)
    x = torch.randn(len(lengths), 3, T, generator=gen, dtype=torch.float64)
    x[:, :, 0] = float("nan")  # never read through the mask: the output keeps no NaN where it pads
    x[:, :, 0] = torch.randn(len(lengths), 3, generator=gen, dtype=torch.float64)
    width = left + T + fixed_right + stride
    out = RaggedRows(torch.tensor(lengths)).padded(x, left, fixed_right, stride, width, mode)
    assert out.shape == (len(lengths), 3, width)
    for r, L in enumerate(lengths):
        extra = math.ceil(L / stride) * stride - L
        ref = pad1d(x[r:r + 1, :, :L], (left, fixed_right + extra), mode)
        assert torch.equal(out[r:r + 1, :, :ref.shape[-1]], ref), L
        assert not out[r, :, ref.shape[-1]:].any()


def test_rows_padding_ignores_what_lies_past_a_row():
    x = torch.randn(2, 2, 12, dtype=torch.float64)
    y = x.clone()
    y[0, :, 5:] = float("inf")
    y[1, :, 9:] = float("nan")
    rows = RaggedRows(torch.tensor([5, 9]))
    a = rows.padded(x, 3, 0, 2, 16, "reflect")
    b = rows.padded(y, 3, 0, 2, 16, "reflect")
    assert torch.equal(a, b)


def test_ragged_rows_reject_bad_lengths():
    with pytest.raises(ValueError, match="int64"):
        RaggedRows(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="not supported"):
        RaggedRows(torch.tensor([3])).padded(torch.zeros(1, 1, 3), 1, 0, 1, 5, "replicate")


def test_bucket_length():
    hop = 320
    previous = 0
    for n in list(range(1, 5000, 7)) + [10 ** 5, 24_000 * 30 + 1, 24_000 * 600]:
        b = bucket_length(n, hop)
        assert b >= n and b % hop == 0
        assert b >= previous  # monotone
        previous = b
        frames = math.ceil(n / hop)
        assert b / hop <= max(frames * 2 ** 0.25 + 1, 2)  # one step of the ladder at most
        assert bucket_length(b, hop) == b  # a bucket is its own bucket
    # few shapes: 30 minutes of clip lengths fall into a few dozen buckets
    assert len({bucket_length(n, hop) for n in range(1, 24_000 * 60, 97)}) < 60
    assert bucket_length(1234, hop, steps_per_octave=0) == 1234
    with pytest.raises(ValueError):
        bucket_length(0, hop)


def _one_call(monkeypatch):
    monkeypatch.setattr(model_module, "ONE_CALL_DEVICES", frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(model_module, "BATCH_ON_CPU", True)


def _codes(frames_per_clip):
    return [[c for c, _ in frames] for frames in frames_per_clip]


def test_one_call_batches_give_each_clips_codes(pair_24, monkeypatch):
    """In fp64 (no near-ties, no shape-dependent roundings) the one-call path gives each clip's own
    codes; in fp32 the same, but for the ELU's and LSTM's shape-dependent roundings on CPU."""
    _, ours = pair_24
    ours.set_target_bandwidth(24.0)
    sr = ours.sample_rate
    lengths = [1, 7, 320, 999, int(0.73 * sr), int(0.2 * sr) + 5, int(1.3 * sr) + 11]
    wavs = [make_signal(sr, n, 1, seed=i) for i, n in enumerate(lengths)]
    with torch.no_grad():
        alone = [ours.encode(w[None]) for w in wavs]
        with monkeypatch.context() as m:
            _one_call(m)
            batched = ours.encode_batch(wavs, max_batch_samples=3 * sr)
        equal = total = 0
        for a, b in zip(_codes(alone), _codes(batched)):
            assert len(a) == len(b) == 1 and a[0].shape == b[0].shape
            equal += int((a[0] == b[0]).sum())
            total += a[0].numel()
        assert equal / total > 0.99
        double = ours.double()
        try:
            wavs64 = [w.double() for w in wavs]
            alone = [double.encode(w[None]) for w in wavs64]
            with monkeypatch.context() as m:
                _one_call(m)
                batched = double.encode_batch(wavs64, max_batch_samples=3 * sr)
            for a, b in zip(_codes(alone), _codes(batched)):
                assert torch.equal(a[0], b[0])
        finally:
            ours.float()


def test_one_call_batches_are_bucketed(pair_24, monkeypatch):
    _, ours = pair_24
    ours.set_target_bandwidth(6.0)
    sr = ours.sample_rate
    wavs = [make_signal(sr, n, 1, seed=n) for n in (1000, 1100, 5000)]
    widths = []
    real = ours._encode_rows_unchecked

    def spy(x, groups, mode):
        widths.append((x.shape[0], x.shape[-1], type(groups).__name__))
        return real(x, groups, mode)

    monkeypatch.setattr(ours, "_encode_rows_unchecked", spy)
    with torch.no_grad(), monkeypatch.context() as m:
        _one_call(m)
        ours.encode_batch(wavs, max_batch_samples=5120 + 2 * 1280)
    assert widths == [(1, bucket_length(5000, 320), "RaggedRows"), (2, bucket_length(1100, 320), "RaggedRows")]


def test_one_call_encoder_with_our_kernels(pair_24, monkeypatch):
    """The encoder on ragged rows through the Triton convolutions (interpreter on CPU): each row's
    valid latents are those of the row encoded alone on the PyTorch path."""
    _, ours = pair_24
    sr = ours.sample_rate
    lengths = [3, 333, 1500, 2100]
    T = bucket_length(max(lengths), ours.hop_length)
    batch = torch.zeros(len(lengths), 1, T)
    for r, n in enumerate(lengths):
        batch[r, :, :n] = make_signal(sr, n, 1, seed=r)
    elu_out, real_conv = [], ops.conv1d
    monkeypatch.setattr(ops, "conv1d", lambda x, w, *a, **k: (k.get("elu_out") and elu_out.append(w.shape[0]))
                        or real_conv(x, w, *a, **k))
    with torch.no_grad():
        with ops.use_backend("triton"):
            got = ours.encoder(batch, RaggedRows(torch.tensor(lengths)))
        # each residual block's first convolution applies the second one's ELU in its epilogue;
        # the downsampling's ELU runs once on the block's output (after the shortcut's sum, which
        # ragged rows do not fuse), not in the downsampling's prologue (ELU commutes with the rows'
        # reflect padding)
        assert sorted(set(elu_out)) == [16, 32, 64, 128]
        with ops.use_backend("torch"):
            for r, n in enumerate(lengths):
                ref = ours.encoder(batch[r:r + 1, :, :n].contiguous())
                frames = math.ceil(n / ours.hop_length)
                assert ref.shape[-1] == frames
                torch.testing.assert_close(got[r:r + 1, :, :frames], ref, rtol=1e-4, atol=1e-4)


def test_cuda_graphs_stand_aside_off_the_gpu(pair_24, monkeypatch):
    _, ours = pair_24
    ours.set_target_bandwidth(6.0)
    wavs = [make_signal(24000, n, 1, seed=n) for n in (900, 2000)]
    with torch.no_grad(), monkeypatch.context() as m:
        _one_call(m)
        plain = ours.encode_batch(wavs)
        ours.use_cuda_graphs()
        try:
            graphed = ours.encode_batch(wavs)
            assert ours._cuda_graphs.captures == 0
            with pytest.raises(ValueError, match="CUDA"):
                ours._cuda_graphs.replay(torch.zeros(1, 1, 320), torch.tensor([320]))
        finally:
            ours.use_cuda_graphs(False)
    assert all(torch.equal(a[0][0], b[0][0]) for a, b in zip(plain, graphed))
    with pytest.raises(ValueError, match="max_graphs"):
        ours.use_cuda_graphs(max_graphs=0)


def test_tokenize_refuses_cuda_graphs_off_cuda(tmp_path):
    from encodec_fast.tokenize import tokenize
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        tokenize([tmp_path / "none.wav"], tmp_path / "out", device="cpu", cuda_graphs=True)
    assert not (tmp_path / "out").exists()


def test_a_graph_is_keyed_by_everything_its_capture_holds(pair_24):
    from encodec_fast.graphs import EncoderGraphs
    _, ours = pair_24
    graphs = EncoderGraphs(ours)
    x = torch.zeros(2, 1, 640)
    ours.set_target_bandwidth(6.0)
    key = graphs._key(x)
    assert graphs._key(x) == key
    assert graphs._key(torch.zeros(3, 1, 640)) != key
    with ops.use_backend("torch"):
        assert graphs._key(x) != key
    ours.set_target_bandwidth(12.0)
    assert graphs._key(x) != key
    ours.set_target_bandwidth(6.0)
    weight = next(ours.parameters())
    with torch.no_grad():
        weight.add_(0.0)  # an in-place update: the weights' version moves
    assert graphs._key(x) != key


@pytest.mark.parametrize("buckets", [False, True])
def test_decode_batch_gives_each_clips_audio(pair_24, monkeypatch, buckets):
    """`decode_batch` stacks the clips' codes (padded with code 0; bucketed where one call per op is on)
    and decodes once: each clip's audio is its own `decode` (fp64: to rounding of the last bit; fp32:
    the CPU's shape-dependent roundings), including clips near the shortest that may share a call."""
    _, ours = pair_24
    ours.set_target_bandwidth(6.0)
    hop = ours.hop_length
    shortest = ours._min_stacked_frames()
    assert shortest == 7  # the decoder's first conv (kernel 7, causal padding 6) at the frame rate
    gen = torch.Generator().manual_seed(5)
    lengths = [1, 2, shortest - 1, shortest, shortest + 1, 40, 75, 133]
    frames = [[(torch.randint(0, 1024, (1, 8, n), generator=gen), None)] for n in lengths]
    if buckets:
        monkeypatch.setattr(model_module, "ONE_CALL_DEVICES", frozenset({"cpu", "cuda"}))
    with torch.no_grad():
        got = ours.decode_batch(frames, max_batch_samples=3 * 75 * hop)
        alone = [ours.decode(f)[0] for f in frames]
        for a, b, n in zip(alone, got, lengths):
            assert b.shape == a.shape == (1, n * hop)
            assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())
        double = ours.double()
        try:
            got = double.decode_batch(frames, max_batch_samples=3 * 75 * hop)
            alone = [double.decode(f)[0] for f in frames]
            for a, b in zip(alone, got):
                assert float((a - b).abs().max()) <= 1e-12 * float(a.abs().max())
        finally:
            ours.float()


def test_decode_batch_on_other_models_decodes_clip_by_clip(pair_48):
    _, ours = pair_48
    ours.set_target_bandwidth(6.0)
    assert not ours._stackable_decoder()
    wavs = [make_signal(48000, n, 2, seed=n) for n in (5000, 48000 + 999)]
    with torch.no_grad():
        frames = ours.encode_batch(wavs)
        got = ours.decode_batch(frames)
        for f, b in zip(frames, got):
            assert torch.equal(ours.decode(f)[0], b)


def test_decode_batch_refuses_bad_frames(pair_24):
    _, ours = pair_24
    good = [(torch.zeros(1, 8, 10, dtype=torch.long), None)]
    assert ours.decode_batch([]) == []
    with pytest.raises(ValueError, match="clip 1: codes must be"):
        ours.decode_batch([good, [(torch.zeros(8, 10, dtype=torch.long), None)]])
    with pytest.raises(ValueError, match="clip 0: .*exactly one frame"):
        ours.decode_batch([good * 2])
    with pytest.raises(ValueError, match="codebooks"):
        ours.decode_batch([[(torch.zeros(1, 33, 10, dtype=torch.long), None)]])
    with pytest.raises(ValueError, match="no frames"):
        ours.decode_batch([[(torch.zeros(1, 8, 0, dtype=torch.long), None)]])
    with pytest.raises(TypeError, match="integers"):
        ours.decode_batch([good, [(torch.zeros(1, 8, 10), None)]])


@pytest.mark.parametrize("frames", [3, 40])
def test_decode_batch_refuses_codes_out_of_range(pair_24, frames):
    """Codes out of [0, bins) are found on the device (no read while queuing) and `result()` raises
    IndexError naming the clip; the caller's codes are left as they were (the clamp that keeps the
    device inside the codebooks works on a copy). 3 frames: a clip decoded alone; 40: stacked."""
    _, ours = pair_24
    gen = torch.Generator().manual_seed(3)
    clips = [torch.randint(0, 1024, (1, 8, n), generator=gen) for n in (frames, frames + 2, frames)]
    for bad in (1024, -1):
        broken = clips[1].clone()
        broken[0, 5, 1] = bad
        kept = broken.clone()
        pending = ours.decode_batch_async([[(clips[0], None)], [(broken, None)], [(clips[2], None)]])
        with pytest.raises(IndexError, match=r"clip 1: codes out of range \[0, 1024\)"):
            pending.result()
        assert torch.equal(broken, kept)
        with pytest.raises(IndexError, match="clip 1: codes out of range"):
            ours.decode_batch([[(clips[0], None)], [(broken, None)]])
    narrow = [[(c.to(torch.int16), None)] for c in clips]  # the other integer types the decoders take
    wide = ours.decode_batch([[(c, None)] for c in clips])
    assert all(torch.equal(a, b) for a, b in zip(ours.decode_batch(narrow), wide))


def _queued_then_read(queue):
    """(queue().result(), the host reads while queuing, the host reads in result())."""
    from encodec_fast.testing import HostReads
    queued, read = HostReads(), HostReads()
    with queued:
        pending = queue()
    with read:
        got = pending.result()
    return got, queued.reads, read.reads


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_queued_batches_wait_for_nothing(pair_24, monkeypatch, backend):
    """`encode_batch_async` on the one-call path (CUDA's, run here on CPU) runs no op that makes the
    host wait for the device (`HostReads`: a value read, an output shaped by values), in any mode,
    so the next batch can be queued while it runs; its `result()` reads one flag per encoder call
    in fp16 and nothing in the other modes, and equals `encode_batch`."""
    _, ours = pair_24
    ours.set_target_bandwidth(6.0)
    wavs = [make_signal(24000, n, 1, seed=n) for n in (700, 1500, 2300)]
    try:
        with monkeypatch.context() as m, ops.use_backend(backend):
            _one_call(m)
            for mode in ("exact", "bf16", "fp16"):
                ours.set_precision(mode)
                got, queued, read = _queued_then_read(
                    lambda: ours.encode_batch_async(wavs, max_batch_samples=2 * 2560))  # two calls
                assert queued == [], (mode, queued)
                assert [op for op, _ in read] == (["_local_scalar_dense"] * 2 if mode == "fp16" else []), mode
                again = ours.encode_batch(wavs, max_batch_samples=2 * 2560)
                assert all(torch.equal(a[0][0], b[0][0]) for a, b in zip(got, again)), mode
    finally:
        ours.set_precision("exact")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_queued_decode_batches_wait_for_nothing(pair_24, monkeypatch, backend):
    """`decode_batch_async` (one-call path, run here on CPU) reads nothing from the device while it
    queues, in any mode, a clip decoded alone included; its `result()` reads one range flag per
    decoder call (and in fp16 one overflow flag per call) and equals `decode_batch`."""
    _, ours = pair_24
    ours.set_target_bandwidth(6.0)
    gen = torch.Generator().manual_seed(9)
    frames = [[(torch.randint(0, 1024, (1, 8, n), generator=gen), None)] for n in (3, 20, 30, 40)]
    try:
        with monkeypatch.context() as m, ops.use_backend(backend):
            _one_call(m)
            for mode in ("exact", "bf16", "fp16"):
                ours.set_precision(mode)
                # the 3-frame clip alone, then buckets of 20 + 32 frames and 46 frames
                got, queued, read = _queued_then_read(
                    lambda: ours.decode_batch_async(frames, max_batch_samples=80 * ours.hop_length))
                assert queued == [], (mode, queued)
                calls = 3
                assert [op for op, _ in read] == (
                    ["tolist"] * calls + (["_local_scalar_dense"] * calls if mode == "fp16" else [])), mode
                again = ours.decode_batch(frames, max_batch_samples=80 * ours.hop_length)
                assert all(torch.equal(a, b) for a, b in zip(got, again)), mode
    finally:
        ours.set_precision("exact")
