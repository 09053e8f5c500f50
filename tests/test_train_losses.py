"""encodec_fast.train.losses and .balancer against hand-computed values and independent
references (torchaudio's mel spectrogram for the mel loss; the paper's formula, written out
here, for the balancer)."""

import math

import pytest
import torch

from encodec_fast.train import losses
from encodec_fast.train.balancer import Balancer


def test_time_l1_by_hand():
    x = torch.tensor([[[0.0, 1.0, 2.0]]])
    y = torch.tensor([[[1.0, 1.0, 0.0]]])
    assert losses.time_l1(x, y).item() == pytest.approx(1.0)


def test_hinge_losses_by_hand():
    real = [torch.tensor([2.0, 0.5, -1.0]), torch.tensor([0.0])]
    fake = [torch.tensor([-2.0, 0.0, 1.0]), torch.tensor([0.5])]
    # scale 1: mean relu(1 - r) = (0 + .5 + 2) / 3, mean relu(1 + f) = (0 + 1 + 2) / 3; scale 2: 1 + 1.5
    expected_d = ((2.5 / 3 + 1.0) + (1.0 + 1.5)) / 2
    assert losses.discriminator_hinge_loss(real, fake).item() == pytest.approx(expected_d)
    # generator: mean relu(1 - f): (3 + 1 + 0) / 3 and 0.5
    assert losses.generator_hinge_loss(fake).item() == pytest.approx((4 / 3 + 0.5) / 2)
    with pytest.raises(ValueError):
        losses.discriminator_hinge_loss(real, fake[:1])


def test_relative_feature_matching_by_hand_and_no_gradient_to_real():
    real = [[torch.tensor([1.0, -1.0], requires_grad=True), torch.tensor([2.0, 2.0], requires_grad=True)]]
    fake = [[torch.tensor([0.0, -1.0], requires_grad=True), torch.tensor([1.0, 3.0], requires_grad=True)]]
    loss = losses.relative_feature_matching(real, fake)
    # layer 1: mean |diff| 0.5 / mean |real| 1; layer 2: 1 / 2; averaged over the 2 layers
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    assert real[0][0].grad is None and fake[0][0].grad is not None
    with pytest.raises(ValueError):
        losses.relative_feature_matching(real, [fake[0][:1]])


@pytest.mark.parametrize("power,log", [(1.0, False), (2.0, True)])
def test_multiscale_mel_loss_against_torchaudio(power, log):
    torchaudio = pytest.importorskip("torchaudio")
    g = torch.Generator().manual_seed(3)
    t = torch.arange(6000) / 24000
    x = (0.4 * torch.sin(2 * math.pi * 220 * t) + 0.05 * torch.randn(6000, generator=g)).view(1, 1, -1).repeat(2, 1, 1)
    y = x + 0.1 * torch.randn(x.shape, generator=g)
    loss = losses.MultiScaleMelLoss(24000, power=power, log=log)
    expected = 0.0
    import warnings
    for i in range(5, 12):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mel = torchaudio.transforms.MelSpectrogram(24000, n_fft=2 ** i, win_length=2 ** i, hop_length=2 ** i // 4,
                                                       n_mels=64, power=power, normalized=True)
        sx, sy = mel(x), mel(y)
        if log:
            sx, sy = torch.log10(sx + 1e-5), torch.log10(sy + 1e-5)
        expected += float((sx - sy).abs().mean() + (sx - sy).pow(2).mean())
    expected /= 7
    assert loss(x, y).item() == pytest.approx(expected, rel=1e-5)
    assert loss(x, x).item() == 0.0
    y.requires_grad_(True)
    loss(x, y).backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def _paper_balancer_grads(steps, weights, beta=0.999, total_norm=1.0, eps=1e-12):
    """The paper's eq. 5 written out: for each step, the output gradient the balancer should give."""
    totals, fixes, out = {}, {}, []
    for grads in steps:  # each: {name: g_k [B, ...]}
        avg = {}
        for name, g in grads.items():
            norm = float(torch.stack([g[b].norm() for b in range(g.shape[0])]).mean())
            totals[name] = totals.get(name, 0.0) * beta + norm
            fixes[name] = fixes.get(name, 0.0) * beta + 1.0
            avg[name] = totals[name] / fixes[name]
        wsum = sum(weights[n] for n in grads)
        out.append(sum(g * (weights[n] / wsum) * total_norm / (eps + avg[n]) for n, g in grads.items()))
    return out


def test_balancer_matches_the_formula_over_steps():
    torch.manual_seed(0)
    weights = {"l1": 0.1, "mel": 1.0, "adv": 3.0}
    balancer = Balancer(weights, ema_decay=0.9)  # a short memory, so the EMA matters in 4 steps
    seen, got = [], []
    for step in range(4):
        x = torch.randn(3, 1, 50)
        y = (x * (1 + step)).requires_grad_(True)
        target = torch.randn(3, 1, 50)
        terms = {"l1": (y - target).abs().mean(), "mel": 10 * (y - target).pow(2).mean(), "adv": (y ** 3).mean() * 100}
        seen.append({k: torch.autograd.grad(v, [y], retain_graph=True)[0] for k, v in terms.items()})
        balancer.backward(terms, y)
        got.append(y.grad.clone())
    for g, e in zip(got, _paper_balancer_grads(seen, weights, beta=0.9)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-8)


def test_balancer_cancels_opposite_gradients_of_any_scale():
    # Upstream's own example: two losses pulling opposite ways at 1x and 100x.
    for rescale, expected in ((False, -99.0), (True, 0.0)):
        y = torch.zeros(1, 1, requires_grad=True)
        Balancer({"a": 1, "b": 1}, rescale_grads=rescale).backward({"a": y.sum(), "b": -100 * y.sum()}, y)
        assert y.grad.item() == pytest.approx(expected, abs=1e-6)


def test_balancer_errors_monitor_and_state():
    y = torch.randn(2, 3, requires_grad=True)
    balancer = Balancer({"a": 1.0, "b": 2.0}, monitor=True)
    with pytest.raises(KeyError):
        balancer.backward({"c": y.sum()}, y)
    with pytest.raises(RuntimeError):  # a loss with no path to the input
        balancer.backward({"a": torch.ones((), requires_grad=True) * 2}, y)
    balancer.backward({"a": y.pow(2).sum(), "b": 5 * y.sum()}, y)
    assert sum(balancer.metrics.values()) == pytest.approx(1.0) and set(balancer.metrics) == {"ratio_a", "ratio_b"}
    # Restored from its state, a new balancer gives the same next gradient.
    clone = Balancer({"a": 1.0, "b": 2.0})
    clone.load_state_dict(balancer.state_dict())
    grads = []
    for b in (balancer, clone):
        z = (y.detach() * 3).requires_grad_(True)
        b.backward({"a": z.pow(2).sum(), "b": 5 * z.sum()}, z)
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
