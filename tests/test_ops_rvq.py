"""RVQ ops: the Triton kernels (interpreted on CPU when there is no GPU) against the references."""

import copy

import pytest
import torch

from encodec_fast import ops
from encodec_fast.ops import rvq
from encodec_fast.quantization import ResidualVectorQuantizer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_books(Q: int, K: int, D: int, seed: int) -> torch.Tensor:
    """[Q, K, D] codebooks whose scale shrinks stage by stage, like trained RVQ codebooks."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.85 ** q for q in range(Q)]).view(Q, 1, 1)
    return (torch.randn(Q, K, D, generator=g) * scales).to(DEVICE)


def make_latents(books: torch.Tensor, B: int, T: int, seed: int) -> torch.Tensor:
    """[B, D, T] latents near sums of one codeword per stage (so every stage has real work)."""
    Q, K, D = books.shape
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.randint(0, K, (Q, B * T), generator=g).to(books.device)
    noise = 0.5 * float(books[-1].std())  # under the last stage's scale, as in a trained RVQ
    x = sum(books[q][idx[q]] for q in range(Q)) + noise * torch.randn(B * T, D, generator=g).to(books.device)
    return x.view(B, T, D).transpose(1, 2).contiguous()


def norms_of(books):
    return [b.t().pow(2).sum(0, keepdim=True) for b in books]


def assert_codes_agree(x: torch.Tensor, books: torch.Tensor, ref: torch.Tensor, got: torch.Tensor,
                       max_tie_fraction: float = 0.01) -> None:
    """Codes [Q, B, T] must be equal, except where the reference and the kernel picked two
    codewords at the same distance within fp32 rounding (`rvq.code_agreement`)."""
    assert got.dtype == torch.int64
    result = rvq.code_agreement(x, books, ref, got)
    assert result.non_ties == 0, f"codes differ and are not ties: {result}"
    assert result.ties <= max(1.0, max_tie_fraction * result.rows), f"too many ties: {result}"
    assert result.equal + result.ties == result.rows


def encode_both(x, books):
    embeds, norms = list(books), norms_of(books)
    ref = rvq.rvq_encode(x, embeds, norms)
    with ops.use_backend("triton"):
        got = rvq.rvq_encode(x, embeds, norms)
    return ref, got


# -- backend selection -------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU rules")
def test_backend_selection(monkeypatch):
    cpu = torch.zeros(2)
    monkeypatch.delenv("ENCODEC_FAST_BACKEND", raising=False)
    assert ops.requested_backend() == "auto"
    assert ops.select(cpu) == "torch"  # auto keeps CPU tensors on the reference
    with ops.use_backend("torch"):
        assert ops.select(cpu) == "torch"
        with ops.use_backend("triton"):
            assert ops.requested_backend() == "triton"
        assert ops.requested_backend() == "torch"
    monkeypatch.setenv("ENCODEC_FAST_BACKEND", "torch")
    assert ops.requested_backend() == "torch"
    monkeypatch.setenv("ENCODEC_FAST_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.requested_backend()
    with pytest.raises(ValueError, match="unknown backend"):
        with ops.use_backend("fast"):
            pass
    monkeypatch.setenv("ENCODEC_FAST_BACKEND", "triton")
    # (Triton reads TRITON_INTERPRET when first imported: patch the check, not the variable.)
    from encodec_fast.ops import backend
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    with pytest.raises(ops.BackendError, match="TRITON_INTERPRET"):
        ops.select(cpu)


def test_precision_setting(monkeypatch):
    monkeypatch.setenv("ENCODEC_FAST_RVQ_PRECISION", "tf32x3")
    assert rvq.rvq_precision() == "tf32x3"
    monkeypatch.setenv("ENCODEC_FAST_RVQ_PRECISION", "fp8")
    with pytest.raises(ValueError, match="ENCODEC_FAST_RVQ_PRECISION"):
        rvq.rvq_precision()


# -- encode ------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,D,T,K,Q", [
    (1, 128, 1, 1024, 3),     # a single frame
    (2, 128, 75, 1024, 8),    # EnCodec's shape, rows not a multiple of the block
    (3, 8, 37, 16, 4),        # D and K under the minimum tile
    (1, 130, 50, 100, 2),     # D and K not powers of two
    (2, 256, 20, 4096, 1),    # the largest codebook and dimension
])
def test_rvq_encode_matches_reference(B, D, T, K, Q):
    books = make_books(Q, K, D, seed=B * 1000 + D + K + Q)
    x = make_latents(books, B, T, seed=T)
    ref, got = encode_both(x, books)
    assert_codes_agree(x, books, ref, got)


@pytest.mark.parametrize("n_q", range(1, 33))
def test_rvq_encode_every_n_q(n_q):
    books = make_books(32, 64, 16, seed=7)[:n_q]
    x = make_latents(books, 2, 21, seed=n_q)
    ref, got = encode_both(x, books)
    assert_codes_agree(x, books, ref, got)


def test_rvq_encode_non_contiguous_and_input_untouched():
    books = make_books(4, 256, 32, seed=3)
    base = make_latents(books, 2, 60, seed=3)
    x = base.transpose(1, 2).contiguous().transpose(1, 2)[:, :, ::2]  # [B, D, T] with strides (T*D, 1, 2D)
    assert not x.is_contiguous()
    before = x.clone()
    ref, got = encode_both(x, books)
    assert_codes_agree(x, books, ref, got)
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rvq_encode_half_inputs_upcast(dtype):
    """Half inputs are upcast on load: the codes are those of the fp32 reference on x.float()."""
    books = make_books(4, 128, 32, seed=11)
    x = make_latents(books, 2, 40, seed=11).to(dtype)
    embeds, norms = list(books), norms_of(books)
    ref = rvq.rvq_encode(x.float(), embeds, norms)
    with ops.use_backend("triton"):
        got = rvq.rvq_encode(x, embeds, norms)
    assert_codes_agree(x.float(), books, ref, got)


def test_exact_ties_go_to_the_lowest_index():
    """Small integers make every product and sum exact, so duplicated codewords are exact ties in
    any summation order; the lowest index must win, in every block of the search."""
    g = torch.Generator().manual_seed(5)
    books = torch.randint(-3, 4, (2, 600, 16), generator=g).float().to(DEVICE)
    for dup in (40, 300, 599):  # same block as the original, later blocks
        books[0, dup] = books[0, 9]
    x = books[0, 9].view(1, 16, 1).repeat(1, 1, 3)  # distance 0 to codeword 9 and its copies
    ref, got = encode_both(x, books)
    assert torch.equal(ref, got)
    assert (got[0] == 9).all()


def test_code_agreement_tells_ties_from_errors():
    books = make_books(3, 64, 16, seed=2)
    x = make_latents(books, 1, 10, seed=2)
    ref = rvq.rvq_encode(x, list(books), norms_of(books))
    assert rvq.code_agreement(x, books, ref, ref.clone()) == (10, 10, 0, 0, None)
    wrong = ref.clone()
    wrong[1, 0, 4] = (wrong[1, 0, 4] + 1) % 64   # a different codeword: not a tie
    wrong[2, 0, 4] = 0                           # after the first difference: not compared
    result = rvq.code_agreement(x, books, ref, wrong)
    assert (result.equal, result.ties, result.non_ties) == (9, 0, 1) and result.first_non_tie[0] == 1
    tied = books.clone()
    tied[0, 63] = tied[0, ref[0, 0, 7]]          # an exact duplicate of frame 7's first codeword
    swapped = ref.clone()
    swapped[0, 0, 7] = 63
    result = rvq.code_agreement(x, tied, ref, swapped)
    assert (result.equal, result.ties, result.non_ties) == (9, 1, 0)


# -- decode ------------------------------------------------------------------------------------

@pytest.mark.parametrize("Q,B,T,K,D", [(1, 1, 1, 16, 8), (8, 2, 75, 1024, 128), (32, 3, 17, 64, 130)])
def test_rvq_decode_bit_exact(Q, B, T, K, D):
    books = make_books(Q, K, D, seed=Q + T)
    g = torch.Generator().manual_seed(Q)
    codes = torch.randint(0, K, (Q, B, T), generator=g).to(DEVICE)
    ref = rvq.rvq_decode(codes, list(books))
    with ops.use_backend("triton"):
        got = rvq.rvq_decode(codes, list(books))
        strided = rvq.rvq_decode(codes.transpose(1, 2).contiguous().transpose(1, 2), list(books))
    assert got.shape == (B, D, T)
    assert torch.equal(got, ref) and torch.equal(strided, ref)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rvq_decode_rejects_bad_codes(backend):
    books = list(make_books(2, 16, 8, seed=0))
    with ops.use_backend(backend):
        with pytest.raises(IndexError, match="out of range"):
            rvq.rvq_decode(torch.full((2, 1, 3), 16, device=DEVICE), books)
        with pytest.raises(IndexError, match="out of range"):
            rvq.rvq_decode(torch.full((2, 1, 3), -1, device=DEVICE), books)
        with pytest.raises(TypeError, match="integers"):
            rvq.rvq_decode(torch.zeros(2, 1, 3, device=DEVICE), books)


# -- one training stage ------------------------------------------------------------------------

@pytest.mark.parametrize("N,K,D", [(1, 16, 8), (300, 32, 16), (257, 1024, 128)])
def test_vq_assign_stats(N, K, D):
    """Codes, codewords and the EMA statistics; few codewords for many rows: long runs per codeword."""
    books = make_books(1, K, D, seed=N)
    x = make_latents(books, 1, N, seed=N)[0].t()  # [N, D], non-contiguous
    embed, norm = books[0], books[0].pow(2).sum(-1)
    codes, quant, counts, sums = rvq.vq_assign_torch(x, embed, norm, stats=True)
    with ops.use_backend("triton"):
        k_codes, k_quant, k_counts, k_sums = rvq.vq_assign(x, embed, norm, stats=True)
        only_codes = rvq.vq_assign(x, embed, norm, stats=False)
    assert_codes_agree(x.t()[None], books, codes.view(1, 1, N), k_codes.view(1, 1, N))
    assert torch.equal(k_codes, codes) and torch.equal(only_codes[0], codes)
    assert torch.equal(k_quant, quant)
    assert only_codes[2] is None and only_codes[3] is None
    assert torch.equal(k_counts, counts)  # integer-valued: exact
    torch.testing.assert_close(k_sums, sums, rtol=1e-5, atol=1e-5)  # another order of additions


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_segment_sums_fixed_order(dtype):
    """The training statistics without atomics: counts exact, sums within fp32 rounding of fp64 (rows
    of magnitudes 1e-3 to 1e3), codewords without rows zero, the same bits on a second call (on a GPU
    the atomics this replaces did not promise that)."""
    from encodec_fast.kernels import rvq as krvq
    g = torch.Generator().manual_seed(dtype.itemsize)
    N, K, D = 700, 50, 24
    x = (torch.randn(N, D, generator=g) * torch.logspace(-3, 3, N)[:, None]).to(dtype).to(DEVICE)
    codes = torch.randint(0, K - 3, (N,), generator=g).to(DEVICE)  # the last 3 codewords get no rows
    counts, sums = krvq.segment_sums(x, codes, K)
    again = krvq.segment_sums(x, codes, K)
    assert torch.equal(sums, again[1]) and torch.equal(counts, again[0])
    assert torch.equal(counts.cpu(), torch.bincount(codes.cpu(), minlength=K).float())
    ref = torch.zeros(K, D, dtype=torch.float64).index_add_(0, codes.cpu(), x.cpu().double())
    torch.testing.assert_close(sums.cpu().double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    assert not sums[-3:].any()


def _quantizer(seed: int, kmeans: bool):
    torch.manual_seed(seed)
    q = ResidualVectorQuantizer(dimension=32, n_q=4, bins=64, kmeans_init=kmeans, kmeans_iters=3,
                                threshold_ema_dead_code=2)
    return q.to(DEVICE)


@pytest.mark.parametrize("kmeans", [False, True])
def test_quantizer_training_step_triton_equals_torch(kmeans):
    """A few training steps (k-means init, dead-code expiry, EMA updates, straight-through
    gradients, commitment loss) give the same state with either backend."""
    ref_q = _quantizer(0, kmeans).train()
    fast_q = copy.deepcopy(ref_q)
    g = torch.Generator().manual_seed(1)
    steps = [torch.randn(3, 32, 50, generator=g).to(DEVICE) for _ in range(3)]
    for step, x in enumerate(steps):
        outs = []
        for backend, model in (("torch", ref_q), ("triton", fast_q)):
            xin = x.clone().requires_grad_(True)
            torch.manual_seed(100 + step)  # k-means and expiry draw random vectors
            with ops.use_backend(backend):
                res = model(xin, sample_rate=75, bandwidth=None)
            (res.quantized.pow(2).mean() + res.penalty.sum()).backward()
            outs.append((res, xin.grad))
        (r, r_grad), (f, f_grad) = outs
        assert torch.equal(f.codes, r.codes), f"step {step}"
        torch.testing.assert_close(f.quantized, r.quantized, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(f.penalty, r.penalty, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(f_grad, r_grad, rtol=1e-6, atol=1e-8)
        for (name, rb), (_, fb) in zip(ref_q.named_buffers(), fast_q.named_buffers()):
            torch.testing.assert_close(fb, rb, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step} {name}: {m}")


# -- a model end to end ------------------------------------------------------------------------

@pytest.mark.parametrize("bandwidth", [6.0, 24.0])
def test_model_codes_and_audio_with_triton_backend(pair_24, bandwidth):
    """Our 24 kHz model (random weights, data-like codebooks): the Triton RVQ gives the reference's
    codes and, from the same codes, the same latents (bit for bit).

    At 24 kbps the test codebooks of the late stages are far smaller than what is left to
    quantize (they are built from other signals' residuals), so all their codewords are nearly
    equidistant: there, every difference must still be a tie within fp32 rounding, but ties are
    common (the kernel, without the reference's ||x||^2 term, is the more accurate one: checked
    against float64 while writing this test)."""
    from encodec_fast.testing import make_signal
    _, model = pair_24
    model.set_target_bandwidth(bandwidth)
    x = torch.stack([make_signal(24000, 12000, 1, seed=s) for s in (1, 2)]).to(DEVICE)
    with torch.no_grad():
        emb = model.encoder(x)
        ref_codes = model.encode(x)[0][0]
        ref_latents = model.quantizer.decode(ref_codes.transpose(0, 1))
        with ops.use_backend("triton"):
            with ops.use_backend("torch"):
                emb_k = model.encoder(x)  # the convolutions on the reference: same latents
            got_codes = model.quantizer.encode(emb_k, model.frame_rate, bandwidth).transpose(0, 1)
            latents = model.quantizer.decode(ref_codes.transpose(0, 1))
    assert torch.equal(emb_k, emb)
    books, _ = model.quantizer.vq.stacked_codebooks(ref_codes.shape[1])
    assert_codes_agree(emb, books, ref_codes.transpose(0, 1), got_codes.transpose(0, 1),
                       max_tie_fraction=0.01 if bandwidth <= 6 else 1.0)
    assert torch.equal(latents, ref_latents)
    assert float(latents.abs().max()) > 0
