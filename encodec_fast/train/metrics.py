"""Codec quality and codebook usage metrics (validation, benchmarks). Audio is [B, C, T].

- `si_snr`: scale-invariant signal-to-noise ratio in dB, per item, higher is better (the positive
  value; audiocraft's loss is its negative).
- `mel_distance`: mean |log10 mel(x) - log10 mel(y)| (n_fft 1024, hop 256, 64 mels, as audiocraft's
  `mel` metric), lower is better.
- `stft_distance`: multi-resolution STFT distance (spectral convergence + mean |log magnitude
  difference|, averaged over FFT sizes 2048/1024/512 with hops of a quarter), lower is better.
- `codebook_usage`: per quantizer stage, the perplexity of the codes used (exp of their entropy;
  1024 = every code equally often) and how many codes were never used.
"""

import math
import typing as tp

import torch

from .. import dsp


def _align(x: torch.Tensor, y: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    if x.shape[:-1] != y.shape[:-1]:
        raise ValueError(f"shapes differ: {tuple(x.shape)} and {tuple(y.shape)}")
    n = min(x.shape[-1], y.shape[-1])
    return x[..., :n].double(), y[..., :n].double()


def si_snr(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """SI-SNR of the estimate y against the reference x, in dB: [B, C, T] x 2 -> [B] (channels
    flattened together, means removed)."""
    x, y = _align(x, y)
    x = x.flatten(1) - x.flatten(1).mean(dim=1, keepdim=True)
    y = y.flatten(1) - y.flatten(1).mean(dim=1, keepdim=True)
    target = (y * x).sum(dim=1, keepdim=True) / (x.pow(2).sum(dim=1, keepdim=True) + eps) * x
    noise = y - target
    return 10 * torch.log10((target.pow(2).sum(dim=1) + eps) / (noise.pow(2).sum(dim=1) + eps))


_MELS: tp.Dict[int, dsp.MelSpectrogram] = {}


def mel_distance(x: torch.Tensor, y: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Mean |log10(mel(x) + 1e-5) - log10(mel(y) + 1e-5)| per item: [B, C, T] x 2 -> [B]."""
    x, y = _align(x, y)
    mel = _MELS.get(sample_rate)
    if mel is None:
        mel = _MELS[sample_rate] = dsp.MelSpectrogram(sample_rate=sample_rate, n_fft=1024, win_length=1024,
                                                      hop_length=256, n_mels=64, f_min=64.0, power=1.0,
                                                      normalized=False, center=True, pad_mode="reflect")
    mx, my = (torch.log10(mel(v.float()) + 1e-5) for v in (x, y))
    return (mx - my).abs().flatten(1).mean(dim=1)


def stft_distance(x: torch.Tensor, y: torch.Tensor, n_ffts: tp.Sequence[int] = (2048, 1024, 512)) -> torch.Tensor:
    """Multi-resolution STFT distance per item: [B, C, T] x 2 -> [B]."""
    x, y = _align(x, y)
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for n_fft in n_ffts:
        window = torch.hann_window(n_fft, dtype=torch.float64)
        sx, sy = (torch.stft(v.flatten(0, 1), n_fft, n_fft // 4, window=window, return_complex=True).abs()
                  .reshape(v.shape[0], -1) for v in (x, y))
        convergence = (sx - sy).norm(dim=1) / sx.norm(dim=1).clamp_min(1e-8)
        log_mag = (torch.log(sx.clamp_min(1e-7)) - torch.log(sy.clamp_min(1e-7))).abs().mean(dim=1)
        total += convergence + log_mag
    return (total / len(n_ffts)).float()


def codebook_usage(codes: torch.Tensor, bins: int) -> tp.List[tp.Dict[str, float]]:
    """codes [K, ...] (K stages) -> per stage {'perplexity', 'unused'}."""
    out = []
    for stage in codes.reshape(codes.shape[0], -1):
        counts = torch.bincount(stage.long().cpu(), minlength=bins).double()
        p = counts / counts.sum()
        entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
        out.append({"perplexity": math.exp(entropy), "unused": int((counts == 0).sum())})
    return out
