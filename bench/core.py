"""The suite's common parts: the registry of benchmarks, the result schema, timing and statistics,
and the run's context (machine, versions, commit, threads, allocator).

A benchmark is a function `run(ctx: Context) -> None` registered with `@benchmark(...)`; it
records measurements through `ctx.record(...)` (or `ctx.timed(...)`, which interleaves
implementations) and unavailable cases through `ctx.na(...)`. Every record has the same fields:

    benchmark, params (dict), implementation, metric, unit, higher_is_better,
    reps (every repetition), median, min, max, iqr, n, [audio_seconds], [note], [na]

`na` holds the reason when an implementation could not run a configuration (no value is made up).
"""

import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import typing as tp
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("smoke", "quick", "full")

Record = tp.Dict[str, tp.Any]


@dataclass
class Benchmark:
    name: str
    title: str
    run: tp.Callable[["Context"], None]
    priority: int             # lower runs first (what a time budget keeps)
    devices: tp.Tuple[str, ...]


REGISTRY: tp.Dict[str, Benchmark] = {}


def benchmark(name: str, title: str, priority: int, devices: tp.Sequence[str] = ("cpu", "cuda")):
    """Register `run(ctx)` as the benchmark `name`."""
    def wrap(fn: tp.Callable[["Context"], None]) -> tp.Callable[["Context"], None]:
        if name in REGISTRY:
            raise ValueError(f"benchmark {name!r} registered twice")
        REGISTRY[name] = Benchmark(name, title, fn, priority, tuple(devices))
        return fn
    return wrap


class EnvSetting:
    """Set (or, with None, unset) an environment variable inside a block."""

    def __init__(self, name: str, value: tp.Optional[str]):
        self.name, self.value, self.old = name, value, None

    def __enter__(self):
        self.old = os.environ.get(self.name)
        if self.value is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self.value

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self.old


def summary(values: tp.Sequence[float]) -> tp.Dict[str, float]:
    """median, min, max and interquartile range (inclusive quartiles; 0 for one value)."""
    vals = sorted(float(v) for v in values)
    if not vals:
        raise ValueError("no repetitions")
    if len(vals) > 1:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1 = q3 = vals[0]
    return {"median": statistics.median(vals), "min": vals[0], "max": vals[-1], "iqr": q3 - q1, "n": len(vals)}


SMOKE_LEFT_OUT = ("not run in the smoke suite (its own process would spend ~4 s importing transformers; the "
                  "quick and full suites run it)")


def upstream_missing() -> tp.Optional[str]:
    """Why upstream encodec 0.1.1 cannot run here (not installed, or its torchaudio does not load), or None."""
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import encodec  # noqa: F401
    except Exception as err:
        return f"encodec 0.1.1 cannot be imported ({type(err).__name__}: {err})"[:200]
    return None


class BudgetExceeded(Exception):
    """Raised by `Context.check_time()` when the run's time budget is spent."""


@dataclass
class Context:
    """What a benchmark gets: the suite size, the device, options, and where to put records."""
    suite: str
    device: str
    workdir: Path
    checkpoint: tp.Optional[Path] = None
    deadline: tp.Optional[float] = None       # time.monotonic() after which no new case starts
    records: tp.List[Record] = field(default_factory=list)
    skipped: tp.List[str] = field(default_factory=list)
    benchmark: str = ""

    def pick(self, smoke: tp.Any, quick: tp.Any, full: tp.Any) -> tp.Any:
        """The value for this run's suite."""
        return {"smoke": smoke, "quick": quick, "full": full}[self.suite]

    @property
    def reps(self) -> int:
        """Timed repetitions per implementation and case (after one warm-up)."""
        return self.pick(1, 3, 5)

    def in_own_process(self, impls: tp.Sequence[str]) -> tp.Tuple[tp.List[str], tp.List[str]]:
        """(run, left out): the implementations a benchmark runs in processes of their own. The
        smoke suite (a plumbing check that has to stay under a minute on 2 cores) leaves out
        transformers there: its process spends ~4 s importing transformers before any work. It
        still runs in this process (codec), in quick and full, and in tests/test_bench_modules.py.
        Record the left-out ones with `SMOKE_LEFT_OUT` as the reason."""
        out = [i for i in impls if self.suite == "smoke" and i == "transformers"]
        return [i for i in impls if i not in out], out

    def time_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def check_time(self, what: str) -> None:
        """Call before each case: past the budget, the case is listed as skipped and the
        benchmark stops (what it recorded so far is kept)."""
        if self.time_left() <= 0:
            self.skipped.append(f"{self.benchmark}: {what}")
            raise BudgetExceeded(what)

    def record(self, params: tp.Dict[str, tp.Any], implementation: str, metric: str, unit: str,
               reps: tp.Sequence[float], higher_is_better: bool = False, **extra: tp.Any) -> Record:
        rec = {"benchmark": self.benchmark, "params": dict(params), "implementation": implementation,
               "metric": metric, "unit": unit, "higher_is_better": higher_is_better,
               "reps": [float(r) for r in reps], **summary(reps), **extra}
        self.records.append(rec)
        return rec

    def na(self, params: tp.Dict[str, tp.Any], implementation: str, metric: str, unit: str, reason: str) -> Record:
        """An implementation that cannot run this case: the reason instead of a value."""
        rec = {"benchmark": self.benchmark, "params": dict(params), "implementation": implementation,
               "metric": metric, "unit": unit, "higher_is_better": False, "reps": [], "na": reason}
        self.records.append(rec)
        return rec

    def timed(self, params: tp.Dict[str, tp.Any], impls: tp.Dict[str, tp.Callable[[], tp.Any]],
              metric: str = "time", unit: str = "s", reps: tp.Optional[int] = None,
              sync: tp.Callable[[], None] = lambda: None, scale: float = 1.0, **extra: tp.Any
              ) -> tp.Dict[str, Record]:
        """Time each implementation: one warm-up each, then `reps` rounds in which every
        implementation runs once, the order alternating between rounds (this kind of VM drifts
        by +-20% over minutes; interleaving spreads the drift over all of them). Times are recorded
        in seconds times `scale` (1e3 with unit "ms"). An implementation that raises is recorded as
        n/a with the error."""
        reps = self.reps if reps is None else reps
        failed: tp.Dict[str, str] = {}
        for name, fn in impls.items():
            try:
                fn()
                sync()
            except Exception as err:  # a peer that cannot run this case: say why, go on
                failed[name] = _reason(err)
        times: tp.Dict[str, tp.List[float]] = {name: [] for name in impls if name not in failed}
        order = list(times)
        for rnd in range(reps):
            for name in (order if rnd % 2 == 0 else order[::-1]):
                if name in failed:
                    continue
                try:
                    sync()
                    t0 = time.perf_counter()
                    impls[name]()
                    sync()
                    times[name].append(scale * (time.perf_counter() - t0))
                except Exception as err:
                    failed[name] = _reason(err)
        out = {}
        for name in impls:
            if name in failed:
                out[name] = self.na(params, name, metric, unit, failed[name])
            else:
                out[name] = self.record(params, name, metric, unit, times[name], **extra)
        return out


def _reason(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    if isinstance(err, MemoryError) or "DefaultCPUAllocator" in text or "out of memory" in text.lower():
        return memory_reason(text)
    return text[:300]


def memory_reason(text: str) -> str:
    """A short out-of-memory reason: the size that could not be allocated first (a table cell
    shows about 70 characters), then the message."""
    found = re.search(r"allocate (\d+) bytes", text)
    if found:
        return f"out of memory: one tensor of {int(found.group(1)) / 2 ** 30:.1f} GB ({text[:200]})"
    return "out of memory: " + text[:300]


# ---------------------------------------------------------------------------------------------
# Memory


def rss_mb() -> float:
    """This process's resident set size now, in MB (Linux /proc; else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's maximum resident set size so far, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0: /proc/self/clear_refs);
    False where that is not possible (then only the process's lifetime peak is known)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_mb() -> float:
    """This process's peak RSS since start or the last `reset_peak_rss()`, in MB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def trim_heap() -> bool:
    """glibc: return the heap's free pages to the system now (malloc_trim), so that RSS is the
    live memory and a later rise in RSS is memory the next call needs (not pages it reuses)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def release_freed_memory() -> bool:
    """glibc: serve allocations of 64 KB and more with mmap and return freed heap top at once, so
    that RSS falls back after each call (memory measurements; slower, never used for timing)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-3, 64 * 1024)) and bool(mallopt(-1, 128 * 1024))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


def side_by_side_env(processes: int) -> tp.Dict[str, str]:
    """Environment for `processes` child processes run at once: the cores shared out between them
    (OMP_NUM_THREADS, at least 1 each). Without it they oversubscribe the cores, and OpenMP's
    spinning threads make that far worse than sharing: on 2 cores, upstream's 2-clip tokenize
    loop took 7.4 s next to ours instead of 0.5 s alone (2026-12-02)."""
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, processes)))}


def map_processes(fn: tp.Callable[[tp.Any, tp.Optional[tp.Dict[str, str]]], tp.Any], items: tp.Sequence[tp.Any],
                  together: bool) -> tp.List[tp.Any]:
    """[fn(item, env) for item in items], where fn starts the item's child process(es) with `env`
    added to its environment: one after the other (env None), or, with `together`, all at once
    with the cores shared out (env = side_by_side_env)."""
    n = len(items) if together and len(items) > 1 else 1
    env = side_by_side_env(n) if n > 1 else None
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(lambda item: fn(item, env), items))


def side_by_side_note(processes: int) -> str:
    """What a record of such a run says (its time shared the machine)."""
    return (f"{processes} processes ran at once, OMP_NUM_THREADS={side_by_side_env(processes)['OMP_NUM_THREADS']} "
            "each (the smoke suite's plumbing check: not a timing)")


def run_child(args: tp.Sequence[str], timeout: float, memory_limit_gb: tp.Optional[float] = None,
              env: tp.Optional[tp.Dict[str, str]] = None) -> tp.Tuple[tp.Optional[tp.Any], str]:
    """Run `python ARGS` (a script or `-m module ...`) from the repository root in a fresh process,
    with an optional address-space limit; returns (the last JSON line it printed, or None; the
    reason when it failed or timed out, else ''). A child prints a JSON line after each case, so
    what finished before a crash or the time limit is kept.""" 
    def limit() -> None:
        if memory_limit_gb:
            size = int(memory_limit_gb * 2 ** 30)
            resource.setrlimit(resource.RLIMIT_AS, (size, size))
    full_env = dict(os.environ,
                    PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    full_env.update(env or {})
    try:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=full_env,
                              timeout=timeout, preexec_fn=limit)
        stdout, stderr, status = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:  # keep what it printed before the limit
        def text(b: tp.Any) -> str:
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        stdout, stderr, status = text(err.stdout), text(err.stderr), None
    lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
    last = json.loads(lines[-1]) if lines else None
    if status == 0 and last is not None:
        return last, ""
    if status is None:
        return last, f"did not finish within {timeout:.0f} s"
    tail = (stderr or stdout).strip().splitlines()
    why = tail[-1] if tail else f"exit status {status}"
    if status < 0:
        why = f"killed by signal {-status}"
    if memory_limit_gb and any(word in why.lower() for word in ("memoryerror", "memory", "alloc", "signal 9")):
        return last, f"out of memory under a {memory_limit_gb:g} GB address-space limit ({why[:200]})"
    return last, why[:300]


# ---------------------------------------------------------------------------------------------
# The run's context


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def context(device: str) -> tp.Dict[str, tp.Any]:
    """Machine, CPU model and cores, GPU, versions, commit, date, threads, allocator setting."""
    import torch

    from encodec_fast import cpu
    info: tp.Dict[str, tp.Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
        "platform": f"{platform.system()} {platform.machine()}", "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "device": device,
        "allocator": "glibc tuned (encodec_fast.cpu.tune_cpu_allocator: freed memory kept in the heap), "
                     "the same for every implementation" if cpu.is_tuned() else "glibc default",
        "git_commit": _git("rev-parse", "HEAD"), "git_dirty": bool(_git("status", "--porcelain",
                                                                        "--untracked-files=no")),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        info["cpu"] = platform.processor() or platform.machine()
    versions = {}
    for name in ("encodec_fast", "torch", "triton", "numpy", "encodec", "transformers", "soundfile", "faiss"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # not installed (or broken): the report says so
            versions[name] = None
    info["versions"] = versions
    info["gpu"] = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else None
    if info["gpu"]:
        info["cuda"] = torch.version.cuda
    return info
