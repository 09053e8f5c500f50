"""Residual vector quantization ops: PyTorch references and the dispatch to `kernels/rvq.py`.

References (the CPU path, bit-identical to upstream EnCodec):
- `nearest_code_torch`: upstream's `||x||^2 - 2 x.e + ||e||^2` distance and its argmin;
- `rvq_encode_torch`: stage by stage, subtracting each chosen codeword from the residual;
- `rvq_decode_torch`: sum of the stages' codewords, in stage order;
- `vq_assign_torch`: one training stage, with upstream's one-hot counts and `x^T @ onehot` sums.

The Triton kernels compute the same things in one launch. Their default search (`exact`) takes
its distances from tensor cores (bf16x3 by default) and certifies each row's code with an error
bound, rescoring in fp32 the rows the bound cannot decide, so that its codes are those of the fp32
kernel (`ieee`) on every input; both equal the reference's except where two codewords are tied
within fp32 rounding (a different summation order may pick the other). `tf32` and `tf32x3` are
approximate modes (no certificate) whose agreement the benchmarks measure.
"""

import typing as tp

import torch
from torch.nn import functional as F

from .backend import env_choice, select

PRECISIONS = ("exact", "ieee", "tf32x3", "tf32")


def rvq_precision() -> str:
    """The RVQ kernels' search: $ENCODEC_FAST_RVQ_PRECISION, default 'exact' (certified)."""
    return env_choice("ENCODEC_FAST_RVQ_PRECISION", PRECISIONS, "exact")


def certify_with() -> str:
    """The tensor-core precision under the certified search: $ENCODEC_FAST_RVQ_CERTIFY_WITH,
    default 'bf16x3' (fewest rows rescored per unit of tensor-core time; see docs/exactness.md)."""
    return env_choice("ENCODEC_FAST_RVQ_CERTIFY_WITH", tuple(LOW_PRECISION), "bf16x3")


# -- references ------------------------------------------------------------------------------------

def nearest_code_torch(x: torch.Tensor, embed: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """x [N, D], embed [K, D], norms [1, K] (||e||^2) -> [N] int64, ties to the lowest index.

    Upstream computes -(||x||^2 - (2x) @ E^T + ||e||^2) and takes the argmax; doubling is exact in
    binary floating point, so ||x||^2 - 2 (x @ E^T) + ||e||^2 has the same bits.
    """
    return argmin_rows(exact_distances_torch(x, embed, norms))


def argmin_rows(dist: torch.Tensor) -> torch.Tensor:
    """`dist.argmin(dim=-1)` of a 2-d tensor: the first index of each row's minimum, or of its first
    NaN. On CPU by numpy (the same rule, about 10x faster than torch's CPU argmin for [600, 1024]
    fp32: 0.05 against 0.5 ms on 2 cores), elsewhere by torch."""
    if (dist.device.type == "cpu" and dist.dim() == 2 and dist.shape[-1] > 0 and not dist.requires_grad
            and dist.dtype in (torch.float32, torch.float64)):
        return torch.from_numpy(dist.detach().numpy().argmin(axis=-1).astype("int64", copy=False))
    return dist.argmin(dim=-1)


def exact_distances_torch(x: torch.Tensor, embed: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """[N, K] distances as upstream computes them (`nearest_code_torch`'s)."""
    dist = torch.mm(x, embed.t())
    dist = torch.sub(x.pow(2).sum(1, keepdim=True), dist, alpha=2)
    return dist.add_(norms)


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
    return (idx, quant, *statistics_torch(x, idx, embed.shape[0], scatter))


def statistics_torch(x: torch.Tensor, idx: torch.Tensor, K: int, scatter: bool) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """Counts [K] and sums [K, D] of the rows x [N, D] by code idx [N]: upstream's one-hot product
    (`scatter=False`) or `bincount`/`index_add_` (`vq_assign_torch`)."""
    if scatter:
        counts = torch.bincount(idx, minlength=K).to(x.dtype)
        return counts, x.new_zeros(K, x.shape[1]).index_add_(0, idx, x)
    onehot = F.one_hot(idx, K).type(x.dtype)
    return onehot.sum(0), (x.t() @ onehot).t()


def _scatter_statistics(x: torch.Tensor) -> bool:
    """The torch path's statistics by scatter (`stats_method()`, never on CUDA: index_add_ is not
    deterministic there) or upstream's one-hot product."""
    return not x.is_cuda and stats_method() == "scatter"


def stats_method() -> str:
    """How the torch path computes a training stage's statistics: $ENCODEC_FAST_VQ_STATS,
    'scatter' (default on CPU) or 'onehot' (upstream's bits; always on CUDA, where index_add_ is
    not deterministic)."""
    return env_choice("ENCODEC_FAST_VQ_STATS", ("scatter", "onehot"), "scatter")


# -- certified search: distances on tensor cores, codes of the exact search ----------------------------
#
# The argument (docs/exactness.md, "Certified search"). For a row x and codewords c_k with stored fp32
# norms n_k, the exact search's distances are d_k = fl(n_k - 2 fl(x.c_k)) (our kernel) or
# fl(fl(|x|^2 - 2 fl(x.c_k)) + n_k) (the torch reference = upstream), and the low-precision search's
# are d~_k = fl(n_k - 2 dot~_k) with dot~_k from the tensor cores. With g the relative error bound of
# a dot product (|dot - x.c| <= g sum_i |x_i c_i| <= g |x| |c_k|) and u = 2^-24, d~_k and d_k (less the
# reference's constant |x|^2) are each within their own bound of n_k - 2 x.c_k; together
#     |d~_k - d_k| <= e_k = 2 (g_lowp + g_exact) |x| r_k + 3 u (|x| + r_k)^2 + tiny,   r_k >= |c_k|.
# Let k* be the argmin of d~. If d~_k - e_k > d~_k* + e_k* for every k != k*, then k* is the exact
# search's argmin, with no tie (d_k >= d~_k - e_k > d~_k* + e_k* >= d_k*). Otherwise the row is
# rescored exactly over its candidates, the k with d~_k - e_k <= d~_k* + e_k*: they hold the exact
# argmin k_e (d~_ke - e_ke <= d_ke <= d_k* <= d~_k* + e_k*) and every codeword tied with it. The
# stage's codes are then the exact search's, its residual the same fp32 subtraction, and by induction
# so are every later stage's. Per-codeword radii r_k matter: trained codebooks keep a few large
# codewords (the small model's last stages: max |c| 1000-2000x the median).

UNIT = 2.0 ** -24  # fp32 unit roundoff

#: Low-precision `tl.dot` modes the certified search can use: (operand error of one product relative
#: to |x_i c_i|, products accumulated per term). tf32: Triton hands the tensor cores raw fp32 bits,
#: which keep 10 of 23 mantissa bits (truncation: < 2^-10 per operand). tf32x3: big = tf32 round to
#: nearest (<= 2^-11), small = a - big truncated (<= 2^-21 |a|), small x small dropped. bf16x3: hi =
#: bf16(a) (<= 2^-8), mid = bf16(a - hi), remainder <= 2^-16 |a|; mid x mid dropped.
LOW_PRECISION = {
    "tf32": (2 * 2.0 ** -10 + 2.0 ** -20, 1),
    "tf32x3": (2.0 ** -20 + 2.0 ** -22 + 2.0 ** -29, 3),
    "bf16x3": (3 * 2.0 ** -16 * (1 + 2.0 ** -7), 3),
}
#: Modes that are another mode's arithmetic, lowered another way (the same emulation and bound):
#: bf16x3-triton leaves the split to Triton's bf16x3 lowering (each codebook block split in every
#: program and iteration); 'bf16x3' splits the codebooks once (kernels.rvq.split_codebooks) and the
#: rows once per stage, and writes the three products out.
SAME_ARITHMETIC = {"bf16x3-triton": "bf16x3"}
LOW_PRECISION.update({mode: LOW_PRECISION[same] for mode, same in SAME_ARITHMETIC.items()})
#: The low precisions with arithmetic of their own (what an emulation needs to run).
DISTINCT_LOW_PRECISION = tuple(m for m in LOW_PRECISION if m not in SAME_ARITHMETIC)
#: Tensor-core accumulation is modelled as fp32 with truncation (unit 2^-23), doubled for the
#: alignment of the products inside one instruction (Fasi et al. 2021 measured truncation there).
TC_ACCUMULATION_UNIT = 2.0 ** -22
#: Evaluating the bound in fp32 (|x| from a fp32 sum, the products) costs a few units; this covers them.
MARGIN = 1 + 2.0 ** -8


def _gamma(n: int, u: float) -> float:
    return n * u / (1 - n * u)


def dot_error_bound(mode: str, D: int) -> float:
    """g with |fl(x.c) - x.c| <= g sum_i |x_i c_i| for a length-D dot in `mode` ('ieee' = fp32 with
    any summation order: ours, cuBLAS, the CPU)."""
    if mode == "ieee":
        return _gamma(D, UNIT)
    operand, passes = LOW_PRECISION[mode]
    return operand + _gamma(passes * D, TC_ACCUMULATION_UNIT)


class Certificate(tp.NamedTuple):
    """e(|x|, r) = a |x| r + b (|x| + r)^2 + z (|x| + r): how far a low-precision distance may be
    from the exact one; lp_a, lp_b: the low-precision side's own share (what a test may perturb
    its distances by)."""
    a: float
    b: float
    z: float
    lp_a: float
    lp_b: float


def certificate(mode: str, D: int) -> Certificate:
    g_lp, g_ref = dot_error_bound(mode, D), dot_error_bound("ieee", D)
    # rounding: the distance once on our side, twice on the reference's (|x|^2 first), and three
    # times more where the kernel forms the intervals' ends
    return Certificate(a=2 * (g_lp + g_ref) * MARGIN, b=6 * UNIT * MARGIN, z=2.0 ** -116,
                       lp_a=2 * g_lp, lp_b=UNIT)


def radius_factors(D: int) -> tp.Tuple[float, float]:
    """(c1, c2) with r_k = sqrt(n_k c1) c2 >= |c_k| when evaluated in fp32 from the fp32 squared norm
    n_k (its own rounding: (D + 2) units; the kernel's sqrt is approximate: 2 units; the products: 2)."""
    return 1 + (D + 8) * UNIT, 1 + 2.0 ** -19


def codeword_radii(norms: torch.Tensor, D: int) -> torch.Tensor:
    """r_k >= |c_k| from the fp32 squared norms (any shape), as the kernel computes them."""
    c1, c2 = radius_factors(D)
    return (norms.detach().float() * c1).sqrt() * c2


def certificate_error(xnorm: torch.Tensor, radii: torch.Tensor, cert: Certificate) -> torch.Tensor:
    """e [N, K] from |x| [N] and r [K], in fp32 as the kernel computes it."""
    x, r = xnorm[:, None], radii[None, :]
    s = x + r
    return cert.a * x * r + cert.b * s * s + cert.z * s


def _tf32(x: torch.Tensor, nearest: bool = False) -> torch.Tensor:
    """fp32 -> tf32 (10 mantissa bits): truncation as the tensor cores read raw fp32 bits, or
    round-to-nearest-away (cvt.rna.tf32.f32) when `nearest`."""
    bits = x.float().contiguous().view(torch.int32)
    if nearest:
        bits = bits + 0x1000
    return (bits & ~0x1FFF).view(torch.float32)


def lowp_dot(x: torch.Tensor, e: torch.Tensor, mode: str) -> torch.Tensor:
    """x [N, D] @ e [K, D]^T with the operands rounded as `mode`'s tensor-core products see them;
    the exact products summed in fp64 and rounded once (the operand error dominates the bound)."""
    x, e = x.float(), e.float()
    if mode == "tf32":
        return (_tf32(x).double() @ _tf32(e).double().t()).float()
    if mode == "tf32x3":
        bx, be = _tf32(x, nearest=True), _tf32(e, nearest=True)
        sx, se = _tf32(x - bx), _tf32(e - be)
        bx, be, sx, se = bx.double(), be.double(), sx.double(), se.double()
        return (bx @ be.t() + bx @ se.t() + sx @ be.t()).float()
    mode = SAME_ARITHMETIC.get(mode, mode)
    if mode == "bf16x3":
        hx, he = x.bfloat16().float(), e.bfloat16().float()
        mx, me = (x - hx).bfloat16().double(), (e - he).bfloat16().double()
        hx, he = hx.double(), he.double()
        return (hx @ he.t() + hx @ me.t() + mx @ he.t()).float()
    raise ValueError(f"unknown low-precision mode {mode!r}; choose one of {', '.join(LOW_PRECISION)}")


class CertifiedStage(tp.NamedTuple):
    codes: torch.Tensor        # [N] int64, the exact search's
    rescored: torch.Tensor     # [N] bool: rows whose certificate failed
    candidates: torch.Tensor   # [N, K] bool: the codewords rescored (none where certified)


def certified_nearest_torch(x: torch.Tensor, embed: torch.Tensor, norms: torch.Tensor, mode: str,
                            perturb: float = 0.0, generator: tp.Optional[torch.Generator] = None,
                            exact: tp.Optional[torch.Tensor] = None) -> CertifiedStage:
    """The certified search, emulated: x [N, D], embed [K, D], norms [K] or [1, K].

    Low-precision distances from `lowp_dot`; `perturb` adds up to `perturb` times the low-precision
    error bound to each (uniform in +-1, from `generator`), as a worse tensor core could. Rows whose
    certificate fails take the argmin of the reference distances (`nearest_code_torch`'s, computed
    for all rows at once as it does: a product's bits can depend on its shape) over their
    candidates only. With perturb <= 1 the codes are `nearest_code_torch`'s on every input."""
    N, D = x.shape
    n = norms.reshape(-1).float()
    cert = certificate(mode, D)
    radii = codeword_radii(n, D)
    xf = x.float()
    dist = n[None] - 2 * lowp_dot(xf, embed, mode)
    xnorm = xf.pow(2).sum(1).sqrt()
    if perturb:
        x_, r_ = xnorm[:, None], radii[None, :]
        bound = cert.lp_a * x_ * r_ + cert.lp_b * (x_ + r_) ** 2
        noise = torch.rand(dist.shape, generator=generator, dtype=torch.float64).mul(2).sub(1).float()
        dist = dist + perturb * bound * noise
    err = certificate_error(xnorm, radii, cert)
    best, arg = dist.min(1)
    upper = best + err.gather(1, arg[:, None])[:, 0]
    low = dist - err
    others = low.scatter(1, arg[:, None], float("inf")).min(1).values
    rescored = ~(others > upper)  # nan anywhere in the row: rescored
    codes = arg.clone()
    cand = torch.zeros_like(dist, dtype=torch.bool)
    if bool(rescored.any()):
        # overflow, inf or nan: every codeword
        whole = ~(upper < float("inf"))
        cand = ((low <= upper[:, None]) | whole[:, None]) & rescored[:, None]
        if exact is None:
            exact = exact_distances_torch(xf, embed.float(), n[None])
        ref = torch.where(cand, exact, torch.full_like(exact, float("inf")))[rescored]
        # a row whose candidates' distances are all nan keeps the reference's own argmin
        codes[rescored] = torch.where(torch.isinf(ref).all(1) | torch.isnan(ref).any(1),
                                      exact[rescored].argmin(1), ref.argmin(1))
    return CertifiedStage(codes, rescored, cand)


def rvq_encode_certified_torch(residual: torch.Tensor, embeds: tp.Sequence[torch.Tensor],
                               norms: tp.Sequence[torch.Tensor], mode: str, perturb: float = 0.0,
                               generator: tp.Optional[torch.Generator] = None
                               ) -> tp.Tuple[torch.Tensor, tp.List[CertifiedStage]]:
    """`rvq_encode_torch` with each stage's search certified (emulated): residual [N, D] (overwritten)
    -> (codes [Q, N], each stage's CertifiedStage)."""
    codes = torch.empty(len(embeds), residual.shape[0], dtype=torch.long)
    stages = []
    for i, (embed, norm) in enumerate(zip(embeds, norms)):
        stage = certified_nearest_torch(residual, embed, norm, mode, perturb=perturb, generator=generator)
        codes[i] = stage.codes
        stages.append(stage)
        if i + 1 < len(embeds):
            residual.sub_(F.embedding(stage.codes, embed))
    return codes, stages


# -- dispatch --------------------------------------------------------------------------------------

def _kernels():
    from ..kernels import rvq as k
    return k


def check_codes_dtype(codes: torch.Tensor) -> None:
    """TypeError unless the codes are of an integer type the decoders take (nothing read)."""
    if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"codes must be integers, got {codes.dtype}")


def _check_codes(codes: torch.Tensor, bins: int, in_range: bool) -> None:
    """The codes' type and, unless the caller has made sure of it (`in_range`), their range: one
    read of a device flag (out-of-range codes would index past a codebook on the device)."""
    check_codes_dtype(codes)
    if not in_range and codes.numel() and bool(((codes < 0) | (codes >= bins)).any()):
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
        return _kernels().rvq_encode(x, cb, nrm, Q, rvq_precision(), certify_with()).view(Q, B, T)
    rows = rows or B
    codes = torch.empty(Q, B, T, dtype=torch.long, device=x.device)
    for b0 in range(0, B, rows):
        residual = x[b0:b0 + rows].transpose(1, 2).reshape(-1, D)
        if residual.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            residual = residual.clone()  # a view of x (T == 1): never modify the input
        codes[:, b0:b0 + rows] = rvq_encode_torch(residual, embeds, norms).view(Q, -1, T)
    return codes


def rvq_decode(codes: torch.Tensor, embeds: tp.Sequence[torch.Tensor],
               stacked: tp.Optional[tp.Callable[[], tp.Tuple[torch.Tensor, torch.Tensor]]] = None,
               in_range: bool = False) -> torch.Tensor:
    """codes [Q, B, T] -> [B, D, T], the sum of the stages' codewords (same bits on both paths).
    IndexError for codes out of range, unless `in_range` (the caller has made sure: no read)."""
    Q, B, T = codes.shape
    _check_codes(codes, embeds[0].shape[0], in_range)
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
        k = _kernels()
        book, norm = embed.float().contiguous(), norms.reshape(-1).float().contiguous()
        precision = rvq_precision()
        if precision != "exact":
            return k.vq_assign(x, book, norm, stats, precision)
        # the certified search (one stage), the quantized rows gathered, the statistics in fixed order
        codes = k.rvq_encode(x.t()[None], book[None], norm[None], 1, "exact", certify_with())[0]
        quant = F.embedding(codes, book).to(x.dtype)
        counts, sums = k.segment_sums(x, codes, book.shape[0]) if stats else (None, None)
        return codes, quant, counts, sums
    return vq_assign_torch(x, embed, norms, stats, scatter=stats and _scatter_statistics(x))


def rvq_train_forward_torch(x: torch.Tensor, codebooks: torch.Tensor, norms: torch.Tensor, n_q: int,
                            detach: bool) -> tp.Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`kernels.rvq.rvq_train_forward` in torch (the CPU's all-stage training forward): the same
    outputs, each stage's code by the reference search on a fresh [N, D] tensor (upstream's call,
    so upstream's codes), the straight-through values, output sum and residuals elementwise in
    upstream's order (the stage-by-stage path's bits)."""
    B, D, T = x.shape
    N = B * T
    r = x.detach().float().transpose(1, 2).reshape(N, D).contiguous()
    codes = torch.empty(n_q, N, dtype=torch.long, device=x.device)
    inputs = torch.empty(n_q, N, D, dtype=torch.float32, device=x.device)
    sqerr = torch.empty(n_q, N, dtype=torch.float32, device=x.device)
    out = torch.zeros(N, D, dtype=torch.float32, device=x.device)
    for q in range(n_q):
        inputs[q] = r
        idx = nearest_code_torch(r, codebooks[q], norms[q].view(1, -1))
        codes[q] = idx
        st = r + (F.embedding(idx, codebooks[q]) - r)
        err = st - r
        sqerr[q] = (err * err).sum(1)
        out += st
        r = r - st
    if detach:  # one straight-through estimator on the sum, as the kernel's wrapper
        rows = x.detach().float().transpose(1, 2).reshape(N, D)
        out = rows + (out - rows)
    return codes, inputs, out, sqerr


def rvq_train_backward_torch(grad_out: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor,
                             inputs: torch.Tensor, scales: torch.Tensor, stages: int) -> torch.Tensor:
    """`kernels.rvq.rvq_train_backward` in torch: grad_out [B, D, T] + the commitment gradients of
    the first `stages` stages, scale_i (r_i - st_i), in stage order."""
    B, D, T = grad_out.shape
    g = grad_out.float().transpose(1, 2).reshape(B * T, D)
    for q in range(stages):
        r = inputs[q]
        st = r + (F.embedding(codes[q], codebooks[q]) - r)
        g = g + scales[q] * (r - st)
    return g.view(B, T, D).transpose(1, 2)


class _TrainStages(torch.autograd.Function):
    """Every training stage in one launch (`kernels.rvq.rvq_train_forward`) and its backward in
    another, or their torch twins (`kernels=False`): the straight-through output's gradient is the
    identity, the commitment losses add 2 w g (r_i - st_i) / numel for stage 0 (upstream: later
    stages' inputs have no gradient) or for every stage (`detach`: audiocraft's fix)."""

    @staticmethod
    def forward(ctx, x, codebooks, norms, weights, n_q: int, detach: bool, kernels: bool):
        if kernels:
            codes, inputs, out, sqerr = _kernels().rvq_train_forward(x.detach(), codebooks, norms, n_q, detach,
                                                                     rvq_precision(), certify_with())
        else:
            codes, inputs, out, sqerr = rvq_train_forward_torch(x, codebooks, norms, n_q, detach)
        B, D, T = x.shape
        losses = sqerr.sum(1).div(B * T * D).mul(weights)
        ctx.save_for_backward(codebooks, codes, inputs, weights)
        ctx.stages, ctx.shape, ctx.kernels = min(n_q, 1 if not detach else n_q), (B, D, T), kernels
        ctx.mark_non_differentiable(codes, inputs)
        return out.view(B, T, D).transpose(1, 2).to(x.dtype), losses, codes, inputs

    @staticmethod
    def backward(ctx, grad_out, grad_losses, _codes, _inputs):
        codebooks, codes, inputs, weights = ctx.saved_tensors
        if grad_losses is None:
            grad_losses = torch.zeros_like(weights)
        B, D, T = ctx.shape
        scales = 2.0 * weights * grad_losses / (B * D * T)
        if grad_out is None:
            grad_out = torch.zeros(ctx.shape, device=inputs.device)
        backward = _kernels().rvq_train_backward if ctx.kernels else rvq_train_backward_torch
        grad_x = backward(grad_out, codebooks, codes, inputs, scales, ctx.stages)
        return grad_x, None, None, None, None, None, None


def rvq_train(x: torch.Tensor, codebooks: torch.Tensor, norms: torch.Tensor, weights: torch.Tensor, detach: bool,
              kernels: bool = True):
    """The training forward of every stage at once: x [B, D, T], codebooks [Q, K, D], norms [Q, K],
    commitment weights [Q] -> (out [B, D, T], commitment losses [Q], codes [Q, B*T], each stage's
    input rows [Q, B*T, D]). The values of the stage-by-stage path (`ResidualVectorQuantization`)
    with the losses' sums and the gradients in another order of additions. `kernels`: one Triton
    launch each way (codes of the certified search); otherwise the torch twins (CPU: the
    reference search, upstream's codes), without autograd's per-stage graph."""
    return _TrainStages.apply(x, codebooks, norms, weights, codebooks.shape[0], detach, kernels)


def stage_statistics(rows: torch.Tensor, codes: torch.Tensor, K: int,
                     kernels: bool = True) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """Counts [K] and sums [K, D] of rows [N, D] by code: in a fixed order by the kernel
    (`kernels.rvq.segment_sums`), or by `statistics_torch` with `stats_method()`."""
    if kernels:
        return _kernels().segment_sums(rows, codes, K)
    return statistics_torch(rows, codes, K, scatter=_scatter_statistics(rows))


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
