"""Vector quantization with EMA codebooks (EnCodec's `core_vq`), inference and training.

Shapes: latents are [B, D, T]; codebooks are `embed` [K, D]; codes are int64.

Inference computes distances with upstream's float32 expression,
`dist = ||x||^2 - 2 x.e + ||e||^2` (the nearest code is the smallest), with the matrix product on
`embed.t()` as upstream does and the codebook norms cached, so codes are bit-identical. Ties go to
the lowest index.
"""

import typing as tp
import warnings

import torch
from torch import nn
from torch.nn import functional as F


def ema_inplace(moving_avg: torch.Tensor, new: torch.Tensor, decay: float) -> None:
    moving_avg.data.mul_(decay).add_(new, alpha=(1 - decay))


def laplace_smoothing(x: torch.Tensor, n_categories: int, epsilon: float = 1e-5) -> torch.Tensor:
    return (x + epsilon) / (x.sum() + n_categories * epsilon)


def sample_vectors(samples: torch.Tensor, num: int) -> torch.Tensor:
    """`num` rows of `samples` [N, D]: a random subset if N >= num, else drawn with replacement."""
    n = samples.shape[0]
    if n >= num:
        indices = torch.randperm(n, device=samples.device)[:num]
    else:
        indices = torch.randint(0, n, (num,), device=samples.device)
    return samples[indices]


def kmeans(samples: torch.Tensor, num_clusters: int, num_iters: int = 10) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means from a random sample of the data; empty clusters keep their mean.

    samples [N, D] -> (means [K, D], counts of the last assignment [K]).
    """
    means = sample_vectors(samples, num_clusters)
    bins = torch.zeros(num_clusters, dtype=torch.long, device=samples.device)
    for _ in range(num_iters):
        dists = -((samples[:, None, :] - means[None, :, :]) ** 2).sum(dim=-1)
        buckets = dists.max(dim=-1).indices
        bins = torch.bincount(buckets, minlength=num_clusters)
        empty = bins == 0
        sums = samples.new_zeros(num_clusters, samples.shape[-1])
        sums.scatter_add_(0, buckets[:, None].expand(-1, samples.shape[-1]), samples)
        new_means = sums / bins.masked_fill(empty, 1)[:, None]
        means = torch.where(empty[:, None], means, new_means)
    return means, bins


class EuclideanCodebook(nn.Module):
    """Codebook with Euclidean distance and EMA updates.

    Buffers (upstream names): `inited` [1], `cluster_size` [K], `embed` [K, D], `embed_avg` [K, D].
    """

    def __init__(self, dim: int, codebook_size: int, kmeans_init: bool = False, kmeans_iters: int = 10,
                 decay: float = 0.99, epsilon: float = 1e-5, threshold_ema_dead_code: int = 2):
        super().__init__()
        self.decay = decay
        if kmeans_init:
            embed = torch.zeros(codebook_size, dim)
        else:
            embed = torch.empty(codebook_size, dim)
            nn.init.kaiming_uniform_(embed)
        self.codebook_size = codebook_size
        self.kmeans_iters = kmeans_iters
        self.epsilon = epsilon
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.register_buffer("inited", torch.Tensor([not kmeans_init]))
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())
        self._norms: tp.Optional[torch.Tensor] = None
        self._norms_key: tp.Any = None

    # -- inference ---------------------------------------------------------------------------
    def embed_norms(self) -> torch.Tensor:
        """||e||^2 as upstream computes it ([1, K], from `embed.t()`), cached per embed version."""
        e = self.embed
        key = (e._version, e.data_ptr(), e.dtype, e.device)
        if self._norms_key != key:
            with torch.inference_mode(False), torch.no_grad():
                self._norms = e.t().pow(2).sum(0, keepdim=True)
            self._norms_key = key
        assert self._norms is not None
        return self._norms

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest codeword for each row of x [N, D] -> [N] int64 (ties: lowest index)."""
        embed_t = self.embed.t()
        norms = self.embed_norms() if not torch.is_grad_enabled() else embed_t.pow(2).sum(0, keepdim=True)
        # Upstream: -((x^2).sum - (2x) @ E^T + ||e||^2), then argmax. Scaling by 2 is exact in
        # binary floating point, so a - 2 * (x @ E^T) has the same bits as a - (2x) @ E^T.
        dist = torch.mm(x, embed_t)
        dist = torch.sub(x.pow(2).sum(1, keepdim=True), dist, alpha=2)
        dist.add_(norms)
        return dist.argmin(dim=-1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> codes [...]."""
        shape = x.shape
        return self.quantize(x.reshape(-1, shape[-1])).view(*shape[:-1])

    def decode(self, embed_ind: torch.Tensor) -> torch.Tensor:
        """codes [...] -> vectors [..., D]."""
        return F.embedding(embed_ind, self.embed)

    # -- training ----------------------------------------------------------------------------
    @torch.jit.ignore
    def init_embed_(self, data: torch.Tensor) -> None:
        if self.inited:
            return
        embed, cluster_size = kmeans(data, self.codebook_size, self.kmeans_iters)
        self.embed.data.copy_(embed)
        self.embed_avg.data.copy_(embed.clone())
        self.cluster_size.data.copy_(cluster_size)
        self.inited.data.copy_(torch.Tensor([True]))
        from .. import distrib
        distrib.broadcast_tensors(self.buffers())

    def expire_codes_(self, batch_samples: torch.Tensor) -> None:
        """Replace codewords whose EMA count fell under the threshold by batch vectors.

        As upstream, the EMA renormalisation that follows in `forward` overwrites `embed`, so
        this has no lasting effect; kept for state and RNG compatibility.
        """
        if self.threshold_ema_dead_code == 0:
            return
        expired = self.cluster_size < self.threshold_ema_dead_code
        if not torch.any(expired):
            return
        samples = batch_samples.reshape(-1, batch_samples.shape[-1])
        self.embed.data.copy_(torch.where(expired[:, None], sample_vectors(samples, self.codebook_size), self.embed))
        from .. import distrib
        distrib.broadcast_tensors(self.buffers())

    def forward(self, x: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """x [..., D] -> (quantized [..., D], codes [...]); updates the EMA buffers in training."""
        shape, dtype = x.shape, x.dtype
        flat = x.reshape(-1, shape[-1])
        self.init_embed_(flat)
        embed_ind = self.quantize(flat)
        onehot = F.one_hot(embed_ind, self.codebook_size).type(dtype)
        embed_ind = embed_ind.view(*shape[:-1])
        quantize = self.decode(embed_ind)
        if self.training:
            self.expire_codes_(flat)
            ema_inplace(self.cluster_size, onehot.sum(0), self.decay)
            embed_sum = flat.t() @ onehot
            ema_inplace(self.embed_avg, embed_sum.t(), self.decay)
            cluster_size = laplace_smoothing(self.cluster_size, self.codebook_size, self.epsilon) * self.cluster_size.sum()
            self.embed.data.copy_(self.embed_avg / cluster_size.unsqueeze(1))
        return quantize, embed_ind


class VectorQuantization(nn.Module):
    """One quantizer stage: [B, D, T] latents, a `_codebook`, straight-through training."""

    def __init__(self, dim: int, codebook_size: int, codebook_dim: tp.Optional[int] = None, decay: float = 0.99,
                 epsilon: float = 1e-5, kmeans_init: bool = True, kmeans_iters: int = 50,
                 threshold_ema_dead_code: int = 2, commitment_weight: float = 1.0):
        super().__init__()
        codebook_dim = dim if codebook_dim is None else codebook_dim
        projection = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if projection else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if projection else nn.Identity()
        self.epsilon = epsilon
        self.commitment_weight = commitment_weight
        self._codebook = EuclideanCodebook(dim=codebook_dim, codebook_size=codebook_size, kmeans_init=kmeans_init,
                                           kmeans_iters=kmeans_iters, decay=decay, epsilon=epsilon,
                                           threshold_ema_dead_code=threshold_ema_dead_code)
        self.codebook_size = codebook_size

    @property
    def codebook(self) -> torch.Tensor:
        return self._codebook.embed

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, D, T] -> codes [B, T]."""
        return self._codebook.encode(self.project_in(x.transpose(1, 2)))

    def decode(self, embed_ind: torch.Tensor) -> torch.Tensor:
        """codes [B, T] -> [B, D, T]."""
        return self.project_out(self._codebook.decode(embed_ind)).transpose(1, 2)

    def forward(self, x: torch.Tensor):
        """[B, D, T] -> (quantized [B, D, T], codes [B, T], commitment loss [1])."""
        x = self.project_in(x.transpose(1, 2))
        quantize, embed_ind = self._codebook(x)
        if self.training:
            quantize = x + (quantize - x).detach()
        loss = torch.tensor([0.0], device=x.device, requires_grad=self.training)
        if self.training:
            warnings.warn("When using RVQ in training model, first check "
                          "https://github.com/facebookresearch/encodec/issues/25 . "
                          "The bug wasn't fixed here for reproducibility.")
            if self.commitment_weight > 0:
                loss = loss + F.mse_loss(quantize.detach(), x) * self.commitment_weight
        quantize = self.project_out(quantize).transpose(1, 2)
        return quantize, embed_ind, loss


class ResidualVectorQuantization(nn.Module):
    """Residual VQ: stage i quantizes what stages < i left over."""

    def __init__(self, *, num_quantizers: int, **kwargs):
        super().__init__()
        self.layers = nn.ModuleList([VectorQuantization(**kwargs) for _ in range(num_quantizers)])

    def forward(self, x: torch.Tensor, n_q: tp.Optional[int] = None):
        quantized_out: tp.Any = 0.0
        residual = x
        losses, indices = [], []
        for layer in self.layers[: n_q or len(self.layers)]:
            quantized, idx, loss = layer(residual)
            residual = residual - quantized
            quantized_out = quantized_out + quantized
            indices.append(idx)
            losses.append(loss)
        return quantized_out, torch.stack(indices), torch.stack(losses)

    def encode(self, x: torch.Tensor, n_q: tp.Optional[int] = None, rows: tp.Optional[int] = None) -> torch.Tensor:
        """[B, D, T] -> codes [n_q, B, T].

        `rows`: run the search on blocks of `rows` batch items, the call shapes of an upstream
        batch of that size (a matrix product's bits can depend on its row count).
        """
        B, D, T = x.shape
        n_q = n_q or len(self.layers)
        layers = self.layers[:n_q]
        if any(not isinstance(layer.project_in, nn.Identity) for layer in layers):
            return self._encode_projected(x, n_q)
        rows = rows or B
        codes = torch.empty(n_q, B, T, dtype=torch.long, device=x.device)
        for b0 in range(0, B, rows):
            # [b, T, D] rows, one copy; each stage subtracts its codeword in place.
            residual = x[b0:b0 + rows].transpose(1, 2).reshape(-1, D)
            if residual.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
                residual = residual.clone()  # a view of x (T == 1): never modify the input
            for i, layer in enumerate(layers):
                cb = layer._codebook
                idx = cb.quantize(residual)
                codes[i, b0:b0 + rows] = idx.view(-1, T)
                if i + 1 < n_q:
                    residual.sub_(F.embedding(idx, cb.embed))
        return codes

    def _encode_projected(self, x: torch.Tensor, n_q: int) -> torch.Tensor:
        residual, out = x, []
        for layer in self.layers[:n_q]:
            idx = layer.encode(residual)
            residual = residual - layer.decode(idx)
            out.append(idx)
        return torch.stack(out)

    def decode(self, q_indices: torch.Tensor) -> torch.Tensor:
        """codes [K, B, T] -> [B, D, T] (sum of the first K stages, in order)."""
        K = q_indices.shape[0]
        if K > len(self.layers):
            raise ValueError(f"{K} codebooks given, the quantizer has {len(self.layers)}")
        if K == 0:
            raise ValueError("no codebooks to decode")
        out = None
        for i in range(K):
            q = self.layers[i].decode(q_indices[i])
            out = q.clone() if out is None else out.add_(q)
        return out
