"""Triton kernels for residual vector quantization.

- `rvq_encode`: every stage's nearest-codeword search for a block of frames in one program; the
  residual stays in registers between stages. Distances are `||e||^2 - 2 x.e` (the `||x||^2`
  term does not change the argmin); ties go to the lowest index. `exact` (the default): distances
  on tensor cores, certified row by row, rows the certificate cannot decide searched again in fp32
  (`_certified_nearest`): the codes of `ieee` (fp32 products on CUDA cores) on every input. The
  default tensor-core products are bf16x3 on operands split ahead (`split_codebooks`: the codebooks'
  bf16 halves, made once per codebook version; the rows' halves once per stage), which the
  interpreter computes on the same rounded values.
- `rvq_decode`: gather-and-sum of the stages' codewords, in stage order (the same fp32 additions
  as the reference, so the same bits).
- `vq_assign`: one stage's fp32 search (`ieee`) or approximate one (tf32), the chosen codewords,
  and the per-codeword counts and vector sums that the EMA update needs; the default training
  stage is `rvq_encode`'s certified search with one stage (`encodec_fast.ops.rvq.vq_assign`).
- `segment_sums`: those statistics in a fixed order (sorted by code, no one-hot matrix, no
  floating-point atomics: the same bits on every run).

Inputs may be fp32, fp16 or bf16 (upcast to fp32 on load) and strided. The launch wrappers take
tensors already validated by `encodec_fast.ops.rvq`; call that module, not these functions.
"""

import typing as tp

import torch
import triton
import triton.language as tl

from ..ops.backend import interpreting
from . import tuning


@triton.jit
def _block_distances(r, cb_ptr, norm_ptr, k0, K, D, d, d_ok, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """||e_k||^2 - 2 r.e_k for the codewords k0 .. k0 + BLOCK_K (inf past K) -> ([BLOCK_N, BLOCK_K], ks, k_ok)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    e = tl.load(cb_ptr + ks[:, None] * D + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    dot = tl.dot(r, tl.trans(e.to(tl.float32)), input_precision=PRECISION)
    norm = tl.load(norm_ptr + ks, mask=k_ok, other=0.0)
    dist = norm[None, :] - 2.0 * dot
    return tl.where(k_ok[None, :], dist, float("inf")), ks, k_ok, norm


@triton.jit
def _round_bf16(v):
    """v rounded to the nearest bf16 (ties to even), as fp32: integer operations, so the same values
    on a GPU and under the interpreter (whose fp32 -> bf16 cast does not round to nearest)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _split_bf16(r, SPLIT_BF16: tl.constexpr):
    """r [BLOCK_N, BLOCK_D] fp32 -> (hi, lo): hi = bf16(r), lo = bf16(r - hi) (r - hi is exact), as
    bf16 for the tensor cores (SPLIT_BF16) or as fp32 holding those values (the interpreter)."""
    hi = _round_bf16(r)
    lo = _round_bf16(r - hi)
    if SPLIT_BF16:
        hi, lo = hi.to(tl.bfloat16), lo.to(tl.bfloat16)
    return hi, lo


@triton.jit
def _split_block_distances(r_hi, r_lo, hi_ptr, lo_ptr, norm_ptr, k0, K, D, d, d_ok, BLOCK_K: tl.constexpr,
                           SPLIT_BF16: tl.constexpr):
    """`_block_distances` in bf16x3 from operands split ahead: the codebook's halves stored as bf16
    ([K, D] each, loaded straight into the products), the rows' split once per stage; the three
    products hi.lo, lo.hi, hi.hi chained into one fp32 accumulator (the bf16x3 bound's model)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    at = ks[:, None] * D + d[None, :]
    m = k_ok[:, None] & d_ok[None, :]
    e_hi = tl.load(hi_ptr + at, mask=m, other=0.0)
    e_lo = tl.load(lo_ptr + at, mask=m, other=0.0)
    if not SPLIT_BF16:
        e_hi, e_lo = e_hi.to(tl.float32), e_lo.to(tl.float32)
    dot = tl.dot(r_hi, tl.trans(e_lo))
    dot = tl.dot(r_lo, tl.trans(e_hi), dot)
    dot = tl.dot(r_hi, tl.trans(e_hi), dot)
    norm = tl.load(norm_ptr + ks, mask=k_ok, other=0.0)
    dist = norm[None, :] - 2.0 * dot
    return tl.where(k_ok[None, :], dist, float("inf")), ks, k_ok, norm


@triton.jit
def _keep_nearest(dist, k0, best, best_i):
    """Running argmin over blocks: ties within a block go to the lowest index (`tl.argmin`), and an
    equal later block keeps the earlier one (strict <), so the lowest index overall."""
    block_min = tl.min(dist, axis=1)
    block_arg = tl.argmin(dist, axis=1).to(tl.int32) + k0
    better = block_min < best
    return tl.where(better, block_min, best), tl.where(better, block_arg, best_i)


@triton.jit
def _nearest(r, cb_ptr, norm_ptr, K, D, d, d_ok, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             PRECISION: tl.constexpr):
    """Index of the nearest of the K codewords at `cb_ptr` ([K, D] row-major) for each row of r."""
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_i = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        dist, ks, k_ok, norm = _block_distances(r, cb_ptr, norm_ptr, k0, K, D, d, d_ok, BLOCK_K, PRECISION)
        best, best_i = _keep_nearest(dist, k0, best, best_i)
    return best_i


@triton.jit
def _lower_ends(r, r_hi, r_lo, xnorm, rows, cb_ptr, hi_ptr, lo_ptr, norm_ptr, k0, K, D, d, d_ok, cert_p, cert_b,
                cert_z, rad_c1, rad_c2, perturb, lp_a, lp_b, seed, BLOCK_K: tl.constexpr, LOWP: tl.constexpr,
                PERTURB: tl.constexpr, SPLIT: tl.constexpr, SPLIT_BF16: tl.constexpr):
    """Low-precision distances d~ [BLOCK_N, BLOCK_K] of a block and the lower ends of their
    intervals, d~_k - e_k + q(|x|) with e_k = p |x| r_k + b (|x| + r_k)^2 + z (|x| + r_k) written
    as P r_k + S_k + q: P = (p + 2 b) |x| per row, S_k = b r_k^2 + z r_k per codeword, q = b |x|^2 +
    z |x| per row (left out here, added to the upper end). PERTURB (tests only) moves each d~ by up
    to `perturb` times the low-precision side's own bound, deterministically per (row, codeword).
    SPLIT: the distances from `_split_block_distances` (r_hi, r_lo and the codebook's halves)."""
    if SPLIT:
        dist, ks, k_ok, norm = _split_block_distances(r_hi, r_lo, hi_ptr, lo_ptr, norm_ptr, k0, K, D, d, d_ok,
                                                      BLOCK_K, SPLIT_BF16)
    else:
        dist, ks, k_ok, norm = _block_distances(r, cb_ptr, norm_ptr, k0, K, D, d, d_ok, BLOCK_K, LOWP)
    rad = tl.sqrt(norm * rad_c1) * rad_c2  # >= |e_k|
    if PERTURB:
        x = xnorm[:, None]
        s = x + rad[None, :]
        noise = tl.rand(seed, rows[:, None] * K + ks[None, :]) * 2.0 - 1.0
        dist = dist + perturb * (lp_a * x * rad[None, :] + lp_b * s * s) * noise
    slope = ((cert_p + 2.0 * cert_b) * xnorm)[:, None]
    low = dist - (slope * rad[None, :] + ((cert_b * rad + cert_z) * rad)[None, :])
    return dist, low


@triton.jit
def _certified_nearest(r, rows, row_ok, cb_ptr, hi_ptr, lo_ptr, norm_ptr, K, D, d, d_ok, cert_p, cert_b, cert_z,
                       rad_c1, rad_c2, perturb, lp_a, lp_b, seed, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_KR: tl.constexpr, LOWP: tl.constexpr, PERTURB: tl.constexpr, SPLIT: tl.constexpr,
                       SPLIT_BF16: tl.constexpr):
    """`_nearest`'s codes, from distances on tensor cores (LOWP) certified row by row.

    Pass 1 (blocks of BLOCK_K codewords): low-precision distances d~ and the intervals
    [d~_k - e_k, d~_k + e_k] that hold the exact search's d_k (encodec_fast.ops.rvq explains why);
    keep k* = argmin d~, its upper end and the lowest lower end of every other codeword. A row is
    certified when that lowest lower end is above the upper end: k* is the exact search's unique
    argmin. Pass 2, only in a tile holding an uncertified row (a uniform branch), in blocks of
    BLOCK_KR: a block holding a candidate of such a row (lower end <= its upper end; every block
    when the bound is not finite) is searched again in fp32 with the exact kernel's own code
    (`_block_distances(..., "ieee")`, `_keep_nearest`), so those rows get the exact kernel's codes:
    its products are one fused multiply-add chain per element in the order of D, whatever the
    tile (Triton's FMA dot lowering; the interpreter runs the same shapes in both kernels), and
    blocks without a candidate hold neither the exact argmin nor a codeword tied with it.
    SPLIT: LOWP is bf16x3 with the operands split ahead (the codebook's bf16 halves at hi_ptr and
    lo_ptr, the rows here, once): the same products and bound as Triton's own bf16x3, without
    splitting a codebook block in every program and iteration.
    -> (codes [BLOCK_N] int32, uncertified [BLOCK_N] bool, exact blocks searched: int32 scalar)."""
    xnorm = tl.sqrt(tl.sum(r * r, axis=1))
    if SPLIT:
        r_hi, r_lo = _split_bf16(r, SPLIT_BF16)
    else:
        r_hi, r_lo = r, r
    # Pass 1 keeps, per row and slot j of the block (the codewords j, j + BLOCK_K, ...), the slot's
    # lowest d~ (first of equals), its codeword and lower end, and the lowest lower end of the
    # slot's other codewords: element-wise updates, no reduction across the block per iteration.
    slot_best = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
    slot_low = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
    slot_others = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
    slot_i = tl.zeros([BLOCK_N, BLOCK_K], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        dist, low = _lower_ends(r, r_hi, r_lo, xnorm, rows, cb_ptr, hi_ptr, lo_ptr, norm_ptr, k0, K, D, d, d_ok,
                                cert_p, cert_b, cert_z, rad_c1, rad_c2, perturb, lp_a, lp_b, seed, BLOCK_K, LOWP,
                                PERTURB, SPLIT, SPLIT_BF16)
        better = dist < slot_best
        # whichever of the two loses joins the slot's others
        slot_others = tl.minimum(slot_others, tl.where(better, slot_low, low))
        slot_low = tl.where(better, low, slot_low)
        slot_best = tl.where(better, dist, slot_best)
        slot_i = tl.where(better, k0 + tl.arange(0, BLOCK_K)[None, :], slot_i)
    # then across the slots, once: k* (any of equal d~: equal ones leave the row uncertified), and
    # the lowest lower end of every codeword but k*
    best = tl.min(slot_best, axis=1)
    at = tl.arange(0, BLOCK_K)[None, :] == tl.argmin(slot_best, axis=1)[:, None]
    best_i = tl.max(tl.where(at, slot_i, 0), axis=1)
    others = tl.minimum(tl.min(slot_others, axis=1), tl.min(tl.where(at, float("inf"), slot_low), axis=1))
    # the upper end of k*: d~ + e (with the q(|x|) the lower ends left out, twice)
    best_rad = tl.sqrt(tl.load(norm_ptr + best_i) * rad_c1) * rad_c2
    q = (cert_b * xnorm + cert_z) * xnorm
    upper = best + (cert_p + 2.0 * cert_b) * xnorm * best_rad + (cert_b * best_rad + cert_z) * best_rad + 2.0 * q
    uncertified = (others <= upper) | (upper != upper) | (others != others)
    uncertified = uncertified & row_ok
    searched = tl.full([], 0, tl.int32)
    if tl.max(uncertified.to(tl.int32), axis=0) > 0:
        whole = (upper >= float("inf")) | (upper != upper)  # overflow, inf or nan: every codeword
        exact = tl.full([BLOCK_N], float("inf"), tl.float32)
        exact_i = tl.zeros([BLOCK_N], tl.int32)
        for k0 in range(0, K, BLOCK_KR):
            dist, low = _lower_ends(r, r_hi, r_lo, xnorm, rows, cb_ptr, hi_ptr, lo_ptr, norm_ptr, k0, K, D, d,
                                    d_ok, cert_p, cert_b, cert_z, rad_c1, rad_c2, perturb, lp_a, lp_b, seed,
                                    BLOCK_KR, LOWP, PERTURB, SPLIT, SPLIT_BF16)
            cand = ((low <= upper[:, None]) | whole[:, None]) & uncertified[:, None]
            if tl.max(tl.max(cand.to(tl.int32), axis=1), axis=0) > 0:
                dist_e, ks, k_ok, norm = _block_distances(r, cb_ptr, norm_ptr, k0, K, D, d, d_ok, BLOCK_KR, "ieee")
                exact, exact_i = _keep_nearest(dist_e, k0, exact, exact_i)
                searched += 1
        best_i = tl.where(uncertified, exact_i, best_i)
    return best_i, uncertified, searched


@triton.jit
def _row_tile(N, T, D, stride_b, stride_t, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows n = b * T + t of a [B, D, T] tensor: (rows, row_ok, d, d_ok, mask, the
    rows' offsets b * stride_b + t * stride_t [BLOCK_N] int64)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    b = (rows // T).to(tl.int64)
    t = (rows % T).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    return rows, row_ok, d, d_ok, row_ok[:, None] & d_ok[None, :], b * stride_b + t * stride_t


# n_q is not specialized: with n_q == 1 as a constant, the unrolled single stage compiled to 32
# registers and 7.5 KB of spills per thread on sm_90 (the loop: 255 registers, 256 B).
@triton.jit(do_not_specialize=["n_q"])
def _rvq_encode_kernel(x_ptr, cb_ptr, hi_ptr, lo_ptr, norm_ptr, codes_ptr, stats_ptr, N, T, D, K, n_q,
                       stride_xb, stride_xd, stride_xt, cert_p, cert_b, cert_z, rad_c1, rad_c2,
                       perturb, lp_a, lp_b, seed,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KR: tl.constexpr, BLOCK_D: tl.constexpr,
                       PRECISION: tl.constexpr, CERTIFY: tl.constexpr, PERTURB: tl.constexpr,
                       STATS: tl.constexpr, SPLIT: tl.constexpr, SPLIT_BF16: tl.constexpr):
    """x [B, D, T] (rows n = b * T + t) -> codes [n_q, N] int64. CERTIFY: `_certified_nearest` with
    PRECISION as the low precision (SPLIT: bf16x3 from the codebooks' bf16 halves at hi_ptr and
    lo_ptr, [Q, K, D] each); STATS: per program and stage, the uncertified rows and the exact
    blocks searched, stats [programs, n_q, 2] int32."""
    rows, row_ok, d, d_ok, mask, row_start = _row_tile(N, T, D, stride_xb, stride_xt, BLOCK_N, BLOCK_D)
    r = tl.load(x_ptr + row_start[:, None] + d[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    code_ptrs = codes_ptr + rows.to(tl.int64)
    for q in range(n_q):
        cb_q = cb_ptr + q * K * D
        if CERTIFY:
            idx, uncertified, searched = _certified_nearest(
                r, rows, row_ok, cb_q, hi_ptr + q * K * D, lo_ptr + q * K * D, norm_ptr + q * K, K, D, d, d_ok,
                cert_p, cert_b, cert_z, rad_c1, rad_c2, perturb, lp_a, lp_b, seed + q, BLOCK_N, BLOCK_K, BLOCK_KR,
                PRECISION, PERTURB, SPLIT, SPLIT_BF16)
            if STATS:
                out = stats_ptr + (tl.program_id(0) * n_q + q) * 2
                tl.store(out, tl.sum(uncertified.to(tl.int32), axis=0))
                tl.store(out + 1, searched)
        else:
            idx = _nearest(r, cb_q, norm_ptr + q * K, K, D, d, d_ok, BLOCK_N, BLOCK_K, PRECISION)
        tl.store(code_ptrs, idx.to(tl.int64), mask=row_ok)
        code_ptrs += N
        chosen = tl.load(cb_q + idx[:, None] * D + d[None, :], mask=mask, other=0.0)
        r = r - chosen


@triton.jit(do_not_specialize=["n_q"])
def _rvq_train_kernel(x_ptr, cb_ptr, hi_ptr, lo_ptr, norm_ptr, codes_ptr, inputs_ptr, out_ptr, sqerr_ptr, N, T, D,
                      K, n_q, stride_xb, stride_xd, stride_xt, cert_p, cert_b, cert_z, rad_c1, rad_c2,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KR: tl.constexpr, BLOCK_D: tl.constexpr,
                      PRECISION: tl.constexpr, CERTIFY: tl.constexpr, SPLIT: tl.constexpr,
                      SPLIT_BF16: tl.constexpr):
    """The training forward of every stage for a block of rows (upstream's values, stage by stage):
    r_0 = x; code_i = nearest(r_i); st_i = r_i + (e_i - r_i) (the straight-through value);
    out = sum of st_i; r_(i+1) = r_i - st_i. Writes codes [n_q, N], each
    stage's input r_i [n_q, N, D] (for the statistics, expiry and the backward), out [N, D] and the
    per-row squared commitment error sum_d (st_i - r_i)^2 [n_q, N]."""
    rows, row_ok, d, d_ok, mask, row_start = _row_tile(N, T, D, stride_xb, stride_xt, BLOCK_N, BLOCK_D)
    r = tl.load(x_ptr + row_start[:, None] + d[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    rows64 = rows.to(tl.int64)
    tile = rows[:, None] * D + d[None, :]  # int32: N * D < 2^31 (checked by the wrapper)
    tl.store(out_ptr + tile, tl.zeros([BLOCK_N, BLOCK_D], tl.float32), mask=mask)
    stage_inputs = inputs_ptr  # advanced by N * D per stage (64-bit pointer arithmetic)
    for q in range(n_q):
        cb_q = cb_ptr + q * K * D
        tl.store(stage_inputs + tile, r, mask=mask)
        stage_inputs += N * D
        if CERTIFY:
            idx, uncertified, searched = _certified_nearest(
                r, rows, row_ok, cb_q, hi_ptr + q * K * D, lo_ptr + q * K * D, norm_ptr + q * K, K, D, d, d_ok,
                cert_p, cert_b, cert_z, rad_c1, rad_c2, 0.0, 0.0, 0.0, 0, BLOCK_N, BLOCK_K, BLOCK_KR, PRECISION,
                False, SPLIT, SPLIT_BF16)
        else:
            idx = _nearest(r, cb_q, norm_ptr + q * K, K, D, d, d_ok, BLOCK_N, BLOCK_K, PRECISION)
        tl.store(codes_ptr + q * N + rows64, idx.to(tl.int64), mask=row_ok)
        chosen = tl.load(cb_q + idx[:, None] * D + d[None, :], mask=mask, other=0.0)
        st = r + (chosen - r)
        err = tl.where(mask, st - r, 0.0)
        tl.store(sqerr_ptr + q * N + rows64, tl.sum(err * err, axis=1), mask=row_ok)
        acc = tl.load(out_ptr + tile, mask=mask, other=0.0)
        tl.store(out_ptr + tile, acc + st, mask=mask)
        r = r - st


@triton.jit
def _rvq_train_backward_kernel(grad_out_ptr, grad_x_ptr, cb_ptr, codes_ptr, inputs_ptr, scale_ptr, N, T, D, K,
                               stages, stride_gb, stride_gd, stride_gt, stride_xb, stride_xd, stride_xt,
                               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_x = grad_out + sum over the first `stages` stages of scale_i (r_i - st_i): the
    straight-through estimator plus the commitment losses' gradients (scale_i = 2 w_i g_i / (N D)),
    in stage order. grad_out and grad_x are [B, D, T] (each with its strides), the rest as
    `_rvq_train_kernel`."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    b = (rows // T).to(tl.int64)
    t = (rows % T).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (d < D)[None, :]
    rows64 = rows.to(tl.int64)
    tile = rows[:, None] * D + d[None, :]  # int32: N * D < 2^31 (checked by the wrapper)
    g = tl.load(grad_out_ptr + b[:, None] * stride_gb + d[None, :] * stride_gd + t[:, None] * stride_gt, mask=mask,
                other=0.0).to(tl.float32)
    stage_inputs = inputs_ptr
    for q in range(stages):
        r = tl.load(stage_inputs + tile, mask=mask, other=0.0)
        stage_inputs += N * D
        idx = tl.load(codes_ptr + q * N + rows64, mask=row_ok, other=0)
        chosen = tl.load(cb_ptr + q * K * D + idx[:, None] * D + d[None, :], mask=mask, other=0.0)
        st = r + (chosen - r)
        g = g + tl.load(scale_ptr + q) * (r - st)
    tl.store(grad_x_ptr + b[:, None] * stride_xb + d[None, :] * stride_xd + t[:, None] * stride_xt, g, mask=mask)


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
def _vq_assign_kernel(x_ptr, cb_ptr, norm_ptr, codes_ptr, quant_ptr, N, D, K, stride_xn, stride_xd,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                      PRECISION: tl.constexpr):
    """One stage on x [N, D]: codes [N] and the quantized rows [N, D]."""
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


@triton.jit
def _segment_sums_kernel(x_ptr, order_ptr, offsets_ptr, sums_ptr, K, D, stride_xn, stride_xd,
                         GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """sums[k] = the rows x[order[j]] for j in [offsets[k], offsets[k + 1]), added in that order in
    blocks of BLOCK_R rows (a fixed tree within a block): the same bits on every run, no atomics.
    A program takes GROUP consecutive codewords."""
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    for k in range(tl.program_id(0) * GROUP, tl.minimum(tl.program_id(0) * GROUP + GROUP, K)):
        start = tl.load(offsets_ptr + k)
        end = tl.load(offsets_ptr + k + 1)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for r0 in range(start, end, BLOCK_R):
            j = r0 + tl.arange(0, BLOCK_R)
            ok = j < end
            rows = tl.load(order_ptr + j, mask=ok, other=0)
            xb = tl.load(x_ptr + rows[:, None] * stride_xn + d[None, :] * stride_xd, mask=ok[:, None] & d_ok[None, :],
                         other=0.0)
            acc += tl.sum(xb.to(tl.float32), axis=0)
        tl.store(sums_ptr + k * D + d, acc, mask=d_ok)


# -- launch wrappers -------------------------------------------------------------------------------

def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _block_kr(K: int, block_k: int) -> int:
    """Codewords per block of the certified search's fp32 rescoring: 16 on a GPU (a row's
    candidates are a few codewords: the fewer searched with them the better); the interpreter
    takes the exact kernel's block (the same shapes in both kernels, for numpy's products)."""
    return block_k if interpreting() else min(16, block_k)


def _clamped(N: int, K: int, block_n: int, block_k: int, warps: int, stages: int):
    """A configuration with its blocks no larger than the launch needs (at least 16)."""
    return (min(block_n, max(16, triton.next_power_of_2(N))), min(block_k, max(16, triton.next_power_of_2(K))),
            warps, stages)


def _config(N: int, D: int, K: int, encode: bool, half_input: bool = False, precision: str = "ieee"):
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
      at most 292 B of spill stores elsewhere). In tf32x3 that tile needs 320 KiB of shared memory
      on sm_90 and 196 KiB on sm_80 (over both limits: it could not launch), so tf32x3 takes
      32 x 64 with 4 warps (97 KiB, no spills on either; not timed).
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
        elif measured and precision == "tf32x3":
            block_n, block_k, warps, stages = 32, 64, 4, 3
        elif measured:
            block_n, block_k, warps, stages = 64, 128, 8, 3
        else:
            block_n, block_k, warps, stages = 16, 64, 4, 3
    return _clamped(N, K, block_n, block_k, warps, stages)


def _certified_config(N: int, D: int, K: int):
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) of the certified search. Not timed yet (no GPU
    since it was written); chosen by compiling the candidates with triton 3.6 and 3.9 for sm_80 and
    sm_90 (tools/compile_gpu.py): 64 rows (wgmma needs 64 per warpgroup on sm_90) x 32 codewords
    with 8 warps. With the per-slot pass 1 and bf16x3 on split operands (the default), triton 3.6:
    no spills on sm_90 (212 registers), 100-108 B of spill stores on sm_80; Triton's own bf16x3
    lowering spills 288-380 B there; tf32 none; tf32x3 spills at any 64-row tile (not a default).
    64 x 64 also compiles without spills on sm_90 (250 registers; 784 B on sm_80): an autotuning
    candidate. Larger D: 32 x 32."""
    if interpreting():
        block_n, block_k, warps, stages = 128, 256, 4, 1
    elif _block_d(D) > 128:
        block_n, block_k, warps, stages = 32, 32, 4, 2
    else:
        block_n, block_k, warps, stages = 64, 32, 8, 2
    return _clamped(N, K, block_n, block_k, warps, stages)


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


#: The certified search: any tile gives the same codes (see `_certified_nearest`); candidates from
#: the compile sweep (64 x 64 with 8 warps: no spills in tf32 on either architecture).
LISTED_CERTIFIED = [(64, 32, 8, 2), (64, 64, 8, 2), (64, 64, 8, 3), (64, 64, 4, 2), (64, 128, 8, 2)]

_LISTED_CONFIGS = {"encode": _configs(LISTED_ENCODE), "assign": _configs(LISTED_ASSIGN),
                   "certified": _configs(LISTED_CERTIFIED)}


def _launch(kernel, args, constants, default, listed, N, K, key, reset_to_zero=()):
    block_n, block_k, warps, stages = default
    tuning.launch(kernel, lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),), args, constants,
                  tuning.config({"BLOCK_N": block_n, "BLOCK_K": block_k}, warps, stages), listed,
                  key=key, size=N, extents={"BLOCK_N": N, "BLOCK_K": K}, reset_to_zero=reset_to_zero)


def split_codebooks(codebooks: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """[Q, K, D] fp32 -> (hi, lo) bf16 [Q, K, D]: hi = bf16(c), lo = bf16(c - hi), rounded to nearest
    as `ops.rvq.lowp_dot('bf16x3')` and the kernel's rows. Kept on the codebooks tensor itself until
    it changes (inference splits a model's stacked codebooks once, training once per step): the
    halves live exactly as long as the tensor they were made from (a CUDA graph that captured a
    search holds both)."""
    key = (codebooks._version, codebooks.data_ptr())
    cached = getattr(codebooks, "_encodec_fast_split", None)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    hi = codebooks.to(torch.bfloat16)
    lo = (codebooks - hi.float()).to(torch.bfloat16)
    codebooks._encodec_fast_split = (key, hi, lo)
    return hi, lo


def _split_args(codebooks: torch.Tensor, split: bool) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    return split_codebooks(codebooks) if split else (codebooks, codebooks)


#: Launch arguments of the certified search that only tests change (`rvq_encode`'s `perturb`).
_NO_PERTURBATION = dict(perturb=0.0, lp_a=0.0, lp_b=0.0, seed=0)


def _dot_precision(mode: str) -> str:
    """`tl.dot`'s input_precision for a search mode (bf16x3-triton: Triton's bf16x3; bf16x3's
    products take split operands, SPLIT). The interpreter computes every tl.dot in fp32 and knows
    only tf32, tf32x3 and ieee."""
    if interpreting():
        return "ieee"
    return "bf16x3" if mode == "bf16x3-triton" else mode


def rvq_encode(x: torch.Tensor, codebooks: torch.Tensor, norms: torch.Tensor, n_q: int,
               precision: str = "exact", lowp: str = "bf16x3", perturb: float = 0.0,
               stats: bool = False):
    """x [B, D, T] (any strides), codebooks [Q, K, D] fp32 contiguous, norms [Q, K] -> codes [n_q, B*T].

    precision: 'exact' (the certified search: distances in `lowp` on tensor cores, rows they cannot
    decide rescored in fp32; the codes of 'ieee'), 'ieee' (fp32 products on CUDA cores), or an
    approximate tensor-core mode ('tf32', 'tf32x3'). `perturb` (tests only, 'exact'): move each
    low-precision distance by up to that multiple of its error bound. `stats` ('exact'): also return
    [n_q, 2] int64, per stage the uncertified rows and the (64-row tile, codeword block) pairs
    searched again in fp32."""
    from encodec_fast.ops import rvq as ref
    B, D, T = x.shape
    K = codebooks.shape[1]
    N = B * T
    codes = torch.empty(n_q, N, dtype=torch.int64, device=x.device)
    certify = precision == "exact"
    config = _certified_config(N, D, K) if certify else _config(N, D, K, encode=True)
    programs = triton.cdiv(N, config[0]) if stats and certify else 1
    counts = torch.zeros(programs, max(n_q, 1), 2, dtype=torch.int32, device=x.device)
    if N and n_q:
        cert = ref.certificate(lowp, D) if certify else ref.Certificate(0.0, 0.0, 0.0, 0.0, 0.0)
        extra = dict(_NO_PERTURBATION)
        if perturb:
            extra.update(perturb=float(perturb), lp_a=cert.lp_a, lp_b=cert.lp_b, seed=1234)
        radius = ref.radius_factors(D)
        split = certify and lowp == "bf16x3"
        dot = _dot_precision(lowp if certify else precision)
        args = (x, codebooks, *_split_args(codebooks, split), norms, codes, counts, N, T, D, K, n_q, *x.stride(),
                cert.a, cert.b, cert.z, *radius, extra["perturb"], extra["lp_a"], extra["lp_b"], extra["seed"])
        consts = dict(BLOCK_D=_block_d(D), BLOCK_KR=_block_kr(K, config[1]), PRECISION=dot, CERTIFY=certify,
                      PERTURB=bool(perturb), STATS=stats and certify, SPLIT=split,
                      SPLIT_BF16=split and not interpreting())
        listed = _LISTED_CONFIGS["certified" if certify else "encode"]
        if stats and certify:
            listed = []  # one launch: the counts are per program of the default tile
        _launch(_rvq_encode_kernel, args, consts, config, listed, N, K, key=("D", "K", "n_q", "PRECISION", "CERTIFY"))
    if stats:
        return codes, counts.sum(0)[:n_q].long()
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
                             BLOCK_N=block_n, BLOCK_D=_block_d(D), num_warps=4, **tuning.LAUNCH_OPTIONS)
    return out


def vq_assign(x: torch.Tensor, codebook: torch.Tensor, norms: torch.Tensor, stats: bool,
              precision: str = "ieee"):
    """x [N, D], codebook [K, D] fp32 contiguous, norms [K] -> (codes [N], quantized [N, D] in x's
    dtype, counts [K] fp32 or None, sums [K, D] fp32 or None).

    The statistics are deterministic (a resumed training run repeats its bits): the rows are
    sorted by code (a stable sort), counts are the sorted runs' lengths, and each codeword's sum
    adds its rows in row order (`segment_sums`); no floating-point atomics."""
    N, D = x.shape
    K = codebook.shape[0]
    codes = torch.empty(N, dtype=torch.int64, device=x.device)
    quant = torch.empty(N, D, dtype=x.dtype, device=x.device)
    if N:
        _launch(_vq_assign_kernel, (x, codebook, norms, codes, quant, N, D, K, *x.stride()),
                dict(BLOCK_D=_block_d(D), PRECISION=precision),
                _config(N, D, K, encode=False, half_input=x.dtype in (torch.float16, torch.bfloat16),
                        precision=precision),
                _LISTED_CONFIGS["assign"], N, K, key=("D", "K", "PRECISION"))
    if not stats:
        return codes, quant, None, None
    counts, sums = segment_sums(x, codes, K)
    return codes, quant, counts, sums


def segment_sums(x: torch.Tensor, codes: torch.Tensor, K: int) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """Per-codeword row counts [K] and row sums [K, D] (fp32) of x [N, D] under codes [N], in a fixed
    order whatever the device: a stable sort of the codes, then each codeword's rows in row order."""
    N, D = x.shape
    sorted_codes, order = torch.sort(codes, stable=True)
    offsets = torch.searchsorted(sorted_codes, torch.arange(K + 1, device=x.device, dtype=sorted_codes.dtype))
    counts = (offsets[1:] - offsets[:-1]).to(torch.float32)
    sums = torch.empty(K, D, dtype=torch.float32, device=x.device)
    group = 128 if interpreting() else 4
    _segment_sums_kernel[(triton.cdiv(K, group),)](x, order, offsets, sums, K, D, *x.stride(), GROUP=group,
                                                   BLOCK_R=128 if interpreting() else 32, BLOCK_D=_block_d(D),
                                                   num_warps=4, **tuning.LAUNCH_OPTIONS)
    return counts, sums


def rvq_train_forward(x: torch.Tensor, codebooks: torch.Tensor, norms: torch.Tensor, n_q: int, detach: bool,
                      precision: str = "exact", lowp: str = "bf16x3"):
    """`_rvq_train_kernel`: x [B, D, T] -> (codes [n_q, B*T], inputs [n_q, B*T, D], out [B*T, D],
    squared commitment errors per row [n_q, B*T]), all fp32 but the codes. `detach`: out is
    x + (sum - x) (audiocraft's fix: one straight-through estimator on the sum)."""
    from encodec_fast.ops import rvq as ref
    B, D, T = x.shape
    K = codebooks.shape[1]
    N = B * T
    dev = x.device
    codes = torch.empty(n_q, N, dtype=torch.int64, device=dev)
    inputs = torch.empty(n_q, N, D, dtype=torch.float32, device=dev)
    out = torch.empty(N, D, dtype=torch.float32, device=dev)
    sqerr = torch.empty(n_q, N, dtype=torch.float32, device=dev)
    if N == 0 or n_q == 0:
        return codes, inputs, out.zero_(), sqerr
    if N * D >= 2 ** 31:
        raise ValueError(f"{N} rows of {D}: more than 2^31 elements per stage; train on smaller batches")
    certify = precision == "exact"
    config = _certified_config(N, D, K) if certify else _config(N, D, K, encode=True)
    cert = ref.certificate(lowp, D) if certify else ref.Certificate(0.0, 0.0, 0.0, 0.0, 0.0)
    split = certify and lowp == "bf16x3"
    args = (x, codebooks, *_split_args(codebooks, split), norms, codes, inputs, out, sqerr, N, T, D, K, n_q,
            *x.stride(), cert.a, cert.b, cert.z, *ref.radius_factors(D))
    consts = dict(BLOCK_D=_block_d(D), BLOCK_KR=_block_kr(K, config[1]),
                  PRECISION=_dot_precision(lowp if certify else precision), CERTIFY=certify, SPLIT=split,
                  SPLIT_BF16=split and not interpreting())
    _launch(_rvq_train_kernel, args, consts, config, [], N, K, key=())
    if detach:  # one straight-through estimator on the sum: x + (sum - x), elementwise in fp32 as torch
        rows = x.detach().float().transpose(1, 2).reshape(N, D)
        out = rows + (out - rows)
    return codes, inputs, out, sqerr


def rvq_train_backward(grad_out: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor, inputs: torch.Tensor,
                       scales: torch.Tensor, stages: int) -> torch.Tensor:
    """`_rvq_train_backward_kernel`: grad_out [B, D, T] -> grad_x [B, D, T] (fp32)."""
    B, D, T = grad_out.shape
    K = codebooks.shape[1]
    N = B * T
    grad_x = torch.empty(B, D, T, dtype=torch.float32, device=grad_out.device)
    if N * D >= 2 ** 31:
        raise ValueError(f"{N} rows of {D}: more than 2^31 elements per stage; train on smaller batches")
    if N:
        block_n = 128 if interpreting() else 32
        _rvq_train_backward_kernel[(triton.cdiv(N, block_n),)](
            grad_out, grad_x, codebooks, codes, inputs, scales.float().contiguous(), N, T, D, K, stages,
            *grad_out.stride(), *grad_x.stride(), BLOCK_N=block_n, BLOCK_D=_block_d(D), num_warps=4,
            **tuning.LAUNCH_OPTIONS)
    return grad_x
