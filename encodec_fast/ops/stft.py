"""The MS-STFT discriminator's spectrogram: PyTorch reference and the dispatch to `kernels/stft.py`.

spectrogram(x [B, C, T]) -> [B, 2C, frames, n_fft // 2 + 1]: the complex STFT (Hann window given,
no centering, one-sided) divided by the window's L2 norm when `normalized`, real parts of every
channel then imaginary parts, time before frequency (the layout the first Conv2d reads).

Both paths take the STFT from `torch.stft`; the kernel path replaces the layout-and-scale passes
by one kernel (forward and backward). The reference is `dsp.spectrogram` (torchaudio's spectrogram, the
function upstream's discriminator calls, written in our code).
"""

import typing as tp

import torch

from ..dsp import spectrogram as _dsp_spectrogram
from .backend import select


def spectrogram_torch(x: torch.Tensor, window: torch.Tensor, n_fft: int, hop_length: int, win_length: int,
                      normalized: bool = True) -> torch.Tensor:
    z = _dsp_spectrogram(x, window, n_fft, hop_length, win_length, power=None, normalized=normalized,
                         center=False, onesided=True)
    return torch.cat([z.real, z.imag], dim=1).transpose(2, 3)


def _kernels():
    from ..kernels import stft as k
    return k


class _Layout(torch.autograd.Function):
    """[B*C, F, frames, 2] (real view of the STFT) -> [B, 2C, frames, F], times `scale`."""

    @staticmethod
    def forward(ctx, spec_real: torch.Tensor, B: int, C: int, scale: float) -> torch.Tensor:
        _, F_, frames, _ = spec_real.shape
        ctx.shape, ctx.scale = (B, C, F_, frames), scale
        src = spec_real.view(B, C, F_, frames, 2).permute(0, 4, 1, 3, 2)  # [B, 2, C, frames, F]
        return _kernels().scaled_copy(src, scale).view(B, 2 * C, frames, F_)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        B, C, F_, frames = ctx.shape
        src = grad.reshape(B, 2, C, frames, F_).permute(0, 2, 4, 3, 1)  # [B, C, F, frames, 2]
        return _kernels().scaled_copy(src, ctx.scale).view(B * C, F_, frames, 2), None, None, None


def spectrogram(x: torch.Tensor, window: torch.Tensor, n_fft: int, hop_length: int, win_length: int,
                normalized: bool = True) -> torch.Tensor:
    """See the module docstring; x [B, C, T] -> [B, 2C, frames, n_fft // 2 + 1]."""
    if select(x) != "triton":
        return spectrogram_torch(x, window, n_fft, hop_length, win_length, normalized)
    B, C, T = x.shape
    spec = torch.stft(x.reshape(B * C, T), n_fft, hop_length, win_length, window, center=False,
                      normalized=False, onesided=True, return_complex=True)
    scale = 1.0 / float(window.pow(2.0).sum().sqrt()) if normalized else 1.0
    return _Layout.apply(torch.view_as_real(spec), B, C, scale)


def spectrogram_view(x: torch.Tensor, window: torch.Tensor, n_fft: int, hop_length: int, win_length: int,
                     normalized: bool = True) -> tp.Tuple[torch.Tensor, float]:
    """The fused front end's input, for mono x [B, 1, T]: (the STFT's real view as [B, 2, frames,
    n_fft // 2 + 1], no copy: torch.stft's memory, bins contiguous with real and imaginary parts
    side by side, strides (., 1, 2 * bins, 2); the normalisation 1 / ||window|| or 1).
    `spectrogram(x)` equals view * scale; the gemm Conv2d reads the view and folds the scale into
    its products (`ops.conv2d_leaky_relu(..., input_scale=scale)`)."""
    B, C, T = x.shape
    if C != 1:
        raise ValueError(f"the STFT's real view is the first conv's layout for mono audio only, got {C} channels")
    spec = torch.stft(x.reshape(B, T), n_fft, hop_length, win_length, window, center=False,
                      normalized=False, onesided=True, return_complex=True)
    scale = 1.0 / float(window.pow(2.0).sum().sqrt()) if normalized else 1.0
    return torch.view_as_real(spec).permute(0, 3, 2, 1), scale


__all__: tp.List[str] = ["spectrogram", "spectrogram_torch", "spectrogram_view"]
