"""pytest-benchmark timings of the ops' PyTorch reference paths on CPU (what runs without a GPU).

    python -m pytest bench/test_ops_reference_cpu.py --benchmark-only [--benchmark-json out.json]

Shapes: one second of the 24 kHz model's activations at batch 4 (RVQ on 300 frames), the
discriminator front end at batch 4 x 1 s. Not part of `tests/` (nothing is asserted about speed).
"""

import pytest
import torch

from encodec_fast import ops
from encodec_fast.ops import conv, rvq, stft

torch.manual_seed(0)
B = 4


@pytest.fixture(autouse=True)
def torch_backend():
    with ops.use_backend("torch"), torch.no_grad():
        yield


@pytest.mark.parametrize("n_q", [8, 32])
def test_rvq_encode(benchmark, n_q):
    books = torch.randn(n_q, 1024, 128)
    norms = [b.pow(2).sum(-1)[None] for b in books]
    x = torch.randn(B, 128, 75)
    benchmark(rvq.rvq_encode, x, list(books), norms)


def test_rvq_decode(benchmark):
    books = torch.randn(32, 1024, 128)
    codes = torch.randint(0, 1024, (32, B, 75))
    benchmark(rvq.rvq_decode, codes, list(books))


def test_vq_assign_with_stats(benchmark):
    embed = torch.randn(1024, 128)
    x = torch.randn(B * 75, 128)
    benchmark(rvq.vq_assign_torch, x, embed, embed.pow(2).sum(-1), True)


@pytest.mark.parametrize("C_in,C_out,K,stride,L", [(1, 32, 7, 1, 24000), (32, 16, 3, 1, 24000),
                                                   (32, 64, 4, 2, 24000), (256, 512, 16, 8, 600)])
def test_conv1d_elu_pad(benchmark, C_in, C_out, K, stride, L):
    x = torch.randn(B, C_in, L)
    w = torch.randn(C_out, C_in, K) / (C_in * K) ** 0.5
    p = K - stride
    benchmark(conv.conv1d_torch, x, w, None, stride, 1, (p - p // 2, p // 2), "reflect", True)


@pytest.mark.parametrize("C_in,C_out,stride,L", [(512, 256, 8, 75), (64, 32, 2, 12000)])
def test_conv_transpose1d_elu_trim(benchmark, C_in, C_out, stride, L):
    x = torch.randn(B, C_in, L)
    w = torch.randn(C_in, C_out, 2 * stride) / C_in ** 0.5
    benchmark(conv.conv_transpose1d_torch, x, w, None, stride, stride - stride // 2, (L - 1) * stride + stride, True)


@pytest.mark.parametrize("n_fft,hop", [(1024, 256), (2048, 512), (512, 128)])
def test_spectrogram(benchmark, n_fft, hop):
    x = torch.randn(B, 1, 24000)
    window = torch.hann_window(n_fft)
    benchmark(stft.spectrogram_torch, x, window, n_fft, hop, n_fft, True)
