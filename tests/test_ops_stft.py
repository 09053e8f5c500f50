"""The discriminator's spectrogram front end: the Triton layout-and-scale kernel (forward and
backward) against torchaudio's spectrogram, and the discriminator on either backend."""

import pytest
import torch

from encodec_fast import ops
from encodec_fast.ops import stft
from encodec_fast.train import MultiScaleSTFTDiscriminator

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("B,C,T,n_fft,hop,win,normalized", [
    (1, 1, 1024, 1024, 256, 1024, True),   # exactly one frame
    (2, 1, 5000, 512, 128, 512, True),
    (2, 2, 7001, 2048, 512, 2048, True),   # stereo
    (3, 1, 3000, 256, 100, 200, False),    # window shorter than n_fft, not normalised
])
def test_spectrogram_forward_and_backward(B, C, T, n_fft, hop, win, normalized):
    g = torch.Generator().manual_seed(T)
    x = torch.randn(B, C, T, generator=g).to(DEVICE)
    window = torch.hann_window(win).to(DEVICE)
    outs = []
    for backend in ("torch", "triton"):
        xin = x.clone().requires_grad_(True)
        with ops.use_backend(backend):
            z = stft.spectrogram(xin, window, n_fft, hop, win, normalized)
        weight = torch.linspace(-1, 1, z.numel(), device=DEVICE).view_as(z)
        (z * weight).sum().backward()
        outs.append((z.detach(), xin.grad))
    (ref, ref_grad), (got, got_grad) = outs
    assert got.shape == ref.shape == (B, 2 * C, (T - n_fft) // hop + 1, n_fft // 2 + 1)
    assert got.is_contiguous()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-5, atol=1e-6 * float(ref_grad.abs().max()))


def test_discriminator_on_the_triton_backend():
    """Spectrogram kernel + fused Conv2d + LeakyReLU kernels: logits, feature maps and the
    gradients of a training loss (input and every parameter, weight norm included) match the
    torch backend."""
    torch.manual_seed(0)
    disc = MultiScaleSTFTDiscriminator(filters=8).to(DEVICE)
    x = torch.randn(2, 1, 6000, device=DEVICE)
    results = []
    for backend in ("torch", "triton"):
        disc.zero_grad()
        xin = x.clone().requires_grad_(True)
        with ops.use_backend(backend):
            logits, fmaps = disc(xin)
        loss = sum(lg.pow(2).mean() for lg in logits) + sum(f.abs().mean() for fm in fmaps for f in fm)
        loss.backward()
        results.append((logits, fmaps, xin.grad, [p.grad.clone() for p in disc.parameters()]))
    (ref_logits, ref_fmaps, ref_gx, ref_gp), (logits, fmaps, gx, gp) = results
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for fa, fb in zip(fmaps, ref_fmaps):
        for a, b in zip(fa, fb):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-4, atol=1e-6 * float(ref_gx.abs().max()))
    assert len(gp) == len(ref_gp) == len(list(disc.parameters()))
    # A weight-norm gain's gradient is a sum of products that cancel (conv_post's single gain here
    # is 1e-3 of the largest gradient): absolute tolerance against the largest gradient overall.
    scale = max(float(b.abs().max()) for b in ref_gp)
    for a, b in zip(gp, ref_gp):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * scale)
