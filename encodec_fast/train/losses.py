"""EnCodec's training losses (Défossez et al. 2022, §3.4), each a small function or module.

Shapes: audio is [B, C, T] (the model's output `y` against the input `x`); discriminator outputs
are what `MultiScaleSTFTDiscriminator` returns: a list of K logit maps and a list of K lists of L
feature maps (any shapes, one per sub-discriminator and layer).

- `time_l1`: ℓ_t = mean |x - y|.
- `MultiScaleMelLoss`: ℓ_f, eq. 1: over the scales i = 5..11 (windows 32..2048 samples, hop a
  quarter of the window), 64-bin mel spectrograms of a normalized STFT, mean |S_i(x) - S_i(y)| +
  α_i mean (S_i(x) - S_i(y))², averaged over the scales (α_i = 1). The paper leaves open magnitude
  or power and linear or log mel: magnitude, linear here (both are constructor options).
- `discriminator_hinge_loss`: L_d = 1/K Σ_k mean relu(1 - D_k(x)) + mean relu(1 + D_k(y)).
- `generator_hinge_loss`: ℓ_g = 1/K Σ_k mean relu(1 - D_k(y)) (the paper's, not audiocraft's -D).
- `relative_feature_matching`: ℓ_feat = 1/(K L) Σ_k Σ_l mean |D_k^l(x) - D_k^l(y)| / mean |D_k^l(x)|
  (eq. 2; the real features carry no gradient).
- The commitment loss ℓ_w is the quantizer's `penalty` (`QuantizedResult.penalty`), backpropagated
  on its own with weight 1, outside the balancer.

Spectrograms use `encodec_fast.dsp` (no torchaudio at run time).
"""

import typing as tp
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .. import dsp


def time_l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ℓ_t: mean absolute difference of the waveforms x, y [B, C, T] -> scalar."""
    return F.l1_loss(y, x)


class MultiScaleMelLoss(nn.Module):
    """ℓ_f (eq. 1): x, y [B, C, T] -> scalar, averaged over scales of mean L1 + α · mean squared
    differences of mel spectrograms.

    sample_rate: the audio's; scales: exponents i (window and n_fft 2^i, hop 2^i / 4);
    n_mels: mel bins (64 in the paper, for every scale: the smallest windows have fewer frequency
    bins than that, so some of their filters are empty, as in the paper's setting);
    alphas: one weight per scale for the squared term (default all 1); power: 1 (magnitude) or 2;
    log: compare log10(mel + eps) instead of the linear mel.
    """

    def __init__(self, sample_rate: int, scales: tp.Sequence[int] = range(5, 12), n_mels: int = 64,
                 alphas: tp.Optional[tp.Sequence[float]] = None, power: float = 1.0, normalized: bool = True,
                 log: bool = False, eps: float = 1e-5):
        super().__init__()
        self.scales = list(scales)
        self.alphas = [1.0] * len(self.scales) if alphas is None else [float(a) for a in alphas]
        if len(self.alphas) != len(self.scales):
            raise ValueError(f"{len(self.alphas)} alphas for {len(self.scales)} scales")
        self.log, self.eps = log, eps
        with warnings.catch_warnings():  # empty filters at the smallest windows are expected (see above)
            warnings.simplefilter("ignore")
            self.mels = nn.ModuleList(
                dsp.MelSpectrogram(sample_rate=sample_rate, n_fft=2 ** i, win_length=2 ** i, hop_length=2 ** i // 4,
                                   n_mels=n_mels, power=power, normalized=normalized, center=True,
                                   pad_mode="reflect")
                for i in self.scales)

    def spectrograms(self, x: torch.Tensor) -> tp.List[torch.Tensor]:
        """x [B, C, T] -> one [B, C, n_mels, frames] per scale."""
        out = []
        for mel in self.mels:
            s = mel(x if x.dtype == torch.float64 else x.float())
            out.append(torch.log10(s + self.eps) if self.log else s)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"shapes differ: {tuple(x.shape)} and {tuple(y.shape)}")
        total = x.new_zeros((), dtype=torch.float32)
        for sx, sy, alpha in zip(self.spectrograms(x), self.spectrograms(y), self.alphas):
            diff = sx - sy
            total = total + diff.abs().mean() + alpha * diff.pow(2).mean()
        return total / len(self.scales)


def discriminator_hinge_loss(real_logits: tp.Sequence[torch.Tensor],
                             fake_logits: tp.Sequence[torch.Tensor]) -> torch.Tensor:
    """L_d = 1/K Σ_k mean relu(1 - D_k(x)) + mean relu(1 + D_k(y)); fake logits from a detached y."""
    if len(real_logits) != len(fake_logits) or not real_logits:
        raise ValueError("one real and one fake logit map per sub-discriminator are needed")
    total = sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real_logits, fake_logits))
    return total / len(real_logits)


def generator_hinge_loss(fake_logits: tp.Sequence[torch.Tensor]) -> torch.Tensor:
    """ℓ_g = 1/K Σ_k mean relu(1 - D_k(y))."""
    if not fake_logits:
        raise ValueError("no logits")
    return sum(F.relu(1 - f).mean() for f in fake_logits) / len(fake_logits)


def relative_feature_matching(real_fmaps: tp.Sequence[tp.Sequence[torch.Tensor]],
                              fake_fmaps: tp.Sequence[tp.Sequence[torch.Tensor]],
                              eps: float = 1e-12,
                              average: tp.Optional[tp.Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """ℓ_feat = 1/(K L) Σ_k Σ_l mean |D_k^l(x) - D_k^l(y)| / mean |D_k^l(x)| over every layer of
    every sub-discriminator (the real features are detached). `average`, given the vector of the
    per-layer means |D_k^l(x)|, returns the values to divide by (data-parallel training averages
    them across workers, so the loss equals one process's on the combined batch)."""
    if len(real_fmaps) != len(fake_fmaps):
        raise ValueError("real and fake features come from different numbers of sub-discriminators")
    pairs = []
    for real_layers, fake_layers in zip(real_fmaps, fake_fmaps):
        if len(real_layers) != len(fake_layers):
            raise ValueError("real and fake feature maps differ in number")
        pairs.extend((r.detach(), f) for r, f in zip(real_layers, fake_layers))
    if not pairs:
        raise ValueError("no feature maps")
    scales = torch.stack([r.abs().mean().to(torch.promote_types(r.dtype, torch.float32)) for r, _ in pairs])
    if average is not None:
        scales = average(scales)
    terms = [(f - r).abs().mean() / (scale + eps) for (r, f), scale in zip(pairs, scales)]
    return sum(terms) / len(terms)
