"""Fused convolution ops: the Triton kernels (interpreted on CPU without a GPU) against the
PyTorch references, over SEANet's layer shapes, padding rules, edge lengths and dtypes."""

import pytest
import torch

from encodec_fast import ops
from encodec_fast.ops import conv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Per dtype: tolerance relative to the output's largest magnitude. fp32 products are exact and
# only the summation order differs; half inputs are rounded before the product.
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(params=["direct", "gemm"])
def kernel(request, monkeypatch):
    """Both Triton kernel families of the 1-d convolutions: direct ([C_out, positions] tiles) and
    the implicit GEMM (positions as M, channels-last output)."""
    monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", request.param)
    return request.param


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def assert_close_rel(got, ref, dtype):
    assert got.shape == ref.shape and got.dtype == ref.dtype
    scale = float(ref.float().abs().max())
    err = float((got.float() - ref.float()).abs().max())
    assert err <= RTOL[dtype] * max(scale, 1e-6), f"max error {err:.3e} for scale {scale:.3e}"


def paddings(k, s, d, L, causal):
    import math
    p = (k - 1) * d - (s - 1)
    extra = math.ceil(L / s) * s - L
    return (p, extra) if causal else (p - p // 2, p // 2 + extra)


# (C_in, C_out, K, stride, dilation): every convolution kind in SEANet's encoder and decoder.
LAYERS = [
    (1, 32, 7, 1, 1),     # first conv, mono
    (2, 32, 7, 1, 1),     # first conv, stereo
    (32, 16, 3, 1, 1),    # residual block, dilated k=3 (dilation 1)
    (64, 32, 3, 1, 2),    # residual block, dilation 2
    (16, 32, 1, 1, 1),    # residual block k=1
    (32, 64, 4, 2, 1),    # down-sampling, stride 2
    (64, 128, 8, 4, 1),   # stride 4
    (128, 256, 10, 5, 1),  # stride 5
    (256, 512, 16, 8, 1),  # stride 8
    (32, 1, 7, 1, 1),     # last decoder conv, mono
    (512, 128, 7, 1, 1),  # bottleneck conv
]


@pytest.mark.parametrize("layer", LAYERS, ids=[f"{c[0]}to{c[1]}k{c[2]}s{c[3]}d{c[4]}" for c in LAYERS])
@pytest.mark.parametrize("causal", [True, False])
def test_conv1d_layers(layer, causal, kernel):
    C_in, C_out, K, s, d = layer
    L = 61 if s == 1 else 8 * s + 3  # not a multiple of the stride or of any block
    x = rand(2, C_in, L, seed=C_in + K)
    w = rand(C_out, C_in, K, seed=C_out) / (C_in * K) ** 0.5
    b = rand(C_out, seed=K)
    pads = paddings(K, s, d, L, causal)
    for elu in (False, True):
        ref = conv.conv1d_torch(x, w, b, s, d, pads, "reflect", elu)
        with ops.use_backend("triton"):
            got = conv.conv1d(x, w, b, s, d, pads, "reflect", elu)
        assert_close_rel(got, ref, torch.float32)


@pytest.mark.parametrize("L", [1, 2, 3, 4, 6, 7])
@pytest.mark.parametrize("pad_mode", ["reflect", "zero"])
def test_conv1d_inputs_shorter_than_the_padding(L, pad_mode, kernel):
    """Upstream's reflect rule for short inputs (zeros appended, reflected, removed) in the kernel."""
    x = rand(1, 16, L, seed=L)
    w = rand(16, 16, 7, seed=1) / 10
    for pads in [(3, 3), (6, 0), (4, 2), (1, 5)]:  # padded length >= the kernel's 7
        ref = conv.conv1d_torch(x, w, None, 1, 1, pads, pad_mode)
        with ops.use_backend("triton"):
            got = conv.conv1d(x, w, None, 1, 1, pads, pad_mode)
        assert_close_rel(got, ref, torch.float32)


def test_conv1d_residual_bias_free_and_strided_input(kernel):
    base = rand(3, 40, 32, seed=4)
    x = base.transpose(1, 2)  # [3, 32, 40], non-contiguous
    w = rand(32, 32, 1, seed=5) / 6
    res = rand(3, 40, 32, seed=6).transpose(1, 2)
    ref = conv.conv1d_torch(x, w, None, elu=True, residual=res)
    with ops.use_backend("triton"):
        got = conv.conv1d(x, w, None, elu=True, residual=res)
        with pytest.raises(ValueError, match="residual"):
            conv.conv1d(x, w, None, residual=res[:, :, :-1])
    assert_close_rel(got, ref, torch.float32)


@pytest.mark.parametrize("residual", [False, True])
def test_conv1d_elu_out_is_the_readers_elu(residual, kernel):
    """`elu_out`: the ELU of the result, in the kernel's epilogue, with the bits the next
    convolution's own ELU prologue would give it (fp32): the two placements give the same output."""
    x = rand(2, 32, 45, seed=11)
    w1, b1 = rand(48, 32, 3, seed=12) / 9, rand(48, seed=13)
    w2, b2 = rand(40, 48, 4, seed=14) / 13, rand(40, seed=15)
    res = rand(2, 48, 45, seed=16) if residual else None
    pads1, pads2 = paddings(3, 1, 2, 45, False), paddings(4, 2, 1, 45, True)
    ref = torch.nn.functional.elu(conv.conv1d_torch(x, w1, b1, 1, 2, pads1, "reflect", True, res))
    with ops.use_backend("torch"):
        assert torch.equal(conv.conv1d(x, w1, b1, 1, 2, pads1, "reflect", True, res, elu_out=True), ref)
    with ops.use_backend("triton"):
        h = conv.conv1d(x, w1, b1, 1, 2, pads1, "reflect", True, res, elu_out=True)
        y = conv.conv1d(h, w2, b2, 2, 1, pads2, "reflect", False)
        h_plain = conv.conv1d(x, w1, b1, 1, 2, pads1, "reflect", True, res)
        y_plain = conv.conv1d(h_plain, w2, b2, 2, 1, pads2, "reflect", True)
    assert_close_rel(h, ref, torch.float32)
    assert bool((h >= -1).all()) and bool((h_plain < 0).any())
    assert torch.equal(y, y_plain)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conv1d_half(dtype, kernel):
    x = rand(2, 32, 50, seed=7, dtype=dtype)
    w = rand(64, 32, 4, seed=8, dtype=dtype) / 11
    b = rand(64, seed=9, dtype=dtype)
    pads = paddings(4, 2, 1, 50, False)
    ref = conv.conv1d_torch(x.float(), w.float(), b.float(), 2, 1, pads, "reflect", True).to(dtype)
    with ops.use_backend("triton"):
        got = conv.conv1d(x, w, b, 2, 1, pads, "reflect", True)
    assert_close_rel(got, ref, dtype)


# (C_in, C_out, stride): the decoder's up-sampling layers (kernel = 2 * stride).
UPSAMPLE = [(64, 32, 2), (128, 64, 4), (40, 20, 5), (64, 32, 8), (16, 1, 3)]


@pytest.mark.parametrize("layer", UPSAMPLE, ids=[f"{c[0]}to{c[1]}s{c[2]}" for c in UPSAMPLE])
@pytest.mark.parametrize("trim", ["full", "noncausal", "causal", "causal_half"])
def test_conv_transpose1d(layer, trim, kernel):
    C_in, C_out, s = layer
    K = 2 * s
    L = 13
    x = rand(2, C_in, L, seed=s)
    w = rand(C_in, C_out, K, seed=C_out) / (C_in * 2) ** 0.5
    b = rand(C_out, seed=3)
    full = (L - 1) * s + K
    total = K - s
    start, length = {"full": (0, full), "noncausal": (total - total // 2, full - total),
                     "causal": (0, full - total), "causal_half": (total - (total + 1) // 2, full - total)}[trim]
    for elu in (False, True):
        ref = conv.conv_transpose1d_torch(x, w, b, s, start, length, elu)
        with ops.use_backend("triton"):
            got = conv.conv_transpose1d(x, w, b, s, start, length, elu)
        assert_close_rel(got, ref, torch.float32)


def test_gemm_reduction_over_taps_and_channel_blocks(monkeypatch):
    """The implicit-GEMM kernels run one loop over (tap, block of input channels), a tap's rows
    computed when the tap changes: more input channels than one block holds (the interpreter's
    blocks are up to 128), with strides, dilation, reflection, every transposed phase (taps that
    fall off the kernel included) and a 2-d kernel, against the references. A channels-first input
    reaches the kernels channels-last (`_rows`), with the same results."""
    from bench import launch_roofline as lr
    monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", "gemm")
    x = rand(2, 200, 29, seed=41)
    w = rand(24, 200, 5, seed=42) / 30
    b = rand(24, seed=43)
    pads = paddings(5, 2, 3, 29, False)
    ref = conv.conv1d_torch(x, w, b, 2, 3, pads, "reflect", True)
    calls = []
    with ops.use_backend("triton"), lr.recording(calls.append):
        got = conv.conv1d(x, w, b, 2, 3, pads, "reflect", True)
        got_last = conv.conv1d(x.transpose(1, 2).contiguous().transpose(1, 2), w, b, 2, 3, pads, "reflect", True)
    assert_close_rel(got, ref, torch.float32)
    assert torch.equal(got, got_last)
    assert [c.args["sx_c"] for c in calls if c.kernel == "_conv1d_gemm_kernel"] == [1, 1]
    for s in (3, 4):  # K = 7 over stride 3 and 4: phases with 3 and with 2 taps
        xt = rand(2, 160, 11, seed=44)
        wt = rand(160, 12, 7, seed=45) / 13
        ref = conv.conv_transpose1d_torch(xt, wt, None, s, 1, 10 * s + 5, True)
        with ops.use_backend("triton"):
            assert_close_rel(conv.conv_transpose1d(xt, wt, None, s, 1, 10 * s + 5, True), ref, torch.float32)
    x2 = rand(2, 136, 5, 13, seed=46)
    w2 = rand(8, 136, 3, 4, seed=47) / 40
    ref = conv.conv2d_leaky_relu_torch(x2, w2, None, (1, 2), (2, 1), (2, 1), 0.2)
    with ops.use_backend("triton"):
        assert_close_rel(conv.conv2d_leaky_relu(x2, w2, None, (1, 2), (2, 1), (2, 1), 0.2), ref, torch.float32)
    # The input gradient over output-channel blocks, width taps kw0 + n * kw_step: dilation 2 over
    # stride 2 reaches the odd columns with every tap and the even ones with none (zero gradient).
    x3 = rand(2, 6, 4, 15, seed=48)
    w3 = rand(136, 6, 3, 5, seed=49) / 12
    g3 = rand(2, 136, 4, 5, seed=50)
    grads = []
    for backend in ("torch", "triton"):
        xs = x3.clone().requires_grad_(True)
        with ops.use_backend(backend):
            conv.conv2d_leaky_relu(xs, w3, None, (1, 2), (1, 2), (1, 1), 0.2).backward(g3)
        grads.append(xs.grad)
    assert_close_rel(grads[1], grads[0], torch.float32)
    assert not grads[1][..., 0::2].any() and grads[1][..., 1::2].abs().min() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conv_transpose1d_half_and_single_frame(dtype, kernel):
    for L in (1, 9):
        x = rand(1, 32, L, seed=L, dtype=dtype)
        w = rand(32, 16, 8, seed=2, dtype=dtype) / 8
        ref = conv.conv_transpose1d_torch(x.float(), w.float(), None, 4, 2, (L - 1) * 4 + 4, True).to(dtype)
        with ops.use_backend("triton"):
            got = conv.conv_transpose1d(x, w, None, 4, 2, (L - 1) * 4 + 4, True)
        assert_close_rel(got, ref, dtype)


def test_conv_ops_validate_and_fall_back():
    x = rand(1, 8, 20)
    w = rand(4, 8, 3)
    with ops.use_backend("triton"):
        with pytest.raises(ValueError, match="does not fit"):
            conv.conv1d(x, rand(4, 5, 3), None)
        with pytest.raises(ValueError, match="cannot keep"):
            conv.conv_transpose1d(x, rand(8, 4, 4), None, 2, start=3, length=100)
        # Autograd through the input or weight: the reference runs (the kernels have no backward).
        xg = x.clone().requires_grad_(True)
        assert ops.conv_backend(xg, w) == "torch"
        y = conv.conv1d(xg, w, None, paddings=(1, 1))
        y.sum().backward()
        assert xg.grad is not None and xg.grad.shape == x.shape
        with torch.no_grad():
            assert ops.conv_backend(xg, w) == "triton"
        # A padding mode the kernel does not implement: the reference.
        ref = conv.conv1d_torch(x, w, None, paddings=(2, 2), pad_mode="replicate")
        assert torch.equal(conv.conv1d(x, w, None, paddings=(2, 2), pad_mode="replicate"), ref)


def test_arranged_weight_cache_follows_in_place_updates():
    x = rand(1, 8, 20)
    w = rand(4, 8, 3)
    with ops.use_backend("triton"):
        first = conv.conv1d(x, w, None, paddings=(1, 1))
        with torch.no_grad():
            w.mul_(2)
        second = conv.conv1d(x, w, None, paddings=(1, 1))
    assert_close_rel(second, 2 * first, torch.float32)


@pytest.mark.parametrize("name", ["24khz", "48khz"])
def test_models_with_triton_convolutions(name, request, kernel, monkeypatch):
    """Every convolution of both models through the kernels (ELU, padding, residual fused).

    Latents and audio stay within fp32 summation-order differences of the reference. Codes: the
    codes are exactly the quantizer's codes for the kernels' latents (ties excepted); against the
    reference's codes they differ where those 1e-6 differences move a latent across a boundary
    between codewords (any difference then runs through the later stages of that frame), which
    with these test codebooks is a few percent of codes."""
    from encodec_fast.ops import rvq
    from encodec_fast.testing import make_signal
    _, model = request.getfixturevalue(f"pair_{name[:2]}")
    model.set_target_bandwidth(6.0)
    sr = model.sample_rate
    x = torch.stack([make_signal(sr, sr // 5 + 77, model.channels, seed=s) for s in (3, 4)]).to(DEVICE)
    fused, fused_up, elu_out = [], [], []
    real, real_up, real_conv = ops.residual_block_down, ops.up_residual_block, ops.conv1d
    monkeypatch.setattr(ops, "residual_block_down", lambda x, *a: fused.append(x.shape[1]) or real(x, *a))
    monkeypatch.setattr(ops, "up_residual_block", lambda x, *a: fused_up.append(x.shape[1]) or real_up(x, *a))
    monkeypatch.setattr(ops, "conv1d", lambda x, w, *a, **k: (k.get("elu_out") and elu_out.append(w.shape[0]))
                        or real_conv(x, w, *a, **k))
    with torch.no_grad():
        frames_ref = model.encode(x)
        audio_ref = model.decode(frames_ref)
        with ops.use_backend("triton"):
            frames = model.encode(x)
            audio = model.decode(frames_ref)
            with ops.use_backend("torch"):
                emb_ref = model.encoder(x)
            emb = model.encoder(x)
    assert_close_rel(emb, emb_ref, torch.float32)
    assert_close_rel(audio, audio_ref, torch.float32)
    # the gemm family runs each block of up to 64 channels with the downsampling after it, and the
    # decoder's upsampling with the block after it (the 48 kHz model's time group norm keeps its
    # convolutions apart)
    assert sorted(set(fused)) == ([32, 64] if kernel == "gemm" and name == "24khz" else [])
    assert sorted(set(fused_up)) == ([64, 128] if kernel == "gemm" and name == "24khz" else [])
    # the blocks that run conv by conv apply the next layer's ELU in their convolutions' epilogues
    # (the 48 kHz model's norm comes after the convolution: its ELU runs after the norm)
    assert sorted(set(elu_out)) == ([] if name == "48khz" else [64, 128, 256] if kernel == "gemm" else
                                    [16, 32, 64, 128, 256])
    if model.segment_length is None:  # one frame: its codes come from `emb`
        codes = frames[0][0].transpose(0, 1)
        with torch.no_grad():
            own = model.quantizer.encode(emb, model.frame_rate, 6.0)
        books, _ = model.quantizer.vq.stacked_codebooks(codes.shape[0])
        result = rvq.code_agreement(emb, books, own, codes)
        assert result.non_ties == 0, result
    codes_ref = torch.cat([c for c, _ in frames_ref], -1)
    codes = torch.cat([c for c, _ in frames], -1)
    agree = float((codes == codes_ref).float().mean())
    assert agree >= 0.9, f"only {agree:.4f} of the codes agree"


# -- the discriminator's Conv2d + LeakyReLU ----------------------------------------------------------

# (C_in, C_out, kernel, stride, dilation): every Conv2d of an MS-STFT discriminator scale.
LAYERS_2D = [
    (2, 8, (3, 9), (1, 1), (1, 1)),    # first conv on [real, imag]
    (8, 8, (3, 9), (1, 2), (1, 1)),    # strided along frequency
    (8, 8, (3, 9), (1, 2), (2, 1)),    # dilated along time
    (8, 16, (3, 9), (1, 2), (4, 1)),
    (16, 8, (3, 3), (1, 1), (1, 1)),   # square conv
    (8, 1, (3, 3), (1, 1), (1, 1)),    # conv_post (no activation)
]


def pad2d(kernel, dilation):
    return ((kernel[0] - 1) * dilation[0]) // 2, ((kernel[1] - 1) * dilation[1]) // 2


@pytest.mark.parametrize("layer", LAYERS_2D, ids=[f"{c[0]}to{c[1]}k{c[2][1]}s{c[3][1]}d{c[4][0]}" for c in LAYERS_2D])
@pytest.mark.parametrize("slope", [0.2, None])
def test_conv2d_leaky_relu_layers(layer, slope, kernel):
    C_in, C_out, k, s, d = layer
    x = rand(2, C_in, 6, 37, seed=C_in + k[1])  # frames and bins: no multiple of any block
    w = rand(C_out, C_in, *k, seed=C_out) / (C_in * k[0] * k[1]) ** 0.5
    b = rand(C_out, seed=3)
    ref = conv.conv2d_leaky_relu_torch(x, w, b, s, d, pad2d(k, d), slope)
    with ops.use_backend("triton"):
        got = conv.conv2d_leaky_relu(x, w, b, s, d, pad2d(k, d), slope)
    assert_close_rel(got, ref, torch.float32)
    if slope is not None:
        assert (got < 0).any() and (got > 0).any()  # both sides of the activation are exercised


@pytest.mark.parametrize("shape", [(1, 2, 1, 1), (1, 2, 3, 5), (3, 8, 2, 9), (1, 8, 9, 2)])
def test_conv2d_edge_sizes_and_non_contiguous_input(shape, kernel):
    """Inputs smaller than the kernel (all taps but the centre fall in the zero padding), batch 1,
    and a transposed (non-contiguous) view as the spectrogram layout can give."""
    B, C_in, H, W = shape
    x = rand(B, C_in, W, H, seed=H * W).transpose(2, 3)
    assert not x.is_contiguous() or min(H, W) == 1
    w = rand(8, C_in, 3, 9, seed=1)
    for stride, dilation in (((1, 1), (1, 1)), ((1, 2), (4, 1))):
        padding = pad2d((3, 9), dilation)
        ref = conv.conv2d_leaky_relu_torch(x, w, None, stride, dilation, padding, 0.2)
        with ops.use_backend("triton"):
            got = conv.conv2d_leaky_relu(x, w, None, stride, dilation, padding, 0.2)
        assert_close_rel(got, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conv2d_half_dtypes(dtype, kernel):
    x = rand(2, 8, 5, 40, seed=4, dtype=dtype)
    w = rand(8, 8, 3, 9, seed=5, dtype=dtype) / 16
    b = rand(8, seed=6, dtype=dtype)
    ref = conv.conv2d_leaky_relu_torch(x.float(), w.float(), b.float(), (1, 2), (2, 1), (2, 4), 0.2).to(dtype)
    with ops.use_backend("triton"):
        got = conv.conv2d_leaky_relu(x, w, b, (1, 2), (2, 1), (2, 4), 0.2)
    assert_close_rel(got, ref, dtype)


@pytest.mark.parametrize("slope", [0.2, 0.0, None])
def test_conv2d_gradients_match_the_reference(slope, kernel):
    """The kernel's forward with its family's backward (direct: torch's convolution gradients;
    gemm: our implicit-GEMM input, weight and bias gradients): they equal the reference's (the
    activation's mask comes from the saved output, which has the pre-activation's sign for any
    slope >= 0)."""
    x = rand(2, 8, 5, 23, seed=7)
    w = rand(8, 8, 3, 9, seed=8) / 16
    b = rand(8, seed=9)
    grad_out = rand(2, 8, 5, 12, seed=10)
    grads = []
    for backend in ("torch", "triton"):
        xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
        with ops.use_backend(backend):
            y = conv.conv2d_leaky_relu(xs, ws, bs, (1, 2), (2, 1), (2, 4), slope)
        y.backward(grad_out)
        grads.append((y.detach(), xs.grad, ws.grad, bs.grad))
    for ref, got in zip(*grads):
        assert_close_rel(got, ref, torch.float32)


GRAD_CASES_2D = [  # (C_in, C_out, kernel, stride, dilation, padding, H, W)
    (2, 8, (3, 9), (1, 1), (1, 1), (1, 4), 5, 21),    # the first conv, two input channels
    (8, 8, (3, 9), (1, 2), (1, 1), (1, 4), 4, 23),    # strided along frequency, odd width
    (8, 8, (3, 9), (1, 2), (4, 1), (4, 4), 6, 16),    # dilated along time (taps outside the frames)
    (8, 1, (3, 3), (1, 1), (1, 1), (1, 1), 3, 7),     # conv_post: one output channel
    (5, 6, (2, 3), (2, 3), (1, 2), (0, 2), 7, 11),    # stride and dilation in both directions
    (3, 17, (1, 1), (1, 1), (1, 1), (0, 0), 2, 33),   # 1x1, channels no multiple of a block
    (4, 4, (3, 9), (1, 2), (1, 1), (1, 4), 1, 2),     # smaller than the kernel
]


@pytest.mark.parametrize("case", GRAD_CASES_2D, ids=[f"{c[0]}to{c[1]}k{c[2][0]}x{c[2][1]}s{c[3][0]}x{c[3][1]}"
                                                     f"d{c[4][0]}x{c[4][1]}" for c in GRAD_CASES_2D])
def test_conv2d_gemm_backward_shapes(case, monkeypatch):
    """The implicit-GEMM backward against torch's autograd over strides (every width phase),
    dilations, paddings, edge sizes and channel counts; a channels-last input and a broadcast
    (stride 0) output gradient; the weight gradient the same bits on a second run."""
    monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", "gemm")
    C_in, C_out, k, s, d, p, H, W = case
    x = rand(2, C_in, H, W, seed=H * W + C_in).contiguous(memory_format=torch.channels_last)
    w = rand(C_out, C_in, *k, seed=C_out) / (C_in * k[0] * k[1]) ** 0.5
    b = rand(C_out, seed=2)
    for slope in (0.2, None):
        out = []
        for backend in ("torch", "triton", "triton"):
            xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
            with ops.use_backend(backend):
                y = conv.conv2d_leaky_relu(xs, ws, bs, s, d, p, slope)
            (y * rand(*y.shape, seed=5)).sum().backward()
            y2 = conv.conv2d_leaky_relu(xs.detach(), ws.detach(), bs.detach(), s, d, p, slope)
            out.append((y.detach(), xs.grad, ws.grad, bs.grad))
            if backend == "torch":  # a broadcast gradient too: d(sum y) / d params
                xe, we, be = (t.clone().requires_grad_(True) for t in (x, w, b))
                with ops.use_backend("triton"):
                    conv.conv2d_leaky_relu(xe, we, be, s, d, p, slope).sum().backward()
                ref_sum = torch.autograd.grad(conv.conv2d_leaky_relu_torch(xs.detach().requires_grad_(True), ws, bs, s,
                                                                           d, p, slope).sum(), [ws, bs])
                assert_close_rel(we.grad, ref_sum[0], torch.float32)
                assert_close_rel(be.grad, ref_sum[1], torch.float32)
            assert y2.shape == y.shape
        for ref, got in zip(out[0], out[1]):
            assert_close_rel(got, ref, torch.float32)
        assert all(torch.equal(a, c) for a, c in zip(out[1], out[2]))  # deterministic


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_leaky_relu_grad_is_the_derivative_in_one_rounding(dtype):
    """The gemm backward's first pass: grad where the saved output is positive, grad * slope
    elsewhere (zero outputs included), computed in fp32 and rounded once to grad's dtype, stored in
    the output's layout (channels-last, frames-first); a gradient laid out otherwise (transposed,
    broadcast) gives the same values; shapes that differ are refused."""
    from encodec_fast.kernels import conv as kconv
    y = rand(2, 5, 7, 9, seed=31, dtype=dtype)
    y[0, 1] = 0
    g = rand(2, 5, 7, 9, seed=32, dtype=dtype) * 100
    want = torch.where(y.float() > 0, g.float(), g.float() * 0.2).to(dtype)
    for layout in (torch.contiguous_format, torch.channels_last):
        yl, gl = y.contiguous(memory_format=layout), g.contiguous(memory_format=layout)
        got = kconv.leaky_relu_grad(gl, yl, 0.2)
        assert got.dtype == dtype and got.stride() == yl.stride()
        assert torch.equal(got, want)
        assert torch.equal(kconv.leaky_relu_grad(g.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2), yl, 0.2),
                           want)
    frames_first = torch.empty(2, 9, 7, 5, dtype=dtype).permute(0, 3, 2, 1).copy_(y)
    assert torch.equal(kconv.leaky_relu_grad(g, frames_first, 0.2), want)
    one = torch.full((1, 1, 1, 1), 3.0, dtype=dtype).expand_as(y)  # d(sum y) / dy
    assert torch.equal(kconv.leaky_relu_grad(one, y, 0.2), torch.where(y > 0, 3.0, 3.0 * 0.2).to(dtype))
    with pytest.raises(ValueError, match="differ"):
        kconv.leaky_relu_grad(g[:, :, :3], y, 0.2)


@pytest.mark.parametrize("layout", ["bins_first", "frames_first"])
def test_conv2d_gemm_reads_the_stft_view_with_its_scale(layout, monkeypatch):
    """The fused front end's first conv: the input is a strided real view of a spectrogram,
    [B, 2, frames, bins] over memory laid out [B, frames, bins, 2] (torch.stft's) or [B, bins,
    frames, 2] (frames closer in memory: the kernels enumerate positions frames first), times a
    scale folded into the products; output, input gradient (laid out as the view: no copy back)
    and weight and bias gradients against torch on the scaled, contiguous input."""
    monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", "gemm")
    from encodec_fast.kernels import conv as kconv
    if layout == "frames_first":
        base = rand(2, 37, 9, 2, seed=21)                # [B, bins, frames, re/im]
        to_view = (0, 3, 2, 1)
    else:
        base = rand(2, 9, 37, 2, seed=21)                # [B, frames, bins, re/im]
        to_view = (0, 3, 1, 2)
    view = base.permute(*to_view)                        # [B, 2, frames, bins]
    assert kconv.frames_fastest(view) == (layout == "frames_first")
    w = rand(8, 2, 3, 9, seed=22) / 7
    b = rand(8, seed=23)
    scale = 0.0625
    g = rand(2, 8, 9, 37, seed=24)
    ref_in = [(view * scale).contiguous().requires_grad_(True), w.clone().requires_grad_(True),
              b.clone().requires_grad_(True)]
    y_ref = conv.conv2d_leaky_relu_torch(*ref_in, (1, 1), (1, 1), (1, 4), 0.2)
    y_ref.backward(g)
    ours = [base.clone().requires_grad_(True), w.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    with ops.use_backend("triton"):
        y = conv.conv2d_leaky_relu(ours[0].permute(*to_view), ours[1], ours[2], (1, 1), (1, 1), (1, 4), 0.2,
                                   input_scale=scale)
    y.backward(g)
    assert_close_rel(y.detach(), y_ref.detach(), torch.float32)
    assert ours[0].grad.is_contiguous()  # the gradient came back in the view's own memory order
    assert_close_rel(ours[0].grad.permute(*to_view), ref_in[0].grad * scale, torch.float32)
    assert_close_rel(ours[1].grad, ref_in[1].grad, torch.float32)
    assert_close_rel(ours[2].grad, ref_in[2].grad, torch.float32)
    with ops.use_backend("torch"):  # the reference path takes the scale too
        assert_close_rel(conv.conv2d_leaky_relu(view, w, b, (1, 1), (1, 1), (1, 4), 0.2, input_scale=scale),
                         y_ref.detach(), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conv2d_gemm_backward_half(dtype, monkeypatch):
    """Half inputs: the gemm backward's gradients within the dtype's tolerance of fp32 autograd on
    the same (rounded) values; gradients in the parameters' dtypes."""
    monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", "gemm")
    x = rand(2, 8, 5, 24, seed=11, dtype=dtype)
    w = rand(8, 8, 3, 9, seed=12, dtype=dtype) / 16
    b = rand(8, seed=13, dtype=dtype)
    g = rand(2, 8, 5, 12, seed=14, dtype=dtype)
    xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
    with ops.use_backend("triton"):
        y = conv.conv2d_leaky_relu(xs, ws, bs, (1, 2), (2, 1), (2, 4), 0.2)
    y.backward(g)
    xr, wr, br = (t.float().requires_grad_(True) for t in (x, w, b))
    yr = conv.conv2d_leaky_relu_torch(xr, wr, br, (1, 2), (2, 1), (2, 4), 0.2)
    yr.backward(g.float())
    assert xs.grad.dtype == ws.grad.dtype == bs.grad.dtype == dtype
    for got, ref in ((y, yr), (xs.grad, xr.grad), (ws.grad, wr.grad), (bs.grad, br.grad)):
        assert_close_rel(got.detach(), ref.detach().to(dtype), dtype)


def test_conv2d_dispatch_rules():
    x = rand(1, 8, 4, 20)
    w = rand(8, 8, 3, 3)
    assert conv.conv2d_backend(x, w) == "torch"  # auto: cuDNN (CPU here) until measured slower
    with ops.use_backend("auto"):
        assert conv.conv2d_backend(x, w) == "torch"
    with ops.use_backend("triton"):
        assert conv.conv2d_backend(x, w) == "triton"
        with pytest.raises(ValueError, match="does not fit"):
            conv.conv2d_leaky_relu(x, rand(8, 5, 3, 3), None)
        with pytest.raises(ValueError, match="bad stride"):
            conv.conv2d_leaky_relu(x, w, None, stride=(0, 1))
        # A negative slope flips the output's sign, so the kernel path does not take it.
        ref = conv.conv2d_leaky_relu_torch(x, w, None, (1, 1), (1, 1), (1, 1), -0.5)
        assert torch.equal(conv.conv2d_leaky_relu(x, w, None, padding=(1, 1), negative_slope=-0.5), ref)


def test_weight_cache_never_serves_a_freed_weight():
    """Temporary weights (e.g. weight norm recomputed every step) come and go, and the allocator
    hands a new one the old one's memory: the arrangement cache must not return the old values.
    Each step here builds a new tensor on the same memory (what the allocator does when it
    reuses a block), at the same version count, with new values."""
    x = rand(1, 8, 4, 20)
    memory = torch.empty(8 * 8 * 3 * 3, device=DEVICE).untyped_storage()
    with ops.use_backend("triton"):
        for step in range(4):
            w = torch.empty(0, device=DEVICE).set_(memory, 0, (8, 8, 3, 3))
            with torch.no_grad():
                w.copy_(rand(8, 8, 3, 3, seed=100 + step))
            ref = conv.conv2d_leaky_relu_torch(x, w, None, (1, 1), (1, 1), (1, 1), 0.2)
            assert_close_rel(conv.conv2d_leaky_relu(x, w, None, padding=(1, 1)), ref, torch.float32)
            del w


def test_gemm_kernels_write_channels_last_and_read_any_layout(monkeypatch):
    """The implicit-GEMM kernels store [B, C, T] as [B, T, C] (the layout the next one reads fastest)
    and give the same values from a channels-first or a channels-last input."""
    monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", "gemm")
    x = rand(2, 32, 45, seed=11)
    w = rand(64, 32, 4, seed=12) / 11
    pads = paddings(4, 2, 1, 45, True)
    ref = conv.conv1d_torch(x, w, None, 2, 1, pads, "reflect", True)
    with ops.use_backend("triton"):
        first = conv.conv1d(x, w, None, 2, 1, pads, "reflect", True)
        again = conv.conv1d(x.transpose(1, 2).contiguous().transpose(1, 2), w, None, 2, 1, pads, "reflect", True)
        up = conv.conv_transpose1d(first, rand(64, 16, 8, seed=13) / 8, None, 4, 2, 40, True)
    assert first.stride(1) == 1 and up.stride(1) == 1
    assert torch.equal(first, again)
    assert_close_rel(first, ref, torch.float32)
    assert_close_rel(up, conv.conv_transpose1d_torch(ref, rand(64, 16, 8, seed=13) / 8, None, 4, 2, 40, True),
                     torch.float32)


# (C, H, K, dilation): SEANet's residual blocks (dim, dim / 2, kernel 3) at each level, a dilated one,
# and odd sizes that fill no tile.
BLOCKS = [(32, 16, 3, 1), (64, 32, 3, 1), (64, 32, 3, 2), (20, 10, 3, 1), (4, 2, 5, 1), (48, 24, 3, 1)]


@pytest.mark.parametrize("block", BLOCKS, ids=[f"C{b[0]}H{b[1]}k{b[2]}d{b[3]}" for b in BLOCKS])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_residual_block(block, causal, monkeypatch):
    """A whole residual block in one kernel (gemm family) against ELU -> conv -> ELU -> conv + x,
    over lengths shorter than the receptive field, tile edges, and both input layouts."""
    monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", "gemm")
    C, H, K, d = block
    w1 = rand(H, C, K, seed=C) / (C * K) ** 0.5
    b1 = rand(H, seed=H)
    w2 = rand(C, H, 1, seed=K) / H ** 0.5
    b2 = rand(C, seed=d)
    ws, bs = rand(C, C, 1, seed=C + 1) / C ** 0.5, rand(C, seed=C + 2)  # upstream's true_skip=False
    for L in (1, 2, 5, 61):
        x = rand(2, C, L, seed=L + C)
        p = (K - 1) * d
        pads = (p, 0) if causal else (p - p // 2, p // 2)
        for pad_mode, skip in (("reflect", None), ("zero", None), ("reflect", (ws, bs))):
            ref = conv.residual_block_torch(x, w1, b1, w2, b2, d, pads, pad_mode, *(skip or ()))
            with ops.use_backend("triton"):
                assert ops.block_backend(x, w1, w2) == "triton"
                got = conv.residual_block(x, w1, b1, w2, b2, d, pads, pad_mode, *(skip or ()))
                cl = conv.residual_block(x.transpose(1, 2).contiguous().transpose(1, 2), w1, None, w2, None, d, pads,
                                         pad_mode, *((ws, None) if skip else ()))
            assert got.stride(1) == 1
            assert_close_rel(got, ref, torch.float32)
            assert_close_rel(cl, conv.residual_block_torch(x, w1, None, w2, None, d, pads, pad_mode,
                                                           *((ws, None) if skip else ())), torch.float32)


def test_fused_residual_block_half_rules_and_fallbacks(monkeypatch):
    monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", "gemm")
    x = rand(2, 32, 70, seed=1, dtype=torch.float16)
    w1 = rand(16, 32, 3, seed=2, dtype=torch.float16) / 10
    w2 = rand(32, 16, 1, seed=3, dtype=torch.float16) / 4
    ref = conv.residual_block_torch(x.float(), w1.float(), None, w2.float(), None, 1, (2, 0)).half()
    with ops.use_backend("triton"):
        got = conv.residual_block(x, w1, None, w2, None, 1, (2, 0))
        with pytest.raises(ValueError, match="keep the length"):
            conv.residual_block(x, w1, None, w2, None, 1, (1, 0))
        with pytest.raises(ValueError, match="does not fit"):
            conv.residual_block(x, w1, None, w2[:16], None, 1, (2, 0))
        big = rand(1, 128, 9, seed=4)
        assert ops.block_backend(big, rand(64, 128, 3), rand(128, 64, 1)) == "torch"  # over 64 channels
        monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", "direct")
        assert ops.block_backend(x, w1, w2) == "torch"  # the direct family has no fused block
    assert_close_rel(got, ref, torch.float16)
    assert ops.block_backend(x, w1, w2) == "torch"  # CPU tensors in auto mode


# (C, C_out, stride): SEANet's encoder stages the fused block + downsampling takes (kernel 2 x stride),
# an odd size that fills no tile, and the largest stride.
BLOCK_DOWNS = [(32, 64, 2), (64, 128, 4), (20, 40, 5), (8, 16, 8)]


def _block_down_weights(C, C_out, stride, seed):
    H = C // 2
    return dict(w1=rand(H, C, 3, seed=seed) / (3 * C) ** 0.5, b1=rand(H, seed=seed + 1),
                w2=rand(C, H, 1, seed=seed + 2) / H ** 0.5, b2=rand(C, seed=seed + 3),
                ws=rand(C, C, 1, seed=seed + 4) / C ** 0.5, bs=rand(C, seed=seed + 5),
                wd=rand(C_out, C, 2 * stride, seed=seed + 6) / (2 * stride * C) ** 0.5, bd=rand(C_out, seed=seed + 7))


@pytest.mark.parametrize("stage", BLOCK_DOWNS, ids=[f"C{c}to{o}s{s}" for c, o, s in BLOCK_DOWNS])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_block_and_downsampling(stage, causal, monkeypatch):
    """A residual block and the strided convolution after it in one kernel (gemm family) against
    the block, ELU, padding and convolution apart, over lengths shorter than the receptive field
    and than the stride, tile edges, both paddings of each part, with and without biases and the
    conv shortcut, and both input layouts."""
    monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", "gemm")
    C, C_out, s = stage
    w = _block_down_weights(C, C_out, s, seed=C + s)
    pads = (2, 0) if causal else (1, 1)
    for L in (1, s + 1, 61):
        x = rand(2, C, L, seed=L + C)
        pads_d = paddings(2 * s, s, 1, L, causal)
        for pad_mode, pad_mode_d, skip, biases in (("reflect", "reflect", False, True), ("zero", "zero", False, True),
                                                   ("reflect", "zero", True, True), ("zero", "reflect", True, False)):
            args = (w["w1"], w["b1"] if biases else None, w["w2"], w["b2"] if biases else None, 1, pads, pad_mode,
                    w["ws"] if skip else None, w["bs"] if skip and biases else None, w["wd"],
                    w["bd"] if biases else None, s, pads_d, pad_mode_d)
            ref = conv.residual_block_down_torch(x, *args)
            with ops.use_backend("triton"):
                assert ops.block_down_backend(x, w["w1"], w["w2"], w["wd"], s) == "triton"
                got = conv.residual_block_down(x, *args)
                if skip and biases:
                    cl = conv.residual_block_down(x.transpose(1, 2).contiguous().transpose(1, 2), *args)
                    assert torch.equal(cl, got)
            assert got.shape == (2, C_out, -(-L // s)) and got.stride(1) == 1
            assert_close_rel(got, ref, torch.float32)


def _assert_half_matches(op, reference, x, args):
    """op on fp16 inputs (x and every tensor of args) within fp16's tolerance of the fp32 reference
    on the same rounded values; returns op's output."""
    half = [a.half() if isinstance(a, torch.Tensor) else a for a in args]
    got = op(x.half(), *half)
    assert_close_rel(got, reference(x.half().float(), *[a.float() if isinstance(a, torch.Tensor) else a
                                                         for a in half]).half(), torch.float16)
    return got


def test_fused_block_and_downsampling_half_rules_and_fallbacks(monkeypatch):
    """fp16 within fp16's tolerance of fp32 on the same values; bad arguments refused; what the
    kernel does not take (over 128 outputs, the direct family, CPU tensors in auto, a padding mode
    of its own) runs the parts apart with the same result."""
    monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", "gemm")
    w = _block_down_weights(32, 64, 2, seed=5)
    x = rand(2, 32, 70, seed=1)
    args = (w["w1"], w["b1"], w["w2"], w["b2"], 1, (2, 0), "reflect", None, None, w["wd"], w["bd"], 2, (2, 0), "zero")
    ref = conv.residual_block_down_torch(x, *args)
    with ops.use_backend("triton"):
        _assert_half_matches(conv.residual_block_down, conv.residual_block_down_torch, x, args)
        with pytest.raises(ValueError, match="keep the length"):
            conv.residual_block_down(x, *args[:5], (1, 0), *args[6:])
        with pytest.raises(ValueError, match="downsampling weight"):
            conv.residual_block_down(x, *args[:9], w["wd"][:, :16], *args[10:])
        with pytest.raises(ValueError, match="negative padding"):
            conv.residual_block_down(x, *args[:12], (-1, 0), "zero")
        wide = rand(256, 32, 4, seed=9)
        assert ops.block_down_backend(x, w["w1"], w["w2"], wide, 2) == "torch"  # over 128 outputs
        apart = conv.residual_block_down(x, *args[:9], wide, None, 2, (2, 0), "zero")
        assert_close_rel(apart, conv.residual_block_down_torch(x, *args[:9], wide, None, 2, (2, 0), "zero"),
                         torch.float32)
        assert_close_rel(conv.residual_block_down(x, *args[:13], "replicate"),
                         conv.residual_block_down_torch(x, *args[:13], "replicate"), torch.float32)
        monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", "direct")
        assert ops.block_down_backend(x, w["w1"], w["w2"], w["wd"], 2) == "torch"
    assert ops.block_down_backend(x, w["w1"], w["w2"], w["wd"], 2) == "torch"  # CPU tensors in auto mode
    assert torch.equal(conv.residual_block_down(x, *args), ref)


# (C_in, C, stride): SEANet's decoder levels the fused upsampling + block takes (kernel 2 x stride), an
# odd size that fills no tile, and the largest stride.
UP_BLOCKS = [(64, 32, 2), (128, 64, 4), (40, 20, 5), (16, 8, 8)]


@pytest.mark.parametrize("level", UP_BLOCKS, ids=[f"C{i}to{c}s{s}" for i, c, s in UP_BLOCKS])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_upsampling_and_block(level, causal, monkeypatch):
    """A transposed convolution (ELU first, trimmed as SConvTranspose1d trims) and the residual block
    after it in one kernel (gemm family) against the two apart, over inputs of one frame and more,
    both block paddings (reflect mirrors the first rows: several phases in one tile), with and
    without biases and the conv shortcut, and both input layouts."""
    monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", "gemm")
    C_in, C, s = level
    K_U = 2 * s
    w = _block_down_weights(C, 2 * C, s, seed=C_in + s)
    wu, bu = rand(C_in, C, K_U, seed=C_in) / (2 * C_in) ** 0.5, rand(C, seed=C_in + 1)
    total = K_U - s
    start = 0 if causal else total - total // 2
    pads = (2, 0) if causal else (1, 1)
    for L in (1, 3, 37):
        x = rand(2, C_in, L, seed=L + C_in)
        length = (L - 1) * s + K_U - total
        for pad_mode, skip, biases in (("reflect", False, True), ("zero", True, True), ("reflect", True, False)):
            args = (wu, bu if biases else None, s, start, length, True, w["w1"], w["b1"] if biases else None,
                    w["w2"], w["b2"] if biases else None, 1, pads, pad_mode, w["ws"] if skip else None,
                    w["bs"] if skip and biases else None)
            ref = conv.up_residual_block_torch(x, *args)
            with ops.use_backend("triton"):
                assert ops.up_block_backend(x, wu, w["w1"], w["w2"], s) == "triton"
                got = conv.up_residual_block(x, *args)
                if skip and biases:
                    cl = conv.up_residual_block(x.transpose(1, 2).contiguous().transpose(1, 2), *args)
                    assert torch.equal(cl, got)
            assert got.shape == (2, C, length) and got.stride(1) == 1
            assert_close_rel(got, ref, torch.float32)


def test_fused_upsampling_and_block_half_rules_and_fallbacks(monkeypatch):
    monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", "gemm")
    w = _block_down_weights(32, 64, 2, seed=5)
    x = rand(2, 64, 35, seed=1)
    wu = rand(64, 32, 4, seed=2) / 11
    args = (wu, None, 2, 0, 70, True, w["w1"], w["b1"], w["w2"], w["b2"], 1, (2, 0), "reflect", None, None)
    ref = conv.up_residual_block_torch(x, *args)
    with ops.use_backend("triton"):
        got = _assert_half_matches(conv.up_residual_block, conv.up_residual_block_torch, x, args)
        with pytest.raises(ValueError, match="does not fit weight"):
            conv.up_residual_block(x[:, :16], *args)
        with pytest.raises(ValueError, match="cannot keep"):
            conv.up_residual_block(x, *args[:3], 2, 71, *args[5:])
        with pytest.raises(ValueError, match="keep the length"):
            conv.up_residual_block(x, *args[:11], (1, 0), *args[12:])
        wide = rand(256, 32, 4, seed=9)
        assert ops.up_block_backend(wide[:, :, :1], wide, w["w1"], w["w2"], 2) == "torch"  # over 128 inputs
        monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", "direct")
        assert ops.up_block_backend(x, wu, w["w1"], w["w2"], 2) == "torch"
    assert ops.up_block_backend(x, wu, w["w1"], w["w2"], 2) == "torch"  # CPU tensors in auto mode
    assert_close_rel(got, ref.half(), torch.float16)
    assert torch.equal(conv.up_residual_block(x, *args), ref)
