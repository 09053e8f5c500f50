"""The certified RVQ search: distances in low precision (tensor cores on a GPU), codes of the exact
fp32 search on every input.

Two halves, because Triton's interpreter computes every `tl.dot` in full fp32 and so cannot show a
rounding-induced flip by itself:
- the algorithm in torch (`rvq.certified_nearest_torch`) with the operands rounded exactly as the
  tensor cores round them (tf32 truncation, bf16 / tf32 splits), on adversarial inputs, against the
  reference's codes; and perturbed by up to its error bound, as a worse tensor core could;
- the Triton kernel under the interpreter (or on a GPU) with its test-only switch that moves its
  low-precision distances by up to the bound: codes equal to the fp32 kernel's, and the rescoring
  path taken (its counters say so). Past the bound, codes do change: the switch is live and the
  bound is what protects the codes.
"""

import math

import pytest
import torch
import triton
import triton.language as tl
from encodec_fast.kernels import rvq as krvq

from encodec_fast import ops
from encodec_fast.ops import rvq
from encodec_fast.testing import adversarial_rows, near_tie_books

MODES = tuple(rvq.LOW_PRECISION)
EMULATED = rvq.DISTINCT_LOW_PRECISION  # bf16x3-triton is bf16x3's arithmetic: emulated once
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# -- the bound -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", EMULATED + ("ieee",))
@pytest.mark.parametrize("D", [16, 128, 130])
def test_dot_error_stays_within_the_bound(mode, D):
    """|fl(x.c) - x.c| <= g sum|x_i c_i| for the emulated tensor-core products (and for torch's
    fp32 products: the reference side), measured against fp64, on data whose products cancel."""
    g = torch.Generator().manual_seed(D)
    x = torch.randn(512, D, generator=g) * torch.logspace(-3, 3, D)
    c = torch.randn(256, D, generator=g) * torch.logspace(3, -3, D)
    c[:128] = x[:128] + 1e-3 * c[:128]  # near-parallel pairs: large products, small results
    exact = x.double() @ c.double().t()
    got = x @ c.t() if mode == "ieee" else rvq.lowp_dot(x, c, mode)
    scale = x.double().abs() @ c.double().abs().t()
    ratio = float(((got.double() - exact).abs() / scale).max())
    bound = rvq.dot_error_bound(mode, D)
    assert ratio <= bound
    if mode != "ieee":  # the operands' rounding is emulated (the accumulation's is only bounded)
        assert ratio > rvq.LOW_PRECISION[mode][0] / 64, "the emulation rounds far less than tensor cores do"


def test_bounds_order_and_values():
    assert rvq.dot_error_bound("tf32", 128) > rvq.dot_error_bound("bf16x3", 128) > rvq.dot_error_bound("ieee", 128)
    assert rvq.dot_error_bound("tf32", 128) == pytest.approx(2 * 2.0 ** -10, rel=0.02)
    assert rvq.dot_error_bound("ieee", 128) == pytest.approx(128 * 2.0 ** -24, rel=1e-3)
    radii = rvq.codeword_radii(torch.tensor([0.0, 1.0, 2.0, 1e30]), 128)
    assert torch.all(radii.double() >= torch.tensor([0.0, 1.0, 2.0, 1e30]).double().sqrt())


# -- the algorithm, emulated ------------------------------------------------------------------

@pytest.mark.parametrize("mode", EMULATED)
@pytest.mark.parametrize("K,D", [(64, 16), (300, 128), (1024, 128)])
def test_emulated_certified_codes_are_the_reference_codes(mode, K, D):
    books = near_tie_books(K, D, seed=K + D)
    norms = books.pow(2).sum(1)
    rows = adversarial_rows(books, 2000, seed=K)
    ref = rvq.nearest_code_torch(rows, books, norms[None])
    for perturb in (0.0, 1.0):
        stage = rvq.certified_nearest_torch(rows, books, norms, mode, perturb=perturb,
                                            generator=torch.Generator().manual_seed(3))
        assert torch.equal(stage.codes, ref)
        assert bool(stage.rescored.any()), "the near-ties must need rescoring"
        assert float(stage.rescored.float().mean()) < 0.9, "most rows must be certified"
        # the reference's code is always among a rescored row's candidates
        r = stage.rescored
        assert bool(stage.candidates[r].gather(1, ref[r][:, None]).all())


@pytest.mark.parametrize("mode", ["tf32", "bf16x3"])
def test_emulated_perturbation_past_the_bound_changes_codes(mode):
    """The same search with distances moved by 30x the bound: codes change (the bound matters)."""
    books = near_tie_books(256, 32, seed=5)
    norms = books.pow(2).sum(1)
    rows = adversarial_rows(books, 4000, seed=5)
    ref = rvq.nearest_code_torch(rows, books, norms[None])
    stage = rvq.certified_nearest_torch(rows, books, norms, mode, perturb=30.0,
                                        generator=torch.Generator().manual_seed(0))
    assert int((stage.codes != ref).sum()) > 0


def test_emulated_non_finite_rows_take_the_reference_code():
    books = near_tie_books(64, 16, seed=2)
    norms = books.pow(2).sum(1)
    rows = torch.randn(6, 16)
    rows[0, 3] = float("nan")
    rows[1, 0] = float("inf")
    rows[2] = 1e30  # |x|^2 overflows
    rows[3] = -1e20
    ref = rvq.nearest_code_torch(rows, books, norms[None])
    stage = rvq.certified_nearest_torch(rows, books, norms, "tf32")
    assert torch.equal(stage.codes, ref)
    assert bool(stage.rescored[:4].all())


@pytest.mark.parametrize("mode", EMULATED)
def test_emulated_every_stage_count(mode):
    """Every bandwidth: 1..32 stages of trained-like codebooks, codes equal to rvq_encode_torch."""
    g = torch.Generator().manual_seed(11)
    Q, K, D = 32, 128, 32
    books = torch.randn(Q, K, D, generator=g) * torch.tensor([0.7 ** q for q in range(Q)]).view(Q, 1, 1)
    books[:, -2:] *= 300  # unused large codewords
    idx = torch.randint(0, K - 2, (Q, 600), generator=g)
    x = sum(books[q][idx[q]] for q in range(Q)) + 0.7 ** Q * torch.randn(600, D, generator=g)
    embeds, norms = list(books), [b.pow(2).sum(1)[None] for b in books]
    for n_q in (1, 2, 4, 8, 16, 32):
        ref = rvq.rvq_encode_torch(x.clone(), embeds[:n_q], norms[:n_q])
        got, stages = rvq.rvq_encode_certified_torch(x.clone(), embeds[:n_q], norms[:n_q], mode)
        assert torch.equal(got, ref)
    rescored = sum(float(s.rescored.float().mean()) for s in stages) / len(stages)
    assert rescored < (0.2 if mode == "tf32" else 0.02)


# -- the kernel ---------------------------------------------------------------------------------

def _kernel_case(K: int, D: int, Q: int, N: int, seed: int):
    books = torch.stack([near_tie_books(K, D, seed=seed + q, scale=0.8 ** q) for q in range(Q)])
    x = adversarial_rows(books[0], N, seed=seed)
    return x.t().reshape(1, D, N).contiguous().to(DEVICE), books.to(DEVICE), books.pow(2).sum(-1).to(DEVICE)


@pytest.mark.parametrize("lowp", MODES)
@pytest.mark.parametrize("K,D,Q,N", [(300, 32, 3, 300), (64, 16, 2, 40), (1024, 128, 2, 130)])
def test_kernel_codes_are_the_fp32_kernels(lowp, K, D, Q, N):
    x, books, norms = _kernel_case(K, D, Q, N, seed=K + Q)
    with ops.use_backend("triton"):
        ref = krvq.rvq_encode(x, books, norms, Q, "ieee")
        got, stats = krvq.rvq_encode(x, books, norms, Q, "exact", lowp, stats=True)
        perturbed, pstats = krvq.rvq_encode(x, books, norms, Q, "exact", lowp, perturb=1.0, stats=True)
    assert torch.equal(got, ref)
    assert torch.equal(perturbed, ref)
    # the near-ties were rescored, in a few blocks only; most rows were certified
    for s in (stats, pstats):
        assert int(s[0, 0]) > 0 and int(s[0, 1]) > 0
        assert int(s[:, 0].sum()) < 0.5 * N * Q


@triton.jit
def _split_rows_kernel(x_ptr, hi_ptr, lo_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(x_ptr + i[None, :] + tl.zeros([16, 1], tl.int32))  # 16 equal rows: a 2-D tile
    hi, lo = krvq._split_bf16(x, False)
    tl.store(hi_ptr + i, tl.max(hi, axis=0))
    tl.store(lo_ptr + i, tl.max(lo, axis=0))


def _bf16_split_torch(x: torch.Tensor):
    hi = x.bfloat16().float()
    return hi, (x - hi).bfloat16().float()


def test_kernel_row_split_rounds_as_torch():
    """The kernel's split of the rows (integer rounding to nearest even, the same on a GPU and in the
    interpreter) gives torch's bf16 values: ties both ways, signs, subnormals, overflow to inf, zero."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, generator=g) * torch.logspace(-30, 30, 256)
    bits = x.view(torch.int32)
    x[:32] = ((bits[:32] & ~0xFFFF) | 0x8000).view(torch.float32)  # halfway: ties to even
    x[32:48] = ((bits[32:48] & ~0xFFFF) | 0x18000).view(torch.float32)
    x[48:52] = torch.tensor([0.0, -0.0, 3.0e38, -3.4e38])  # 3.4e38 rounds past bf16's largest finite
    x[52:56] = torch.tensor([1e-40, -3e-39, 2.0 ** -133, 1e-45])  # subnormal
    x = x.to(DEVICE)
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    _split_rows_kernel[(1,)](x, hi, lo, N=256)
    want_hi, want_lo = _bf16_split_torch(x.cpu())
    finite = torch.isfinite(want_hi)
    assert torch.equal(hi.cpu().view(torch.int32), want_hi.view(torch.int32))
    assert torch.equal(lo.cpu()[finite].view(torch.int32), want_lo[finite].view(torch.int32))
    assert bool(torch.isinf(hi.cpu()[51])) and not bool(finite.all())


def test_split_codebooks_cached_until_changed():
    g = torch.Generator().manual_seed(1)
    books = (torch.randn(3, 64, 16, generator=g) * 10).to(DEVICE)
    hi, lo = krvq.split_codebooks(books)
    want_hi, want_lo = _bf16_split_torch(books.cpu())
    assert hi.dtype == lo.dtype == torch.bfloat16
    assert torch.equal(hi.float().cpu(), want_hi) and torch.equal(lo.float().cpu(), want_lo)
    assert float(((hi.float() + lo.float() - books).abs() / books.abs()).max()) <= 2.0 ** -16
    assert krvq.split_codebooks(books)[0] is hi  # cached
    books.mul_(2)  # in place: a new version
    hi2, _ = krvq.split_codebooks(books)
    assert hi2 is not hi and torch.equal(hi2.float(), 2 * hi.float())
    assert krvq.split_codebooks(books.clone())[0] is not hi2  # another tensor


@pytest.mark.parametrize("K,D,N", [(300, 32, 600), (1024, 128, 260)])
def test_kernel_split_products_round_as_tensor_cores_do(K, D, N, monkeypatch):
    """In the interpreter too, bf16x3 runs on bf16-rounded operands (split ahead: exact in fp32, so
    numpy's products see the tensor cores' values). With the bound: codes of the fp32 kernel and as
    many rows left uncertified as the emulation leaves (to a few rows: fp32 against fp64 sums).
    With the bound set to zero: the rounding shows, codes flip on near-ties as the emulation's do,
    where the same search on unrounded operands (bf16x3-triton in the interpreter) flips none."""
    books = near_tie_books(K, D, seed=D)
    x = adversarial_rows(books, N, seed=D)
    norms = books.pow(2).sum(1)
    emulated = rvq.certified_nearest_torch(x, books, norms, "bf16x3")
    xg, bg, ng = x.t()[None].contiguous().to(DEVICE), books[None].to(DEVICE), norms[None].to(DEVICE)
    with ops.use_backend("triton"):
        ieee = krvq.rvq_encode(xg, bg, ng, 1, "ieee")
        codes, stats = krvq.rvq_encode(xg, bg, ng, 1, "exact", "bf16x3", stats=True)
        assert torch.equal(codes, ieee)
        want = int(emulated.rescored.sum())
        assert abs(int(stats[0, 0]) - want) <= 2 + N // 100, (int(stats[0, 0]), want)
        if DEVICE != "cpu":
            return
        monkeypatch.setattr(rvq, "certificate", lambda mode, D: rvq.Certificate(0.0, 0.0, 0.0, 0.0, 0.0))
        rounded = krvq.rvq_encode(xg, bg, ng, 1, "exact", "bf16x3")
        unrounded = krvq.rvq_encode(xg, bg, ng, 1, "exact", "bf16x3-triton")
    finite = torch.isfinite(x).all(1) & (x.abs().amax(1) < 1e15)
    lowp = (norms[None] - 2 * rvq.lowp_dot(x, books, "bf16x3")).argmin(1)
    flips = (rounded[0] != ieee[0]) & finite
    assert int(flips.sum()) > 0, "bf16 rounding must flip some near-ties when nothing certifies"
    assert bool((rounded[0][flips] == lowp[flips]).float().mean() > 0.8)
    assert int(((unrounded[0] != ieee[0]) & finite).sum()) < int(flips.sum()) // 4


def test_kernel_perturbation_past_the_bound_changes_codes():
    x, books, norms = _kernel_case(256, 32, 2, 512, seed=9)
    with ops.use_backend("triton"):
        ref = krvq.rvq_encode(x, books, norms, 2, "ieee")
        got = krvq.rvq_encode(x, books, norms, 2, "exact", "bf16x3", perturb=30.0)
    assert int((got != ref).sum()) > 0


def test_kernel_easy_rows_need_no_rescoring():
    """Rows on well-separated codewords: every row certified, no fp32 block searched."""
    g = torch.Generator().manual_seed(4)
    books = torch.randn(2, 128, 32, generator=g)
    idx = torch.randint(0, 128, (200,), generator=g)
    x = books[0][idx] + 0.01 * torch.randn(200, 32, generator=g)
    x = x.t()[None].contiguous().to(DEVICE)
    books = books.to(DEVICE)
    with ops.use_backend("triton"):
        codes, stats = krvq.rvq_encode(x, books, books.pow(2).sum(-1), 1, "exact", stats=True)
    assert torch.equal(codes[0].cpu(), idx)
    assert stats.tolist() == [[0, 0]]


def test_kernel_extreme_rows():
    """Rows whose |x| or distances overflow fp32: every codeword rescored, the fp32 kernel's codes.
    (Rows with nan or inf are on the GPU tests: the interpreter's argmin raises on all-nan rows.)"""
    x, books, norms = _kernel_case(64, 16, 2, 48, seed=1)
    x[0, :, 0] = 1e30
    x[0, :, 1] = -3e38
    x[0, 3, 2] = 2e19
    with ops.use_backend("triton"):
        ref = krvq.rvq_encode(x, books, norms, 2, "ieee")
        got = krvq.rvq_encode(x, books, norms, 2, "exact")
    assert torch.equal(got, ref)


@pytest.mark.parametrize("n_q", [1, 5, 32])
def test_kernel_every_stage_count(n_q):
    g = torch.Generator().manual_seed(n_q)
    Q, K, D = 32, 64, 16
    books = torch.randn(Q, K, D, generator=g) * torch.tensor([0.7 ** q for q in range(Q)]).view(Q, 1, 1)
    books[:, -1] *= 500
    idx = torch.randint(0, K - 1, (Q, 150), generator=g)
    x = sum(books[q][idx[q]] for q in range(Q)) + 1e-5 * torch.randn(150, D, generator=g)
    x = x.view(2, 75, D).transpose(1, 2)  # [B, D, T], strided
    books, norms = books.to(DEVICE), books.pow(2).sum(-1).to(DEVICE)
    x = x.to(DEVICE)
    with ops.use_backend("triton"):
        ref = krvq.rvq_encode(x, books, norms, n_q, "ieee")
        got = krvq.rvq_encode(x, books, norms, n_q, "exact", perturb=1.0)
    assert torch.equal(got, ref)
    expected = rvq.rvq_encode_torch(x.transpose(1, 2).reshape(-1, D).cpu().clone(), list(books[:n_q].cpu()),
                                    [n[None] for n in norms[:n_q].cpu()])
    assert rvq.code_agreement(x.cpu(), books[:n_q].cpu(), expected.view(n_q, 2, 75),
                              got.view(n_q, 2, 75).cpu()).non_ties == 0


def test_default_search_is_certified(monkeypatch):
    monkeypatch.delenv("ENCODEC_FAST_RVQ_PRECISION", raising=False)
    monkeypatch.delenv("ENCODEC_FAST_RVQ_CERTIFY_WITH", raising=False)
    assert rvq.rvq_precision() == "exact"
    assert rvq.certify_with() == "bf16x3"
    monkeypatch.setenv("ENCODEC_FAST_RVQ_CERTIFY_WITH", "fp8")
    with pytest.raises(ValueError, match="ENCODEC_FAST_RVQ_CERTIFY_WITH"):
        rvq.certify_with()


def test_model_codes_on_real_audio_equal_the_fp32_kernels():
    """The shipped small model on speech-like audio, every stage: the default (certified) search
    gives the fp32 kernel's codes."""
    import encodec_fast
    from encodec_fast.testing import voice
    model = encodec_fast.EncodecModel.encodec_model_24khz_small()
    model = model.to(DEVICE)
    wav = voice(model.sample_rate, 2.0, seed=3).reshape(1, 1, -1).to(DEVICE)
    with torch.no_grad():
        emb = model.encoder(wav)
    n_q = len(model.quantizer.vq.layers)
    books, norms = model.quantizer.vq.stacked_codebooks(n_q)
    with ops.use_backend("triton"):
        ref = krvq.rvq_encode(emb, books, norms, n_q, "ieee")
        got, stats = krvq.rvq_encode(emb, books, norms, n_q, "exact", stats=True)
    assert torch.equal(got, ref)
    assert math.isfinite(float(stats.sum()))
