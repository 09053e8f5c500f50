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

from .. import host, ops
from ..ops import rvq as rvq_ops


def ema_inplace(moving_avg: torch.Tensor, new: torch.Tensor, decay: float) -> None:
    # on the buffer itself (not `.data`, upstream's): the same bits, and its version counter moves
    with torch.no_grad():
        moving_avg.mul_(decay).add_(new, alpha=(1 - decay))


def _state(t: torch.Tensor) -> tp.Tuple[torch.Tensor, int]:
    """A buffer's state for remembering what was read from it: the tensor (compared by identity:
    `load_state_dict` may replace it) and its version (every in-place write moves it)."""
    return t, t._version


def _unchanged(seen: tp.Optional[tp.Tuple[torch.Tensor, int]], t: torch.Tensor) -> bool:
    return seen is not None and seen[0] is t and seen[1] == t._version


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


#: Elements of the [rows, K, D] difference tensor k-means builds at once (64 MB in fp32).
KMEANS_CHUNK_ELEMENTS = 1 << 24


def _nearest_mean(samples: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """argmax_k -||x - m_k||² per row, with upstream's expression (the same bits), a block of rows at
    a time: the whole [N, K, D] tensor would take GBs for a batch of 1 s crops."""
    n, k = samples.shape[0], means.shape[0]
    rows = max(1, KMEANS_CHUNK_ELEMENTS // max(1, k * samples.shape[1]))
    out = torch.empty(n, dtype=torch.long, device=samples.device)
    for start in range(0, n, rows):
        block = samples[start:start + rows]
        out[start:start + rows] = (-((block[:, None, :] - means[None, :, :]) ** 2).sum(dim=-1)).max(dim=-1).indices
    return out


def kmeans(samples: torch.Tensor, num_clusters: int, num_iters: int = 10) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means from a random sample of the data; empty clusters keep their mean.

    samples [N, D] -> (means [K, D], counts of the last assignment [K]).
    """
    means = sample_vectors(samples, num_clusters)
    bins = torch.zeros(num_clusters, dtype=torch.long, device=samples.device)
    for _ in range(num_iters):
        buckets = _nearest_mean(samples, means)
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
                 decay: float = 0.99, epsilon: float = 1e-5, threshold_ema_dead_code: int = 2,
                 revive_dead_codes: bool = False):
        super().__init__()
        self.decay = decay
        self.revive_dead_codes = revive_dead_codes
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
        self._inited_seen: tp.Any = None  # (the `inited` tensor, its version) last read as True
        #: Codewords replaced by dead-code expiry since the trainer last read (and reset) it.
        self.replaced = 0
        #: Set by `ResidualVectorQuantization`: training statistics are appended here, and the
        #: update waits for `update_` (one all-reduce for every stage), instead of running at once.
        self._deferred: tp.Optional[list] = None

    # -- inference ---------------------------------------------------------------------------
    def _set_embed(self, value: torch.Tensor) -> None:
        # In place on the buffer itself (not `.data`), so that its version counter moves and the
        # cached norms (here and in `ResidualVectorQuantization.stacked_codebooks`) follow.
        with torch.no_grad():
            self.embed.copy_(value)

    def embed_norms(self) -> torch.Tensor:
        """||e||^2 as upstream computes it ([1, K], from `embed.t()`), cached per embed version in
        eval mode (edits through `embed.data` do not move the version: after one, call
        `load_state_dict` or change the buffer itself); recomputed on every call in training."""
        e = self.embed
        key = (e._version, e.data_ptr(), e.dtype, e.device)
        if self.training or self._norms_key != key:
            with torch.inference_mode(False), torch.no_grad():
                self._norms = e.t().pow(2).sum(0, keepdim=True)
            self._norms_key = key
        assert self._norms is not None
        return self._norms

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest codeword for each row of x [N, D] -> [N] int64 (ties: lowest index)."""
        return ops.nearest_code(x, self.embed, self.embed_norms())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> codes [...]."""
        shape = x.shape
        return self.quantize(x.reshape(-1, shape[-1])).view(*shape[:-1])

    def decode(self, embed_ind: torch.Tensor) -> torch.Tensor:
        """codes [...] -> vectors [..., D]."""
        return F.embedding(embed_ind, self.embed)

    # -- training ----------------------------------------------------------------------------
    #: Data-parallel training as one process on the combined batch (set by the trainer): k-means
    #: and code expiry draw from every worker's vectors (gathered in rank order, the same draws
    #: on every worker), and the EMA counts and sums are summed across workers before the update.
    #: Off: upstream's behaviour (local statistics, buffers broadcast from rank 0 after init and
    #: expiry).
    sync_statistics: bool = False

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        from .. import distrib
        return distrib.all_gather_rows(rows) if self.sync_statistics else rows

    @torch.jit.ignore
    def is_inited(self) -> bool:
        """`bool(inited)`, read from the device once: a True is remembered while the buffer is the
        same tensor at the same version (`load_state_dict` and every in-place write on the buffer
        itself move the version), so a training step does not wait for the device to ask."""
        if _unchanged(self._inited_seen, self.inited):
            return True
        if not bool(self.inited):
            return False
        self._inited_seen = _state(self.inited)
        return True

    @torch.jit.ignore
    def init_embed_(self, data: torch.Tensor) -> None:
        if self.is_inited():
            return
        embed, cluster_size = kmeans(self._gather(data), self.codebook_size, self.kmeans_iters)
        self._set_embed(embed)
        with torch.no_grad():  # on the buffers themselves (not `.data`): their version counters move
            self.embed_avg.copy_(embed)
            self.cluster_size.copy_(cluster_size)
            self.inited.fill_(True)
        from .. import distrib
        distrib.broadcast_tensors(self.buffers())

    def expired_count(self) -> tp.Optional[torch.Tensor]:
        """How many codewords `expire_codes_` would replace now, as a 0-d tensor on the codebook's
        device (not read), or None when expiry is off."""
        if self.threshold_ema_dead_code == 0:
            return None
        return (self.cluster_size < self.threshold_ema_dead_code).sum()

    def expire_codes_(self, batch_samples: torch.Tensor, count: tp.Optional[int] = None) -> None:
        """Replace codewords whose EMA count fell under the threshold by batch vectors.

        As upstream, only `embed` is replaced, and the EMA renormalisation that follows in
        `forward` overwrites it from `embed_avg` / `cluster_size`, so this has no lasting effect
        (upstream's issue #61); kept for state and RNG compatibility. With `revive_dead_codes`
        the EMA state is replaced too (`embed_avg` = vector x threshold, `cluster_size` =
        threshold), so the revived codeword survives the update: the same random draws, an effect.
        """
        if self.threshold_ema_dead_code == 0:
            return
        if count is None:  # `count`: `expired_count()` already read (one read for many stages)
            count = int(self.expired_count())
        if count == 0:
            return
        expired = self.cluster_size < self.threshold_ema_dead_code
        self.replaced += count
        samples = self._gather(batch_samples.reshape(-1, batch_samples.shape[-1]))
        vectors = sample_vectors(samples, self.codebook_size)
        self._set_embed(torch.where(expired[:, None], vectors, self.embed))
        if self.revive_dead_codes:
            with torch.no_grad():
                threshold = float(self.threshold_ema_dead_code)
                self.embed_avg.copy_(torch.where(expired[:, None], vectors * threshold, self.embed_avg))
                self.cluster_size.masked_fill_(expired, threshold)
        from .. import distrib
        distrib.broadcast_tensors(self.buffers())

    def forward(self, x: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """x [..., D] -> (quantized [..., D], codes [...]); updates the EMA buffers in training."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        self.init_embed_(flat)
        with torch.no_grad():
            embed_ind, quantize, counts, embed_sum = ops.vq_assign(flat, self.embed, self.embed_norms(),
                                                                   stats=self.training)
        embed_ind = embed_ind.view(*shape[:-1])
        quantize = quantize.view(*shape[:-1], -1)
        if self.training:
            if self._deferred is not None:
                self._deferred.append((self, flat, counts, embed_sum))
            else:
                if self.sync_statistics:
                    from .. import distrib
                    distrib.all_reduce_sum_(counts)
                    distrib.all_reduce_sum_(embed_sum)
                self.update_(flat, counts, embed_sum)
        return quantize, embed_ind

    def update_(self, flat: torch.Tensor, counts: torch.Tensor, embed_sum: torch.Tensor,
                expired: tp.Optional[int] = None) -> None:
        """Dead-code expiry (`expired`: `expired_count()`, read by the caller), then the EMA update
        from this step's (already summed) statistics."""
        self.expire_codes_(flat, expired)
        ema_inplace(self.cluster_size, counts, self.decay)
        ema_inplace(self.embed_avg, embed_sum, self.decay)
        cluster_size = laplace_smoothing(self.cluster_size, self.codebook_size,
                                         self.epsilon) * self.cluster_size.sum()
        self._set_embed(self.embed_avg / cluster_size.unsqueeze(1))


class VectorQuantization(nn.Module):
    """One quantizer stage: [B, D, T] latents, a `_codebook`, straight-through training."""

    def __init__(self, dim: int, codebook_size: int, codebook_dim: tp.Optional[int] = None, decay: float = 0.99,
                 epsilon: float = 1e-5, kmeans_init: bool = True, kmeans_iters: int = 50,
                 threshold_ema_dead_code: int = 2, commitment_weight: float = 1.0, revive_dead_codes: bool = False,
                 warn: bool = True):
        super().__init__()
        codebook_dim = dim if codebook_dim is None else codebook_dim
        projection = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if projection else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if projection else nn.Identity()
        self.epsilon = epsilon
        self.commitment_weight = commitment_weight
        self._codebook = EuclideanCodebook(dim=codebook_dim, codebook_size=codebook_size, kmeans_init=kmeans_init,
                                           kmeans_iters=kmeans_iters, decay=decay, epsilon=epsilon,
                                           threshold_ema_dead_code=threshold_ema_dead_code,
                                           revive_dead_codes=revive_dead_codes)
        self.codebook_size = codebook_size
        self.warn = warn

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
        if self.training and self.warn:
            warnings.warn("When using RVQ in training model, first check "
                          "https://github.com/facebookresearch/encodec/issues/25 . "
                          "The bug wasn't fixed here for reproducibility.")
        if self.training:
            if self.commitment_weight > 0:
                loss = loss + F.mse_loss(quantize.detach(), x) * self.commitment_weight
        quantize = self.project_out(quantize).transpose(1, 2)
        return quantize, embed_ind, loss


#: Training: every stage searches before any stage's EMA update (`ResidualVectorQuantization.forward`;
#: the same results, one all-reduce). False: update stage by stage, as upstream's code is written.
DEFER_UPDATES = True
#: Training on CPU: every stage in one autograd node (`ops.rvq.rvq_train` with the torch twins of the
#: GPU launches) instead of a graph of per-stage operations; the same codes, outputs and EMA state.
FUSED_CPU_TRAINING = True


class ResidualVectorQuantization(nn.Module):
    """Residual VQ: stage i quantizes what stages < i left over.

    In training, as upstream, each stage's straight-through output is subtracted from the residual,
    whose gradient with respect to the encoder output is then I - I = 0: only the first stage's
    commitment loss reaches the encoder (upstream's issue #25, kept for reproducibility). With
    `commitment_all_stages`, each stage's output is detached before the next residual and one
    straight-through estimator is applied to the sum (audiocraft's fix): every stage's commitment
    loss has a gradient, the output's gradient is still the identity.
    """

    def __init__(self, *, num_quantizers: int, commitment_all_stages: bool = False, **kwargs):
        super().__init__()
        self.commitment_all_stages = commitment_all_stages
        if commitment_all_stages:
            kwargs["warn"] = False
        self.layers = nn.ModuleList([VectorQuantization(**kwargs) for _ in range(num_quantizers)])
        self._stacked: tp.Dict[int, tp.Any] = {}
        # (per stage ((cluster_size, its version), threshold), the counts on the host, an event or None)
        self._expiry_ahead: tp.Any = None

    def forward(self, x: torch.Tensor, n_q: tp.Optional[int] = None):
        layers = self.layers[: n_q or len(self.layers)]
        books = [layer._codebook for layer in layers]
        # In training, every stage's EMA update waits until all stages have searched: a stage's
        # update changes only its own codebook, so the results are the same, and under data
        # parallelism one all-reduce carries every stage's statistics. Not on a step that runs a
        # k-means init (its random draws would move past other stages' expiry draws).
        defer = DEFER_UPDATES and self.training and all(cb.is_inited() for cb in books)
        how = self._fused_training(x, layers) if defer else ""
        if how:
            return self._forward_fused(x, layers, how)
        pending: list = []
        for cb in books:
            cb._deferred = pending if defer else None
        try:
            quantized_out: tp.Any = 0.0
            residual = x
            losses, indices = [], []
            fix = self.commitment_all_stages and self.training
            for layer in layers:
                quantized, idx, loss = layer(residual)
                if fix:
                    quantized = quantized.detach()
                residual = residual - quantized
                quantized_out = quantized_out + quantized
                indices.append(idx)
                losses.append(loss)
        finally:
            for cb in books:
                cb._deferred = None
        if pending:
            self._update_stages(pending)
        if fix:
            quantized_out = x + (quantized_out - x).detach()
        return quantized_out, torch.stack(indices), torch.stack(losses)

    @staticmethod
    def _fused_training(x: torch.Tensor, layers) -> str:
        """How every stage trains at once, or '' (stage by stage): 'kernels' (the Triton backend,
        CUDA by default: one launch each way) or 'torch' (CPU: the torch twins of those launches,
        without autograd's per-stage graph; `FUSED_CPU_TRAINING`). Needs fp32 latents and no
        projections."""
        if x.dtype != torch.float32 or not all(isinstance(layer.project_in, nn.Identity)
                                               and isinstance(layer.project_out, nn.Identity) for layer in layers):
            return ""
        if ops.select(x, layers[0]._codebook.embed) == "triton":
            return "kernels"
        return "torch" if FUSED_CPU_TRAINING and x.device.type == "cpu" else ""

    def _forward_fused(self, x: torch.Tensor, layers, how: str = "kernels"):
        """The training forward of `forward` (same values, codes and updates) with every stage's
        search, straight-through output and commitment error in one call (`ops.rvq_train`: one
        launch, or its torch twin) and each stage's statistics after it."""
        for layer in layers:
            if layer.warn:
                warnings.warn("When using RVQ in training model, first check "
                              "https://github.com/facebookresearch/encodec/issues/25 . "
                              "The bug wasn't fixed here for reproducibility.")
        books = [layer._codebook for layer in layers]
        embeds, norms = self.stacked_codebooks(len(layers))
        weights = torch.tensor([float(layer.commitment_weight) if layer.commitment_weight > 0 else 0.0
                                for layer in layers], device=x.device)
        kernels = how == "kernels"
        out, losses, codes, inputs = rvq_ops.rvq_train(x, embeds, norms, weights, self.commitment_all_stages, kernels)
        pending = []
        K = embeds.shape[1]
        for i, cb in enumerate(books):
            counts, sums = rvq_ops.stage_statistics(inputs[i], codes[i], K, kernels)
            pending.append((cb, inputs[i], counts, sums))
        self._update_stages(pending)
        B, _, T = x.shape
        return out, codes.view(len(layers), B, T), losses.view(-1, 1)

    def __getstate__(self) -> tp.Dict[str, tp.Any]:
        # copies and pickles leave the counts counted ahead behind (a CUDA event cannot be copied;
        # a copy reads its counts at its first update)
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "_expiry_ahead": None}

    def _update_stages(self, pending: list) -> None:
        """The deferred EMA updates, in stage order, after one all-reduce of every stage's counts
        and sums (under `sync_statistics`)."""
        if any(cb.sync_statistics for cb, *_ in pending):
            from .. import distrib
            flat = torch.cat([t.reshape(-1) for _, _, counts, sums in pending for t in (counts, sums)])
            distrib.all_reduce_sum_(flat)
            offset = 0
            for _, _, counts, sums in pending:
                for t in (counts, sums):
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()
        expired = self._expiry_counts([cb for cb, *_ in pending])
        for (cb, rows, counts, sums), n in zip(pending, expired):
            cb.update_(rows, counts, sums, n)
        self._count_expiry_ahead()

    def _expiry_counts(self, books: tp.List[EuclideanCodebook]) -> tp.List[tp.Optional[int]]:
        """Each stage's expiry count (`expired_count()`; None where expiry is off) for the updates
        about to run: counted after the previous update (`_count_expiry_ahead`) and already on the
        host where no count it depends on has changed since, else every stage's in one read (on a
        GPU, one wait for the device instead of one per stage). A stage's count depends only on its
        own codebook, which the stages before it in the update loop do not touch."""
        ahead, self._expiry_ahead = self._expiry_ahead, None
        if ahead is not None and len(books) <= len(ahead[0]) and all(
                cb is self.layers[i]._codebook and _unchanged(ahead[0][i][0], cb.cluster_size)
                and ahead[0][i][1] == cb.threshold_ema_dead_code for i, cb in enumerate(books)):
            _, values, event = ahead
            host.wait(event)
            counts = values.numpy().tolist()  # host memory (on CUDA, the pinned copy)
        else:
            values = self._counts_on_device(books)
            counts = values.tolist() if values is not None else []
        return [None if cb.threshold_ema_dead_code == 0 else int(counts[i]) for i, cb in enumerate(books)]

    @staticmethod
    def _counts_on_device(books: tp.List[EuclideanCodebook]) -> tp.Optional[torch.Tensor]:
        """Every stage's `expired_count()` in one device tensor (0 where expiry is off; one
        comparison where the thresholds agree), not read; None when expiry is off everywhere."""
        thresholds = {cb.threshold_ema_dead_code for cb in books}
        if thresholds == {0}:
            return None
        if len(thresholds) == 1:
            return (torch.stack([cb.cluster_size for cb in books]) < thresholds.pop()).sum(dim=1)
        return torch.stack([cb.expired_count() if cb.threshold_ema_dead_code else
                            cb.cluster_size.new_zeros((), dtype=torch.long) for cb in books])

    def _count_expiry_ahead(self) -> None:
        """Every stage's expiry count for the next training step, counted now on the device (after
        the update: the last change to the counts they depend on) and copied to the host without
        waiting, so that the next step's forward finds them there instead of waiting for the
        device in its middle (`_expiry_counts` checks that no stage's cluster sizes or threshold
        changed in between)."""
        books = [layer._codebook for layer in self.layers]
        values = self._counts_on_device(books)
        if values is not None:
            keys = [(_state(cb.cluster_size), cb.threshold_ema_dead_code) for cb in books]
            self._expiry_ahead = (keys, *host.to_host_later(values))

    def encode(self, x: torch.Tensor, n_q: tp.Optional[int] = None, rows: tp.Optional[int] = None) -> torch.Tensor:
        """[B, D, T] -> codes [n_q, B, T] (`encodec_fast.ops.rvq_encode`).

        `rows`: on the reference path, run the search on blocks of `rows` batch items, the call
        shapes of an upstream batch of that size (a matrix product's bits can depend on them).
        """
        n_q = n_q or len(self.layers)
        layers = self.layers[:n_q]
        if any(not isinstance(layer.project_in, nn.Identity) for layer in layers):
            return self._encode_projected(x, n_q)
        books = [layer._codebook for layer in layers]
        return ops.rvq_encode(x, [cb.embed for cb in books], [cb.embed_norms() for cb in books],
                              stacked=lambda: self.stacked_codebooks(n_q), rows=rows)

    def stacked_codebooks(self, n_q: tp.Optional[int] = None) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """The first n_q codebooks as one fp32 [n_q, K, D] tensor and their norms [n_q, K] (the
        kernels' layout), cached until a codebook changes."""
        books = [layer._codebook for layer in self.layers[:n_q or len(self.layers)]]
        key = tuple((cb.embed._version, cb.embed.data_ptr(), cb.embed.device) for cb in books)
        cached = self._stacked.get(len(books))
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                embeds = torch.stack([cb.embed.float() for cb in books]).contiguous()
                norms = torch.stack([cb.embed_norms().reshape(-1).float() for cb in books]).contiguous()
            cached = (key, embeds, norms)
            self._stacked = {len(books): cached}
        return cached[1], cached[2]

    def _encode_projected(self, x: torch.Tensor, n_q: int) -> torch.Tensor:
        residual, out = x, []
        for layer in self.layers[:n_q]:
            idx = layer.encode(residual)
            residual = residual - layer.decode(idx)
            out.append(idx)
        return torch.stack(out)

    def decode(self, q_indices: torch.Tensor, in_range: bool = False) -> torch.Tensor:
        """codes [K, B, T] -> [B, D, T] (sum of the first K stages, in order); `in_range`: the
        caller has checked the codes' range (`ops.rvq_decode` reads nothing)."""
        K = q_indices.shape[0]
        if K > len(self.layers):
            raise ValueError(f"{K} codebooks given, the quantizer has {len(self.layers)}")
        if K == 0:
            raise ValueError("no codebooks to decode")
        layers = self.layers[:K]
        if any(not isinstance(layer.project_out, nn.Identity) for layer in layers):
            out = layers[0].decode(q_indices[0])
            for i in range(1, K):
                out = out + layers[i].decode(q_indices[i])
            return out
        return ops.rvq_decode(q_indices, [layer._codebook.embed for layer in layers],
                              stacked=lambda: self.stacked_codebooks(K), in_range=in_range)
