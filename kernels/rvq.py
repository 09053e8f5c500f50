"""Triton kernels for residual vector quantization.

- `rvq_encode`: every stage's nearest-codeword search for a block of frames in one program; the
  residual stays in registers between stages. Distances are `||e||^2 - 2 x.e` (the `||x||^2`
  term does not change the argmin) with `tl.dot` in the chosen precision (`ieee` = exact fp32
  products, fp32 accumulation); ties go to the lowest index.
- `rvq_decode`: gather-and-sum of the stages' codewords, in stage order (the same fp32 additions
  as the reference, so the same bits).
- `vq_assign`: one stage for training: codes, the chosen codewords, and the per-codeword counts
  and vector sums that the EMA update needs, accumulated with atomics (no one-hot matrix).

Inputs may be fp32, fp16 or bf16 (upcast to fp32 on load) and strided. The launch wrappers take
tensors already validated by `encodec_fast.ops.rvq`; call that module, not these functions.
"""

import torch
import triton
import triton.language as tl

from ..ops.backend import interpreting
from . import tuning


@triton.jit
def _nearest(r, cb_ptr, norm_ptr, K, D, d, d_ok, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             PRECISION: tl.constexpr):
    """Index of the nearest of the K codewords at `cb_ptr` ([K, D] row-major) for each row of r."""
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_i = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        e = tl.load(cb_ptr + ks[:, None] * D + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        dot = tl.dot(r, tl.trans(e.to(tl.float32)), input_precision=PRECISION)
        norm = tl.load(norm_ptr + ks, mask=k_ok, other=0.0)
        dist = norm[None, :] - 2.0 * dot
        dist = tl.where(k_ok[None, :], dist, float("inf"))
        block_min = tl.min(dist, axis=1)
        block_arg = tl.argmin(dist, axis=1).to(tl.int32) + k0
        better = block_min < best  # strict: an equal later block keeps the lower index
        best = tl.where(better, block_min, best)
        best_i = tl.where(better, block_arg, best_i)
    return best_i


# n_q is not specialized: with n_q == 1 as a constant, the unrolled single stage compiled to 32
# registers and 7.5 KB of spills per thread on sm_90 (the loop: 255 registers, 256 B).
@triton.jit(do_not_specialize=["n_q"])
def _rvq_encode_kernel(x_ptr, cb_ptr, norm_ptr, codes_ptr, N, T, D, K, n_q,
                       stride_xb, stride_xd, stride_xt,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                       PRECISION: tl.constexpr):
    """x [B, D, T] (rows n = b * T + t) -> codes [n_q, N] int64."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    b = (rows // T).to(tl.int64)
    t = (rows % T).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    mask = row_ok[:, None] & d_ok[None, :]
    r = tl.load(x_ptr + b[:, None] * stride_xb + d[None, :] * stride_xd + t[:, None] * stride_xt,
                mask=mask, other=0.0).to(tl.float32)
    code_ptrs = codes_ptr + rows.to(tl.int64)
    for q in range(n_q):
        cb_q = cb_ptr + q * K * D
        idx = _nearest(r, cb_q, norm_ptr + q * K, K, D, d, d_ok, BLOCK_N, BLOCK_K, PRECISION)
        tl.store(code_ptrs, idx.to(tl.int64), mask=row_ok)
        code_ptrs += N
        chosen = tl.load(cb_q + idx[:, None] * D + d[None, :], mask=mask, other=0.0)
        r = r - chosen


@triton.jit
def _rvq_decode_kernel(codes_ptr, cb_ptr, out_ptr, N, T, D, K, n_q, stride_cq, stride_cn,
                       stride_ob, stride_od, stride_ot,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """codes [n_q, N] -> out [B, D, T] = sum over stages of the chosen codewords."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (d < D)[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    code_ptrs = codes_ptr + rows.to(tl.int64) * stride_cn
    for q in range(n_q):
        idx = tl.load(code_ptrs, mask=row_ok, other=0)
        code_ptrs += stride_cq
        acc = acc + tl.load(cb_ptr + q * K * D + idx[:, None] * D + d[None, :], mask=mask, other=0.0)
    b = (rows // T).to(tl.int64)
    t = (rows % T).to(tl.int64)
    tl.store(out_ptr + b[:, None] * stride_ob + d[None, :] * stride_od + t[:, None] * stride_ot,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _vq_assign_kernel(x_ptr, cb_ptr, norm_ptr, codes_ptr, quant_ptr, counts_ptr, sums_ptr, N, D, K,
                      stride_xn, stride_xd,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                      PRECISION: tl.constexpr, STATS: tl.constexpr):
    """One stage on x [N, D]: codes [N], quantized rows [N, D] and (STATS) counts [K], sums [K, D]."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    mask = row_ok[:, None] & d_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xn + d[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    idx = _nearest(x, cb_ptr, norm_ptr, K, D, d, d_ok, BLOCK_N, BLOCK_K, PRECISION)
    tl.store(codes_ptr + rows, idx.to(tl.int64), mask=row_ok)
    chosen = tl.load(cb_ptr + idx[:, None] * D + d[None, :], mask=mask, other=0.0)
    tl.store(quant_ptr + rows64[:, None] * D + d[None, :], chosen.to(quant_ptr.dtype.element_ty), mask=mask)
    if STATS:
        tl.atomic_add(counts_ptr + idx, tl.full([BLOCK_N], 1.0, tl.float32), mask=row_ok)
        tl.atomic_add(sums_ptr + idx[:, None] * D + d[None, :], x, mask=mask)


# -- launch wrappers -------------------------------------------------------------------------------

def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _config(N: int, D: int, K: int, encode: bool, half_input: bool = False):
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for `rvq_encode` (`encode`) or `vq_assign`.

    Under the interpreter, where each loop iteration costs milliseconds whatever its size: large
    blocks. On a GPU, a table by architecture and Triton version, from timing every block size on
    an H200 with triton 3.6 (tools/gpu_sweep.py, bench/results/gpu_h200_2026-11-30/gpu_sweep_2026-11-30.md; 48,000
    frames, D=128, K=1024) and compiling the candidates for sm_80/90/100 with triton 3.6 and 3.9
    (tools/compile_gpu.py):
    - encode, triton 3.6 on sm_80/sm_90: 64 rows x 64 codewords, 4 warps, 2 stages, the fastest of
      21 configurations in exact fp32 (7.7 ms for 8 stages; the fastest without local memory,
      32 x 64, 14.0 ms; 32 x 32 with 8 warps, the table before, 27.5 ms) and within 5% of the
      fastest in tf32. It keeps 256 bytes of local memory per thread (440 B of spill stores on
      sm_90): cheap, unlike the 5-20 KB that 128-row blocks spill (10-30x slower).
      Elsewhere that block spills (sm_100 with 3.6: 10 KB; 3.9: 1.5 KB): 32 x 64 with 2 stages
      (3.9: at most 16 B), or 32 x 32 with 8 warps on sm_100 with 3.6 (none). Not timed.
    - training stage, fp32 rows, triton 3.6 on sm_80/sm_90: 64 x 128 with 8 warps (0.18 ms for
      4,800 rows; 32 x 32, the table before: 0.33 ms); elsewhere 16 x 64 (0.25 ms on the H200;
      at most 292 B of spill stores elsewhere).
    - training stage, half rows: 16 x 32 (not timed; 32 rows spilled 3 KB on sm_90 when compiled).
    - larger D: 32 x 32 (not timed; registers grow with D)."""
    if interpreting():
        block_n, block_k, warps, stages = 128, 256, 4, 1
    else:
        measured = not tuning.TRITON_3_7 and tuning.target_arch() in (80, 90)
        if _block_d(D) > 128:
            block_n, block_k, warps, stages = 32, 32, 4, 2 if encode else 3
        elif encode:
            if measured:
                block_n, block_k, warps, stages = 64, 64, 4, 2
            elif tuning.TRITON_3_7:
                block_n, block_k, warps, stages = 32, 64, 4, 2
            else:
                block_n, block_k, warps, stages = 32, 32, 8, 3
        elif half_input:
            block_n, block_k, warps, stages = 16, 32, 4, 3
        elif measured:
            block_n, block_k, warps, stages = 64, 128, 8, 3
        else:
            block_n, block_k, warps, stages = 16, 64, 4, 3
    block_k = min(block_k, max(16, triton.next_power_of_2(K)))
    block_n = min(block_n, max(16, triton.next_power_of_2(N)))
    return block_n, block_k, warps, stages


#: Other configurations timed by the autotuner (ENCODEC_FAST_AUTOTUNE=1, GPU only), as
#: (BLOCK_N, BLOCK_K, num_warps, num_stages), clamped to each launch's sizes; tools/compile_gpu.py
#: compiles every one of them.
#: From the H200 sweep: the fastest in exact fp32 and its runners-up (64 x 64 with 3 stages,
#: 64 x 128 with 8 warps), the fastest in tf32 (64 x 32), the fastest without local memory
#: (32 x 64); for training, the fastest and the fastest without local memory (16 x 64).
LISTED_ENCODE = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 8, 3), (64, 32, 4, 3), (32, 64, 4, 3)]
LISTED_ASSIGN = [(64, 128, 8, 3), (64, 64, 4, 3), (16, 64, 4, 3), (32, 64, 4, 3)]


def _configs(listed):
    return [tuning.config({"BLOCK_N": n, "BLOCK_K": k}, w, st) for n, k, w, st in listed]


_LISTED_CONFIGS = {"encode": _configs(LISTED_ENCODE), "assign": _configs(LISTED_ASSIGN)}


def _launch(kernel, args, constants, default, listed, N, K, key, reset_to_zero=()):
    block_n, block_k, warps, stages = default
    tuning.launch(kernel, lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),), args, constants,
                  tuning.config({"BLOCK_N": block_n, "BLOCK_K": block_k}, warps, stages), listed,
                  key=key, size=N, extents={"BLOCK_N": N, "BLOCK_K": K}, reset_to_zero=reset_to_zero)


def rvq_encode(x: torch.Tensor, codebooks: torch.Tensor, norms: torch.Tensor, n_q: int,
               precision: str = "ieee") -> torch.Tensor:
    """x [B, D, T] (any strides), codebooks [Q, K, D] fp32 contiguous, norms [Q, K] -> codes [n_q, B*T]."""
    B, D, T = x.shape
    K = codebooks.shape[1]
    N = B * T
    codes = torch.empty(n_q, N, dtype=torch.int64, device=x.device)
    if N == 0 or n_q == 0:
        return codes
    _launch(_rvq_encode_kernel, (x, codebooks, norms, codes, N, T, D, K, n_q, *x.stride()),
            dict(BLOCK_D=_block_d(D), PRECISION=precision), _config(N, D, K, encode=True),
            _LISTED_CONFIGS["encode"], N, K, key=("D", "K", "n_q", "PRECISION"))
    return codes


def rvq_decode(codes: torch.Tensor, codebooks: torch.Tensor, B: int, T: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes [n_q, B*T] (int64, any strides), codebooks [Q, K, D] -> [B, D, T]."""
    n_q, N = codes.shape
    _, K, D = codebooks.shape
    out = torch.empty(B, D, T, dtype=dtype, device=codes.device)
    if N == 0:
        return out
    block_n = min(64, max(16, triton.next_power_of_2(N)))
    grid = (triton.cdiv(N, block_n),)
    _rvq_decode_kernel[grid](codes, codebooks, out, N, T, D, K, n_q, *codes.stride(), *out.stride(),
                             BLOCK_N=block_n, BLOCK_D=_block_d(D), num_warps=4)
    return out


def vq_assign(x: torch.Tensor, codebook: torch.Tensor, norms: torch.Tensor, stats: bool,
              precision: str = "ieee"):
    """x [N, D], codebook [K, D] fp32 contiguous, norms [K] -> (codes [N], quantized [N, D] in x's
    dtype, counts [K] fp32 or None, sums [K, D] fp32 or None)."""
    N, D = x.shape
    K = codebook.shape[0]
    codes = torch.empty(N, dtype=torch.int64, device=x.device)
    quant = torch.empty(N, D, dtype=x.dtype, device=x.device)
    counts = torch.zeros(K, dtype=torch.float32, device=x.device) if stats else None
    sums = torch.zeros(K, D, dtype=torch.float32, device=x.device) if stats else None
    if N == 0:
        return codes, quant, counts, sums
    dummy = codes  # unused pointers when STATS is off
    _launch(_vq_assign_kernel, (x, codebook, norms, codes, quant, counts if stats else dummy,
                                sums if stats else dummy, N, D, K, *x.stride()),
            dict(BLOCK_D=_block_d(D), PRECISION=precision, STATS=stats),
            _config(N, D, K, encode=False, half_input=x.dtype in (torch.float16, torch.bfloat16)),
            _LISTED_CONFIGS["assign"], N, K, key=("D", "K", "PRECISION", "STATS"),
            reset_to_zero=("counts_ptr", "sums_ptr"))
    return codes, quant, counts, sums
