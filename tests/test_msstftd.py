"""MS-STFT discriminator against upstream encodec 0.1.1's `msstftd`: state dicts, outputs, gradients."""

import pytest
import torch
from encodec import msstftd as upstream

from encodec_fast.testing import make_signal
from encodec_fast.train import MultiScaleSTFTDiscriminator


def pair(channels: int, seed: int = 0):
    torch.manual_seed(seed)
    up = upstream.MultiScaleSTFTDiscriminator(filters=8, in_channels=channels)
    ours = MultiScaleSTFTDiscriminator(filters=8, in_channels=channels)
    with torch.no_grad():  # weights that are not the default init, on both sides
        for p in up.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours.load_state_dict(up.state_dict(), strict=True)
    return up, ours


def test_state_dicts_cross_both_ways():
    up, ours = pair(1)
    assert list(up.state_dict()) == list(ours.state_dict())
    assert "discriminators.0.convs.0.conv.weight" in ours.state_dict()       # no weight norm on the first conv
    assert "discriminators.0.convs.1.conv.weight_g" in ours.state_dict()
    assert "discriminators.2.spec_transform.window" in ours.state_dict()
    fresh_up = upstream.MultiScaleSTFTDiscriminator(filters=8)
    fresh_up.load_state_dict(ours.state_dict(), strict=True)
    for (k, a), (_, b) in zip(fresh_up.state_dict().items(), up.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("channels", [1, 2])
def test_outputs_and_gradients_match_upstream(channels, layout, monkeypatch):
    """In upstream's layout (nchw) upstream's bits; channels-last (the CPU default, faster on oneDNN)
    within fp32 rounding of them, the feature maps stored channels-last."""
    monkeypatch.setenv("ENCODEC_FAST_DISC_LAYOUT", layout)
    up, ours = pair(channels, seed=channels)
    x = torch.stack([make_signal(24000, 9000, channels, seed=s) for s in (1, 2)])
    outs = []
    for model in (up, ours):
        xin = x.clone().requires_grad_(True)
        logits, fmaps = model(xin)
        loss = sum(lg.pow(2).mean() for lg in logits) + sum(f.abs().mean() for fm in fmaps for f in fm)
        loss.backward()
        outs.append((logits, fmaps, xin.grad, [p.grad for p in model.parameters()]))
    (ul, uf, ug, upg), (ol, of, og, opg) = outs
    assert len(ol) == 3 and all(len(fm) == 5 for fm in of)
    last = layout == "channels_last"
    assert all(f.is_contiguous(memory_format=torch.channels_last) == last for fm in of for f in fm)
    for a, b in zip(ul, ol):
        assert a.shape == b.shape
        if last:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.detach().abs().max()))
        else:
            assert torch.equal(a, b)
    for fa, fb in zip(uf, of):
        for a, b in zip(fa, fb):
            if last:
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.detach().abs().max()))
            else:
                assert torch.equal(a, b)
    torch.testing.assert_close(og, ug, rtol=1e-5 if last else 1e-6, atol=1e-9)
    for a, b in zip(upg, opg):
        if last:
            # A parameter's gradient sums B x frames x bins terms, in another order in oneDNN's
            # channels-last kernels (which order depends on the CPU's instruction set): 3e-5 of
            # relative difference seen on one CPU where another showed under 1e-5.
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 * float(a.abs().max()))
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)


def test_bad_inputs():
    _, ours = pair(1)
    with pytest.raises(ValueError, match=r"\[B, 1, T\]"):
        ours(torch.randn(1, 2, 4000))
    with pytest.raises(ValueError, match="shorter than the STFT window"):
        ours(torch.randn(1, 1, 1000))


@pytest.mark.parametrize("family", ["direct", "gemm"])
def test_triton_kernels_match_upstream(family, monkeypatch):
    """The discriminator on the Triton backend (the fused Conv2d + LeakyReLU kernels of each family;
    gemm: its own backward too) against upstream's: outputs and every gradient within fp32 rounding."""
    from encodec_fast.kernels import conv as kconv

    from encodec_fast import ops
    monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", family)
    names = (["conv2d_gemm", "conv2d_input_grad_gemm", "conv2d_weight_grad_gemm"] if family == "gemm"
             else ["conv2d_leaky_relu"])
    from encodec_fast.kernels import stft as kstft
    calls = dict.fromkeys(names + ["scaled_copy"], 0)
    first_inputs = []
    for module, name in [(kconv, n) for n in names] + [(kstft, "scaled_copy")]:
        def spy(*args, _name=name, _fn=getattr(module, name), **kwargs):
            calls[_name] += 1
            if _name == "conv2d_gemm" and args[0].shape[1] == 2:
                first_inputs.append(args[0])
            return _fn(*args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    up, ours = pair(1, seed=5)
    x = torch.stack([make_signal(24000, 2500, 1, seed=s) for s in (3, 4)])
    outs = []
    for model, backend in ((up, "torch"), (ours, "triton")):
        xin = x.clone().requires_grad_(True)
        with ops.use_backend(backend):
            logits, fmaps = model(xin)
            loss = sum(lg.pow(2).mean() for lg in logits) + sum(f.abs().mean() for fm in fmaps for f in fm)
            loss.backward()
        outs.append((logits, fmaps, xin.grad, [p.grad for p in model.parameters()]))
    # every conv of the three scales through our kernels (the input's gradient reaches the first)
    assert all(calls[n] == 3 * 6 for n in names), calls
    if family == "gemm":  # the fused front end: the first conv reads the STFT's real view, no layout pass
        assert calls["scaled_copy"] == 0 and len(first_inputs) == 3
        # torch.stft's own memory (bins contiguous, real and imaginary parts side by side), not a copy
        assert all(z.stride(1) == 1 and z.stride(3) == 2 and not z.is_contiguous() for z in first_inputs)
    else:  # the layout kernel, forward and backward, per scale
        assert calls["scaled_copy"] == 3 * 2
    (ul, uf, ug, upg), (ol, of, og, opg) = outs
    for a, b in zip(ul + [f for fm in uf for f in fm], ol + [f for fm in of for f in fm]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.detach().abs().max()))
    torch.testing.assert_close(og, ug, rtol=1e-4, atol=1e-5 * float(ug.abs().max()))
    for a, b in zip(upg, opg):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.detach().abs().max()))
