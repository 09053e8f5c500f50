"""The Triton kernels on a real GPU (marker `gpu`; skipped without CUDA): what Triton's interpreter on
CPU cannot show (TF32, real atomics, bf16, compiled code). `python -m pytest -m gpu` on a GPU machine.

RVQ encode against the exact-fp32 PyTorch path (differences must be ties), decode bit-exact, one
training stage (codes, counts, sums), a quantizer training step against the PyTorch backend, the
24 kHz model end to end, and every convolution kind, spectrogram and discriminator layer within its
dtype's tolerance of the PyTorch path. The shapes and inputs are the `kernels` benchmark's.
"""

import copy

import pytest
import torch
from encodec_fast.kernels import rvq as krvq

from bench import peers
from bench.benchmarks import kernels
from encodec_fast import ops
from encodec_fast import precision as precision_modes
from encodec_fast.ops import rvq
from encodec_fast.quantization import ResidualVectorQuantizer
from encodec_fast.testing import adversarial_rows, near_tie_books, voice_batch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (python -m pytest -m gpu)")]
DEVICE = "cuda"


@pytest.fixture(autouse=True, scope="module")
def exact_torch_path():
    """The PyTorch side in exact fp32 (no TF32), as the reference."""
    with precision_modes.torch_precision("exact"):
        yield


@pytest.mark.parametrize("B,D,T,K,Q", [(1, 128, 1, 1024, 3), (3, 8, 37, 16, 4), (1, 130, 50, 100, 2),
                                       (2, 256, 20, 4096, 1), (4, 128, 750, 1024, 32), (2, 64, 333, 2048, 17)])
def test_rvq_encode_codes_are_the_exact_paths_up_to_ties(B, D, T, K, Q):
    books = kernels.make_books(Q, K, D, seed=B + D + T + K + Q, device=DEVICE)
    x = kernels.make_latents(books, B, T, seed=T)
    norms = [b.pow(2).sum(-1)[None] for b in books]
    with ops.use_backend("torch"):
        ref = rvq.rvq_encode(x, list(books), norms)
    with ops.use_backend("triton"), kernels.Precision("ieee"):
        got = rvq.rvq_encode(x, list(books), norms)
        strided = rvq.rvq_encode(x.transpose(1, 2).contiguous().transpose(1, 2), list(books), norms)
    agreement = rvq.code_agreement(x, books, ref, got)
    assert agreement.non_ties == 0, agreement
    assert torch.equal(got, strided)


@pytest.mark.parametrize("lowp", list(rvq.LOW_PRECISION))
@pytest.mark.parametrize("K,D,Q,N", [(1024, 128, 8, 48000), (300, 32, 3, 3000), (1024, 16, 32, 5000)])
def test_certified_search_gives_the_fp32_kernels_codes(lowp, K, D, Q, N):
    """On real tensor cores, adversarial rows (near-ties, zero, tiny, huge), codebooks with twins and
    large codewords: the certified search's codes are the fp32 kernel's, also with its distances moved
    by up to the bound; rows were rescored (counters)."""
    books = torch.stack([near_tie_books(K, D, seed=q, scale=0.8 ** q) for q in range(Q)])
    x = adversarial_rows(books[0], N, seed=K).t().reshape(1, D, N).contiguous().to(DEVICE)
    books = books.to(DEVICE)
    norms = books.pow(2).sum(-1)
    ref = krvq.rvq_encode(x, books, norms, Q, "ieee")
    got, stats = krvq.rvq_encode(x, books, norms, Q, "exact", lowp, stats=True)
    perturbed = krvq.rvq_encode(x, books, norms, Q, "exact", lowp, perturb=1.0)
    assert torch.equal(got, ref)
    assert torch.equal(perturbed, ref)
    assert int(stats[0, 0]) > 0


def test_certified_search_rows_with_nan_and_inf():
    books = torch.stack([near_tie_books(256, 32, seed=q) for q in range(2)]).to(DEVICE)
    norms = books.pow(2).sum(-1)
    x = torch.randn(1, 32, 200, device=DEVICE)
    x[0, 3, 0] = float("nan")
    x[0, :, 1] = float("inf")
    x[0, 5, 2] = float("-inf")
    x[0, :, 3] = 1e30
    for lowp in rvq.LOW_PRECISION:
        got = krvq.rvq_encode(x, books, norms, 2, "exact", lowp)
        assert torch.equal(got, krvq.rvq_encode(x, books, norms, 2, "ieee"))


@pytest.mark.parametrize("mode", list(rvq.LOW_PRECISION))
def test_tensor_core_dot_error_is_within_the_certificates_bound(mode):
    """The certificate's error model on this GPU: |tl.dot in `mode` - x.c| <= g sum|x_i c_i| (fp64
    reference) on 10^6 products of length 128, data whose products cancel; the fp32 dot likewise."""
    import triton
    import triton.language as tl

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, hi_ptr, lo_ptr, o_ptr, D: tl.constexpr, P: tl.constexpr, SPLIT: tl.constexpr):
        i = tl.program_id(0) * 64 + tl.arange(0, 64)
        j = tl.program_id(1) * 64 + tl.arange(0, 64)
        d = tl.arange(0, D)
        a = tl.load(a_ptr + i[:, None] * D + d[None, :])
        if SPLIT:  # the search's own bf16x3: rows split in the kernel, codewords' halves split ahead
            a_hi, a_lo = krvq._split_bf16(a, True)
            b_hi = tl.load(hi_ptr + j[:, None] * D + d[None, :])
            b_lo = tl.load(lo_ptr + j[:, None] * D + d[None, :])
            out = tl.dot(a_hi, tl.trans(b_lo))
            out = tl.dot(a_lo, tl.trans(b_hi), out)
            out = tl.dot(a_hi, tl.trans(b_hi), out)
        else:
            b = tl.load(b_ptr + j[:, None] * D + d[None, :])
            out = tl.dot(a, tl.trans(b), input_precision=P)
        tl.store(o_ptr + i[:, None] * 1024 + j[None, :], out)

    D = 128
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(1024, D, device=DEVICE, generator=g) * torch.logspace(-2, 2, D, device=DEVICE)
    c = torch.randn(1024, D, device=DEVICE, generator=g) * torch.logspace(2, -2, D, device=DEVICE)
    c[:512] = x[:512] + 1e-3 * c[:512]
    hi, lo = krvq.split_codebooks(c)
    scale = x.double().abs() @ c.double().abs().t()
    exact = x.double() @ c.double().t()
    for precision in (mode, "ieee"):
        out = torch.empty(1024, 1024, device=DEVICE)
        dot_kernel[(16, 16)](x, c, hi, lo, out, D=D, P=krvq._dot_precision(precision), SPLIT=precision == "bf16x3",
                             num_warps=4)
        ratio = float(((out.double() - exact).abs() / scale).max())
        assert ratio <= rvq.dot_error_bound(precision, D), (precision, ratio)


def test_rvq_decode_is_bit_exact():
    books = kernels.make_books(32, 1024, 128, seed=1, device=DEVICE)
    codes = torch.randint(0, 1024, (32, 3, 500), device=DEVICE)
    with ops.use_backend("torch"):
        ref = rvq.rvq_decode(codes, list(books))
    with ops.use_backend("triton"):
        got = rvq.rvq_decode(codes, list(books))
    assert torch.equal(ref, got)


def test_vq_assign_with_ema_statistics():
    books = kernels.make_books(1, 1024, 128, seed=2, device=DEVICE)
    x = kernels.make_latents(books, 1, 5000, seed=2)[0].t()
    norm = books[0].pow(2).sum(-1)
    with ops.use_backend("torch"):
        c, q, n, s = rvq.vq_assign(x, books[0], norm, stats=True)
    with ops.use_backend("triton"):
        kc, kq, kn, ks = rvq.vq_assign(x, books[0], norm, stats=True)
    agreement = rvq.code_agreement(x.t()[None], books, c.view(1, 1, -1), kc.view(1, 1, -1))
    assert agreement.non_ties == 0, agreement
    if agreement.equal == agreement.rows:
        assert torch.equal(q, kq) and torch.equal(n, kn)
        torch.testing.assert_close(ks, s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fix", [False, True])
def test_fused_training_stages_are_deterministic_and_equal_the_stage_by_stage_kernels(fix, monkeypatch):
    """On the GPU: all 32 training stages in one launch against the same kernels stage by stage (same
    codes, output and EMA state bits; gradients to rounding), and two runs of 3 steps bit-identical."""
    torch.manual_seed(0)
    q = ResidualVectorQuantizer(dimension=128, n_q=32, bins=1024, kmeans_init=False,
                                commitment_all_stages=fix).to(DEVICE).train()
    models = [copy.deepcopy(q) for _ in range(3)]
    monkeypatch.setattr(models[0].vq, "_fused_training", lambda *a: False)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    batch, frames = kernels.FULL_SIZES["train"]
    for step in range(3):
        x = torch.randn(batch, 128, frames, generator=g, device=DEVICE)
        res = []
        for model in models:
            xin = x.clone().requires_grad_(True)
            torch.manual_seed(100 + step)  # dead-code expiry draws random frames
            with ops.use_backend("triton"):
                r = model(xin, sample_rate=75)
            (r.quantized.pow(2).mean() + r.penalty.sum()).backward()
            res.append((r, xin.grad))
        (a, ga), (b, gb), (c, gc) = res
        assert torch.equal(a.codes, b.codes) and torch.equal(a.quantized, b.quantized)
        torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-7)
        assert torch.equal(b.quantized, c.quantized) and torch.equal(gb, gc) and torch.equal(b.penalty, c.penalty)
    for (name, x1), (_, x2), (_, x3) in zip(*(m.named_buffers() for m in models)):
        assert torch.equal(x2, x3), name
        torch.testing.assert_close(x2, x1, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_quantizer_training_steps_match_the_torch_backend():
    # No k-means: with fewer frames than codewords it repeats frames, and repeated codewords are exact
    # ties that either side may break.
    torch.manual_seed(0)
    ref_q = ResidualVectorQuantizer(dimension=128, n_q=8, bins=1024, kmeans_init=False).to(DEVICE).train()
    fast_q = copy.deepcopy(ref_q)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    batch, frames = kernels.FULL_SIZES["train"]
    for step in range(3):
        x = torch.randn(batch, 128, frames, generator=g, device=DEVICE)
        books = torch.stack([layer._codebook.embed.detach().clone() for layer in ref_q.vq.layers])
        res = []
        for backend, model in (("torch", ref_q), ("triton", fast_q)):
            xin = x.clone().requires_grad_(True)
            torch.manual_seed(100 + step)  # dead-code expiry draws random frames
            with ops.use_backend(backend):
                r = model(xin, sample_rate=75)
            (r.quantized.pow(2).mean() + r.penalty.sum()).backward()
            res.append((r, xin.grad))
        (a, ga), (b, gb) = res
        if not torch.equal(a.codes, b.codes):  # ties only; the states diverge from there
            assert rvq.code_agreement(x, books, a.codes, b.codes).non_ties == 0
            return
        torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-7)
        for (name, x1), (_, x2) in zip(ref_q.named_buffers(), fast_q.named_buffers()):
            torch.testing.assert_close(x2, x1, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_24khz_model_end_to_end():
    model = peers.ours_model("24khz", peers.random_state("24khz")).to(DEVICE)
    model.set_target_bandwidth(6.0)
    x = voice_batch(24000, 1.0, 1, batch=2).to(DEVICE)
    with torch.no_grad():
        with ops.use_backend("torch"):
            emb_ref = model.encoder(x)
            ref = model.encode(x)[0][0]
            audio_ref = model.decode([(ref, None)])
        with ops.use_backend("triton"):
            emb = model.encoder(x)
            got = model.encode(x)[0][0]
            own = model.quantizer.encode(emb, model.frame_rate, 6.0)
            audio = model.decode([(ref, None)])
        with ops.use_backend("torch"):
            own_ref = model.quantizer.encode(emb, model.frame_rate, 6.0)
    books, _ = model.quantizer.vq.stacked_codebooks(ref.shape[1])
    # The RVQ kernel on the kernels' latents: ties only. Convolutions: latents and audio close.
    agreement = rvq.code_agreement(emb, books, own_ref, own)
    assert agreement.non_ties == 0 and torch.equal(own, got.transpose(0, 1)), agreement
    assert float((emb - emb_ref).abs().max() / emb_ref.abs().max()) <= 1e-5
    assert float((audio - audio_ref).abs().max() / audio_ref.abs().max()) <= 1e-5


def test_auto_takes_our_convolution_only_where_measured_faster():
    """`ops.dispatch` on a GPU: cuDNN for a layer measured slower, our kernel for one measured faster."""
    x = torch.randn(2, 64, 1000, device=DEVICE)
    assert ops.conv_backend(x, torch.randn(128, 64, 8, device=DEVICE), "conv1d", 4) == "cudnn"
    x16 = torch.randn(2, 16, 1000, device=DEVICE)
    w = torch.randn(32, 16, 1, device=DEVICE)
    assert ops.conv_backend(x16, w, "conv1d", 1) == "triton"
    res = torch.randn(2, 32, 1000, device=DEVICE)
    with torch.no_grad():
        got = ops.conv1d(x16, w, None, elu=True, residual=res)
        with ops.use_backend("torch"):
            ref = ops.conv1d(x16, w, None, elu=True, residual=res)
    assert _rel_err(got, ref) <= 1e-5


@pytest.mark.parametrize("mode", ["exact", "tf32", "bf16", "fp16"])
def test_precision_modes_on_the_gpu(mode):
    """The shipped small model on real-ish audio in each mode against the CPU's exact codes: exact
    agrees but for ties, the others mostly; torch's switches are restored after every call."""
    state, _ = peers.load_state("small", None)
    cpu = peers.ours_model("small", state)
    cpu.set_target_bandwidth(6.0)
    model = peers.ours_model("small", state).to(DEVICE).set_precision(mode)
    model.set_target_bandwidth(6.0)
    x = voice_batch(24000, 2.0, 1, batch=2)
    before = [leaf.fp32_precision for leaf in (torch.backends.cudnn.conv, torch.backends.cudnn.rnn)]
    ref = cpu.encode(x)[0][0]
    got = model.encode(x.to(DEVICE))[0][0].cpu()
    audio = model.decode([(got.to(DEVICE), None)])
    assert [leaf.fp32_precision for leaf in (torch.backends.cudnn.conv, torch.backends.cudnn.rnn)] == before
    agree = (got == ref).double().mean().item()
    assert agree >= (0.99 if mode == "exact" else 0.5), agree
    assert audio.dtype == torch.float32 and torch.isfinite(audio).all()


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().float(), ref.detach().float()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


LIMITS = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layer", kernels.CONV_LAYERS, ids=[layer[0] for layer in kernels.CONV_LAYERS])
def test_conv_layers_within_tolerance(layer, dtype):
    fn, ref_fn, *_ = kernels.conv_case(DEVICE, layer, dtype)
    with torch.no_grad():
        ref = ref_fn()
        with ops.use_backend("triton"):
            got = fn()
    assert _rel_err(got, ref) <= LIMITS[dtype]


MODE_LIMITS = {"exact": 1e-5, "tf32": 5e-3, "bf16": 2e-2}


@pytest.mark.parametrize("mode", ["exact", "tf32", "bf16"])
@pytest.mark.parametrize("layer", kernels.CONV_LAYERS, ids=[layer[0] for layer in kernels.CONV_LAYERS])
def test_gemm_conv_layers_within_tolerance(layer, mode, monkeypatch):
    """The implicit-GEMM family on real tensor cores (tf32, bf16) and in exact fp32, against the
    PyTorch path in exact fp32 (bf16: in bf16)."""
    monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", "gemm")
    monkeypatch.setattr(kernels, "SIZES", {**kernels.FULL_SIZES, "rvq": (4, 750)})  # 4 x 10 s: a quick check
    fn, ref_fn, *_ = kernels.conv_case(DEVICE, layer, torch.bfloat16 if mode == "bf16" else torch.float32)
    with torch.no_grad():
        ref = ref_fn()
        with precision_modes.scope(mode, DEVICE), ops.use_backend("triton"):
            got = fn()
    assert got.stride(1) == 1  # channels-last output
    assert _rel_err(got, ref) <= MODE_LIMITS[mode]


def _block_weights(C: int, dtype: torch.dtype, g: torch.Generator):
    """A random residual block's w1 [C/2, C, 3], w2 [C, C/2, 1] and shortcut ws [C, C, 1] on the GPU."""
    return ((torch.randn(C // 2, C, 3, device=DEVICE, generator=g) / (3 * C) ** 0.5).to(dtype),
            (torch.randn(C, C // 2, 1, device=DEVICE, generator=g) / (C // 2) ** 0.5).to(dtype),
            (torch.randn(C, C, 1, device=DEVICE, generator=g) / C ** 0.5).to(dtype))


@pytest.mark.parametrize("mode", ["exact", "tf32", "bf16"])
@pytest.mark.parametrize("C", [32, 64])
def test_fused_residual_blocks_within_tolerance(C, mode, monkeypatch):
    from encodec_fast.ops import conv
    monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", "gemm")
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    g = torch.Generator(device=DEVICE).manual_seed(C)
    x = torch.randn(8, C, 24000 + 77, device=DEVICE, generator=g).to(dtype)
    w1, w2, ws = _block_weights(C, dtype, g)
    b = torch.randn(C, device=DEVICE, generator=g).to(dtype)
    with torch.no_grad():
        ref = conv.residual_block_torch(x, w1, b[: C // 2], w2, b, 1, (2, 0), "reflect", ws, b)
        with precision_modes.scope(mode, DEVICE), ops.use_backend("triton"):
            assert ops.block_backend(x, w1, w2) == "triton"
            got = conv.residual_block(x, w1, b[: C // 2], w2, b, 1, (2, 0), "reflect", ws, b)
    assert _rel_err(got, ref) <= MODE_LIMITS[mode]


@pytest.mark.parametrize("mode", ["exact", "tf32", "bf16"])
@pytest.mark.parametrize("C,stride", [(32, 2), (64, 4)])
def test_fused_block_and_downsampling_within_tolerance(C, stride, mode, monkeypatch):
    """The encoder's first levels (block, ELU, downsampling) in one kernel on the GPU, each mode,
    against the PyTorch path in exact fp32 (bf16: in bf16)."""
    from encodec_fast.ops import conv
    monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", "gemm")
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    g = torch.Generator(device=DEVICE).manual_seed(C)
    L = 24000 + 77
    x = torch.randn(8, C, L, device=DEVICE, generator=g).to(dtype)
    w1, w2, ws = _block_weights(C, dtype, g)
    wd = (torch.randn(2 * C, C, 2 * stride, device=DEVICE, generator=g) / (2 * stride * C) ** 0.5).to(dtype)
    b = torch.randn(2 * C, device=DEVICE, generator=g).to(dtype)
    args = (x, w1, b[: C // 2], w2, b[:C], 1, (2, 0), "reflect", ws, b[:C], wd, b, stride,
            (stride, -(-L // stride) * stride - L), "reflect")
    with torch.no_grad():
        ref = conv.residual_block_down_torch(*args)
        with precision_modes.scope(mode, DEVICE), ops.use_backend("triton"):
            assert ops.block_down_backend(x, w1, w2, wd, stride) == "triton"
            got = conv.residual_block_down(*args)
    assert _rel_err(got, ref) <= MODE_LIMITS[mode]


@pytest.mark.parametrize("mode", ["exact", "tf32", "bf16"])
@pytest.mark.parametrize("C,stride", [(32, 2), (64, 4)])
def test_fused_upsampling_and_block_within_tolerance(C, stride, mode, monkeypatch):
    """The decoder's last levels (ELU, transposed convolution, trim, block) in one kernel on the GPU,
    each mode, against the PyTorch path in exact fp32 (bf16: in bf16)."""
    from encodec_fast.ops import conv
    monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", "gemm")
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    g = torch.Generator(device=DEVICE).manual_seed(C)
    L = 24000 // stride + 7
    x = torch.randn(8, 2 * C, L, device=DEVICE, generator=g).to(dtype)
    wu = (torch.randn(2 * C, C, 2 * stride, device=DEVICE, generator=g) / (4 * C) ** 0.5).to(dtype)
    w1, w2, ws = _block_weights(C, dtype, g)
    b = torch.randn(C, device=DEVICE, generator=g).to(dtype)
    args = (x, wu, b, stride, 0, L * stride, True, w1, b[: C // 2], w2, b, 1, (2, 0), "reflect", ws, b)
    with torch.no_grad():
        ref = conv.up_residual_block_torch(*args)
        with precision_modes.scope(mode, DEVICE), ops.use_backend("triton"):
            assert ops.up_block_backend(x, wu, w1, w2, stride) == "triton"
            got = conv.up_residual_block(*args)
    assert _rel_err(got, ref) <= MODE_LIMITS[mode]


@pytest.mark.parametrize("n_fft,hop", [(1024, 256), (2048, 512), (512, 128)])
def test_spectrogram_forward_and_backward(n_fft, hop):
    from encodec_fast.ops import stft
    x = torch.randn(4, 1, 24000, device=DEVICE)
    window = torch.hann_window(n_fft, device=DEVICE)
    out = {}
    for backend in ("torch", "triton"):
        xin = x.clone().requires_grad_(True)
        with ops.use_backend(backend):
            z = stft.spectrogram(xin, window, n_fft, hop, n_fft, True)
        z.sum().backward()
        out[backend] = (z, xin.grad)
    assert _rel_err(out["triton"][0], out["torch"][0]) <= 1e-5
    assert _rel_err(out["triton"][1], out["torch"][1]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_discriminator_conv2d_layers_within_tolerance(dtype):
    from encodec_fast.ops import conv
    from encodec_fast.train.msstftd import DiscriminatorSTFT
    torch.manual_seed(0)
    disc = DiscriminatorSTFT(filters=32).to(DEVICE)
    seen = []
    hooks = [m.register_forward_hook(lambda m, inp, out: seen.append((m, inp[0].detach())))
             for m in list(disc.convs) + [disc.conv_post]]
    with torch.no_grad():
        disc(torch.randn(2, 1, 24000, device=DEVICE))
    for h in hooks:
        h.remove()
    for module, x in seen:
        c = module.conv
        slope = None if module is disc.conv_post else 0.2
        args = (x.to(dtype), module.weight().detach().to(dtype), c.bias.detach().to(dtype), c.stride, c.dilation,
                c.padding, slope)
        with torch.no_grad():
            with ops.use_backend("torch"):
                ref = conv.conv2d_leaky_relu(*args)
            with ops.use_backend("triton"):
                got = conv.conv2d_leaky_relu(*args)
        assert _rel_err(got, ref) <= LIMITS[dtype], (module, dtype)


@pytest.mark.parametrize("mode", ["exact", "tf32", "bf16"])
def test_discriminator_conv2d_gemm_forward_and_backward(mode, monkeypatch):
    """The gemm family's Conv2d + LeakyReLU on every discriminator layer, forward and backward (input,
    weight and bias gradients on tensor cores), against cuDNN in exact fp32 on the same values: within
    the mode's tolerance; the weight gradient the same bits on a second run (no atomics)."""
    from encodec_fast.ops import conv
    from encodec_fast.train.msstftd import DiscriminatorSTFT
    monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", "gemm")
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    limit = {"exact": 1e-5, "tf32": 5e-3, "bf16": 3e-2}[mode]
    torch.manual_seed(0)
    disc = DiscriminatorSTFT(filters=32).to(DEVICE)
    seen = []
    hooks = [m.register_forward_hook(lambda m, inp, out: seen.append((m, inp[0].detach())))
             for m in list(disc.convs) + [disc.conv_post]]
    with torch.no_grad():
        disc(torch.randn(4, 1, 24000, device=DEVICE))
    for h in hooks:
        h.remove()
    for module, x in seen:
        c = module.conv
        slope = None if module is disc.conv_post else 0.2
        params = [x.to(dtype), module.weight().detach().to(dtype), c.bias.detach().to(dtype)]
        cfg = (c.stride, c.dilation, c.padding, slope)
        ref_in = [p.float().requires_grad_(True) for p in params]
        y_ref = conv.conv2d_leaky_relu_torch(*ref_in, *cfg)
        g = torch.randn_like(y_ref)
        y_ref.backward(g)
        runs = []
        for _ in range(2):
            ours = [p.clone().requires_grad_(True) for p in params]
            with ops.use_backend("triton"), precision_modes.scope(mode, DEVICE):
                y = conv.conv2d_leaky_relu(*ours, *cfg)
                y.backward(g.to(dtype))
            runs.append([y.detach()] + [p.grad for p in ours])
        for got, ref in zip(runs[0], [y_ref.detach()] + [p.grad for p in ref_in]):
            assert _rel_err(got, ref) <= limit, (module, mode)
        assert torch.equal(runs[0][2], runs[1][2]) and torch.equal(runs[0][3], runs[1][3])


def test_stage_timer_on_the_gpu():
    """GPU stages are timed with CUDA events (no synchronization), and a host stage that waits for
    them keeps its own time (they overlap, so nothing is taken out of it)."""
    from encodec_fast import timing
    timer = timing.StageTimer()
    x = torch.randn(4096, 4096, device=DEVICE)
    with timer.active():
        with timing.stage("host"):
            with timing.stage("matmul", x.device):
                for _ in range(20):
                    x = x @ x / 64
            torch.cuda.synchronize()
    sec = timer.seconds()
    assert timer.gpu == {"matmul"} and sec["matmul"] > 0
    assert sec["host"] >= 0.5 * sec["matmul"]


def test_tokenize_on_the_gpu_breaks_its_time_down(tmp_path):
    """`tokenize(device="cuda")`: the model's stages and the copies timed on the GPU, the codes those
    of the CPU run (exact mode) but for rounding-level ties."""
    import numpy as np
    import soundfile as sf

    from encodec_fast.testing import voice
    from encodec_fast.tokenize import read_codes, tokenize
    (tmp_path / "in").mkdir()
    for i in range(4):
        sf.write(str(tmp_path / "in" / f"v{i}.wav"), voice(24000, 1.0 + i, seed=i).reshape(-1).numpy(), 24000)
    runs = {}
    for device in ("cpu", DEVICE):
        summary = tokenize([tmp_path / "in"], tmp_path / device, model="small", device=device, workers=0, quiet=True)
        runs[device] = {r["id"]: r["codes"] for r in read_codes(tmp_path / device)}
        if device == DEVICE:
            assert {"encoder convolutions", "encoder LSTM", "RVQ search", "to device", "to host"} <= set(
                summary.gpu_stages)
            assert all(summary.seconds_by_stage[s] > 0 for s in ("encoder convolutions", "RVQ search"))
    summary = tokenize([tmp_path / "in"], tmp_path / "graphs", model="small", device=DEVICE, workers=0, quiet=True,
                       cuda_graphs=True)
    runs["graphs"] = {r["id"]: r["codes"] for r in read_codes(tmp_path / "graphs")}
    assert all(np.array_equal(runs["graphs"][k], v) for k, v in runs[DEVICE].items())  # replays: the same bits
    equal = sum(int((runs[DEVICE][k] == v).sum()) for k, v in runs["cpu"].items())
    assert equal / sum(v.size for v in runs["cpu"].values()) >= 0.99
    assert all(np.array_equal(runs[DEVICE][k].shape, v.shape) for k, v in runs["cpu"].items())


def test_tokenize_resamples_on_the_gpu(tmp_path):
    """On CUDA the clips are resampled on the GPU by default (stage `resample (device)`, GPU time):
    the codes of resampling in the decoding processes but for rounding-level ties, the same lengths."""
    import soundfile as sf

    from encodec_fast.testing import voice
    from encodec_fast.tokenize import read_codes, tokenize
    (tmp_path / "in").mkdir()
    for i, rate in enumerate((44100, 48000, 16000)):
        sf.write(str(tmp_path / "in" / f"v{i}.wav"), voice(rate, 1.5, seed=i).reshape(-1).numpy(), rate)
    runs = {}
    for on_device in (True, False):
        summary = tokenize([tmp_path / "in"], tmp_path / str(on_device), model="small", device=DEVICE, workers=1,
                           quiet=True, resample_on_device=on_device)
        runs[on_device] = {r["id"]: r for r in read_codes(tmp_path / str(on_device))}
        assert ("resample (device)" in summary.gpu_stages) == on_device
    equal = total = 0
    for k, row in runs[False].items():
        got = runs[True][k]
        assert got["num_samples"] == row["num_samples"] and got["codes"].shape == row["codes"].shape
        equal += int((got["codes"] == row["codes"]).sum())
        total += row["codes"].size
    assert equal / total >= 0.99, equal / total


def test_deterministic_training_steps_repeat_their_bits(tmp_path):
    """`--deterministic` on CUDA: every op of a training step has a deterministic algorithm (none
    raises), and two runs from the same start give the same weights bit for bit."""
    import soundfile as sf

    from encodec_fast.testing import voice
    from encodec_fast.train.trainer import TrainConfig, Trainer
    (tmp_path / "data").mkdir()
    for i in range(4):
        sf.write(str(tmp_path / "data" / f"v{i}.wav"), voice(24000, 2.0, seed=i).reshape(-1).numpy(), 24000)
    states = []
    for run in range(2):
        config = TrainConfig(data=[str(tmp_path / "data")], model="small", batch_size=4, segment_seconds=0.5,
                             workers=0, valid_items=0, steps=3, precision="fp32", device=DEVICE, seed=1,
                             deterministic=True, valid_every=0, log_every=1)
        trainer = Trainer(config, tmp_path / f"run{run}", quiet=True)
        trainer.run()
        states.append({k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()})
    assert all(torch.equal(a, states[1][k]) for k, a in states[0].items())


def test_a_training_step_waits_for_the_gpu_once(tmp_path):
    """A training step on CUDA from a pinned batch synchronises once (torch's sync debug mode
    counting): the losses with the balancer's norms; the codebooks' expiry counts came to the host
    after the previous step's update. The trainer's loader pins its batches on CUDA."""
    import warnings

    import soundfile as sf

    from encodec_fast.testing import voice
    from encodec_fast.train import data as D
    from encodec_fast.train.trainer import TrainConfig, Trainer
    (tmp_path / "data").mkdir()
    for i in range(4):
        sf.write(str(tmp_path / "data" / f"v{i}.wav"), voice(24000, 2.0, seed=i).reshape(-1).numpy(), 24000)
    config = TrainConfig(data=[str(tmp_path / "data")], model="small", batch_size=4, segment_seconds=0.5,
                         workers=0, valid_items=0, steps=3, precision="fp32", device=DEVICE, seed=1,
                         valid_every=0, log_every=1)
    trainer = Trainer(config, tmp_path / "run", quiet=True)
    x = torch.stack([trainer.dataset[i][0] for i in range(4)]).pin_memory()
    trainer.draws = lambda step: (trainer.model.target_bandwidths[-1], True)
    for step in range(2):  # k-means initialisation, then the codebooks seen initialised
        trainer.train_step(step, [x])
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            assert trainer.train_step(2, [x]) is not None
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message)[:120] for w in seen if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs
    copy.deepcopy(trainer.model)  # mid-training (the EMA model's copy), counts held ahead on the GPU
    sampler = D.StepBatches(0, 1, 4, 1, 0, 1)
    batch, _ = next(iter(D.loader(trainer.dataset, sampler, 0, pin_memory=True)))
    assert batch.is_pinned()


@pytest.mark.parametrize("mode", ["exact", "bf16", "fp16"])
def test_encode_batch_one_call_and_cuda_graphs(mode):
    """Clips of different lengths in one call per op (length buckets, `RaggedRows`): each clip's codes
    against the clip encoded alone on the GPU; replayed from CUDA graphs, the same codes bit for bit,
    one capture per batch shape, none on a second pass."""
    import encodec_fast
    model = encodec_fast.EncodecModel.encodec_model_24khz_small().to(DEVICE).set_precision(mode)
    model.set_target_bandwidth(6.0)
    lengths = [1, 777, 24_000, 31_111, 47_000, 48_000, 50_001, 3 * 24_000 + 7]
    wavs = [voice_batch(24000, n / 24000, 1, seed=i)[0, :, :n].to(DEVICE) for i, n in enumerate(lengths)]
    budget = 4 * 48_000
    with torch.no_grad():
        alone = [model.encode(w[None])[0][0] for w in wavs]
        plain = model.encode_batch(wavs, max_batch_samples=budget)
        model.use_cuda_graphs()
        graphed = model.encode_batch(wavs, max_batch_samples=budget)
        captures = model._cuda_graphs.captures
        again = model.encode_batch(wavs, max_batch_samples=budget)
    assert captures >= 2 and model._cuda_graphs.captures == captures
    equal = total = 0
    for a, p, g, h in zip(alone, plain, graphed, again):
        assert torch.equal(p[0][0], g[0][0]) and torch.equal(g[0][0], h[0][0])
        assert a.shape == p[0][0].shape
        equal += int((a == p[0][0]).sum())
        total += a.numel()
    # the convolutions' and LSTM's algorithms may differ by batch shape on the GPU (not bit-exact)
    assert equal / total >= (0.99 if mode == "exact" else 0.9), equal / total


def _queued_without_a_sync(queue):
    """queue() with the device idle before it and torch's sync debug mode raising on any
    synchronisation inside it."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return queue()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("graphs", [False, True], ids=["ops", "graphs"])
@pytest.mark.parametrize("mode", ["exact", "fp16"])
def test_queued_batches_never_wait_for_the_gpu(mode, graphs):
    """`encode_batch_async` queues a ragged batch without one synchronisation (torch's sync debug
    mode set to error), once its shapes are warm (kernels compiled, graphs captured); in fp16 its
    overflow flags go through pinned memory. `result()` gives `encode_batch`'s codes."""
    import encodec_fast
    model = encodec_fast.EncodecModel.encodec_model_24khz_small().to(DEVICE).set_precision(mode)
    model.set_target_bandwidth(6.0)
    if graphs:
        model.use_cuda_graphs()
    lengths = (9_000, 24_000, 50_001)
    wavs = [voice_batch(24000, n / 24000, 1, seed=i)[0, :, :n].to(DEVICE) for i, n in enumerate(lengths)]
    budget = 2 * 48_000  # two calls
    with torch.no_grad():
        first = model.encode_batch(wavs, max_batch_samples=budget)
        got = _queued_without_a_sync(lambda: model.encode_batch_async(wavs, max_batch_samples=budget)).result()
    assert all(torch.equal(a[0][0], b[0][0]) for a, b in zip(first, got))


@pytest.mark.parametrize("mode", ["exact", "fp16"])
def test_queued_decode_batches_never_wait_for_the_gpu(mode):
    """`decode_batch_async` queues clips of codes (one decoded alone, the others stacked) without one
    synchronisation once warm; `result()` gives `decode_batch`'s audio. Codes out of range raise
    IndexError from `result()` instead of a device-side assert."""
    import encodec_fast
    model = encodec_fast.EncodecModel.encodec_model_24khz_small().to(DEVICE).set_precision(mode)
    gen = torch.Generator().manual_seed(4)
    frames = [[(torch.randint(0, 1024, (1, 8, n), generator=gen).to(DEVICE), None)] for n in (3, 75, 130, 211)]
    budget = 150 * model.hop_length
    with torch.no_grad():
        first = model.decode_batch(frames, max_batch_samples=budget)
        got = _queued_without_a_sync(lambda: model.decode_batch_async(frames, max_batch_samples=budget)).result()
        assert all(torch.equal(a, b) for a, b in zip(first, got))
        bad = frames[2][0][0].clone()
        bad[0, 3, 7] = 5000
        with pytest.raises(IndexError, match="clip 1: codes out of range"):
            model.decode_batch([frames[1], [(bad, None)]])
        torch.cuda.synchronize()  # the device is still usable


def test_fp16_overflow_redone_in_exact_on_the_gpu():
    """Audio far outside [-1, 1] overflows fp16 in the encoder: each path (one call, one call per op
    over a ragged batch, a CUDA graph replay) redoes that call in exact, with a warning, and gets
    exact's codes."""
    import encodec_fast
    model = encodec_fast.EncodecModel.encodec_model_24khz_small().to(DEVICE)
    model.set_target_bandwidth(6.0)
    wavs = [1e5 * voice_batch(24000, n / 24000, 1, seed=i)[0, :, :n].to(DEVICE) for i, n in enumerate((24_000, 31_111))]
    with torch.no_grad():
        exact = [model.encode(w[None])[0][0] for w in wavs]
        model.set_precision("fp16")
        with pytest.warns(RuntimeWarning, match="fp16 overflowed"):
            alone = [model.encode(w[None])[0][0] for w in wavs]
        with pytest.warns(RuntimeWarning, match="fp16 overflowed"):
            batched = model.encode_batch(wavs)
        model.use_cuda_graphs()
        with pytest.warns(RuntimeWarning, match="fp16 overflowed"):
            graphed = model.encode_batch(wavs)
        assert model._cuda_graphs.captures >= 1
    for e, a, b, g in zip(exact, alone, batched, graphed):
        assert torch.equal(a, e) and torch.equal(b[0][0], g[0][0])
        assert (b[0][0] == e).double().mean() >= 0.99  # one call per op: the GPU's shape-dependent roundings


@pytest.mark.parametrize("mode,tolerance", [("exact", 1e-4), ("bf16", 5e-2), ("fp16", 2e-2)])
def test_decode_batch_on_the_gpu(mode, tolerance):
    """Codes of clips of different lengths decoded together (bucketed, one call per op) against each
    clip decoded alone on the GPU."""
    import encodec_fast
    model = encodec_fast.EncodecModel.encodec_model_24khz_small().to(DEVICE).set_precision(mode)
    gen = torch.Generator().manual_seed(3)
    frames = [[(torch.randint(0, 1024, (1, 8, n), generator=gen).to(DEVICE), None)] for n in (3, 7, 75, 333, 750)]
    with torch.no_grad():
        got = model.decode_batch(frames)
        for f, b in zip(frames, got):
            a = model.decode(f)[0]
            assert a.shape == b.shape
            assert float((a - b).abs().max()) <= tolerance * float(a.abs().max())


def test_launch_log_puts_each_launchs_roofline_next_to_its_resources():
    """On a GPU the benchmarks' launch log records, per distinct launch, the compiled resources and
    the work model's calls, FLOP, bytes and floor (bench/launch_roofline.py), which the benchmarks
    print next to the measured time (`launch_floor_ms`)."""
    kernels.LaunchLog.install()
    books = kernels.make_books(8, 1024, 128, seed=5, device=DEVICE)
    x = kernels.make_latents(books, 4, 750, seed=5)
    norms = [b.pow(2).sum(-1)[None] for b in books]
    with ops.use_backend("triton"):
        launches = kernels.LaunchLog.of(lambda: rvq.rvq_encode(x, list(books), norms))
    assert len(launches) == 1 and launches[0]["registers"] > 0 and launches[0]["calls"] == 1, launches
    assert launches[0]["flop"] == 2 * 3000 * 1024 * 128 * 8
    floor = kernels.predicted_ms(launches, torch.cuda.get_device_name())
    name = torch.cuda.get_device_name()
    assert (floor is not None and floor > 0) == (("H100" in name and "PCIe" not in name) or "H200" in name)
