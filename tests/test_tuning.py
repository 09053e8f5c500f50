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
