"""Residual vector quantization ops: PyTorch references and the dispatch to `kernels/rvq.py`.

References (the CPU path, bit-identical to upstream EnCodec):
- `nearest_code_torch`: upstream's `||x||^2 - 2 x.e + ||e||^2` distance and its argmin;
- `rvq_encode_torch`: stage by stage, subtracting each chosen codeword from the residual;
- `rvq_decode_torch`: sum of the stages' codewords, in stage order;
- `vq_assign_torch`: one training stage, with upstream's one-hot counts and `x^T @ onehot` sums.

The Triton kernels compute the same things in one launch; their distances are `||e||^2 - 2 x.e`
with exact fp32 products (`precision="ieee"`), so their codes equal the reference's except where
two codewords are tied within fp32 rounding (a different summation order may pick the other).
`precision="tf32x3"` (near fp32 on tensor cores) and `"tf32"` are opt-in speed modes whose
agreement is measured by the `kernels` benchmark.
"""

import typing as tp

import torch
from torch.nn import functional as F

from .backend import env_choice, select

PRECISIONS = ("ieee", "tf32x3", "tf32")


def rvq_precision() -> str:
    """The `tl.dot` precision of the RVQ kernels: $ENCODEC_FAST_RVQ_PRECISION, default 'ieee'."""
    return env_choice("ENCODEC_FAST_RVQ_PRECISION", PRECISIONS, "ieee")


# -- references ------------------------------------------------------------------------------------

def nearest_code_torch(x: torch.Tensor, embed: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """x [N, D], embed [K, D], norms [1, K] (||e||^2) -> [N] int64, ties to the lowest index.

    Upstream computes -(||x||^2 - (2x) @ E^T + ||e||^2) and takes the argmax; doubling is exact in
    binary floating point, so ||x||^2 - 2 (x @ E^T) + ||e||^2 has the same bits.
    """
    dist = torch.mm(x, embed.t())
    dist = torch.sub(x.pow(2).sum(1, keepdim=True), dist, alpha=2)
    dist.add_(norms)
    return dist.argmin(dim=-1)


def rvq_encode_torch(residual: torch.Tensor, embeds: tp.Sequence[torch.Tensor],
                     norms: tp.Sequence[torch.Tensor]) -> torch.Tensor:
    """residual [N, D] (overwritten), one embed [K, D] and norms [1, K] per stage -> codes [Q, N]."""
    codes = torch.empty(len(embeds), residual.shape[0], dtype=torch.long, device=residual.device)
    for i, (embed, norm) in enumerate(zip(embeds, norms)):
        idx = nearest_code_torch(residual, embed, norm)
        codes[i] = idx
        if i + 1 < len(embeds):
            residual.sub_(F.embedding(idx, embed))
    return codes


def rvq_decode_torch(codes: torch.Tensor, embeds: tp.Sequence[torch.Tensor]) -> torch.Tensor:
    """codes [Q, B, T], one embed [K, D] per stage -> [B, D, T]."""
    out = None
    for i in range(codes.shape[0]):
        q = F.embedding(codes[i], embeds[i]).transpose(1, 2)
        out = q.clone() if out is None else out.add_(q)
    assert out is not None
    return out


def vq_assign_torch(x: torch.Tensor, embed: torch.Tensor, norms: torch.Tensor, stats: bool,
                    scatter: bool = False):
    """One stage on x [N, D] -> (codes [N], quantized [N, D], counts [K] or None, sums [K, D] or None).

    The statistics as upstream computes them (`scatter=False`: a one-hot [N, K] matrix, its column
    sums and `x^T @ onehot`), or by `bincount`/`index_add_` (`scatter=True`: the same counts, the
    sums in another order, within 1e-6 relative; the training step at 24 kbps 1.9x faster on CPU,
    the `quantizer` benchmark)."""
    idx = nearest_code_torch(x, embed, norms.view(1, -1))
    quant = F.embedding(idx, embed)
    if not stats:
        return idx, quant, None, None
    K = embed.shape[0]
    if scatter:
        counts = torch.bincount(idx, minlength=K).to(x.dtype)
        return idx, quant, counts, x.new_zeros(K, x.shape[1]).index_add_(0, idx, x)
    onehot = F.one_hot(idx, K).type(x.dtype)
    return idx, quant, onehot.sum(0), (x.t() @ onehot).t()


def stats_method() -> str:
    """How the torch path computes a training stage's statistics: $ENCODEC_FAST_VQ_STATS,
    'scatter' (default on CPU) or 'onehot' (upstream's bits; always on CUDA, where index_add_ is
    not deterministic)."""
    return env_choice("ENCODEC_FAST_VQ_STATS", ("scatter", "onehot"), "scatter")


# -- dispatch --------------------------------------------------------------------------------------

def _kernels():
    from ..kernels import rvq as k
    return k


def _check_codes(codes: torch.Tensor, bins: int) -> None:
    if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"codes must be integers, got {codes.dtype}")
    if codes.numel() and bool(((codes < 0) | (codes >= bins)).any()):
        raise IndexError(f"codes out of range [0, {bins})")


def rvq_encode(x: torch.Tensor, embeds: tp.Sequence[torch.Tensor], norms: tp.Sequence[torch.Tensor],
               stacked: tp.Optional[tp.Callable[[], tp.Tuple[torch.Tensor, torch.Tensor]]] = None,
               rows: tp.Optional[int] = None) -> torch.Tensor:
    """Latents x [B, D, T] -> codes [Q, B, T] for the stages given (embeds [K, D], norms [1, K]).

    `stacked()` returns the stages as one [Q, K, D] tensor and their norms [Q, K] (the kernel's
    layout; callers cache it). `rows` (reference only): search blocks of `rows` batch items, the
    call shapes of an upstream batch of that size (a matrix product's bits can depend on them).
    """
    B, D, T = x.shape
    Q = len(embeds)
    if select(x) == "triton":
        if stacked is None:
            cb = torch.stack([e.float() for e in embeds]).contiguous()
            nrm = torch.stack([n.reshape(-1).float() for n in norms]).contiguous()
        else:
            cb, nrm = stacked()
        return _kernels().rvq_encode(x, cb, nrm, Q, rvq_precision()).view(Q, B, T)
    rows = rows or B
    codes = torch.empty(Q, B, T, dtype=torch.long, device=x.device)
    for b0 in range(0, B, rows):
        residual = x[b0:b0 + rows].transpose(1, 2).reshape(-1, D)
        if residual.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            residual = residual.clone()  # a view of x (T == 1): never modify the input
        codes[:, b0:b0 + rows] = rvq_encode_torch(residual, embeds, norms).view(Q, -1, T)
    return codes


def rvq_decode(codes: torch.Tensor, embeds: tp.Sequence[torch.Tensor],
               stacked: tp.Optional[tp.Callable[[], tp.Tuple[torch.Tensor, torch.Tensor]]] = None) -> torch.Tensor:
    """codes [Q, B, T] -> [B, D, T], the sum of the stages' codewords (same bits on both paths)."""
    Q, B, T = codes.shape
    _check_codes(codes, embeds[0].shape[0])
    if select(codes, embeds[0]) == "triton":
        cb = stacked()[0] if stacked is not None else torch.stack([e.float() for e in embeds[:Q]]).contiguous()
        return _kernels().rvq_decode(codes.reshape(Q, B * T).long(), cb, B, T, embeds[0].dtype)
    return rvq_decode_torch(codes.long(), embeds)


def nearest_code(x: torch.Tensor, embed: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """x [N, D], codebook [K, D], norms ||e||^2 ([K] or [1, K]) -> nearest codeword [N] int64."""
    if select(x, embed) == "triton":
        return vq_assign(x, embed, norms)[0]
    return nearest_code_torch(x, embed, norms.view(1, -1))


def vq_assign(x: torch.Tensor, embed: torch.Tensor, norms: torch.Tensor, stats: bool = False):
    """One training/inference stage on x [N, D] with codebook embed [K, D] and norms [K] ->
    (codes [N] int64, quantized [N, D], counts [K] or None, sums [K, D] or None): what the EMA
    update needs, without upstream's [N, K] one-hot matrix on the kernel path."""
    if select(x, embed) == "triton":
        return _kernels().vq_assign(x, embed.float().contiguous(), norms.reshape(-1).float().contiguous(),
                                    stats, rvq_precision())
    return vq_assign_torch(x, embed, norms, stats, scatter=stats and not x.is_cuda and stats_method() == "scatter")


# -- measuring agreement ---------------------------------------------------------------------------

class CodeAgreement(tp.NamedTuple):
    """How two code tensors for the same latents compare (see `code_agreement`)."""
    rows: int        # frames compared
    equal: int       # frames whose codes are equal at every stage
    ties: int        # frames whose first difference is a tie within rounding
    non_ties: int    # frames whose first difference is not a tie: a real disagreement
    first_non_tie: tp.Optional[tp.Tuple[int, float]] = None  # (stage, gap / scale) of the worst one


def code_agreement(x: torch.Tensor, codebooks: torch.Tensor, ref: torch.Tensor, got: torch.Tensor,
                   tie_rtol: float = 2e-6) -> CodeAgreement:
    """Compare codes [Q, B, T] `got` with `ref` for latents x [B, D, T] and codebooks [Q, K, D].

    Each frame is followed stage by stage in float64 along `ref`'s residual; at its first stage
    where the codes differ, the two codewords' true distances are compared: a gap under
    `tie_rtol * (|r|^2 + |e_ref|^2 + |e_got|^2)` (the size of fp32 rounding in the distance) is a
    tie, which either side may break; later stages of that frame quantize different residuals
    and are not compared.
    """
    Q = ref.shape[0]
    if got.shape != ref.shape:
        raise ValueError(f"code shapes differ: {tuple(ref.shape)} vs {tuple(got.shape)}")
    rows = x.transpose(1, 2).reshape(-1, x.shape[1]).double()
    ref, got = ref.reshape(Q, -1), got.reshape(Q, -1)
    alive = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    ties = non_ties = 0
    worst: tp.Optional[tp.Tuple[int, float]] = None
    for q in range(Q):
        E = codebooks[q].double()
        differ = alive & (ref[q] != got[q])
        if bool(differ.any()):
            r = rows[differ]
            e_ref, e_got = E[ref[q][differ]], E[got[q][differ]]
            gap = ((r - e_ref).pow(2).sum(-1) - (r - e_got).pow(2).sum(-1)).abs()
            scale = r.pow(2).sum(-1) + e_ref.pow(2).sum(-1) + e_got.pow(2).sum(-1)
            rel = gap / scale.clamp_min(torch.finfo(torch.float64).tiny)
            tied = rel <= tie_rtol
            ties += int(tied.sum())
            non_ties += int((~tied).sum())
            if bool((~tied).any()):
                value = float(rel[~tied].max())
                if worst is None or value > worst[1]:
                    worst = (q, value)
            alive &= ~differ
        rows = rows - E[ref[q]]
    return CodeAgreement(rows.shape[0], int(alive.sum()), ties, non_ties, worst)
