"""Triton kernels for SEANet's convolutions: ELU -> pad -> Conv1d (+ residual) and
ELU -> ConvTranspose1d -> trim, each in one pass, as implicit matrix products.

- `conv1d`: out[b, o, t] = bias[o] (+ res[b, o, t]) + sum_{i, k} W[o, i, k] * f(x)[b, i, t*s + k*d - left],
  where f is ELU (optional) and the index outside [0, L) is mapped by the padding rule inside the
  kernel (reflect with upstream's rule for inputs shorter than the padding, or zeros): no padded
  copy and no separate ELU pass are written to memory.
- `conv_transpose1d`: one output phase r (t' = j*s + r) per program, so every tap that reaches it
  is k = r + s*m and reads input j - m: a dense matrix product per tap. Only the kept range
  [start, start + length) of the full output is computed (upstream's trimming).
- `conv2d_leaky_relu`: the MS-STFT discriminator's Conv2d (zero padding, stride, dilation) with
  bias and LeakyReLU applied before the single store; each (kh, kw) tap is one dense product over
  the input channels, reusing the 1-d tap loop along the frequency axis.

Weights come pre-arranged as [K, C_out, C_in] (contiguous, fp32 or the input's dtype). The dot
precision is a constexpr: 'ieee' (exact fp32 products), 'tf32x3' or 'tf32'; half inputs may
multiply in their own dtype (HALF_DOT) with fp32 accumulation. The wrappers in
`encodec_fast.ops.conv` validate arguments; call those.
"""


import math
import typing as tp

import torch
import triton
import triton.language as tl

from ..ops.backend import interpreting
from . import tuning


@triton.jit
def _elu(v):
    return tl.where(v > 0, v, tl.exp(v) - 1.0)


@triton.jit
def _dot_acc(acc, a, b, HALF_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation: in a's (half) dtype where HALF_DOT, else in fp32 at the
    dot precision PRECISION ('ieee', 'tf32x3', 'tf32')."""
    if HALF_DOT:
        acc += tl.dot(a, b.to(a.dtype), out_dtype=tl.float32)
    else:
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    return acc


@triton.jit
def _source_index(i, L, L_ext, REFLECT: tl.constexpr):
    """Index into x (or -1 for a zero) of padded position i - left = i (already shifted)."""
    if REFLECT:
        j = tl.where(i < 0, -i, i)
        j = tl.where(j >= L_ext, 2 * (L_ext - 1) - j, j)
    else:
        j = i
    return tl.where((j >= 0) & (j < L), j, -1)


@triton.jit
def _accumulate_tap(acc, x_b, src, src_ok, w_ptr, k, o, o_ok, C_in, C_out, sx_c, sx_t,
                    BLOCK_CI: tl.constexpr, ELU: tl.constexpr, HALF_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc[o, t] += sum_i W[k, o, i] * f(x[i, src[t]]) over all input channels (zero where not src_ok)."""
    ci = tl.arange(0, BLOCK_CI)
    for c0 in range(0, C_in, BLOCK_CI):
        c = c0 + ci
        c_ok = c < C_in
        xv = tl.load(x_b + c[:, None].to(tl.int64) * sx_c + src[None, :].to(tl.int64) * sx_t,
                     mask=c_ok[:, None] & src_ok[None, :], other=0.0)
        wv = tl.load(w_ptr + (k * C_out + o[:, None]) * C_in + c[None, :],
                     mask=o_ok[:, None] & c_ok[None, :], other=0.0)
        if ELU:
            xv = _elu(xv.to(tl.float32)).to(xv.dtype)
        if HALF_DOT:
            acc += tl.dot(wv.to(xv.dtype), xv, out_dtype=tl.float32)
        else:
            acc += tl.dot(wv.to(tl.float32), xv.to(tl.float32), input_precision=PRECISION)
    return acc


@triton.jit
def _epilogue(acc, b_ptr, res_ptr, out_ptr, b, o2, o_ok2, t2, mask, sr_b, sr_c, sr_t, so_b, so_c, so_t,
              HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ELU_OUT: tl.constexpr = False):
    """Bias, residual, the ELU of the result where ELU_OUT (for a convolution whose only reader
    applies ELU first: once per element here instead of once per tap and output-channel block
    there) and the one store of a 1-d convolution's output tile in either orientation: o2 and t2
    are the output-channel and position indices shaped [n, 1] and [1, m] (direct kernels) or [1, n]
    and [m, 1] (implicit-GEMM kernels), o_ok2 the channels' mask in o2's shape, mask the tile's."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + o2, mask=o_ok2, other=0.0).to(tl.float32)
    if HAS_RES:
        acc += tl.load(res_ptr + b * sr_b + o2.to(tl.int64) * sr_c + t2.to(tl.int64) * sr_t,
                       mask=mask, other=0.0).to(tl.float32)
    if ELU_OUT:
        acc = _elu(acc)
    tl.store(out_ptr + b * so_b + o2.to(tl.int64) * so_c + t2.to(tl.int64) * so_t,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv1d_kernel(x_ptr, w_ptr, b_ptr, res_ptr, out_ptr,
                   C_in, C_out, L, L_ext, T_out, left, stride, dilation,
                   sx_b, sx_c, sx_t, sr_b, sr_c, sr_t, so_b, so_c, so_t,
                   K: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_T: tl.constexpr,
                   ELU: tl.constexpr, REFLECT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                   HALF_DOT: tl.constexpr, PRECISION: tl.constexpr, ELU_OUT: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_o = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    o = pid_o * BLOCK_CO + tl.arange(0, BLOCK_CO)
    t_ok = t < T_out
    o_ok = o < C_out
    acc = tl.zeros([BLOCK_CO, BLOCK_T], tl.float32)
    x_b = x_ptr + b * sx_b
    for k in tl.static_range(K):
        src = _source_index(t * stride + k * dilation - left, L, L_ext, REFLECT)
        acc = _accumulate_tap(acc, x_b, src, t_ok & (src >= 0), w_ptr, k, o, o_ok, C_in, C_out, sx_c, sx_t,
                              BLOCK_CI, ELU, HALF_DOT, PRECISION)
    _epilogue(acc, b_ptr, res_ptr, out_ptr, b, o[:, None], o_ok[:, None], t[None, :], o_ok[:, None] & t_ok[None, :],
              sr_b, sr_c, sr_t, so_b, so_c, so_t, HAS_BIAS, HAS_RES, ELU_OUT)


@triton.jit
def _conv_transpose1d_kernel(x_ptr, w_ptr, b_ptr, out_ptr,
                             C_in, C_out, L, start, length, j0, n_j,
                             sx_b, sx_c, sx_t, so_b, so_c, so_t,
                             K: tl.constexpr, S: tl.constexpr,
                             BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_J: tl.constexpr,
                             ELU: tl.constexpr, HAS_BIAS: tl.constexpr, HALF_DOT: tl.constexpr,
                             PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    r = pid % S                      # output phase
    j = j0 + (pid // S) * BLOCK_J + tl.arange(0, BLOCK_J)
    o = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    b = tl.program_id(2).to(tl.int64)
    tp = j * S + r                   # position in the full (untrimmed) output
    keep = (tp >= start) & (tp < start + length) & (j < j0 + n_j)
    o_ok = o < C_out
    acc = tl.zeros([BLOCK_CO, BLOCK_J], tl.float32)
    x_b = x_ptr + b * sx_b
    for m in tl.static_range((K + S - 1) // S):
        k = r + m * S
        src = j - m
        # A tap past the kernel (k >= K, when K is not a multiple of S) reads no input, so its
        # weights (masked to the clamped index) never count. k is compared as a vector: Triton's
        # interpreter turns (vector & scalar) into an int32 mask, which 3.9 refuses.
        src_ok = keep & (src >= 0) & (src < L) & ((j * 0 + k) < K)
        acc = _accumulate_tap(acc, x_b, src, src_ok, w_ptr, tl.minimum(k, K - 1), o, o_ok, C_in, C_out,
                              sx_c, sx_t, BLOCK_CI, ELU, HALF_DOT, PRECISION)
    pos = tp - start
    _epilogue(acc, b_ptr, out_ptr, out_ptr, b, o[:, None], o_ok[:, None], pos[None, :], o_ok[:, None] & keep[None, :],
              0, 0, 0, so_b, so_c, so_t, HAS_BIAS, False)


@triton.jit
def _conv2d_leaky_relu_kernel(x_ptr, w_ptr, b_ptr, out_ptr,
                              C_in, C_out, H, W, H_out, W_out,
                              sh, sw, dh, dw, ph, pw, slope,
                              sx_b, sx_c, sx_h, sx_w, so_b, so_c, so_h, so_w,
                              KH: tl.constexpr, KW: tl.constexpr,
                              BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr,
                              HAS_BIAS: tl.constexpr, ACTIVATE: tl.constexpr, HALF_DOT: tl.constexpr,
                              PRECISION: tl.constexpr):
    # A block of output positions of the flattened (H_out, W_out) plane: rows of any width fill it.
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    o = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    b = tl.program_id(2).to(tl.int64)
    p_ok = p < H_out * W_out
    h = p // W_out
    w_out = p % W_out
    o_ok = o < C_out
    acc = tl.zeros([BLOCK_CO, BLOCK_P], tl.float32)
    x_b = x_ptr + b * sx_b
    for kh in tl.static_range(KH):
        h_in = h * sh + kh * dh - ph
        row_ok = p_ok & (h_in >= 0) & (h_in < H)
        # A loop, not unrolled: with the 27 taps of a 3x9 kernel unrolled, ptxas spilled 2-6 KB per
        # thread on sm_80/sm_90 (tools/compile_gpu.py); looping over kw: none.
        for kw in range(KW):
            w_in = w_out * sw + kw * dw - pw
            src_ok = row_ok & (w_in >= 0) & (w_in < W)
            # The tap loop reads x_b + c * sx_c + src: src is the element offset of (h_in, w_in).
            src = h_in.to(tl.int64) * sx_h + w_in.to(tl.int64) * sx_w
            acc = _accumulate_tap(acc, x_b, src, src_ok, w_ptr, kh * KW + kw, o, o_ok, C_in, C_out, sx_c, 1,
                                  BLOCK_CI, False, HALF_DOT, PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[:, None]
    if ACTIVATE:
        acc = tl.where(acc > 0, acc, acc * slope)
    off = h.to(tl.int64) * so_h + w_out.to(tl.int64) * so_w
    tl.store(out_ptr + b * so_b + o[:, None].to(tl.int64) * so_c + off[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=o_ok[:, None] & p_ok[None, :])


# -- implicit GEMM on tensor cores: M = output positions, N = output channels, K = input channels x taps --

@triton.jit
def _gemm_step(acc, x_b, rows, rows_ok, w_ptr, k, c, o, o_ok, C_in, C_out, sx_c,
               ELU: tl.constexpr, HALF_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc[t, o] += sum_{i in c} f(x[i, row t]) * W[k, i, o], W as [taps, C_in, C_out]: one tap and
    one block c of input channels, the rows given as offsets (`_row_offsets`). A is a [positions,
    channels] tile (each row one contiguous C-vector when x is channels-last), B a [channels,
    outputs] tile (contiguous along the outputs)."""
    c_ok = c < C_in
    a = tl.load(x_b + rows[:, None] + c[None, :] * sx_c, mask=rows_ok[:, None] & c_ok[None, :], other=0.0)
    w = tl.load(w_ptr + (k * C_in + c[:, None]) * C_out + o[None, :], mask=c_ok[:, None] & o_ok[None, :], other=0.0)
    if ELU:
        a = _elu(a.to(tl.float32)).to(a.dtype)
    return _dot_acc(acc, a, w, HALF_DOT, PRECISION)


@triton.jit
def _row_offsets(src, sx_t):
    """Offsets of source rows src (-1 or any negative: padding) for `_gemm_step`: padding rows read
    row 0 under a false mask, so no negative address is ever formed (a pipelined masked load may
    still issue it)."""
    return tl.maximum(src, 0).to(tl.int64) * sx_t


@triton.jit
def _accumulate_tap_gemm(acc, x_b, src, src_ok, w_ptr, k, o, o_ok, C_in, C_out, sx_c, sx_t,
                         BLOCK_CI: tl.constexpr, ELU: tl.constexpr, HALF_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """`_gemm_step` over every block of input channels of tap k."""
    ci = tl.arange(0, BLOCK_CI)
    rows = _row_offsets(src, sx_t)
    for c0 in range(0, C_in, BLOCK_CI):
        acc = _gemm_step(acc, x_b, rows, src_ok, w_ptr, k, c0 + ci, o, o_ok, C_in, C_out, sx_c, ELU, HALF_DOT,
                         PRECISION)
    return acc


@triton.jit
def _conv1d_gemm_kernel(x_ptr, w_ptr, b_ptr, res_ptr, out_ptr,
                        C_in, C_out, L, L_ext, T_out, left, stride, dilation,
                        sx_b, sx_c, sx_t, sr_b, sr_c, sr_t, so_b, so_c, so_t,
                        K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
                        ELU: tl.constexpr, REFLECT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                        HALF_DOT: tl.constexpr, PRECISION: tl.constexpr, ELU_OUT: tl.constexpr):
    """`_conv1d_kernel` as an implicit GEMM with the positions as M: [BLOCK_T, BLOCK_CO] tiles,
    the tensor cores' shape (wgmma's M is 64) whatever the channel counts."""
    pid_t = tl.program_id(0)
    pid_o = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    o = pid_o * BLOCK_CO + tl.arange(0, BLOCK_CO)
    t_ok = t < T_out
    o_ok = o < C_out
    acc = tl.zeros([BLOCK_T, BLOCK_CO], tl.float32)
    x_b = x_ptr + b * sx_b
    ci = tl.arange(0, BLOCK_CI)
    n_cb = tl.cdiv(C_in, BLOCK_CI)
    # One loop over (tap, block of input channels), taps outer as in a loop per tap (the same sums):
    # one software pipeline for the whole reduction, the next tap's loads in flight during this
    # one's products (a 32-channel layer has one block per tap); a tap's source rows computed once.
    k = 0
    cb = 0
    src = _source_index(t * stride - left, L, L_ext, REFLECT)
    rows, rows_ok = _row_offsets(src, sx_t), t_ok & (src >= 0)
    for _ in range(K * n_cb):
        acc = _gemm_step(acc, x_b, rows, rows_ok, w_ptr, k, cb * BLOCK_CI + ci, o, o_ok, C_in, C_out, sx_c, ELU,
                         HALF_DOT, PRECISION)
        cb += 1
        if cb == n_cb:
            cb = 0
            k += 1
            src = _source_index(t * stride + k * dilation - left, L, L_ext, REFLECT)
            rows, rows_ok = _row_offsets(src, sx_t), t_ok & (src >= 0)
    _epilogue(acc, b_ptr, res_ptr, out_ptr, b, o[None, :], o_ok[None, :], t[:, None], t_ok[:, None] & o_ok[None, :],
              sr_b, sr_c, sr_t, so_b, so_c, so_t, HAS_BIAS, HAS_RES, ELU_OUT)


@triton.jit
def _conv_transpose1d_gemm_kernel(x_ptr, w_ptr, b_ptr, out_ptr,
                                  C_in, C_out, L, start, length, j0, n_j,
                                  sx_b, sx_c, sx_t, so_b, so_c, so_t,
                                  K: tl.constexpr, S: tl.constexpr,
                                  BLOCK_J: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
                                  ELU: tl.constexpr, HAS_BIAS: tl.constexpr, HALF_DOT: tl.constexpr,
                                  PRECISION: tl.constexpr):
    """`_conv_transpose1d_kernel` as an implicit GEMM: one output phase r per program, [BLOCK_J,
    BLOCK_CO] tiles of the positions j*S + r, taps k = r + m*S reading input j - m."""
    pid = tl.program_id(0)
    r = pid % S
    j = j0 + (pid // S) * BLOCK_J + tl.arange(0, BLOCK_J)
    o = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    b = tl.program_id(2).to(tl.int64)
    tp = j * S + r
    keep = (tp >= start) & (tp < start + length) & (j < j0 + n_j)
    o_ok = o < C_out
    acc = tl.zeros([BLOCK_J, BLOCK_CO], tl.float32)
    x_b = x_ptr + b * sx_b
    ci = tl.arange(0, BLOCK_CI)
    n_cb = tl.cdiv(C_in, BLOCK_CI)
    # (tap, channel block) in one pipelined loop, a tap's rows computed once: as in conv1d. Tap m
    # is k = r + m S, reading input j - m; a phase with fewer taps than (K + S - 1) // S masks the
    # last one out.
    m = 0
    cb = 0
    rows_ok = keep & (j < L) & ((j * 0 + r) < K)  # a vector mask: triton 3.9's interpreter refuses a scalar one
    rows = _row_offsets(tl.where(rows_ok, j, 0), sx_t)
    for _ in range(((K + S - 1) // S) * n_cb):
        acc = _gemm_step(acc, x_b, rows, rows_ok, w_ptr, tl.minimum(r + m * S, K - 1), cb * BLOCK_CI + ci, o, o_ok,
                         C_in, C_out, sx_c, ELU, HALF_DOT, PRECISION)
        cb += 1
        if cb == n_cb:
            cb = 0
            m += 1
            src = j - m
            rows_ok = keep & (src >= 0) & (src < L) & ((src * 0 + r + m * S) < K)
            rows = _row_offsets(tl.where(rows_ok, src, 0), sx_t)
    pos = tp - start
    _epilogue(acc, b_ptr, out_ptr, out_ptr, b, o[None, :], o_ok[None, :], pos[:, None], keep[:, None] & o_ok[None, :],
              0, 0, 0, so_b, so_c, so_t, HAS_BIAS, False)


@triton.jit
def _conv2d_rows(h, w_out, p_ok, kh, kw, H, W, sh, sw, dh, dw, ph, pw, sx_h, sx_w):
    """(offsets, mask) of the input rows tap (kh, kw) reads for output positions (h, w_out)."""
    h_in = h * sh + kh * dh - ph
    w_in = w_out * sw + kw * dw - pw
    ok = p_ok & (h_in >= 0) & (h_in < H) & (w_in >= 0) & (w_in < W)
    return tl.where(ok, h_in.to(tl.int64) * sx_h + w_in.to(tl.int64) * sx_w, 0), ok


@triton.jit
def _conv2d_gemm_kernel(x_ptr, w_ptr, b_ptr, out_ptr,
                        C_in, C_out, H, W, H_out, W_out, sh, sw, dh, dw, ph, pw, slope, x_scale,
                        sx_b, sx_c, sx_h, sx_w, so_b, so_c, so_h, so_w,
                        KH: tl.constexpr, KW: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
                        HAS_BIAS: tl.constexpr, ACTIVATE: tl.constexpr, HALF_DOT: tl.constexpr,
                        PRECISION: tl.constexpr, H_FAST: tl.constexpr):
    """`_conv2d_leaky_relu_kernel` as an implicit GEMM: M = output positions of the (H_out, W_out)
    plane (H_FAST: frames fastest, for inputs whose frames are closer in memory than their bins),
    N = output channels, K = input channels x taps; W as [taps, C_in,
    C_out]; the products times `x_scale` (the spectrogram's normalisation, folded in)."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    o = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    b = tl.program_id(2).to(tl.int64)
    p_ok = p < H_out * W_out
    if H_FAST:
        h = p % H_out
        w_out = p // H_out
    else:
        h = p // W_out
        w_out = p % W_out
    o_ok = o < C_out
    acc = tl.zeros([BLOCK_P, BLOCK_CO], tl.float32)
    x_b = x_ptr + b * sx_b
    ci = tl.arange(0, BLOCK_CI)
    n_cb = tl.cdiv(C_in, BLOCK_CI)
    # One loop over (tap, block of input channels), taps in (kh, kw) order: the whole reduction in
    # one software pipeline, the next tap's loads in flight during this one's products (32-channel
    # layers have one block per tap); a tap's source rows computed once.
    kh = 0
    kw = 0
    cb = 0
    rows, rows_ok = _conv2d_rows(h, w_out, p_ok, 0, 0, H, W, sh, sw, dh, dw, ph, pw, sx_h, sx_w)
    for _ in range(KH * KW * n_cb):
        acc = _gemm_step(acc, x_b, rows, rows_ok, w_ptr, kh * KW + kw, cb * BLOCK_CI + ci, o, o_ok, C_in, C_out, sx_c,
                         False, HALF_DOT, PRECISION)
        cb += 1
        if cb == n_cb:
            cb = 0
            kw += 1
            if kw == KW:
                kw = 0
                kh += 1
            rows, rows_ok = _conv2d_rows(h, w_out, p_ok, kh, kw, H, W, sh, sw, dh, dw, ph, pw, sx_h, sx_w)
    acc = acc * x_scale
    if HAS_BIAS:
        acc += tl.load(b_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    if ACTIVATE:
        acc = tl.where(acc > 0, acc, acc * slope)
    off = h.to(tl.int64) * so_h + w_out.to(tl.int64) * so_w
    tl.store(out_ptr + b * so_b + off[:, None] + o[None, :].to(tl.int64) * so_c,
             acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & o_ok[None, :])


@triton.jit
def _leaky_relu_grad_kernel(g_ptr, y_ptr, out_ptr, slope, numel, BLOCK: tl.constexpr):
    """out = g where y > 0, else g * slope: the gradient at a conv's output through its LeakyReLU,
    from the saved output (which has the pre-activation's sign for a slope >= 0); g, y and out
    share one memory layout (flat). In fp32, one rounding back to g's dtype."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < numel
    g = tl.load(g_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + idx, tl.where(y > 0, g, g * slope).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _input_grad_rows(h, w, r, q_ok, kh, kw, H_out, W_out, sh, sw, dh, ph, pw, dw, sg_h, sg_w):
    """(offsets into g, mask) of the output positions tap (kh, kw) takes input positions (h, w) of
    phase r to; kw reaches the phase (r + pw - kw dw is a multiple of sw, so the division is exact
    in either rounding)."""
    num_h = h + ph - kh * dh
    h_o = tl.maximum(num_h, 0) // sh
    w_o = (w - r) // sw + (r + pw - kw * dw) // sw
    ok = q_ok & (num_h >= 0) & (num_h % sh == 0) & (h_o < H_out) & (w_o >= 0) & (w_o < W_out)
    return tl.where(ok, h_o, 0).to(tl.int64) * sg_h + tl.where(ok, w_o, 0).to(tl.int64) * sg_w, ok


@triton.jit
def _conv2d_input_grad_gemm_kernel(g_ptr, w_ptr, dx_ptr,
                                   C_in, C_out, H, W, H_out, W_out, sh, sw, dh, dw, ph, pw, x_scale,
                                   n_blocks, kw_step,
                                   sg_b, sg_c, sg_h, sg_w, sd_b, sd_c, sd_h, sd_w,
                                   KH: tl.constexpr, KW: tl.constexpr,
                                   BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
                                   HALF_DOT: tl.constexpr, PRECISION: tl.constexpr, H_FAST: tl.constexpr):
    """The input gradient of a conv2d as an implicit GEMM: M = input positions, N = input channels,
    K = output channels x taps; g is the gradient at the conv's output (through its activation
    already: `_leaky_relu_grad_kernel`, once per element rather than once per tap and channel
    block); W as [taps, C_out, C_in]. One phase r of the width stride per program (the
    columns w = j * sw + r): a tap kw reaches them only if (r + pw - kw * dw) is a multiple of sw,
    that is kw = kw0 + n * kw_step (kw_step = sw / gcd(dw, sw)), so the program runs those taps
    only and no product is masked out along the width. One pipelined loop over (kh, reaching kw,
    block of output channels), in that order, a tap's rows computed when the tap changes (as the
    forward's). H_FAST: the positions enumerate frames fastest (a gradient stored frames first);
    `x_scale` as the forward's."""
    pid = tl.program_id(0)
    r = pid // n_blocks
    Wr = (W - r + sw - 1) // sw  # columns of phase r
    q = (pid % n_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    q_ok = q < H * Wr
    if H_FAST:
        h = q % H
        w = (q // H) * sw + r
    else:
        h = q // tl.maximum(Wr, 1)
        w = (q % tl.maximum(Wr, 1)) * sw + r
    i = tl.program_id(1) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    i_ok = i < C_in
    b = tl.program_id(2).to(tl.int64)
    co = tl.arange(0, BLOCK_CO)
    acc = tl.zeros([BLOCK_P, BLOCK_CI], tl.float32)
    g_b = g_ptr + b * sg_b
    kw0 = KW  # the first tap that reaches phase r (KW: none does)
    for t in range(kw_step):
        if ((r + pw - t * dw) % sw == 0) & (kw0 == KW):
            kw0 = t
    n_kw = tl.maximum(KW - kw0 + kw_step - 1, 0) // kw_step
    n_cb = tl.cdiv(C_out, BLOCK_CO)
    kh = 0
    n = 0
    cb = 0
    off_g, ok = _input_grad_rows(h, w, r, q_ok, 0, kw0, H_out, W_out, sh, sw, dh, ph, pw, dw, sg_h, sg_w)
    for _ in range(KH * n_kw * n_cb):
        c = cb * BLOCK_CO + co
        c_ok = c < C_out
        a = tl.load(g_b + off_g[:, None] + c[None, :].to(tl.int64) * sg_c, mask=ok[:, None] & c_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + ((kh * KW + kw0 + n * kw_step) * C_out + c[:, None]) * C_in + i[None, :],
                     mask=c_ok[:, None] & i_ok[None, :], other=0.0)
        if HALF_DOT:
            acc += tl.dot(a, wt.to(a.dtype), out_dtype=tl.float32)
        else:
            acc += tl.dot(a.to(tl.float32), wt.to(tl.float32), input_precision=PRECISION)
        cb += 1
        if cb == n_cb:
            cb = 0
            n += 1
            if n == n_kw:
                n = 0
                kh += 1
            off_g, ok = _input_grad_rows(h, w, r, q_ok, kh, kw0 + n * kw_step, H_out, W_out, sh, sw, dh, ph, pw, dw,
                                         sg_h, sg_w)
    off = h.to(tl.int64) * sd_h + w.to(tl.int64) * sd_w
    tl.store(dx_ptr + b * sd_b + off[:, None] + i[None, :].to(tl.int64) * sd_c,
             (acc * x_scale).to(dx_ptr.dtype.element_ty), mask=q_ok[:, None] & i_ok[None, :])


@triton.jit
def _conv2d_weight_grad_gemm_kernel(g_ptr, x_ptr, part_ptr, bias_part_ptr,
                                    C_in, C_out, H, W, H_out, W_out, sh, sw, dh, dw, ph, pw, N, chunk,
                                    sg_b, sg_c, sg_h, sg_w, sx_b, sx_c, sx_h, sx_w,
                                    KW: tl.constexpr,
                                    BLOCK_K: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
                                    HAS_BIAS: tl.constexpr, HALF_DOT: tl.constexpr,
                                    PRECISION: tl.constexpr, H_FAST: tl.constexpr):
    """The weight (and bias) gradient of a conv2d as GEMMs, g the gradient at its output (through
    its activation already): for one tap, one block of output and input channels and one chunk of
    the N = B x H_out x W_out positions, M = output channels, N = input channels, K = positions.
    Each program writes its partial sums to its own slot ([chunks, taps, C_out, C_in]); the caller
    adds the chunks in a fixed order: no atomics, the same bits on every run. The bias sums run in
    the programs that store them only (tap 0, the first block of input channels)."""
    pid_n = tl.program_id(0)
    tap = tl.program_id(1)
    n_i = tl.cdiv(C_in, BLOCK_CI)
    o = (tl.program_id(2) // n_i) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    i = (tl.program_id(2) % n_i) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    o_ok = o < C_out
    i_ok = i < C_in
    kh = tap // KW
    kw = tap % KW
    P = H_out * W_out
    acc = tl.zeros([BLOCK_CO, BLOCK_CI], tl.float32)
    bias_acc = tl.zeros([BLOCK_CO], tl.float32)
    bias_here = (tap == 0) & (tl.program_id(2) % n_i == 0)
    start = pid_n * chunk
    stop = tl.minimum(start + chunk, N)
    for k0 in range(start, stop, BLOCK_K):
        n = k0 + tl.arange(0, BLOCK_K)
        n_ok = n < stop
        b = (n // P).to(tl.int64)
        p = n % P
        if H_FAST:  # frames fastest: the input's memory order when its frames are closer than its bins
            h = p % H_out
            w_o = p // H_out
        else:
            h = p // W_out
            w_o = p % W_out
        g = tl.load(g_ptr + (b * sg_b + h.to(tl.int64) * sg_h + w_o.to(tl.int64) * sg_w)[None, :]
                    + o[:, None].to(tl.int64) * sg_c, mask=o_ok[:, None] & n_ok[None, :], other=0.0)
        h_in = h * sh + kh * dh - ph
        w_in = w_o * sw + kw * dw - pw
        x_ok = n_ok & (h_in >= 0) & (h_in < H) & (w_in >= 0) & (w_in < W)
        src = tl.where(x_ok, b * sx_b + h_in.to(tl.int64) * sx_h + w_in.to(tl.int64) * sx_w, 0)
        xt = tl.load(x_ptr + src[:, None] + i[None, :].to(tl.int64) * sx_c, mask=x_ok[:, None] & i_ok[None, :],
                     other=0.0)
        if HALF_DOT:
            acc += tl.dot(g, xt.to(g.dtype), out_dtype=tl.float32)
        else:
            acc += tl.dot(g.to(tl.float32), xt.to(tl.float32), input_precision=PRECISION)
        if HAS_BIAS:
            if bias_here:
                bias_acc += tl.sum(g.to(tl.float32), axis=1)
    n_taps = tl.num_programs(1)
    slot = (pid_n * n_taps + tap).to(tl.int64) * C_out * C_in
    tl.store(part_ptr + slot + o[:, None] * C_in + i[None, :], acc, mask=o_ok[:, None] & i_ok[None, :])
    if HAS_BIAS & bias_here:
        tl.store(bias_part_ptr + pid_n * C_out + o, bias_acc, mask=o_ok)


@triton.jit
def _block_tail(hidden, centre, rows_ok, b1_ptr, w2_ptr, b2_ptr, ws_ptr, bs_ptr, out_ptr, C, H,
                BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
                SHORTCUT: tl.constexpr, HAS_BS: tl.constexpr, HALF_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """A SEANet residual block's output from its first convolution's accumulated products `hidden`
    [rows, BLOCK_H] (bias not yet added) and its input rows `centre` [rows, BLOCK_C] (values of the
    activations' dtype): shortcut(centre) + conv_k1(ELU(hidden + b1)), each branch rounded as a
    layer's output, then the sum, rounded; an fp32 tile, zero in the rows not wanted (rows_ok)."""
    act = out_ptr.dtype.element_ty
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    h = tl.arange(0, BLOCK_H)
    h_ok = h < H
    if HAS_B1:
        hidden += tl.load(b1_ptr + h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
    # the first convolution's output is rounded to the activations' dtype, as between two layers
    hidden = _elu(hidden.to(act).to(tl.float32))
    w2 = tl.load(w2_ptr + h[:, None] * C + c[None, :], mask=h_ok[:, None] & c_ok[None, :], other=0.0)
    if HALF_DOT:
        y = tl.dot(hidden.to(act), w2.to(act), out_dtype=tl.float32)
    else:
        y = tl.dot(hidden, w2.to(tl.float32), input_precision=PRECISION)
    if HAS_B2:
        y += tl.load(b2_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    y = y.to(act).to(tl.float32)
    if SHORTCUT:
        ws = tl.load(ws_ptr + c[:, None] * C + c[None, :], mask=c_ok[:, None] & c_ok[None, :], other=0.0)
        if HALF_DOT:
            skip = tl.dot(centre.to(act), ws.to(act), out_dtype=tl.float32)
        else:
            skip = tl.dot(centre.to(tl.float32), ws.to(tl.float32), input_precision=PRECISION)
        if HAS_BS:
            skip += tl.load(bs_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        skip = skip.to(act).to(tl.float32)
    else:
        skip = centre.to(tl.float32)
    return tl.where(rows_ok[:, None] & c_ok[None, :], (skip + y).to(act).to(tl.float32), 0.0)


@triton.jit
def _block_rows(x_b, t, t_ok, w1_ptr, b1_ptr, w2_ptr, b2_ptr, ws_ptr, bs_ptr, out_ptr,
                C, H, L, L_ext, left, dilation, sx_c, sx_t,
                K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                REFLECT: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, SHORTCUT: tl.constexpr,
                HAS_BS: tl.constexpr, HALF_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """A SEANet residual block's output at the BLOCK_T rows t of x (t_ok: the rows wanted, in [0, L)):
    shortcut(x) + conv_k1(ELU(conv_K(ELU(x)))) as `_block_tail` gives it. The K shifted tiles of x
    (the first convolution's halo) are read with EnCodec's padding by index; the hidden [rows, H]
    tile stays on chip. Weights: w1 [K, C, H], w2 [H, C], ws [C, C] (input channel first)."""
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    h = tl.arange(0, BLOCK_H)
    h_ok = h < H
    hidden = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    for k in tl.static_range(K):
        src = _source_index(t + k * dilation - left, L, L_ext, REFLECT)
        ok = t_ok & (src >= 0)
        a = tl.load(x_b + tl.maximum(src, 0).to(tl.int64)[:, None] * sx_t + c[None, :] * sx_c,
                    mask=ok[:, None] & c_ok[None, :], other=0.0)
        a = _elu(a.to(tl.float32)).to(a.dtype)
        w = tl.load(w1_ptr + (k * C + c[:, None]) * H + h[None, :], mask=c_ok[:, None] & h_ok[None, :], other=0.0)
        hidden = _dot_acc(hidden, a, w, HALF_DOT, PRECISION)
    centre = tl.load(x_b + tl.where(t_ok, t, 0).to(tl.int64)[:, None] * sx_t + c[None, :] * sx_c,
                     mask=t_ok[:, None] & c_ok[None, :], other=0.0)
    return _block_tail(hidden, centre, t_ok, b1_ptr, w2_ptr, b2_ptr, ws_ptr, bs_ptr, out_ptr, C, H, BLOCK_C,
                       BLOCK_H, HAS_B1, HAS_B2, SHORTCUT, HAS_BS, HALF_DOT, PRECISION)


@triton.jit
def _up_phase(x_b, src, rows_ok, tap, wu_ptr, C_in, C, L_in, sx_c, sx_t, K_U: tl.constexpr, S: tl.constexpr,
              BLOCK_J: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_C: tl.constexpr, ELU: tl.constexpr,
              HALF_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """A transposed convolution's products (no bias) at rows of one output phase: row i sums
    f(x[src[i] - m]) @ W[tap + m*S] over m (f: ELU or identity; `_accumulate_tap_gemm` per tap);
    wu [K_U, C_in, C]; tap a scalar tensor."""
    c = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_J, BLOCK_C], tl.float32)
    for m in tl.static_range((K_U + S - 1) // S):
        j = src - m
        ok = rows_ok & (j >= 0) & (j < L_in) & ((j * 0 + tap + m * S) < K_U)
        acc = _accumulate_tap_gemm(acc, x_b, tl.where(ok, j, 0), ok, wu_ptr, tl.minimum(tap + m * S, K_U - 1), c,
                                   c < C, C_in, C, sx_c, sx_t, BLOCK_CI, ELU, HALF_DOT, PRECISION)
    return acc


@triton.jit
def _up_rows(x_b, q, q_ok, phase, wu_ptr, bu_ptr, out_ptr, C_in, C, L_in, start, sx_c, sx_t,
             K_U: tl.constexpr, S: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_CI: tl.constexpr,
             BLOCK_C: tl.constexpr, ELU: tl.constexpr, HAS_BU: tl.constexpr, HALF_DOT: tl.constexpr,
             PRECISION: tl.constexpr):
    """ELU -> ConvTranspose1d -> trim at the rows q of its kept output (q_ok: the rows wanted), as the
    activations' dtype in an fp32 tile, zero elsewhere. `phase` is the rows' common output phase
    (q + start) mod S, or -1 where they have several (rows mirrored by a padding): then each phase's
    rows are computed under a mask, S products instead of one."""
    t = q + start
    if phase >= 0:
        acc = _up_phase(x_b, (t - phase) // S, q_ok, phase, wu_ptr, C_in, C, L_in, sx_c, sx_t, K_U, S,
                        BLOCK_J, BLOCK_CI, BLOCK_C, ELU, HALF_DOT, PRECISION)
    else:
        r = t % S
        acc = tl.zeros([BLOCK_J, BLOCK_C], tl.float32)
        for rho in tl.static_range(S):
            acc += _up_phase(x_b, (t - rho) // S, q_ok & (r == rho), phase * 0 + rho, wu_ptr, C_in, C, L_in, sx_c,
                             sx_t, K_U, S, BLOCK_J, BLOCK_CI, BLOCK_C, ELU, HALF_DOT, PRECISION)
    c = tl.arange(0, BLOCK_C)
    if HAS_BU:
        acc += tl.load(bu_ptr + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
    return tl.where(q_ok[:, None], acc.to(out_ptr.dtype.element_ty).to(tl.float32), 0.0)


@triton.jit
def _up_block_kernel(x_ptr, wu_ptr, bu_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, ws_ptr, bs_ptr, out_ptr,
                     C_in, C, H, L_in, start, length, j0, n_j, L_ext, sx_b, sx_c, sx_t, so_b, so_c, so_t,
                     K_U: tl.constexpr, S: tl.constexpr, K: tl.constexpr, DIL: tl.constexpr, LEFT: tl.constexpr,
                     BLOCK_J: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                     ELU: tl.constexpr, HAS_BU: tl.constexpr, REFLECT: tl.constexpr, HAS_B1: tl.constexpr,
                     HAS_B2: tl.constexpr, SHORTCUT: tl.constexpr, HAS_BS: tl.constexpr, HALF_DOT: tl.constexpr,
                     PRECISION: tl.constexpr):
    """SEANet's decoder level in one pass: ELU -> ConvTranspose1d (kernel K_U, stride S) -> trim ->
    residual block, the upsampled signal never written. A program takes BLOCK_J output positions of
    one phase r (p = j*S + r - start) and, for each of the block's K taps, recomputes the upsampled
    rows p + k*DIL - LEFT on chip (one phase for all of them but where the block's padding mirrors
    rows: `_up_rows`); the tap at offset 0 is also the shortcut's input. Weights: wu [K_U, C_in, C],
    the block's as `_block_rows`."""
    pid = tl.program_id(0)
    r = pid % S
    j = j0 + (pid // S) * BLOCK_J + tl.arange(0, BLOCK_J)
    b = tl.program_id(1).to(tl.int64)
    p = j * S + r - start
    p_ok = (p >= 0) & (p < length) & (j < j0 + n_j)
    x_b = x_ptr + b * sx_b
    act = out_ptr.dtype.element_ty
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    h = tl.arange(0, BLOCK_H)
    h_ok = h < H
    hidden = tl.zeros([BLOCK_J, BLOCK_H], tl.float32)
    centre = tl.zeros([BLOCK_J, BLOCK_C], tl.float32)
    for k in tl.static_range(K):
        i = p + k * DIL - LEFT
        q = _source_index(i, length, L_ext, REFLECT)
        ok = p_ok & (q >= 0)
        mirrored = tl.max((ok & (q != i)).to(tl.int32), axis=0)
        phase = tl.where(mirrored > 0, -1, ((r + k * DIL - LEFT) % S + S) % S)
        y = _up_rows(x_b, q, ok, phase, wu_ptr, bu_ptr, out_ptr, C_in, C, L_in, start, sx_c, sx_t, K_U, S,
                     BLOCK_J, BLOCK_CI, BLOCK_C, ELU, HAS_BU, HALF_DOT, PRECISION)
        if k * DIL == LEFT:
            centre = y
        a = _elu(y).to(act)
        w = tl.load(w1_ptr + (k * C + c[:, None]) * H + h[None, :], mask=c_ok[:, None] & h_ok[None, :], other=0.0)
        hidden = _dot_acc(hidden, a, w, HALF_DOT, PRECISION)
    if LEFT % DIL != 0 or LEFT // DIL >= K:  # no tap reads the row itself
        centre = _up_rows(x_b, p, p_ok, r, wu_ptr, bu_ptr, out_ptr, C_in, C, L_in, start, sx_c, sx_t, K_U, S,
                          BLOCK_J, BLOCK_CI, BLOCK_C, ELU, HAS_BU, HALF_DOT, PRECISION)
    y = _block_tail(hidden, centre, p_ok, b1_ptr, w2_ptr, b2_ptr, ws_ptr, bs_ptr, out_ptr, C, H, BLOCK_C, BLOCK_H,
                    HAS_B1, HAS_B2, SHORTCUT, HAS_BS, HALF_DOT, PRECISION)
    tl.store(out_ptr + b * so_b + tl.where(p_ok, p, 0).to(tl.int64)[:, None] * so_t + c[None, :].to(tl.int64) * so_c,
             y.to(act), mask=p_ok[:, None] & c_ok[None, :])


@triton.jit
def _residual_block_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, ws_ptr, bs_ptr, out_ptr,
                           C, H, L, L_ext, left, dilation, sx_b, sx_c, sx_t, so_b, so_c, so_t,
                           K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
                           REFLECT: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
                           SHORTCUT: tl.constexpr, HAS_BS: tl.constexpr, HALF_DOT: tl.constexpr,
                           PRECISION: tl.constexpr):
    """A whole SEANet residual block in one pass over memory (`_block_rows`) for a tile of BLOCK_T
    positions and every channel."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = tl.program_id(1).to(tl.int64)
    t_ok = t < L
    y = _block_rows(x_ptr + b * sx_b, t, t_ok, w1_ptr, b1_ptr, w2_ptr, b2_ptr, ws_ptr, bs_ptr, out_ptr,
                    C, H, L, L_ext, left, dilation, sx_c, sx_t, K, BLOCK_T, BLOCK_C, BLOCK_H, REFLECT, HAS_B1,
                    HAS_B2, SHORTCUT, HAS_BS, HALF_DOT, PRECISION)
    c = tl.arange(0, BLOCK_C)
    tl.store(out_ptr + b * so_b + t.to(tl.int64)[:, None] * so_t + c[None, :].to(tl.int64) * so_c,
             y.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & (c < C)[None, :])


@triton.jit
def _block_down_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, ws_ptr, bs_ptr, wd_ptr, bd_ptr, out_ptr,
                       C, H, C_out, L, L_ext, left, dilation, L_ext_d, left_d, stride, T_out,
                       sx_b, sx_c, sx_t, so_b, so_c, so_t,
                       K: tl.constexpr, KD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_CO: tl.constexpr, REFLECT: tl.constexpr,
                       REFLECT_D: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, SHORTCUT: tl.constexpr,
                       HAS_BS: tl.constexpr, HAS_BD: tl.constexpr, HALF_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """A residual block and the strided convolution after it (ELU -> pad -> conv, kernel KD, stride
    `stride`: SEANet's downsampling) in one pass: for each of the KD taps, the block's output at the
    rows that tap reads (`_block_rows`, the downsampling's padding mapped by index onto the block's
    rows) is computed on chip and multiplied into the [BLOCK_T, C_out] output tile. The block's
    output is never written; a row is computed once per tap that reads it (KD / stride times:
    twice for SEANet's kernel = 2 x stride). Weights: the block's as `_block_rows`, wd [KD, C, C_out]."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = tl.program_id(1).to(tl.int64)
    t_ok = t < T_out
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    o = tl.arange(0, BLOCK_CO)
    o_ok = o < C_out
    act = out_ptr.dtype.element_ty
    x_b = x_ptr + b * sx_b
    acc = tl.zeros([BLOCK_T, BLOCK_CO], tl.float32)
    for k in range(KD):
        rows = _source_index(t * stride + k - left_d, L, L_ext_d, REFLECT_D)
        ok = t_ok & (rows >= 0)
        y = _block_rows(x_b, rows, ok, w1_ptr, b1_ptr, w2_ptr, b2_ptr, ws_ptr, bs_ptr, out_ptr,
                        C, H, L, L_ext, left, dilation, sx_c, sx_t, K, BLOCK_T, BLOCK_C, BLOCK_H, REFLECT, HAS_B1,
                        HAS_B2, SHORTCUT, HAS_BS, HALF_DOT, PRECISION)
        a = _elu(y).to(act)  # the block's output as stored, then the downsampling's ELU prologue
        w = tl.load(wd_ptr + (k * C + c[:, None]) * C_out + o[None, :], mask=c_ok[:, None] & o_ok[None, :],
                    other=0.0)
        acc = _dot_acc(acc, a, w, HALF_DOT, PRECISION)
    _epilogue(acc, bd_ptr, out_ptr, out_ptr, b, o[None, :], o_ok[None, :], t[:, None], t_ok[:, None] & o_ok[None, :],
              0, 0, 0, so_b, so_c, so_t, HAS_BD, False)


# -- launch wrappers -------------------------------------------------------------------------------

def _blocks(C_in: int, C_out: int, T: int, kind: str = "conv1d"):
    """(BLOCK_CO, BLOCK_CI, BLOCK_T, num_warps, num_stages) for a launch of `kind` (conv1d,
    conv_transpose1d, conv2d; T is the number of output positions per program row).

    On a GPU: 8 warps and no software pipelining of the input-channel loop. Compiled for sm_80 and
    sm_90 (tools/compile_gpu.py, triton 3.6), the pipelined loop (num_stages 2-3) with ELU applied
    to each loaded tile made ptxas fall to 32 registers with 11-226 KB of spills per thread for
    every fp32 layer with ELU; timed on an H200 (the `kernels` benchmark, batch 64 x 10 s), those layers took
    190-370 ms with the old 4 warps and 3 stages against 15-28 ms with these.
    Convolutions over few input channels (C_in <= 32: the first encoder layers and the decoder's
    last) run 16 channels x 256 positions per step: on the H200, 1.15-1.75x faster than 32 x 128
    in fp32 and bf16 (enc first conv 15.2 -> 9.0 ms, enc down s2 14.6 -> 9.1 ms fp32; the
    decoder's last layer not timed). Transposed convolutions and Conv2d keep 32 x 128 (not timed
    otherwise).
    """
    if interpreting():  # each program costs milliseconds whatever its size: few, large ones
        return (min(256, max(16, triton.next_power_of_2(C_out))), min(128, max(16, triton.next_power_of_2(C_in))),
                min(1024, max(16, triton.next_power_of_2(T))), 4, 1)
    block_co = min(64, max(16, triton.next_power_of_2(C_out)))
    if kind == "conv1d" and C_in <= 32 and T >= 256:
        return block_co, 16, 256, 8, 1
    block_ci = min(32, max(16, triton.next_power_of_2(C_in)))
    block_t = 128 if T >= 128 else max(16, triton.next_power_of_2(T))
    return block_co, block_ci, block_t, 8, 1


#: Other configurations timed by the autotuner (ENCODEC_FAST_AUTOTUNE=1, GPU only), as
#: (BLOCK_CO, BLOCK_CI, BLOCK_positions, num_warps, num_stages), clamped to each launch's sizes:
#: the former default and the ones the H200 picked for some layer (bench/results/gpu_h200_2026-11-30/gpu_*_autotune).
#: tools/compile_gpu.py compiles every one of them for every layer.
LISTED = [(64, 32, 128, 8, 1), (32, 16, 128, 4, 1), (32, 16, 256, 4, 2), (64, 16, 256, 8, 1)]


#: LISTED as launch configurations, per kernel (its position block's name) and whether software
#: pipelining may be timed: a pipelined input loop with ELU on fp32 tiles spills kilobytes (up to
#: 80 KB, compile check), so those are left out there.
_LISTED_CONFIGS = {(name, pipelining): [tuning.config({"BLOCK_CO": co, "BLOCK_CI": ci, name: p}, w, st)
                                        for co, ci, p, w, st in LISTED if st == 1 or pipelining]
                   for name in ("BLOCK_T", "BLOCK_J", "BLOCK_P") for pipelining in (False, True)}
_KINDS = {"BLOCK_T": "conv1d", "BLOCK_J": "conv_transpose1d", "BLOCK_P": "conv2d"}


def _launch(kernel, args, constants, C_in, C_out, positions, block_name, grid, key):
    """Launch with `_blocks`' default, or autotuned over LISTED; grid(BLOCK_CO, BLOCK_positions)."""
    bco, bci, bp, warps, stages = _blocks(C_in, C_out, positions, _KINDS[block_name])
    if interpreting() and block_name == "BLOCK_P":
        bp = min(4096, max(16, triton.next_power_of_2(positions)))
    pipelining = not constants.get("ELU") or constants["HALF_DOT"]
    tuning.launch(kernel, lambda meta: grid(meta["BLOCK_CO"], meta[block_name]), args, constants,
                  tuning.config({"BLOCK_CO": bco, "BLOCK_CI": bci, block_name: bp}, warps, stages),
                  _LISTED_CONFIGS[(block_name, pipelining)], key=key, size=positions,
                  extents={"BLOCK_CO": C_out, "BLOCK_CI": C_in, block_name: positions})


def _half_dot(x: torch.Tensor) -> bool:
    # The interpreter cannot multiply bf16 (numpy has none): compute those in fp32 there.
    return x.dtype == torch.float16 or (x.dtype == torch.bfloat16 and not interpreting())


def _gemm_blocks(C_in: int, C_out: int, positions: int, half: bool):
    """(BLOCK_positions, BLOCK_CO, BLOCK_CI, num_warps, num_stages) of the implicit-GEMM kernels:
    128 positions (two wgmma M-blocks), up to 64 output channels, 64 input channels per step for
    half dtypes and 16 for fp32, 4 warps (one warpgroup), the input-channel loop pipelined over 2
    stages. fp32 with 32 channels per step spilled 1-2 KB per thread on sm_80 and sm_90 for k7
    layers (the decoder's first and last convolutions, tf32; tools/compile_gpu.py, triton 3.9);
    with 16: 123-164 registers, no spills."""
    if interpreting():
        return (min(1024, max(16, triton.next_power_of_2(positions))), min(256, max(16, triton.next_power_of_2(C_out))),
                min(128, max(16, triton.next_power_of_2(C_in))), 4, 1)
    block_co = min(64, max(16, triton.next_power_of_2(C_out)))
    block_ci = min(64 if half else 16, max(16, triton.next_power_of_2(C_in)))
    return 128 if positions >= 128 else max(64, triton.next_power_of_2(positions)), block_co, block_ci, 4, 2


def _channels_last(B: int, C: int, T: int, device, dtype) -> torch.Tensor:
    """An empty [B, C, T] tensor stored as [B, T, C] (channels-last): what the GEMM kernels write,
    and what they read fastest."""
    return torch.empty(B, T, C, device=device, dtype=dtype).transpose(1, 2)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, C, L] with each position's channels one contiguous vector (channels-last), copied there
    if it is not. The GEMM kernels' A tiles are rows of channels gathered at computed positions
    (strides, taps, reflection): from channels-last they load 16 bytes at a time (cp.async); from
    channels-first (the 48 kHz model's norm output, the decoder's latent) one element per load, a
    stride apart, staged through registers (sm_90, triton 3.6: 64 loads and 64 shared stores per
    thread per step of a K8 downsampling conv, against 6 cp.async). One copy costs less."""
    if x.shape[1] == 1 or x.stride(1) == 1:
        return x
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def conv1d_gemm(x, weight_kio, bias, stride, dilation, left, right, reflect, elu, residual, precision, out_dtype,
                elu_out=False):
    """`conv1d` as an implicit GEMM on tensor cores: x [B, C_in, L] (any strides; channels-last is
    the fast layout), weight_kio [K, C_in, C_out]; returns [B, C_out, T_out] stored channels-last
    (its ELU: `elu_out`)."""
    x = _rows(x)
    B, C_in, L = x.shape
    K, _, C_out = weight_kio.shape
    T_out = (left + L + right - (K - 1) * dilation - 1) // stride + 1
    out = _channels_last(B, C_out, max(T_out, 0), x.device, out_dtype)
    if T_out <= 0 or B == 0:
        return out
    L_ext = max(L, max(left, right) + 1) if reflect else L
    res = residual if residual is not None else out
    half = _half_dot(x)
    bt, bco, bci, warps, stages = _gemm_blocks(C_in, C_out, T_out, half)
    _conv1d_gemm_kernel[(triton.cdiv(T_out, bt), triton.cdiv(C_out, bco), B)](
        x, weight_kio, bias if bias is not None else weight_kio, res, out,
        C_in, C_out, L, L_ext, T_out, left, stride, dilation, *x.stride(), *res.stride(), *out.stride(),
        K=K, BLOCK_T=bt, BLOCK_CO=bco, BLOCK_CI=bci, ELU=elu, REFLECT=reflect, HAS_BIAS=bias is not None,
        HAS_RES=residual is not None, HALF_DOT=half, PRECISION=precision, ELU_OUT=elu_out, num_warps=warps,
        num_stages=stages,
        **tuning.LAUNCH_OPTIONS)
    return out


def conv_transpose1d_gemm(x, weight_kio, bias, stride, start, length, elu, precision, out_dtype):
    """`conv_transpose1d` as an implicit GEMM on tensor cores: weight_kio [K, C_in, C_out]; returns
    [B, C_out, length] stored channels-last."""
    x = _rows(x)
    B, C_in, L = x.shape
    K, _, C_out = weight_kio.shape
    out = _channels_last(B, C_out, length, x.device, out_dtype)
    if length <= 0 or B == 0:
        return out
    j0 = start // stride
    n_j = (start + length - 1) // stride - j0 + 1
    half = _half_dot(x)
    bj, bco, bci, warps, stages = _gemm_blocks(C_in, C_out, n_j, half)
    _conv_transpose1d_gemm_kernel[(triton.cdiv(n_j, bj) * stride, triton.cdiv(C_out, bco), B)](
        x, weight_kio, bias if bias is not None else weight_kio, out, C_in, C_out, L, start, length, j0, n_j,
        *x.stride(), *out.stride(), K=K, S=stride, BLOCK_J=bj, BLOCK_CO=bco, BLOCK_CI=bci, ELU=elu,
        HAS_BIAS=bias is not None, HALF_DOT=half, PRECISION=precision, num_warps=warps, num_stages=stages,
        **tuning.LAUNCH_OPTIONS)
    return out


def _conv2d_out_size(H, W, KH, KW, stride, dilation, padding):
    (sh, sw), (dh, dw), (ph, pw) = stride, dilation, padding
    return (H + 2 * ph - dh * (KH - 1) - 1) // sh + 1, (W + 2 * pw - dw * (KW - 1) - 1) // sw + 1


def _channels_last_2d(B: int, C: int, H: int, W: int, device, dtype) -> torch.Tensor:
    return torch.empty(B, H, W, C, device=device, dtype=dtype).permute(0, 3, 1, 2)


def frames_fastest(x) -> bool:
    """Whether the frames of x [B, C, H, W] are closer in memory than its bins (a spectrogram stored
    time-major, say): the GEMM kernels then enumerate positions frames first, so that a tile's
    loads and stores stay contiguous. torch.stft's real view has its bins closer (False)."""
    return x.shape[2] > 1 and abs(x.stride(2)) < abs(x.stride(3))


def conv2d_gemm(x, weight_kio, KH, KW, bias, stride, dilation, padding, slope, precision, out_dtype,
                x_scale: float = 1.0):
    """`conv2d_leaky_relu` as an implicit GEMM on tensor cores: x [B, C_in, H, W] (any strides;
    channels-last, torch.stft's real view, or frames first are the fast layouts), weight_kio
    [KH*KW, C_in, C_out] (tap kh*KW + kw); returns leaky_relu(conv2d(x * x_scale) + bias)
    [B, C_out, H_out, W_out] stored channels-last."""
    B, C_in, H, W = x.shape
    _, _, C_out = weight_kio.shape
    H_out, W_out = _conv2d_out_size(H, W, KH, KW, stride, dilation, padding)
    out = _channels_last_2d(B, C_out, max(H_out, 0), max(W_out, 0), x.device, out_dtype)
    if H_out <= 0 or W_out <= 0 or B == 0:
        return out
    P = H_out * W_out
    half = _half_dot(x)
    bp, bco, bci, warps, stages = _gemm_blocks(C_in, C_out, P, half)
    (sh, sw), (dh, dw), (ph, pw) = stride, dilation, padding
    _conv2d_gemm_kernel[(triton.cdiv(P, bp), triton.cdiv(C_out, bco), B)](
        x, weight_kio, bias if bias is not None else weight_kio, out, C_in, C_out, H, W, H_out, W_out,
        sh, sw, dh, dw, ph, pw, 0.0 if slope is None else float(slope), float(x_scale), *x.stride(), *out.stride(),
        KH=KH, KW=KW, BLOCK_P=bp, BLOCK_CO=bco, BLOCK_CI=bci, HAS_BIAS=bias is not None, ACTIVATE=slope is not None,
        HALF_DOT=half, PRECISION=precision, H_FAST=frames_fastest(x), num_warps=warps, num_stages=stages,
        **tuning.LAUNCH_OPTIONS)
    return out


def leaky_relu_grad(grad: torch.Tensor, y: torch.Tensor, slope: float) -> torch.Tensor:
    """The gradient at a conv's output through its LeakyReLU (`_leaky_relu_grad_kernel`): grad where
    the saved output y > 0, else grad * slope, in grad's dtype and y's memory layout (y dense: the
    forward's output). A gradient laid out otherwise (e.g. broadcast) is copied into that layout
    first."""
    if grad.shape != y.shape:
        raise ValueError(f"leaky_relu_grad: gradient {tuple(grad.shape)} and output {tuple(y.shape)} differ")
    out = torch.empty_like(y, dtype=grad.dtype)
    if out.stride() != y.stride():
        raise ValueError("leaky_relu_grad: the saved output is not dense")
    if grad.stride() != y.stride():
        grad = torch.empty_like(out).copy_(grad)
    numel = out.numel()
    if numel:
        block = 1 << 16 if interpreting() else 1024
        _leaky_relu_grad_kernel[(triton.cdiv(numel, block),)](grad, y, out, float(slope), numel, BLOCK=block,
                                                             num_warps=4, **tuning.LAUNCH_OPTIONS)
    return out


def conv2d_input_grad_gemm(grad, weight_kco, x_shape, KH, KW, stride, dilation, padding, precision, out_dtype,
                           x_scale: float = 1.0, frames_first: bool = False):
    """d loss / d x of a conv2d (implicit GEMM, `_conv2d_input_grad_gemm_kernel`): grad at its output
    [B, C_out, H_out, W_out] (any strides; through the activation already, `leaky_relu_grad`),
    weight_kco [KH*KW, C_out, C_in]; returns [B, C_in, H, W] stored channels-last (torch.stft's real
    view's own order: its gradient needs no copy), or with `frames_first` as [B, W, H, C_in] (an
    input stored that way)."""
    B, C_in, H, W = x_shape
    _, C_out, _ = weight_kco.shape
    H_out, W_out = grad.shape[-2:]
    if frames_first:
        dx = torch.empty(B, W, H, C_in, device=grad.device, dtype=out_dtype).permute(0, 3, 2, 1)
    else:
        dx = _channels_last_2d(B, C_in, H, W, grad.device, out_dtype)
    if B == 0 or H == 0 or W == 0:
        return dx
    if H_out == 0 or W_out == 0:
        return dx.zero_()
    (sh, sw), (dh, dw), (ph, pw) = stride, dilation, padding
    half = _half_dot(grad)
    positions = H * -(-W // sw)  # the largest phase's
    bp, bci, bco, warps, stages = _gemm_blocks(C_out, C_in, positions, half)
    n_blocks = triton.cdiv(positions, bp)
    _conv2d_input_grad_gemm_kernel[(n_blocks * sw, triton.cdiv(C_in, bci), B)](
        grad, weight_kco, dx, C_in, C_out, H, W, H_out, W_out, sh, sw, dh, dw, ph, pw, float(x_scale), n_blocks,
        sw // math.gcd(dw, sw), *grad.stride(), *dx.stride(), KH=KH, KW=KW, BLOCK_P=bp, BLOCK_CI=bci, BLOCK_CO=bco,
        HALF_DOT=half, PRECISION=precision, H_FAST=frames_first and H > 1, num_warps=warps, num_stages=stages,
        **tuning.LAUNCH_OPTIONS)
    return dx


#: Position chunks of the weight gradient per tap (its partial sums; the chunks are added in order).
WEIGHT_GRAD_CHUNKS = 32


def conv2d_weight_grad_gemm(grad, x, KH, KW, stride, dilation, padding, has_bias, precision, x_scale: float = 1.0):
    """(d loss / d weight [KH*KW, C_out, C_in] fp32, d loss / d bias [C_out] fp32 or None) of a conv2d
    (`_conv2d_weight_grad_gemm_kernel`; grad at its output, through the activation already; the input
    taken as x * x_scale): deterministic, its chunks' partial sums added in a fixed order."""
    B, C_in, H, W = x.shape
    _, C_out, H_out, W_out = grad.shape
    N = B * H_out * W_out
    half = _half_dot(grad)
    block_k = (min(1024, max(16, triton.next_power_of_2(N))) if interpreting() else 64)
    block_co = min(64, max(16, triton.next_power_of_2(C_out)))
    block_ci = min(64, max(16, triton.next_power_of_2(C_in)))
    chunks = 2 if interpreting() else WEIGHT_GRAD_CHUNKS
    chunk = max(block_k, -(-triton.cdiv(max(N, 1), chunks) // block_k) * block_k)
    n_chunks = max(1, triton.cdiv(N, chunk))
    taps = KH * KW
    part = torch.zeros(n_chunks, taps, C_out, C_in, device=grad.device, dtype=torch.float32)
    bias_part = torch.zeros(n_chunks, C_out, device=grad.device, dtype=torch.float32) if has_bias else part
    if N > 0:
        (sh, sw), (dh, dw), (ph, pw) = stride, dilation, padding
        grid = (n_chunks, taps, triton.cdiv(C_out, block_co) * triton.cdiv(C_in, block_ci))
        _conv2d_weight_grad_gemm_kernel[grid](
            grad, x, part, bias_part, C_in, C_out, H, W, H_out, W_out, sh, sw, dh, dw, ph, pw, N, chunk,
            *grad.stride(), *x.stride(), KW=KW, BLOCK_K=block_k, BLOCK_CO=block_co, BLOCK_CI=block_ci,
            HAS_BIAS=has_bias, HALF_DOT=half, PRECISION=precision, H_FAST=frames_fastest(x), num_warps=4,
            num_stages=2, **tuning.LAUNCH_OPTIONS)
    taps = part.sum(0)
    return (taps if x_scale == 1.0 else taps * x_scale), (bias_part.sum(0) if has_bias else None)


def residual_block(x, w1_kch, b1, w2_hc, b2, ws_cc, bs, dilation, left, right, reflect, precision, out_dtype):
    """`_residual_block_kernel`: x [B, C, L] (any strides), w1_kch [K, C, H], w2_hc [H, C], the
    shortcut's ws_cc [C, C] or None (identity) -> shortcut(x) + conv_k1(ELU(conv_K(ELU(x))))
    [B, C, L] stored channels-last. C <= `ops.conv.FUSED_BLOCK_MAX_CHANNELS`."""
    from ..ops.conv import FUSED_BLOCK_MAX_CHANNELS
    x = _rows(x)
    B, C, L = x.shape
    K, _, H = w1_kch.shape
    if C > FUSED_BLOCK_MAX_CHANNELS:
        raise ValueError(f"the fused residual block takes at most {FUSED_BLOCK_MAX_CHANNELS} channels, got {C}")
    out = _channels_last(B, C, L, x.device, out_dtype)
    if L == 0 or B == 0:
        return out
    L_ext = max(L, max(left, right) + 1) if reflect else L
    block_c, block_h = max(16, triton.next_power_of_2(C)), max(16, triton.next_power_of_2(H))
    if interpreting():
        block_t = min(1024, max(16, triton.next_power_of_2(L)))
    else:
        block_t = 128
    _residual_block_kernel[(triton.cdiv(L, block_t), B)](
        x, *_block_weights(w1_kch, b1, w2_hc, b2, ws_cc, bs), out,
        C, H, L, L_ext, left, dilation, *x.stride(), *out.stride(), K=K, BLOCK_T=block_t, BLOCK_C=block_c,
        BLOCK_H=block_h, REFLECT=reflect, **_block_flags(b1, b2, ws_cc, bs), HALF_DOT=_half_dot(x),
        PRECISION=precision, num_warps=4, num_stages=1, **tuning.LAUNCH_OPTIONS)
    return out


def _block_down_config(C_out: int) -> tp.Tuple[int, int]:
    """(BLOCK_T, num_warps) of the fused block + downsampling: 64 output positions (wgmma's M on
    sm_90) and 4 warps for up to 64 outputs; 8 warps for 128 outputs, and on sm_80 also 32 positions.
    Compiled (tools/compile_gpu.py, triton 3.9): 64 x 128 with 4 warps spilled 36 B (sm_90, tf32) and
    548-800 B per thread (sm_80); with 8 warps none on sm_90 (40-80 wgmma) but 304-524 B on sm_80,
    where 32 positions spill nothing (mma.sync, 128-180 registers). Not timed on a GPU."""
    if C_out <= 64:
        return 64, 4
    return (32 if tuning.target_arch() < 90 else 64), 8


def _block_weights(w1_kch, b1, w2_hc, b2, ws_cc, bs):
    """The fused block kernels' weight arguments, with a stand-in pointer for each absent one."""
    return (w1_kch, b1 if b1 is not None else w1_kch, w2_hc, b2 if b2 is not None else w2_hc,
            ws_cc if ws_cc is not None else w2_hc, bs if bs is not None else w2_hc)


def _block_flags(b1, b2, ws_cc, bs):
    return dict(HAS_B1=b1 is not None, HAS_B2=b2 is not None, SHORTCUT=ws_cc is not None, HAS_BS=bs is not None)


def residual_block_down(x, w1_kch, b1, w2_hc, b2, ws_cc, bs, dilation, left, right, reflect,
                        wd_kio, bd, stride, left_d, right_d, reflect_d, precision, out_dtype):
    """`_block_down_kernel`: the residual block of `residual_block` followed by ELU -> pad
    (left_d, right_d; reflect_d or zeros) -> conv1d(wd_kio [KD, C, C_out], bd, stride) ->
    [B, C_out, T_out] stored channels-last. C <= `ops.conv.FUSED_BLOCK_MAX_CHANNELS`, C_out <=
    `ops.conv.FUSED_DOWN_MAX_CHANNELS`."""
    from ..ops.conv import FUSED_BLOCK_MAX_CHANNELS, FUSED_DOWN_MAX_CHANNELS
    x = _rows(x)
    B, C, L = x.shape
    K, _, H = w1_kch.shape
    KD, _, C_out = wd_kio.shape
    if C > FUSED_BLOCK_MAX_CHANNELS or C_out > FUSED_DOWN_MAX_CHANNELS:
        raise ValueError(f"the fused block + downsampling takes at most {FUSED_BLOCK_MAX_CHANNELS} -> "
                         f"{FUSED_DOWN_MAX_CHANNELS} channels, got {C} -> {C_out}")
    T_out = (left_d + L + right_d - KD) // stride + 1
    out = _channels_last(B, C_out, max(T_out, 0), x.device, out_dtype)
    if T_out <= 0 or B == 0:
        return out
    L_ext = max(L, max(left, right) + 1) if reflect else L
    L_ext_d = max(L, max(left_d, right_d) + 1) if reflect_d else L
    block_c, block_h = max(16, triton.next_power_of_2(C)), max(16, triton.next_power_of_2(H))
    block_co = max(16, triton.next_power_of_2(C_out))
    if interpreting():
        block_t, warps = min(1024, max(16, triton.next_power_of_2(T_out))), 4
    else:
        block_t, warps = _block_down_config(C_out)
    _block_down_kernel[(triton.cdiv(T_out, block_t), B)](
        x, *_block_weights(w1_kch, b1, w2_hc, b2, ws_cc, bs), wd_kio, bd if bd is not None else wd_kio, out,
        C, H, C_out, L, L_ext, left, dilation, L_ext_d, left_d, stride, T_out, *x.stride(), *out.stride(),
        K=K, KD=KD, BLOCK_T=block_t, BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_CO=block_co, REFLECT=reflect,
        REFLECT_D=reflect_d, **_block_flags(b1, b2, ws_cc, bs), HAS_BD=bd is not None, HALF_DOT=_half_dot(x),
        PRECISION=precision, num_warps=warps, num_stages=1, **tuning.LAUNCH_OPTIONS)
    return out


def _up_block_config(C_in: int, C: int, half: bool) -> tp.Tuple[int, int, int]:
    """(BLOCK_J, BLOCK_CI, num_warps) of the fused upsampling + block: 64 positions (wgmma's M), the
    input channels in steps of 64 (half) or 32 (fp32), 4 warps, 8 for 64 output channels. Compiled
    (tools/compile_gpu.py, triton 3.9): all 128 input channels in one step with 4 warps spilled
    0.5-5.4 KB per thread at the 128 -> 64 level on sm_80 and sm_90; these: 128-236 registers, no
    spills, wgmma in every sm_90 launch. Not timed on a GPU."""
    return 64, min(64 if half else 32, max(16, triton.next_power_of_2(C_in))), 8 if C > 32 else 4


def up_residual_block(x, wu_kio, bu, stride, start, length, elu, w1_kch, b1, w2_hc, b2, ws_cc, bs, dilation, left,
                      right, reflect, precision, out_dtype):
    """`_up_block_kernel`: ELU (elu) -> ConvTranspose1d(wu_kio [K_U, C_in, C], bu, stride) -> keep
    [start, start + length) -> the residual block of `residual_block` (its padding (left, right) on
    the kept length) -> [B, C, length] stored channels-last. C <= `ops.conv.FUSED_BLOCK_MAX_CHANNELS`,
    C_in <= `ops.conv.FUSED_UP_MAX_IN_CHANNELS`."""
    from ..ops.conv import FUSED_BLOCK_MAX_CHANNELS, FUSED_UP_MAX_IN_CHANNELS
    x = _rows(x)
    B, C_in, L_in = x.shape
    K_U, _, C = wu_kio.shape
    K, _, H = w1_kch.shape
    if C > FUSED_BLOCK_MAX_CHANNELS or C_in > FUSED_UP_MAX_IN_CHANNELS:
        raise ValueError(f"the fused upsampling + block takes at most {FUSED_UP_MAX_IN_CHANNELS} -> "
                         f"{FUSED_BLOCK_MAX_CHANNELS} channels, got {C_in} -> {C}")
    out = _channels_last(B, C, length, x.device, out_dtype)
    if length <= 0 or B == 0:
        return out
    L_ext = max(length, max(left, right) + 1) if reflect else length
    j0 = start // stride
    n_j = (start + length - 1) // stride - j0 + 1
    half = _half_dot(x)
    if interpreting():
        block_j, block_ci, warps = (min(1024, max(16, triton.next_power_of_2(n_j))),
                                    max(16, triton.next_power_of_2(C_in)), 4)
    else:
        block_j, block_ci, warps = _up_block_config(C_in, C, half)
    _up_block_kernel[(triton.cdiv(n_j, block_j) * stride, B)](
        x, wu_kio, bu if bu is not None else wu_kio, *_block_weights(w1_kch, b1, w2_hc, b2, ws_cc, bs), out,
        C_in, C, H, L_in, start, length, j0, n_j, L_ext, *x.stride(), *out.stride(),
        K_U=K_U, S=stride, K=K, DIL=dilation, LEFT=left, BLOCK_J=block_j,
        BLOCK_CI=block_ci, BLOCK_C=max(16, triton.next_power_of_2(C)),
        BLOCK_H=max(16, triton.next_power_of_2(H)), ELU=elu, HAS_BU=bu is not None, REFLECT=reflect,
        **_block_flags(b1, b2, ws_cc, bs), HALF_DOT=half, PRECISION=precision, num_warps=warps, num_stages=1,
        **tuning.LAUNCH_OPTIONS)
    return out


def conv1d(x, weight_kco, bias, stride, dilation, left, right, reflect, elu, residual, precision, out_dtype,
           elu_out=False):
    """x [B, C_in, L]; weight_kco [K, C_out, C_in]; returns [B, C_out, T_out] (its ELU: `elu_out`)."""
    B, C_in, L = x.shape
    K, C_out, _ = weight_kco.shape
    padded = left + L + right
    T_out = (padded - (K - 1) * dilation - 1) // stride + 1
    out = torch.empty(B, C_out, T_out, device=x.device, dtype=out_dtype)
    if T_out <= 0 or B == 0:
        return out
    # Upstream's reflect rule for short inputs: zeros appended up to max(left, right) + 1 first.
    L_ext = max(L, max(left, right) + 1) if reflect else L
    res = residual if residual is not None else out
    args = (x, weight_kco, bias if bias is not None else weight_kco, res, out,
            C_in, C_out, L, L_ext, T_out, left, stride, dilation, *x.stride(), *res.stride(), *out.stride())
    constants = dict(K=K, ELU=elu, REFLECT=reflect, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
                     HALF_DOT=_half_dot(x), PRECISION=precision, ELU_OUT=elu_out)
    _launch(_conv1d_kernel, args, constants, C_in, C_out, T_out, "BLOCK_T",
            lambda bco, bt: (triton.cdiv(T_out, bt), triton.cdiv(C_out, bco), B),
            key=("C_in", "C_out", "stride", "dilation", "K", "ELU", "HAS_RES", "PRECISION", "ELU_OUT"))
    return out


def conv_transpose1d(x, weight_kco, bias, stride, start, length, elu, precision, out_dtype):
    """x [B, C_in, L]; weight_kco [K, C_out, C_in]; returns the full transposed convolution's
    output [B, C_out, (L - 1) * stride + K] restricted to [start, start + length)."""
    B, C_in, L = x.shape
    K, C_out, _ = weight_kco.shape
    out = torch.empty(B, C_out, length, device=x.device, dtype=out_dtype)
    if length <= 0 or B == 0:
        return out
    j0 = start // stride
    n_j = (start + length - 1) // stride - j0 + 1
    args = (x, weight_kco, bias if bias is not None else weight_kco, out, C_in, C_out, L, start, length, j0, n_j,
            *x.stride(), *out.stride())
    constants = dict(K=K, S=stride, ELU=elu, HAS_BIAS=bias is not None, HALF_DOT=_half_dot(x), PRECISION=precision)
    _launch(_conv_transpose1d_kernel, args, constants, C_in, C_out, n_j, "BLOCK_J",
            lambda bco, bj: (triton.cdiv(n_j, bj) * stride, triton.cdiv(C_out, bco), B),
            key=("C_in", "C_out", "K", "S", "ELU", "PRECISION"))
    return out


def conv2d_leaky_relu(x, weight_kco, KH, KW, bias, stride, dilation, padding, slope, precision, out_dtype):
    """x [B, C_in, H, W]; weight_kco [KH*KW, C_out, C_in] (tap kh*KW + kw); zero padding (ph, pw).
    Returns leaky_relu(conv2d(x) + bias, slope) [B, C_out, H_out, W_out] (slope None: no activation)."""
    B, C_in, H, W = x.shape
    _, C_out, _ = weight_kco.shape
    (sh, sw), (dh, dw), (ph, pw) = stride, dilation, padding
    H_out = (H + 2 * ph - dh * (KH - 1) - 1) // sh + 1
    W_out = (W + 2 * pw - dw * (KW - 1) - 1) // sw + 1
    out = torch.empty(B, C_out, max(H_out, 0), max(W_out, 0), device=x.device, dtype=out_dtype)
    if H_out <= 0 or W_out <= 0 or B == 0:
        return out
    P = H_out * W_out
    args = (x, weight_kco, bias if bias is not None else weight_kco, out, C_in, C_out, H, W, H_out, W_out,
            sh, sw, dh, dw, ph, pw, 0.0 if slope is None else float(slope), *x.stride(), *out.stride())
    constants = dict(KH=KH, KW=KW, HAS_BIAS=bias is not None, ACTIVATE=slope is not None, HALF_DOT=_half_dot(x),
                     PRECISION=precision)
    _launch(_conv2d_leaky_relu_kernel, args, constants, C_in, C_out, P, "BLOCK_P",
            lambda bco, bp: (triton.cdiv(P, bp), triton.cdiv(C_out, bco), B),
            key=("C_in", "C_out", "W", "sw", "dw", "KH", "KW", "PRECISION"))
    return out
