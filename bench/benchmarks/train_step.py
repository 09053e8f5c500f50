"""`train_step`: one training step of the 24 kHz model, ours (`Trainer.train_step`) against the same step
built from upstream `encodec`'s modules (`encodec_fast.train.reference`: its SEANet, quantizer and
MS-STFT discriminator, our losses and balancer), interleaved in one process with the same threads,
weights, codebooks and batch.

Each step: generator forward, losses through the balancer, commitment, the discriminator's update
(drawn every step here) and both Adam steps. The codebooks are set from data beforehand (k-means,
which runs once per stage in a real run, is not timed). Recorded: every step, and the share of the
step spent in the quantizer's forward. On CUDA also the quantizer's Triton path off
(ENCODEC_FAST_BACKEND=torch) and bf16 autocast.
"""

import contextlib
import statistics
import tempfile
import time
import typing as tp
from pathlib import Path

import torch

from bench.core import Context, benchmark, upstream_missing


class QuantizerClock:
    """Seconds spent in a quantizer's forward (synchronised on CUDA)."""

    def __init__(self, quantizer: torch.nn.Module, device: torch.device):
        self.total, self.device = 0.0, device
        self._forward = quantizer.forward
        quantizer.forward = self

    def __call__(self, *args, **kwargs):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = self._forward(*args, **kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.total += time.perf_counter() - t0
        return out


def _corpus(folder: Path, seconds: float) -> None:
    import soundfile as sf

    from encodec_fast.testing import voice
    for i in range(4):
        sf.write(folder / f"clip{i}.wav", voice(24000, seconds + 1, seed=i)[0].numpy(), 24000)


def measure(model: str, batch: int, seconds: float, reps: int, bandwidths: tp.Sequence[float], device: str,
            with_upstream: bool = True) -> tp.List[tp.Dict[str, tp.Any]]:
    """Rows per bandwidth and implementation: every step's milliseconds (`times_ms`), the quantizer's share."""
    from encodec_fast import ops
    from encodec_fast.testing import set_data_like_codebooks
    from encodec_fast.train import reference
    from encodec_fast.train.balancer import Balancer
    from encodec_fast.train.losses import MultiScaleMelLoss
    from encodec_fast.train.trainer import TrainConfig, Trainer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        _corpus(Path(tmp), seconds)
        variants = [("ours", "fp32", None)]
        if device == "cuda":
            variants += [("ours", "fp32", "torch"), ("ours", "bf16", None)]
        trainers = {}
        for name, precision, backend in variants:
            config = TrainConfig(data=[tmp], model=model, batch_size=batch, segment_seconds=seconds,
                                 workers=0, valid_items=0, precision=precision, device=device, steps=10 ** 6)
            trainers[(name, precision, backend)] = Trainer(config, Path(tmp) / f"run_{precision}_{backend}",
                                                           quiet=True)
        first = next(iter(trainers.values()))
        x = torch.stack([first.dataset[i][0] for i in range(batch)]).to(first.device)
        set_data_like_codebooks(first.model)
        for trainer in trainers.values():
            trainer.model.load_state_dict(first.model.state_dict())
            trainer.disc.load_state_dict(first.disc.state_dict())
        clocks = {key: QuantizerClock(t.model.quantizer, t.device) for key, t in trainers.items()}
        if with_upstream:
            up_model, up_disc = reference.upstream_copy(first)
            cfg = first.config
            opt_g = torch.optim.Adam(up_model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
            opt_d = torch.optim.Adam(up_disc.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
            balancer = Balancer(cfg.weights())
            mel = MultiScaleMelLoss(first.model.sample_rate).to(first.device)
            clocks["upstream"] = QuantizerClock(up_model.quantizer, first.device)

        def sync():
            if first.device.type == "cuda":
                torch.cuda.synchronize()

        for kbps in bandwidths:
            impls = {}
            for key, trainer in trainers.items():
                def ours(trainer=trainer, backend=key[2]):
                    trainer.draws = lambda step: (kbps, True)
                    with ops.use_backend(backend) if backend else contextlib.nullcontext():
                        trainer.train_step(0, [x])
                name = "ours" + (f" ({key[1]})" if device == "cuda" else "") + (
                    ", torch quantizer" if key[2] else "")
                impls[name] = (ours, clocks[key])
            if with_upstream:
                impls["upstream modules"] = (
                    lambda: reference.reference_step(up_model, up_disc, opt_g, opt_d, balancer, mel, x, kbps, True),
                    clocks["upstream"])
            times = {name: [] for name in impls}
            shares = {name: [] for name in impls}
            for name, (fn, _) in impls.items():  # warm-up
                fn()
            for _ in range(reps):  # interleaved rounds
                for name, (fn, clock) in impls.items():
                    sync()
                    clock.total = 0.0
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    elapsed = time.perf_counter() - t0
                    times[name].append(1e3 * elapsed)
                    shares[name].append(clock.total / elapsed)
            for name in impls:
                ts = times[name]
                rows.append({"kbps": kbps, "implementation": name, "median_ms": statistics.median(ts),
                             "min_ms": min(ts), "max_ms": max(ts), "times_ms": ts,
                             "quantizer_share": statistics.median(shares[name])})
    return rows


@benchmark("train_step", "One training step of the 24 kHz model (generator + discriminator) vs upstream's modules",
           priority=70)
def run(ctx: Context) -> None:
    params = {"model": "24khz", "batch": ctx.pick(1, 2, 8), "seconds": ctx.pick(0.25, 1.0, 1.0), "device": ctx.device}
    missing = upstream_missing()
    if missing:  # the reference step is built from upstream's modules
        ctx.na(params, "upstream", "time", "s", missing)
    rows = measure("24khz", params["batch"], params["seconds"], ctx.pick(1, 2, 3), ctx.pick([6.0], [6.0], [6.0, 24.0]),
                   ctx.device, with_upstream=not missing)
    for r in rows:
        impl = "upstream" if r["implementation"] == "upstream modules" else r["implementation"]
        ctx.record({**params, "kbps": r["kbps"]}, impl, "time", "s", [t / 1e3 for t in r["times_ms"]],
                   headline=impl in ("ours", "upstream", "ours (fp32)"), quantizer_share=r["quantizer_share"],
                   note="upstream = the same step built from upstream's SEANet, quantizer and MS-STFTD")
