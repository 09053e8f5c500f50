"""`train_step`: one training step of the 24 kHz model, whole and by part, in each precision mode:
ours (`Trainer.train_step`), the same step on the PyTorch path, that path under `torch.compile`, and
the step built from upstream `encodec`'s modules (`encodec_fast.train.reference`: its SEANet,
quantizer and MS-STFT discriminator, our losses and balancer), interleaved in one process with the
same threads, weights, codebooks and batch.

Each step: generator forward, losses through the balancer, commitment, the discriminator's update
(drawn every step here) and both Adam steps. The codebooks are set from data beforehand (k-means,
which runs once per stage in a real run, is not timed).

Implementations, as in the `codec` benchmark (mode: exact, tf32, bf16; `encodec_fast.precision`,
the trainer's `--precision fp32|tf32|bf16`):
- `ours <mode>`: the trainer as it runs (on CUDA the fused Triton quantizer and the
  discriminator's kernels where the ops dispatch takes them; on CPU the quantizer's stages in one
  autograd node);
- `torch <mode>`: the same trainer on the PyTorch path (ENCODEC_FAST_BACKEND=torch; on CPU also the
  quantizer stage by stage, upstream's graph);
- `torch.compile <mode>`: that path with the encoder, decoder and discriminator under
  `torch.compile` (default mode; compile time is not timed: two warm-up steps). CUDA: bf16 only in
  the quick suite, every mode in the full one; CPU: the full suite only, exact;
- `upstream`: the step on upstream's modules, as torch is configured (TF32 as torch's defaults);
- `ours exact, deterministic` (CUDA): the trainer's `--deterministic` (what it costs; with it in
  the run, CUBLAS_WORKSPACE_CONFIG=:4096:8 is set for the whole process, every variant);
- `ours exact, NCHW discriminator` (CPU): ours with the discriminator in upstream's layout
  (ENCODEC_FAST_DISC_LAYOUT=nchw; the default is channels-last on CPU): what the layout buys.
On CPU tf32 is exact (no TF32 on CPUs) and is left out; bf16 in the full suite only.

Param `part` (the issue tracker's and docs' names): `step` (the whole step, wall clock: `time` in
seconds, `throughput` in samples per second and `peak_memory`: on CUDA the allocator's peak over
the step, on CPU the peak RSS over it, VmHWM reset before it) and, for ours and the torch path,
the step's parts from `encodec_fast.timing` stages the trainer marks (own time; on CUDA GPU time
from CUDA events): `generator` (encoder and decoder, forward and backward, the quantizer's backward
included: autograd runs it inside), `quantizer` (its forward: search, EMA statistics, commitment),
`discriminator` (its forwards on real and decoded audio and its weights' gradient), `balancer`
(the losses and their gradients with respect to the decoded audio, which go back through the
discriminator for the adversarial and feature losses) and `optimizers` (both Adam steps). Over
batch size: CPU 2 (quick) / 2, 8 (full); CUDA 8, 32 (quick) / 8, 32, 64 (full).
"""

import contextlib
import statistics
import tempfile
import time
import typing as tp
from pathlib import Path

import torch

from bench.core import Context, EnvSetting, benchmark, hwm_mb, reset_peak_rss, rss_mb, upstream_missing

PARTS = ("generator", "quantizer", "discriminator", "balancer", "optimizers")
#: The trainer's --precision for each precision mode.
TRAINER_PRECISION = {"exact": "fp32", "tf32": "tf32", "bf16": "bf16"}


def _corpus(folder: Path, seconds: float) -> None:
    import soundfile as sf

    from encodec_fast.testing import voice
    for i in range(4):
        sf.write(folder / f"clip{i}.wav", voice(24000, seconds + 1, seed=i)[0].numpy(), 24000)


def _compiled(trainer) -> None:
    """The trainer's encoder, decoder and discriminator forwards under torch.compile (default mode)."""
    for module in (trainer.model.encoder, trainer.model.decoder, trainer.disc):
        module.forward = torch.compile(module.forward)


class _Peak:
    """Peak memory over a call: CUDA allocator peak, or the process's peak RSS (VmHWM reset first)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.ok = self.cuda or reset_peak_rss()

    def __enter__(self) -> "_Peak":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            self.before = rss_mb()
            reset_peak_rss()
        return self

    def __exit__(self, *exc: tp.Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self.before) / 2 ** 20
        else:
            self.mb = hwm_mb() - self.before


def variants(device: str, suite: str) -> tp.List[tp.Tuple[str, str, str]]:
    """(name, mode, how) for this device and suite; how: 'ours', 'torch' or 'compile'."""
    cuda = device == "cuda"
    modes = list(TRAINER_PRECISION) if cuda else ["exact"] + (["bf16"] if suite == "full" else [])
    out = []
    for mode in modes:
        out += [(f"ours {mode}", mode, "ours"), (f"torch {mode}", mode, "torch")]
        if (cuda and (suite == "full" or mode == "bf16")) or (not cuda and suite == "full" and mode == "exact"):
            out.append((f"torch.compile {mode}", mode, "compile"))
    if cuda:  # what --deterministic costs (a CPU step is deterministic without it)
        out.append(("ours exact, deterministic", "exact", "deterministic"))
    else:  # what the discriminator's channels-last layout buys on oneDNN
        out.append(("ours exact, NCHW discriminator", "exact", "nchw"))
    return out


def measure(model: str, batches: tp.Sequence[int], seconds: float, reps: int, bandwidths: tp.Sequence[float],
            device: str, with_upstream: bool = True, suite: str = "quick",
            only: tp.Optional[tp.Sequence[str]] = None) -> tp.List[tp.Dict[str, tp.Any]]:
    """Rows per bandwidth, batch and implementation: every step's milliseconds (`times_ms`), the
    parts' median milliseconds (`parts_ms`, ours and the torch path), the peak memory (`peak_mb`),
    samples per second; `only` restricts the implementations (names as in the rows)."""
    from encodec_fast import ops, timing
    from encodec_fast.quantization import core_vq
    from encodec_fast.testing import set_data_like_codebooks
    from encodec_fast.train import reference
    from encodec_fast.train.balancer import Balancer
    from encodec_fast.train.losses import MultiScaleMelLoss
    from encodec_fast.train.trainer import TrainConfig, Trainer

    rows = []
    todo = [v for v in variants(device, suite) if only is None or v[0] in only]
    if any(how == "deterministic" for _, _, how in todo):  # before cuBLAS starts: every variant gets it
        import os
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    with tempfile.TemporaryDirectory() as tmp:
        _corpus(Path(tmp), seconds)
        trainers = {}
        for name, mode, how in todo:
            config = TrainConfig(data=[tmp], model=model, batch_size=max(batches), segment_seconds=seconds,
                                 workers=0, valid_items=0, precision=TRAINER_PRECISION[mode], device=device,
                                 steps=10 ** 6, deterministic=how == "deterministic")
            trainers[name] = Trainer(config, Path(tmp) / f"run_{len(trainers)}", quiet=True)
        first = next(iter(trainers.values()))
        set_data_like_codebooks(first.model)
        for name, mode, how in todo:
            trainer = trainers[name]
            trainer.model.load_state_dict(first.model.state_dict())
            trainer.disc.load_state_dict(first.disc.state_dict())
            if how == "compile":
                _compiled(trainer)
        clips = [first.dataset[i % len(first.dataset)][0] for i in range(max(batches))]
        if with_upstream:
            up_model, up_disc = reference.upstream_copy(first)
            cfg = first.config
            opt_g = torch.optim.Adam(up_model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
            opt_d = torch.optim.Adam(up_disc.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
            balancer = Balancer(cfg.weights())
            mel = MultiScaleMelLoss(first.model.sample_rate).to(first.device)

        def sync():
            if first.device.type == "cuda":
                torch.cuda.synchronize()

        for kbps in bandwidths:
            for batch in batches:
                x = torch.stack(clips[:batch]).to(first.device)
                impls: tp.Dict[str, tp.Callable[[], None]] = {}
                for name, mode, how in todo:
                    def ours(trainer=trainers[name], how=how) -> None:
                        trainer.draws = lambda step: (kbps, True)
                        torch_path = how in ("torch", "compile")
                        saved = core_vq.FUSED_CPU_TRAINING
                        core_vq.FUSED_CPU_TRAINING = saved and not torch_path
                        layout = EnvSetting("ENCODEC_FAST_DISC_LAYOUT", "nchw") if how == "nchw" else \
                            contextlib.nullcontext()
                        try:
                            with ops.use_backend("torch") if torch_path else contextlib.nullcontext(), layout:
                                trainer.train_step(0, [x])
                        finally:
                            core_vq.FUSED_CPU_TRAINING = saved
                    impls[name] = ours
                if with_upstream:
                    impls["upstream"] = lambda: reference.reference_step(up_model, up_disc, opt_g, opt_d, balancer,
                                                                         mel, x, kbps, True)
                times: tp.Dict[str, tp.List[float]] = {name: [] for name in impls}
                parts: tp.Dict[str, tp.List[tp.Dict[str, float]]] = {name: [] for name in impls}
                peaks: tp.Dict[str, float] = {}
                for name, fn in impls.items():  # warm-up (torch.compile: compiling, then once compiled)
                    for _ in range(2 if name.startswith("torch.compile") else 1):
                        fn()
                    sync()
                    with _Peak(first.device) as peak:
                        fn()
                    if peak.ok:
                        peaks[name] = peak.mb
                for _ in range(reps):  # interleaved rounds
                    for name, fn in impls.items():
                        timer = timing.StageTimer()
                        sync()
                        t0 = time.perf_counter()
                        # upstream's step has no stages (the balancer's backward, ours, would show alone)
                        with timer.active() if name != "upstream" else contextlib.nullcontext():
                            fn()
                        sync()
                        times[name].append(1e3 * (time.perf_counter() - t0))
                        parts[name].append(timer.seconds())
                for name in impls:
                    ts = times[name]
                    by_part = {p: 1e3 * statistics.median(r.get(p, 0.0) for r in parts[name]) for p in PARTS
                               if any(p in r for r in parts[name])}
                    rows.append({"kbps": kbps, "batch": batch, "implementation": name,
                                 "median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts),
                                 "times_ms": ts, "parts_ms": by_part, "peak_mb": peaks.get(name),
                                 "samples_per_s": batch / (statistics.median(ts) / 1e3)})
    return rows


@benchmark("train_step", "One training step of the 24 kHz model, whole and by part, in each precision mode "
           "(ours, the torch path, torch.compile) vs upstream's modules", priority=70)
def run(ctx: Context) -> None:
    cuda = ctx.device == "cuda"
    batches = ctx.pick([1], [8, 32], [8, 32, 64]) if cuda else ctx.pick([1], [2], [2, 8])
    seconds = ctx.pick(0.25, 1.0, 1.0)
    missing = upstream_missing()
    base = {"model": "24khz", "seconds": seconds, "device": ctx.device}
    if missing:  # the reference step is built from upstream's modules
        for batch in batches:
            ctx.na({**base, "part": "step", "batch": batch}, "upstream", "time", "s", missing)
    timed = {name for name, _, _ in variants(ctx.device, ctx.suite)}
    left_out = {"torch.compile exact": "compiled in the full suite only (minutes per mode)",
                "torch.compile tf32": "compiled in the full suite only (minutes per mode)",
                "torch.compile bf16": "compiled in the full suite only (minutes per mode)",
                "ours bf16": "the full suite only on CPU", "torch bf16": "the full suite only on CPU"}
    for name, reason in left_out.items():
        if name not in timed and (cuda or "tf32" not in name):
            if not cuda and name == "torch.compile bf16" and ctx.suite == "full":
                reason = "on CPU, compiled in exact only (minutes per mode)"
            for batch in batches:
                ctx.na({**base, "part": "step", "batch": batch, "kbps": 6.0}, name, "time", "s", reason)
    rows = measure("24khz", batches, seconds, ctx.pick(1, 2, 3), ctx.pick([6.0], [6.0], [6.0, 24.0]), ctx.device,
                   with_upstream=not missing, suite=ctx.suite)
    first_batch = batches[0]
    for r in rows:
        impl = r["implementation"]
        params = {**base, "batch": r["batch"], "kbps": r["kbps"]}
        step = {**params, "part": "step"}
        ctx.record(step, impl, "time", "s", [t / 1e3 for t in r["times_ms"]],
                   headline=r["batch"] == first_batch and impl in ("ours exact", "upstream"),
                   note="upstream = the same step built from upstream's SEANet, quantizer and MS-STFTD, "
                        "as torch is configured" if impl == "upstream" else "")
        ctx.record(step, impl, "throughput", "samples / s", [r["batch"] * 1e3 / t for t in r["times_ms"]],
                   higher_is_better=True)
        if r["peak_mb"] is not None:
            ctx.record(step, impl, "peak_memory", "MB", [r["peak_mb"]],
                       memory="cuda max allocated over a step" if cuda else
                       "CPU: peak RSS over a step minus the RSS before it (VmHWM reset)")
        for part, ms in r["parts_ms"].items():
            ctx.record({**params, "part": part}, impl, "time", "s", [ms / 1e3],
                       note="own time of the trainer's stage (encodec_fast.timing), median over the steps" +
                            ("; GPU time from CUDA events" if cuda else ""))

