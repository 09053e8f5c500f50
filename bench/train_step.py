"""One training step of the 24 kHz model: ours (`Trainer.train_step`) against the same step built
from upstream `encodec`'s modules (`encodec_fast.train.reference`: its SEANet, quantizer and
MS-STFT discriminator, our losses and balancer), interleaved in one process with the same
threads, weights, codebooks and batch.

    python -m bench.train_step [--threads 2] [--batch 8] [--seconds 1] [--reps 3] [--model 24khz]
                               [--device cpu|cuda] [--out DIR]

Each step: generator forward, losses through the balancer, commitment, the discriminator's update
(drawn every step here) and both Adam steps; 6 and 24 kbps. The codebooks are set from the data
beforehand (k-means, which runs once per stage in a real run, is not timed). Reported: median and
range of --reps steps, and the share of the step spent in the quantizer's forward. On CUDA also
the quantizer's Triton path off (ENCODEC_FAST_BACKEND=torch) and bf16 autocast.
"""

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
import typing as tp
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


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

    from encodec_fast.demo import _clip  # speech-like test signals, no upstream needed
    for i in range(4):
        sf.write(folder / f"clip{i}.wav", _clip(24000, seconds + 1, seed=i)[0].numpy(), 24000)


def _data_codebooks(model, x: torch.Tensor) -> None:
    """Codebooks from the batch's latents, stage by stage (what k-means would start from)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        residual = model.encoder(x).transpose(1, 2).reshape(-1, model.quantizer.dimension).float()
        for layer in model.quantizer.vq.layers:
            cb = layer._codebook
            embed = residual[torch.randint(0, residual.shape[0], (cb.embed.shape[0],), generator=gen)]
            embed = embed + 0.01 * residual.std() * torch.randn(embed.shape, generator=gen).to(embed)
            cb.embed.copy_(embed)
            cb.embed_avg.copy_(embed)
            cb.cluster_size.fill_(2.0)
            cb.inited.fill_(1.0)
            residual = residual - cb.decode(cb.encode(residual))


def run(args) -> tp.List[tp.Dict[str, tp.Any]]:
    from encodec_fast import ops
    from encodec_fast.train import reference
    from encodec_fast.train.balancer import Balancer
    from encodec_fast.train.losses import MultiScaleMelLoss
    from encodec_fast.train.trainer import TrainConfig, Trainer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        _corpus(Path(tmp), args.seconds)
        variants = [("ours", "fp32", None)]
        if args.device == "cuda":
            variants += [("ours", "fp32", "torch"), ("ours", "bf16", None)]
        trainers = {}
        for name, precision, backend in variants:
            config = TrainConfig(data=[tmp], model=args.model, batch_size=args.batch, segment_seconds=args.seconds,
                                 workers=0, valid_items=0, precision=precision, device=args.device, steps=10 ** 6)
            trainers[(name, precision, backend)] = Trainer(config, Path(tmp) / f"run_{precision}_{backend}",
                                                           quiet=True)
        first = next(iter(trainers.values()))
        x = torch.stack([first.dataset[i][0] for i in range(args.batch)]).to(first.device)
        _data_codebooks(first.model, x)
        for trainer in trainers.values():
            trainer.model.load_state_dict(first.model.state_dict())
            trainer.disc.load_state_dict(first.disc.state_dict())
        up_model, up_disc = reference.upstream_copy(first)
        cfg = first.config
        opt_g = torch.optim.Adam(up_model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
        opt_d = torch.optim.Adam(up_disc.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
        balancer = Balancer(cfg.weights())
        mel = MultiScaleMelLoss(first.model.sample_rate).to(first.device)
        clocks = {key: QuantizerClock(t.model.quantizer, t.device) for key, t in trainers.items()}
        clocks["upstream"] = QuantizerClock(up_model.quantizer, first.device)

        def sync():
            if first.device.type == "cuda":
                torch.cuda.synchronize()

        for kbps in args.bandwidths:
            impls = {}
            for key, trainer in trainers.items():
                def ours(trainer=trainer, backend=key[2]):
                    trainer.draws = lambda step: (kbps, True)
                    with ops.use_backend(backend) if backend else contextlib.nullcontext():
                        trainer.train_step(0, [x])
                name = "ours" + (f" ({key[1]})" if args.device == "cuda" else "") + (
                    ", torch quantizer" if key[2] else "")
                impls[name] = (ours, clocks[key])
            impls["upstream modules"] = (
                lambda: reference.reference_step(up_model, up_disc, opt_g, opt_d, balancer, mel, x, kbps, True),
                clocks["upstream"])
            times = {name: [] for name in impls}
            shares = {name: [] for name in impls}
            for name, (fn, _) in impls.items():  # warm-up
                fn()
            for _ in range(args.reps):  # interleaved rounds
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--model", default="24khz")
    parser.add_argument("--bandwidths", type=float, nargs="+", default=[6.0, 24.0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    rows = run(args)
    base = {r["kbps"]: r["median_ms"] for r in rows if r["implementation"] == "upstream modules"}
    lines = [f"Training step, {args.model} model, batch {args.batch} x {args.seconds:g} s, discriminator update "
             f"every step, {args.device} ({args.threads} threads); median of {args.reps} interleaved steps", "",
             "| kbps | implementation | median ms | min-max ms | quantizer share | upstream modules / this |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kbps']:g} | {r['implementation']} | {r['median_ms']:.0f} | {r['min_ms']:.0f}-"
                     f"{r['max_ms']:.0f} | {100 * r['quantizer_share']:.1f}% | "
                     f"{base[r['kbps']] / r['median_ms']:.2f}x |")
    from bench import report
    report.publish("\n".join(lines), args.out, f"train_step_{args.device}", args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
