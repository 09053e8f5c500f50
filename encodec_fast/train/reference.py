"""A training step written plainly on upstream `encodec`'s modules (its SEANet, its quantizer, its
MS-STFT discriminator) with our losses and balancer: the reference the trainer's step is tested
against (tests/test_train_loop.py) and timed against (the `train_step` benchmark). Needs the `encodec`
package (a test dependency).

The step: generator losses against the discriminator as it is, through the balancer, the
commitment loss on its own; then, if drawn, the discriminator's hinge loss on a fresh pass over the
real and the detached decoded audio (four discriminator passes, as audiocraft's solver makes them;
the trainer makes two and gets the same numbers).
"""

import typing as tp
import warnings

import torch

from .losses import discriminator_hinge_loss, generator_hinge_loss, relative_feature_matching, time_l1


def upstream_copy(trainer) -> tp.Tuple[torch.nn.Module, torch.nn.Module]:
    """(upstream EncodecModel, upstream MultiScaleSTFTDiscriminator) holding the trainer's weights
    and codebooks (loaded strictly: the layouts are upstream's)."""
    import encodec
    import encodec.msstftd

    from ..model import MODEL_CONFIGS
    from .trainer import MODELS
    base, changes = MODELS[trainer.config.model]
    cfg = MODEL_CONFIGS[base]
    arch = {**cfg.get("arch", {}), **changes}
    kw = dict(channels=cfg["channels"], causal=cfg["causal"], norm=cfg["norm"],
              **{k: arch[k] for k in ("dimension", "n_filters", "lstm") if k in arch})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc, dec = encodec.modules.SEANetEncoder(**kw), encodec.modules.SEANetDecoder(**kw)
        rvq = encodec.quantization.ResidualVectorQuantizer(dimension=enc.dimension, n_q=trainer.model.quantizer.n_q,
                                                           bins=trainer.model.quantizer.bins)
        model = encodec.EncodecModel(enc, dec, rvq, cfg["target_bandwidths"], cfg["sample_rate"], cfg["channels"],
                                     normalize=cfg["normalize"], segment=cfg["segment"])
        model.load_state_dict(trainer.model.state_dict(), strict=True)
        disc = trainer.disc
        ffts = [d.n_fft for d in disc.discriminators]
        up_disc = encodec.msstftd.MultiScaleSTFTDiscriminator(
            disc.discriminators[0].filters, n_ffts=ffts, hop_lengths=[d.hop_length for d in disc.discriminators],
            win_lengths=[d.win_length for d in disc.discriminators])
        up_disc.load_state_dict(disc.state_dict(), strict=True)
    return model.to(trainer.device), up_disc.to(trainer.device)


def reference_step(model, disc, opt_g, opt_d, balancer, mel_loss, x: torch.Tensor, bandwidth: float,
                   learn_d: bool, commitment_weight: float = 1.0) -> None:
    """One step on a mono batch x [B, 1, T] (the 24 kHz models)."""
    model.train()
    disc.train()
    opt_g.zero_grad()
    opt_d.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = model.quantizer(model.encoder(x), model.frame_rate, bandwidth)
    y = model.decoder(q.quantized)[..., :x.shape[-1]]
    for p in disc.parameters():
        p.requires_grad_(False)
    fake_logits, fake_fmaps = disc(y)
    _, real_fmaps = disc(x)
    losses = {"l1": time_l1(x, y), "mel": mel_loss(x, y), "adv": generator_hinge_loss(fake_logits),
              "feat": relative_feature_matching(real_fmaps, fake_fmaps)}
    (commitment_weight * q.penalty).backward(retain_graph=True)
    balancer.backward(losses, y)
    for p in disc.parameters():
        p.requires_grad_(True)
    opt_g.step()
    if learn_d:
        real_logits, _ = disc(x)
        fake_logits, _ = disc(y.detach())
        discriminator_hinge_loss(real_logits, fake_logits).backward()
        opt_d.step()
