"""Launch configurations (encodec_fast.kernels.tuning): the default path, the autotuner's inputs,
and that autotuning never runs under the interpreter (where these tests run)."""

import torch
import triton
from encodec_fast.kernels import conv as kconv
from encodec_fast.kernels import rvq as krvq
from encodec_fast.kernels import tuning

from encodec_fast import ops


def test_size_classes():
    assert [tuning.size_class(n) for n in (0, 1, 15, 16, 255, 256, 4095, 4096, 48000)] == [0, 0, 0, 1, 1, 2, 2, 3, 3]


def test_candidates_clamp_and_drop_repeats():
    default = tuning.config({"BLOCK_N": 16, "BLOCK_K": 64}, 4, 2)
    listed = [tuning.config({"BLOCK_N": n, "BLOCK_K": k}, w, s) for n, k, w, s in
              [(64, 64, 4, 2), (16, 64, 4, 2), (64, 32, 8, 3), (128, 32, 8, 3)]]
    out = tuning.candidates(default, listed, lambda kw: {**kw, "BLOCK_N": min(kw["BLOCK_N"], 16)})
    # (64, 64, 4, 2) clamps to the default and (16, 64, 4, 2) is the default: both dropped; the
    # two 8-warp ones clamp to one.
    assert [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) for c in out] == \
        [(16, 64, 4, 2), (16, 32, 8, 3)]


def test_autotune_never_runs_in_the_interpreter(monkeypatch):
    monkeypatch.setenv("ENCODEC_FAST_AUTOTUNE", "1")
    assert not tuning.autotune_enabled()
    g = torch.Generator().manual_seed(0)
    books = torch.randn(2, 64, 16, generator=g)
    x = torch.randn(1, 16, 37, generator=g)
    norms = books.pow(2).sum(-1)
    with ops.use_backend("triton"):
        codes = krvq.rvq_encode(x, books, norms, 2)
    monkeypatch.setenv("ENCODEC_FAST_AUTOTUNE", "0")
    with ops.use_backend("triton"):
        assert torch.equal(krvq.rvq_encode(x, books, norms, 2), codes)
    assert tuning.chosen() == []


def test_lists_are_well_formed():
    for entry in kconv.LISTED:
        co, ci, p, warps, stages = entry
        assert all(triton.next_power_of_2(v) == v for v in (co, ci, p)) and warps in (4, 8) and stages >= 1
    for entry in krvq.LISTED_ENCODE + krvq.LISTED_ASSIGN:
        n, k, warps, stages = entry
        assert all(triton.next_power_of_2(v) == v for v in (n, k)) and warps in (4, 8) and stages >= 1
    assert len(set(kconv.LISTED)) == len(kconv.LISTED)


def test_every_launch_pins_floating_point_contraction(monkeypatch):
    """Each kernel launch passes `enable_fp_fusion` (Triton's default for it changes in 3.10): the
    launches' keyword arguments are recorded at the interpreter's entry, before it drops them."""
    from encodec_fast.kernels import stft as kstft
    from triton.runtime.interpreter import InterpretedFunction
    seen = {}
    run = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        seen[self.fn.__name__] = kwargs.get("enable_fp_fusion", "missing")
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)
    monkeypatch.setattr(InterpretedFunction, "run", recording)
    g = torch.Generator().manual_seed(0)
    books = torch.randn(2, 32, 8, generator=g)
    norms = books.pow(2).sum(-1)
    x = torch.randn(1, 8, 21, generator=g)
    codes = krvq.rvq_encode(x, books, norms, 2)
    krvq.rvq_decode(codes, books, 1, 21)
    krvq.segment_sums(x[0].t().contiguous(), codes[0], 32)
    _, inputs, _, _ = krvq.rvq_train_forward(x, books, norms, 2, False)
    krvq.rvq_train_backward(x, books, codes, inputs, torch.ones(2), 1)
    w = torch.randn(3, 4, 8, generator=g)
    kconv.conv1d(x, w, None, 1, 1, 1, 1, True, True, None, "ieee", torch.float32)
    kconv.conv_transpose1d(x, torch.randn(4, 4, 8, generator=g), None, 2, 0, 30, False, "ieee", torch.float32)
    kconv.conv2d_leaky_relu(torch.randn(1, 2, 5, 6, generator=g), torch.randn(6, 3, 2, generator=g), 2, 3, None,
                            (1, 1), (1, 1), (0, 1), 0.2, "ieee", torch.float32)
    kstft.scaled_copy(torch.randn(1, 2, 3, 4, 5, generator=g), 0.5)
    assert len(seen) == 9, seen
    assert all(v is tuning.FP_FUSION for v in seen.values()), seen
