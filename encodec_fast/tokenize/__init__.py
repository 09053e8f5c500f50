"""Audio corpora -> RVQ codes in Parquet shards, resumable (`encodec-fast tokenize`).

    from encodec_fast.tokenize import tokenize, read_codes, CodesDataset
    summary = tokenize(["corpus/"], "codes/", model="24khz", bandwidth=6.0)
    for row in read_codes("codes/"): row["id"], row["codes"]   # int16 [K, T]

Inputs, ids and `--shard`: `sources`; output layout and resume: `sink`; the engine: `local`.
"""

import dataclasses
import os
import time
import typing as tp
from pathlib import Path

import torch

from .. import __version__, timing
from ..jobs import GracefulStop
from ..model import FACTORIES, MODEL_CONFIGS, SHORT_NAMES, EncodecModel
from ..streaming import DEFAULT_CHUNK_SECONDS, DEFAULT_STREAM_SECONDS, LongInputs
from .loading import ReadRate
from .local import READ_STAGE, WRITE_STAGE, Progress, run_local
from .sources import Item, Problem, list_items, parse_shard

MODEL_NAMES = SHORT_NAMES


def __getattr__(name: str):
    # The shards' reader needs pyarrow; importing it when asked for keeps this package's other parts
    # (the loading and listing that training uses) importable without pyarrow.
    if name in ("CodesDataset", "read_codes"):
        from . import reader
        return getattr(reader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass
class Summary:
    total: int            # items of this shard (including those done by an earlier run)
    skipped: int          # done by an earlier run
    tokenized: int        # this run
    failed: int           # this run
    failed_before: int    # recorded by an earlier run (in errors.jsonl)
    audio_seconds: float  # tokenized by this run
    wall_seconds: float
    out_dir: str
    # Where this run's time went (the local engine; empty with Ray): {stage: seconds}, see `breakdown`.
    seconds_by_stage: tp.Dict[str, float] = dataclasses.field(default_factory=dict)
    gpu_stages: tp.List[str] = dataclasses.field(default_factory=list)  # those timed on the GPU
    workers: int = 0
    loop_seconds: float = 0.0  # the part of wall_seconds spent tokenizing (after loading the model, listing)
    # The reading processes (--workers, or this process with none; the local engine): their summed time
    # on the items (open, decode, resample where they do) and the audio they delivered.
    read_seconds: float = 0.0
    read_audio_seconds: float = 0.0

    def line(self) -> str:
        return (f"{self.tokenized} tokenized, {self.failed} failed, {self.skipped} done before "
                f"({self.failed_before} of them failed), of {self.total}; "
                f"{self.audio_seconds / 3600:.3f} h of audio in {self.wall_seconds:.1f} s "
                f"({self.audio_seconds / max(self.wall_seconds, 1e-9):.1f}x real time) -> {self.out_dir}")

    def breakdown(self) -> str:
        """Where the time went, one line; with a hint when decoding held the encoder back."""
        if not self.seconds_by_stage:
            return ""
        wall = max(self.loop_seconds, 1e-9)
        # host stages under 0.5% (the copies on a CPU run: no-ops) stay in the manifest, not in the line
        host = [f"{name} {sec:.2f} s ({100 * sec / wall:.0f}%)" for name, sec in self.seconds_by_stage.items()
                if name not in self.gpu_stages and name != WRITE_STAGE and sec >= 0.005 * wall]
        out = f"time, of {self.loop_seconds:.1f} s tokenizing: " + ", ".join(host)
        if self.gpu_stages:
            out += "; on the GPU: " + ", ".join(f"{name} {self.seconds_by_stage[name]:.2f} s"
                                                for name in self.gpu_stages if name in self.seconds_by_stage)
        if WRITE_STAGE in self.seconds_by_stage:
            out += f"; {WRITE_STAGE} {self.seconds_by_stage[WRITE_STAGE]:.2f} s, beside the rest"
        if self.read_seconds > 0 and self.read_audio_seconds > 0:
            each = self.read_audio_seconds / self.read_seconds
            where = ("this process (--workers 0)" if not self.workers else "the one reading process"
                     if self.workers == 1 else f"each of {self.workers} reading processes")
            out += (f"\nreading audio: {each:,.0f} audio-s/s in {where} ({self.read_seconds:.2f} s for "
                    f"{self.read_audio_seconds:.1f} s of audio), at most {each * max(self.workers, 1):,.0f} audio-s/s "
                    f"together; tokenizing ran at {self.audio_seconds / wall:,.0f} audio-s/s")
        read = self.seconds_by_stage.get(READ_STAGE, 0.0)
        cpus = os.cpu_count() or 1
        if read > 0.25 * wall and self.workers < cpus - 1:
            out += (f"\nhint: {100 * read / wall:.0f}% of the time went to waiting for decoded audio; more "
                    f"decoding processes (--workers, {self.workers} now, {cpus} CPUs) would keep the encoder busier")
        return out


def _model(model: tp.Union[str, EncodecModel], checkpoint, repository) -> EncodecModel:
    if isinstance(model, EncodecModel):
        return model
    name = MODEL_NAMES.get(model, model)
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {model!r}: choose one of {', '.join(SHORT_NAMES)}")
    factory = FACTORIES[name]
    if checkpoint is not None:
        return factory(pretrained=False, checkpoint=checkpoint)
    return factory(pretrained=True, repository=repository)


def tokenize(inputs: tp.Sequence[tp.Union[str, Path]], out_dir: tp.Union[str, Path],
             model: tp.Union[str, EncodecModel] = "24khz", bandwidth: float = 6.0,
             checkpoint: tp.Optional[tp.Union[str, Path]] = None, repository: tp.Optional[tp.Union[str, Path]] = None,
             device: tp.Union[str, torch.device] = "cpu", batch_seconds: float = 120.0,
             workers: tp.Optional[int] = None, shard: tp.Union[str, tp.Tuple[int, int]] = (0, 1),
             overwrite: bool = False, quiet: bool = False, rows_per_shard: int = 1000,
             chunk_seconds: float = DEFAULT_CHUNK_SECONDS, stream_seconds: float = DEFAULT_STREAM_SECONDS,
             engine: str = "local",
             ray_address: tp.Optional[str] = None, precision: tp.Optional[str] = None,
             cuda_graphs: bool = False, resample_on_device: tp.Optional[bool] = None) -> Summary:
    """Tokenize every input into Parquet shards in `out_dir` (see the module docstring).

    model: "24khz", "48khz", or an EncodecModel (e.g. your own); checkpoint / repository as for
    the models' constructors. batch_seconds: audio per encoder call (padded). workers: decoding
    processes (default: CPU count - 1, at most 8 on CPU, where they share the CPUs with the
    encoder, and 32 on CUDA). shard: this job's part (i, n) or "i/n".
    Failed inputs are recorded in OUT_DIR/_errors.jsonl and counted in the summary; they do not
    stop the job. A job killed at any point and run again with the same arguments finishes the
    remaining items; `overwrite` starts over. Inputs longer than `stream_seconds` are read,
    resampled and encoded `chunk_seconds` at a time (`encodec_fast.streaming.encode_pieces`:
    bounded memory whatever the length, the whole-file codes).
    engine: "local" (DataLoader workers, this process encodes) or "ray" (Ray Data: decoding
    tasks and encoder actors on a cluster at `ray_address`, or a local Ray instance); the same
    output and resume either way.
    precision: the encoder's precision mode ('exact', 'tf32', 'bf16', 'fp16'; `encodec_fast.precision`;
    None: the model's own, 'exact' unless set). A mode other than 'exact' is part of the output's
    configuration: a resume must ask for the same one.
    cuda_graphs: on CUDA, replay each batch shape from a captured CUDA graph
    (`EncodecModel.use_cuda_graphs`; the batches are padded to length buckets either way).
    resample_on_device: the decoding processes (Ray: tasks) only decode, and the encoding process
    (Ray: the encoder actors) resamples each clip on `device` (fp32, TF32 off) before encoding it;
    None: on CUDA (resampling costs a CPU more than decoding a WAV file). False keeps the
    resampling in the decoding processes on the CPU (upstream's `convert_audio` values bit for bit).
    """
    start = time.perf_counter()
    shard = parse_shard(shard if isinstance(shard, str) else f"{shard[0]}/{shard[1]}")
    if not inputs:
        raise ValueError("no inputs given")
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be local or ray, got {engine!r}")
    if min(batch_seconds, chunk_seconds, stream_seconds) <= 0:
        raise ValueError("batch_seconds, chunk_seconds and stream_seconds must be positive")
    long = LongInputs(stream_seconds, chunk_seconds)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but torch sees no CUDA GPU here (use --device cpu)")
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, not {device.type}")
    from .sink import ShardSink, shard_lock, state_dict_sha256
    # The lock before the model loads: a second job on this output is refused at once.
    with shard_lock(out_dir, shard), GracefulStop() as stop:
        net = _model(model, checkpoint, repository).to(device).eval()
        if bandwidth not in net.target_bandwidths:
            raise ValueError(f"bandwidth {bandwidth} is not supported by {net.name} "
                             f"(choose from {net.target_bandwidths})")
        net.set_target_bandwidth(bandwidth)
        if precision is not None:
            net.set_precision(precision)
        if cuda_graphs:
            net.use_cuda_graphs()
        if workers is None:
            workers = max(0, min(32 if device.type == "cuda" else 8, (os.cpu_count() or 1) - 1))
        config = {"model": net.name, "sample_rate": net.sample_rate, "channels": net.channels, "bandwidth": bandwidth,
                  "codebooks": net.num_codebooks, "checkpoint_sha256": state_dict_sha256(net.state_dict()),
                  "encodec_fast_version": __version__}
        if net.precision != "exact":  # codes of another precision never mix with exact ones
            config["precision"] = net.precision
        sink = ShardSink(out_dir, config, shard=shard, overwrite=overwrite, rows_per_shard=rows_per_shard)
        items, problems = list_items(inputs, shard)
        todo = [it for it in items if it.id not in sink.done]
        ours = {it.id for it in items} | {p.id for p in problems}
        failed_before = len(ours & sink.failed_before)
        new_problems = [p for p in problems if p.id not in sink.done]
        progress = Progress(len(items) + len(problems), len(items) + len(problems) - len(todo) - len(new_problems),
                            quiet)
        committed = False
        timer = timing.StageTimer()
        reading = ReadRate()
        by_stage: tp.Dict[str, float] = {}
        try:
            for p in new_problems:
                sink.add_error(p.id, p.path, p.error)
                progress.update(failed=1)
            if engine == "ray":
                from .ray_engine import run_ray
                complete = run_ray(net, todo, sink, bandwidth, device, batch_seconds, workers, progress, long,
                                   address=ray_address, stop=stop, resample_on_device=resample_on_device)
            else:
                complete = run_local(net, todo, sink, bandwidth, device, batch_seconds, workers, progress, long,
                                     stop=stop, timer=timer, resample_on_device=resample_on_device,
                                     reading=reading)
                by_stage = _by_stage(timer)
            sink.close({"last_run": {"tokenized": progress.done, "failed": progress.failed,
                                     "interrupted": not complete, "seconds_by_stage": by_stage,
                                     "gpu_stages": sorted(timer.gpu),
                                     "reading": {"processes": max(workers, 1), "seconds": reading.seconds,
                                                 "audio_seconds": reading.audio_seconds}}})
            committed = True
        finally:
            if not committed:
                sink.commit()  # keep what is finished (an error, a second signal); SIGKILL loses the open shard
            progress.finish()
        if not complete:
            stop.raise_if_requested("finished shards and the manifest are written; run the same command again "
                                    "to resume")
    return Summary(total=progress.total, skipped=progress.skipped, tokenized=progress.done, failed=progress.failed,
                   failed_before=failed_before,
                   audio_seconds=progress.seconds, wall_seconds=time.perf_counter() - start, out_dir=str(out_dir),
                   seconds_by_stage=by_stage, gpu_stages=[s for s in by_stage if s in timer.gpu], workers=workers,
                   loop_seconds=timer.loop_seconds, read_seconds=reading.seconds,
                   read_audio_seconds=reading.audio_seconds)


def _by_stage(timer: timing.StageTimer) -> tp.Dict[str, float]:
    """The timer's stages, plus the main thread's time in none of them ("other": batching, padding,
    starting the decoding processes; on a GPU, launching kernels and waiting), rounded to ms."""
    out = timer.seconds()
    host = sum(sec for name, sec in out.items() if name not in timer.gpu and name != WRITE_STAGE)
    out["other (main thread)"] = max(0.0, timer.loop_seconds - host)
    return {name: round(sec, 3) for name, sec in out.items()}


__all__ = ["CodesDataset", "Item", "Problem", "Summary", "list_items", "read_codes", "tokenize"]
