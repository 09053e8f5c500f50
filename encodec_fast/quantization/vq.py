"""Residual vector quantizer with EnCodec's bandwidth rules."""

import dataclasses
import math
import typing as tp

import torch
from torch import nn

from .core_vq import ResidualVectorQuantization


@dataclasses.dataclass
class QuantizedResult:
    quantized: torch.Tensor
    codes: torch.Tensor
    bandwidth: torch.Tensor  # bandwidth in kb/s used, per batch item (as encodec 0.1.1)
    penalty: tp.Optional[torch.Tensor] = None
    metrics: dict = dataclasses.field(default_factory=dict)


class ResidualVectorQuantizer(nn.Module):
    """RVQ over `dimension`-dim latents with `n_q` codebooks of `bins` entries.

    A bandwidth of `bw` kbps uses n_q = max(1, floor(bw / (log2(bins) * sample_rate / 1000)))
    codebooks; no bandwidth means all of them. Two fixes of upstream's training behaviour, off by
    default (upstream's behaviour, for reproducibility): `revive_dead_codes` (its issue #61: dead
    codewords replaced by batch vectors actually stay replaced) and `commitment_all_stages` (its
    issue #25: every stage's commitment loss reaches the encoder).
    """

    def __init__(self, dimension: int = 256, n_q: int = 8, bins: int = 1024, decay: float = 0.99,
                 kmeans_init: bool = True, kmeans_iters: int = 50, threshold_ema_dead_code: int = 2,
                 revive_dead_codes: bool = False, commitment_all_stages: bool = False):
        super().__init__()
        self.n_q = n_q
        self.dimension = dimension
        self.bins = bins
        self.decay = decay
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.vq = ResidualVectorQuantization(
            dim=dimension, codebook_size=bins, num_quantizers=n_q, decay=decay, kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters, threshold_ema_dead_code=threshold_ema_dead_code,
            revive_dead_codes=revive_dead_codes, commitment_all_stages=commitment_all_stages)

    def forward(self, x: torch.Tensor, sample_rate: int, bandwidth: tp.Optional[float] = None) -> QuantizedResult:
        """Training/evaluation forward: x [B, D, T] -> QuantizedResult (codes [n_q, B, T])."""
        bw_per_q = self.get_bandwidth_per_quantizer(sample_rate)
        n_q = self.get_num_quantizers_for_bandwidth(sample_rate, bandwidth)
        quantized, codes, commit_loss = self.vq(x, n_q=n_q)
        bw = torch.tensor(n_q * bw_per_q).to(x)
        return QuantizedResult(quantized, codes, bw, penalty=torch.mean(commit_loss))

    def get_num_quantizers_for_bandwidth(self, sample_rate: int, bandwidth: tp.Optional[float] = None) -> int:
        n_q = self.n_q
        if bandwidth and bandwidth > 0.0:
            n_q = int(max(1, math.floor(bandwidth / self.get_bandwidth_per_quantizer(sample_rate))))
        return n_q

    def get_bandwidth_per_quantizer(self, sample_rate: int) -> float:
        """kbps per codebook."""
        return math.log2(self.bins) * sample_rate / 1000

    def encode(self, x: torch.Tensor, sample_rate: int, bandwidth: tp.Optional[float] = None,
               rows: tp.Optional[int] = None) -> torch.Tensor:
        """x [B, D, T] -> codes [n_q, B, T] int64."""
        return self.vq.encode(x, n_q=self.get_num_quantizers_for_bandwidth(sample_rate, bandwidth), rows=rows)

    def decode(self, codes: torch.Tensor, in_range: bool = False) -> torch.Tensor:
        """codes [K, B, T] -> quantized latents [B, D, T] (`in_range`: the caller has checked the
        codes' range; nothing read)."""
        return self.vq.decode(codes, in_range=in_range)
