"""bench/launch_roofline.py: the work model of each Triton launch, read from the launch's own
arguments (kernels run in Triton's interpreter on CPU), against torch's FlopCounterMode on the PyTorch
references of the same calls, brute-force counts and the tensors' sizes."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import launch_roofline as lr
from bench.peaks import PEAKS
from encodec_fast import ops
from encodec_fast.ops import conv
from encodec_fast.ops import rvq as orvq


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def torch_flop(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def launched(fn):
    calls = []
    with lr.recording(calls.append), ops.use_backend("triton"), torch.no_grad():
        out = fn()
    return calls, out


@pytest.fixture(params=["direct", "gemm"])
def family(request, monkeypatch):
    monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", request.param)
    return request.param


@pytest.mark.parametrize("shape", [(2, 8, 16, 3, 1, 1, 37), (3, 16, 8, 4, 2, 1, 50), (1, 4, 24, 3, 1, 2, 5)],
                         ids=["k3", "s2", "short"])
def test_conv1d_flop_and_bytes(shape, family):
    B, C_in, C_out, K, stride, dilation, L = shape
    x, w, b = rand(B, C_in, L, seed=1), rand(C_out, C_in, K, seed=2), rand(C_out, seed=3)
    pads = ((K - 1) * dilation, 0)
    calls, out = launched(lambda: conv.conv1d(x, w, b, stride, dilation, pads, "zero", True, None))
    assert [c.kernel for c in calls] == [f"_conv1d{'_gemm' if family == 'gemm' else ''}_kernel"]
    work = calls[0].work()
    assert work.flop == torch_flop(lambda: conv.conv1d_torch(x, w, b, stride, dilation, pads, "zero", True))
    # x, the packed weight, the bias and the output once each: no residual, its stand-in (the output) not twice
    assert work.bytes == 4 * (x.numel() + w.numel() + b.numel() + out.numel())
    assert (work.peak, work.passes) == ("fp32", 1)  # exact fp32 products: CUDA cores


@pytest.mark.parametrize("L,stride,K,start,length", [(5, 2, 4, 0, None), (9, 4, 8, 2, 30), (1, 5, 10, 3, 5)])
def test_conv_transpose1d_counts_the_kept_taps(L, stride, K, start, length, family):
    x, w = rand(2, 6, L, seed=4), rand(6, 10, K, seed=5)
    full = (L - 1) * stride + K
    length = full - start if length is None else length
    calls, out = launched(lambda: conv.conv_transpose1d(x, w, None, stride, start, length))
    assert out.shape[-1] == length
    brute = sum(1 for j in range(L) for k in range(K) if start <= j * stride + k < start + length)
    assert lr.transposed_taps(L, K, stride, start, length) == brute
    assert calls[0].work().flop == 2 * 2 * 6 * 10 * brute
    if start == 0 and length == full:  # nothing cropped: torch's count of the whole transposed convolution
        assert calls[0].work().flop == torch_flop(lambda: conv.conv_transpose1d_torch(x, w, None, stride))


def test_fused_blocks_count_every_convolution_they_fuse(monkeypatch):
    monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", "gemm")
    C, H, C_out, s = 16, 8, 32, 2
    w1, w2, ws = rand(H, C, 3, seed=6) / 8, rand(C, H, 1, seed=7) / 4, rand(C, C, 1, seed=8) / 4
    wd = rand(C_out, C, 2 * s, seed=9) / 8
    x = rand(2, C, 41, seed=10)
    for skip in (None, ws):
        args = (w1, None, w2, None, 1, (2, 0), "reflect", skip, None)
        calls, _ = launched(lambda: conv.residual_block(x, *args))
        assert [c.kernel for c in calls] == ["_residual_block_kernel"]
        assert calls[0].work().flop == torch_flop(lambda: conv.residual_block_torch(x, *args))
        down = args + (wd, None, s, (2 * s - s, 1), "zero")
        calls, _ = launched(lambda: conv.residual_block_down(x, *down))
        assert [c.kernel for c in calls] == ["_block_down_kernel"]
        assert calls[0].work().flop == torch_flop(lambda: conv.residual_block_down_torch(x, *down))
    # the decoder's upsampling + block, cropped as SConvTranspose1d crops: the block's convolutions as
    # torch counts them, the transposed convolution's kept taps
    wu = rand(2 * C, C, 2 * s, seed=11) / 8
    xu = rand(2, 2 * C, 7, seed=12)
    length = 6 * s + 2 * s - s
    up = (wu, None, s, 0, length, True, w1, None, w2, None, 1, (2, 0), "zero", ws, None)
    calls, _ = launched(lambda: conv.up_residual_block(xu, *up))
    assert [c.kernel for c in calls] == ["_up_block_kernel"]
    y = conv.conv_transpose1d_torch(xu, wu, None, s, 0, length, True)
    block = torch_flop(lambda: conv.residual_block_torch(y, w1, None, w2, None, 1, (2, 0), "zero", ws, None))
    assert calls[0].work().flop == block + 2 * 2 * 2 * C * C * lr.transposed_taps(7, 2 * s, s, 0, length)


def test_conv2d_forward_and_both_gradients(monkeypatch):
    monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", "gemm")
    x = rand(2, 3, 9, 12, seed=13).requires_grad_()
    w, b = rand(5, 3, 3, 4, seed=14).requires_grad_(), rand(5, seed=15).requires_grad_()
    args = ((1, 2), (2, 1), (2, 1), 0.2)
    expected = torch_flop(lambda: conv.conv2d_leaky_relu_torch(x.detach(), w.detach(), b.detach(), *args))
    calls = []
    with lr.recording(calls.append), ops.use_backend("triton"):
        y = conv.conv2d_leaky_relu(x, w, b, *args)
        y.backward(torch.ones_like(y))
    flop = {c.kernel: c.work().flop for c in calls}
    assert flop == {"_conv2d_gemm_kernel": expected, "_leaky_relu_grad_kernel": y.numel(),
                    "_conv2d_input_grad_gemm_kernel": expected, "_conv2d_weight_grad_gemm_kernel": expected}


@pytest.mark.parametrize("precision", ["ieee", "exact"])
def test_rvq_encode_counts_the_stages_it_runs(precision):
    from encodec_fast.kernels import rvq as krvq
    Q, K, D, n_q = 4, 64, 16, 2
    books = rand(Q, K, D, seed=16)
    norms = books.pow(2).sum(-1)
    x = rand(3, D, 11, seed=17)
    calls, codes = launched(lambda: krvq.rvq_encode(x, books, norms, n_q, precision, "bf16x3"))
    work = calls[0].work()
    ref_flop = torch_flop(lambda: orvq.rvq_encode_torch(x.transpose(1, 2).reshape(-1, D).clone(),
                                                       list(books[:n_q]), list(norms[:n_q, None])))
    assert work.flop == ref_flop == 2 * 33 * K * D * n_q
    # the stages run: half the codebooks and their norms; x and the codes [n_q, N] whole
    stats = calls[0].args["stats_ptr"]
    assert work.bytes == 4 * x.numel() + 4 * (K * D + K) * n_q + 8 * codes.numel() + 4 * stats.numel()
    # the interpreter runs 'ieee' whatever was asked: the model reads the launch's own PRECISION
    assert calls[0].args["PRECISION"] == "ieee"
    assert (work.peak, work.passes) == ("fp32", 1)


def test_products_precision():
    """On a GPU the certified search's PRECISION is its low precision: three bf16 passes by default."""
    assert lr.dot_passes({"PRECISION": "bf16x3"}) == (3, "bf16")
    assert lr.dot_passes({"PRECISION": "tf32x3"}) == (3, "tf32")
    assert lr.dot_passes({"PRECISION": "ieee", "HALF_DOT": True}) == (1, "bf16")  # fp16 and bf16 operands
    assert lr.dot_passes({}) == (1, "fp32")


def test_roofline_is_the_slower_of_compute_and_memory():
    compute = lr.Work(flop=2e12, bytes=1e6, peak="bf16", passes=3).roofline()
    assert compute["bound"] == "compute"
    assert compute["predicted_ms_h100"] == pytest.approx(1e3 * 3 * 2e12 / (PEAKS["H100"]["bf16"] * 1e12))
    memory = lr.Work(flop=1e6, bytes=4.8e9, peak="fp32", passes=1).roofline()
    assert memory["bound"] == "memory"
    assert memory["predicted_ms_h200"] == pytest.approx(1.0)  # 4.8 GB at 4.8 TB/s
    assert memory["predicted_ms_h100"] > memory["predicted_ms_h200"]


def test_every_kernel_has_a_model():
    """A kernel added without a work model would leave its launches out of the compile check's roofline."""
    import inspect

    from encodec_fast.kernels import conv as kconv
    from encodec_fast.kernels import rvq as krvq
    from encodec_fast.kernels import stft as kstft
    kernels = {name for module in (kconv, krvq, kstft) for name, obj in inspect.getmembers(module)
               if name.endswith("_kernel") and hasattr(obj, "arg_names")}
    assert kernels and kernels == set(lr.modelled())
    assert lr.work("_no_such_kernel", {}) is None


def test_accumulated_launches_and_the_floor_on_the_gpu_that_ran_them():
    from bench.benchmarks.kernels import predicted_ms
    work = lr.Work(flop=1e9, bytes=1e6, peak="fp32", passes=1)
    entry = lr.accumulate(lr.accumulate({"kernel": "k"}, work), work)
    assert (entry["calls"], entry["flop"], entry["bytes"]) == (2, 2e9, 2e6)
    assert entry["predicted_ms_h100"] == pytest.approx(2 * work.roofline()["predicted_ms_h100"])
    assert predicted_ms([entry, entry], "NVIDIA H200") == pytest.approx(2 * entry["predicted_ms_h200"])
    assert predicted_ms([entry], "NVIDIA H100 80GB HBM3") == entry["predicted_ms_h100"]
    assert predicted_ms([entry], "NVIDIA A100-SXM4-80GB") is None  # no floor for a GPU not predicted
    assert predicted_ms([entry, {"kernel": "unmodelled"}], "NVIDIA H100") is None  # a part is not a floor
    assert predicted_ms([], "NVIDIA H100") is None
