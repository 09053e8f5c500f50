"""Triton kernel for the MS-STFT discriminator's front end.

The complex STFT itself comes from `torch.stft` (cuFFT); what the discriminator needs next is its
real and imaginary parts as channels, time before frequency, divided by the window's L2 norm:
[B, 2C, frames, freq]. torch does that in three passes (cat, contiguous transpose for the conv,
division); `scaled_copy` does it in one, and its transpose (the backward) in one.
"""


import torch
import triton
import triton.language as tl

from ..ops.backend import interpreting
from . import tuning


@triton.jit
def _scaled_copy_kernel(src_ptr, dst_ptr, scale, numel, d1, d2, d3, d4,
                        s0, s1, s2, s3, s4, BLOCK: tl.constexpr):
    """dst (contiguous, shape [d0, d1, d2, d3, d4]) = scale * src (same shape, any strides)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < numel
    i4 = idx % d4
    rest = idx // d4
    i3 = rest % d3
    rest = rest // d3
    i2 = rest % d2
    rest = rest // d2
    i1 = rest % d1
    i0 = rest // d1
    v = tl.load(src_ptr + i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3 + i4 * s4, mask=ok, other=0.0)
    tl.store(dst_ptr + idx, (v.to(tl.float32) * scale).to(dst_ptr.dtype.element_ty), mask=ok)


def scaled_copy(src: torch.Tensor, scale: float) -> torch.Tensor:
    """A contiguous copy of the 5-d (strided) `src`, multiplied by `scale`."""
    if src.dim() != 5:
        raise ValueError("scaled_copy takes 5-d views")
    dst = torch.empty(src.shape, dtype=src.dtype, device=src.device)
    numel = dst.numel()
    if numel == 0:
        return dst
    block = 1 << 16 if interpreting() else 1024
    _scaled_copy_kernel[(triton.cdiv(numel, block),)](src, dst, float(scale), numel, *src.shape[1:], *src.stride(),
                                                      BLOCK=block, num_warps=4, **tuning.LAUNCH_OPTIONS)
    return dst
