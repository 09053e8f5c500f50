"""`stream_command`: peak memory and time of the `encodec-fast` command on long files, against upstream's
command.

For each model (24 kHz mono, 48 kHz stereo; random weights with data-like codebooks, 6 kbps) and
length, a WAV at the model's rate is written block by block (`encodec_fast.testing.voice_batch`), then each
implementation compresses it to `.ecdc` and decompresses it back to WAV, each step in its own process
under an address-space limit, with its peak RSS (ru_maxrss of the child) and wall time. Upstream's
command is `python -m encodec` (0.1.1) in a process whose `MODELS` give it the same weights, and whose
audio I/O goes through soundfile (torchaudio >= 2.9 needs TorchCodec to read files): otherwise its own
code. A run that dies (out of memory, the limit) is recorded with its reason, never a number.
"""

import os
import resource
import subprocess
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

from bench.core import ROOT, Context, benchmark, map_processes, side_by_side_note, upstream_missing

UPSTREAM_CHILD = r"""
import importlib, sys, torch, soundfile as sf, numpy as np
import encodec
upc = importlib.import_module("encodec.compress")  # the package exports a function of that name
upmain = importlib.import_module("encodec.__main__")
state = torch.load(sys.argv[1], map_location="cpu")
name = sys.argv[2]
def make():
    m = getattr(encodec.EncodecModel, "encodec_model_" + name.split("_")[1])(pretrained=False)
    m.load_state_dict(state)
    m.name = name
    return m.eval()
upc.MODELS[name] = make
def load(path):
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(np.ascontiguousarray(data.T)), sr
def save_audio(wav, path, sample_rate, rescale=False):
    wav = wav.clamp(-0.99, 0.99)
    sf.write(str(path), wav.numpy().T, sample_rate, subtype="PCM_16")
upmain.torchaudio.load = load
upmain.save_audio = save_audio
sys.argv = ["encodec"] + sys.argv[3:]
with torch.no_grad():
    upmain.main()
"""


def write_input(path: Path, sample_rate: int, channels: int, minutes: float) -> None:
    import soundfile as sf

    from encodec_fast.testing import voice_batch
    block = voice_batch(sample_rate, 30.0, channels, batch=1, seed=3)[0].numpy().T
    total = int(minutes * 60 * sample_rate)
    with sf.SoundFile(str(path), "w", sample_rate, channels, subtype="PCM_16") as f:
        done = 0
        while done < total:
            n = min(block.shape[0], total - done)
            f.write(block[:n])
            done += n


def run_step(cmd, limit_gb: float, timeout: float, env: tp.Optional[tp.Dict[str, str]] = None):
    """Run cmd under an address-space limit (and `env` added to the environment) -> (wall seconds,
    peak RSS MB, error or None)."""
    def limit():
        size = int(limit_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (size, size))
    # ru_maxrss of RUSAGE_CHILDREN is the largest of all children so far: measure through a
    # wrapper that reports its own child's peak.
    wrapper = ("import resource, subprocess, sys\n"
               "p = subprocess.run(sys.argv[1:])\n"
               "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
               "sys.exit(p.returncode)\n")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, timeout=timeout,
                              preexec_fn=limit, cwd=ROOT, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return None, None, f"did not finish within {timeout:.0f} s"
    wall = time.perf_counter() - t0
    lines = proc.stderr.strip().splitlines()
    rss = next((int(ln.split()[1]) / 1024 for ln in reversed(lines) if ln.startswith("MAXRSS")), None)
    if proc.returncode != 0:
        tail = [ln for ln in lines if not ln.startswith("MAXRSS")]
        why = tail[-1] if tail else f"exit status {proc.returncode}"
        if "memory" in why.lower() or "alloc" in why.lower() or proc.returncode < 0:
            why = f"out of memory under a {limit_gb:g} GB limit ({why[:160]})"
        return None, rss, why[:240]
    return wall, rss, None


def measure(models: tp.Sequence[str], minutes: tp.Sequence[float], impls: tp.Sequence[str], limit_gb: float,
            timeout: float, workdir: Path, at_once: bool = False) -> tp.List[tp.Dict[str, tp.Any]]:
    """One row per (model, minutes, implementation, step): seconds, peak RSS (MB), or the error.
    `at_once`: the implementations run side by side (a plumbing check: their times then share the
    machine, its cores shared out: `bench.core.map_processes`), else one after the other."""
    import torch

    from bench.peers import random_state
    rows = []
    for model in models:
        ckpt = workdir / f"{model}.th"
        torch.save(random_state(model, seed=0), ckpt)
        for length in minutes:
            wav = workdir / f"in_{model}_{length:g}.wav"
            rate, channels = (24000, 1) if model == "24khz" else (48000, 2)
            write_input(wav, rate, channels, length)

            def steps(impl: str, env: tp.Optional[tp.Dict[str, str]]) -> tp.List[tp.Dict[str, tp.Any]]:
                return _steps(impl, model, length, wav, ckpt, workdir, limit_gb, timeout, env)
            for done in map_processes(steps, impls, at_once):
                rows += done
            wav.unlink()
    return rows


def _steps(impl: str, model: str, length: float, wav: Path, ckpt: Path, workdir: Path, limit_gb: float,
           timeout: float, env: tp.Optional[tp.Dict[str, str]]
           ) -> tp.List[tp.Dict[str, tp.Any]]:
    """One implementation's compress then decompress of `wav`: a row per step."""
    rows = []
    ecdc, back = workdir / f"{impl}.ecdc", workdir / f"{impl}_out.wav"
    for p in (ecdc, back):
        p.unlink(missing_ok=True)
    hq = ["--hq"] if model == "48khz" else []
    for step, (src, dst) in (("compress", (wav, ecdc)), ("decompress", (ecdc, back))):
        if impl == "ours":
            cmd = ["-m", "encodec_fast", str(src), str(dst), "--checkpoint", str(ckpt), "-b", "6", "-f", *hq]
        else:
            cmd = ["-c", UPSTREAM_CHILD, str(ckpt), f"encodec_{model}", str(src), str(dst), "-b", "6", "-f", *hq]
        if step == "decompress" and not ecdc.exists():
            wall, rss, err = None, None, "no .ecdc file (compress failed)"
        else:
            wall, rss, err = run_step([sys.executable, *cmd], limit_gb, timeout, env)
        rows.append({"model": model, "minutes": length, "impl": impl, "step": step, "seconds": wall,
                     "peak_rss_mb": rss if err is None else None, "error": err,
                     "realtime_x": (length * 60 / wall) if wall else None})
    for p in (ecdc, back):
        p.unlink(missing_ok=True)
    return rows


@benchmark("stream_command", "The encodec-fast command on long files: time and peak memory (vs upstream's command)",
           priority=48, devices=("cpu",))
def stream_command(ctx: Context) -> None:
    minutes = ctx.pick([0.05], [1.0], [1.0, 10.0, 60.0])
    models = ctx.pick(["24khz"], ["24khz"], ["24khz", "48khz"])
    missing = upstream_missing()
    impls = ["ours"] + ([] if missing else ["upstream"])
    limit_gb = 16.0
    together = len(impls) if ctx.suite == "smoke" else 1  # the smoke run is a plumbing check: side by side
    with tempfile.TemporaryDirectory(prefix="stream-command-", dir=ctx.workdir) as tmp:
        for model in models:
            for length in minutes:
                ctx.check_time(f"{model}, {length:g} min")
                rows = measure([model], [length], impls, limit_gb, timeout=max(120.0, 40 * 60 * length),
                                  workdir=Path(tmp), at_once=together > 1)
                for step in ("compress", "decompress"):
                    params = {"model": model, "minutes": length, "step": step, "kbps": 6.0, "device": "cpu"}
                    if missing:
                        ctx.na(params, "upstream", "time", "s", missing)
                    for r in (r for r in rows if r["step"] == step):
                        _record(ctx, params, r, headline=length == minutes[-1], limit_gb=limit_gb, together=together)


def _record(ctx: Context, params: tp.Dict[str, tp.Any], row: tp.Dict[str, tp.Any], headline: bool,
            limit_gb: float, together: int) -> None:
    impl = row["impl"]
    if row["error"]:
        for metric, unit in (("time", "s"), ("peak_memory", "MB")):
            ctx.na(params, impl, metric, unit, row["error"])
        return
    note = f"the command in its own process under a {limit_gb:g} GB address-space limit; random weights" + (
        f"; {side_by_side_note(together)}" if together > 1 else "")
    ctx.record(params, impl, "time", "s", [row["seconds"]], audio_seconds=60 * params["minutes"], headline=headline,
               note=note)
    ctx.record(params, impl, "peak_memory", "MB", [row["peak_rss_mb"]], memory="peak RSS of the process", note=note)
