#!/usr/bin/env python
"""Triton's kernel cache for a GPU machine, compiled on a machine without one.

    python -m tools.triton_cache build OUT_DIR [--arch 90] [--set default|full] [--libtriton PATH] [--jobs N]
    python -m tools.triton_cache pack OUT_DIR TARBALL                  (.tar.xz)
    python -m tools.triton_cache unpack TARBALL DIR          (on the GPU machine)
    python -m tools.triton_cache report DIR                  (what the GPU machine compiled itself)

A GPU session's first minutes go to compiling kernels (on the 2026-11-30 H200 run, 85 s of its 8
correctness checks), time a lent GPU is idle. Triton looks each launch up in its file cache
(TRITON_CACHE_DIR) under a key made of its own library, the kernel's source, the launch's
specialization (types, constexprs, which integers are divisible by 16), the target and the compile
options; a cache built here with the same key is one the GPU machine finds.

1. build: compile_gpu's scenarios (both models' encoders and decoders in every dtype and precision
   mode, the RVQ kernels, the discriminator) on meta tensors under its stand-in driver, recording
   every distinct launch exactly as Triton's JIT would compile it (its full specialization and
   options), then each compiled into OUT_DIR in worker processes, keeping only what a launch
   loads (cubin and metadata). Then the same scenarios once more
   through Triton's JIT itself (a stand-in driver whose launches do nothing): every launch must
   find its kernel in OUT_DIR (one that does not is compiled there and counted as a miss) and fit
   the architecture's shared memory (else it could not launch there). Exit status 1 on a compile
   failure, a miss or a kernel over the shared memory; the cache is written all the same.
2. Triton's key hashes its `libtriton.so`, which differs between Python versions of the same
   triton. `--libtriton PATH` names the GPU machine's (from the same triton version's wheel for its
   Python: `pip download triton==X --python-version 3.12 --no-deps`), so that the keys are the
   ones that machine computes. The rest of the key (Python sources, ptxas) is the same.
3. Triton's cache holds absolute paths: `unpack` writes them for where it unpacks.
A launch the scenarios do not make (other sizes' divisibility, other modes) still compiles on the
GPU machine as before; `report` lists those.
"""

import argparse
import concurrent.futures as cf
import contextlib
import hashlib
import io
import json
import os
import sys
import tarfile
import time
import typing as tp
from pathlib import Path

MANIFEST = "encodec_fast_triton_cache.json"


def _tuples(value):
    """JSON's lists back to the tuples Triton's options hold (their hash is their text)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


class Exact(tp.NamedTuple):
    """One launch as Triton's JIT compiles it."""
    module: str
    name: str
    signature: tp.Dict[str, str]
    constexprs: tp.Dict[tp.Tuple[int, ...], tp.Any]
    attrs: tp.Dict[tp.Tuple[int, ...], tp.Any]
    options: tp.Dict[str, tp.Any]


def _cg():
    """tools/compile_gpu.py, imported when needed (it refuses to load under Triton's interpreter,
    which unpack and report do not need)."""
    from tools import compile_gpu
    return compile_gpu


def _exact_recorder(only: tp.Optional[str]):
    cg = _cg()

    class ExactRecorder(cg._Recorder):
        """compile_gpu's recorder, also keeping every distinct specialization with its full options
        (the default launches only: the autotuning lists' run only with ENCODEC_FAST_AUTOTUNE=1)."""

        def __init__(self):
            super().__init__()
            self.exact: tp.Dict[str, Exact] = {}

        def hook(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled):
            if not self.suffix and _wanted(fn.name, only):
                self._keep(fn, compile)
            return super().hook(key=key, repr=repr, fn=fn, compile=compile, is_manual_warmup=is_manual_warmup,
                                already_compiled=already_compiled)

        def _keep(self, fn, compile):
            jit = fn.jit_function
            data = json.loads(compile["specialization_data"])
            options = {k: _tuples(v) for k, v in data["options"].items()}
            entry = Exact(jit.fn.__module__, jit.fn.__qualname__, dict(compile["signature"]),
                          dict(compile["constants"]), dict(compile["configs"][0]), options)
            ident = json.dumps([entry.module, entry.name, sorted(entry.signature.items()),
                                sorted((str(k), str(v)) for k, v in entry.constexprs.items()),
                                sorted((str(k), str(v)) for k, v in entry.attrs.items()),
                                sorted((k, str(v)) for k, v in options.items())])
            self.exact.setdefault(hashlib.sha256(ident.encode()).hexdigest(), entry)

    return ExactRecorder()


def _wanted(name: str, only: tp.Optional[str]) -> bool:
    import re
    return only is None or re.search(only, name) is not None


def _jit_function(module: str, name: str):
    import importlib

    from triton.runtime.jit import JITFunction
    fn = getattr(importlib.import_module(module), name)
    while not isinstance(fn, JITFunction):  # an Autotuner or Heuristics around it
        fn = fn.fn
    return fn


def _file_hash(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_PATCHED: tp.Set[str] = set()


def _use_libtriton(path: tp.Optional[str]) -> None:
    """Triton's cache key as a triton whose libtriton.so is `path` computes it (the same version's
    wheel for another Python: only that file differs)."""
    if not path or path in _PATCHED:
        return
    import sysconfig

    import triton
    from triton.runtime import cache
    ext = sysconfig.get_config_var("EXT_SUFFIX").split(".")[-1]
    ours = _file_hash(os.path.join(os.path.dirname(triton.__file__), "_C", f"libtriton.{ext}"))
    theirs = _file_hash(path)
    key = cache.triton_key()
    if ours not in key:
        raise RuntimeError("this triton's cache key does not hash its libtriton.so as expected")
    replaced = key.replace(ours, theirs)
    cache.triton_key = lambda: replaced
    _PATCHED.add(path)


def _compile(entry: Exact, arch: int, out: str, libtriton: tp.Optional[str]) -> tp.Dict[str, tp.Any]:
    """One launch into Triton's cache at `out` (a worker process); never raises."""
    started = time.time()
    os.environ["TRITON_CACHE_DIR"] = out
    os.environ["TRITON_STORE_BINARY_ONLY"] = "1"
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        _use_libtriton(libtriton)
        fn = _jit_function(entry.module, entry.name)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            compiled = triton.compile(ASTSource(fn, entry.signature, entry.constexprs, entry.attrs),
                                      target=GPUTarget("cuda", arch, 32), options=dict(entry.options))
        return {"ok": True, "hash": compiled.hash, "secs": time.time() - started}
    except Exception as err:  # a compile error is a result (compile_gpu reports them)
        return {"ok": False, "error": f"{type(err).__name__}: {err}"[:500], "secs": time.time() - started}


@contextlib.contextmanager
def _dry_run_driver(arch: int, over: tp.Set[str]):
    """Triton's JIT on a stand-in CUDA device of `arch`: it compiles (through its cache) and its
    launches do nothing. A kernel needing more shared memory than the architecture has (which
    could not launch there) is added to `over` instead of stopping the run."""
    from triton.runtime.driver import driver
    cg = _cg()
    limit = cg.SHARED_LIMIT.get(arch, cg.SHARED_LIMIT[90])

    class Utils:
        @staticmethod
        def get_device_properties(device):
            return {"max_shared_mem": 1 << 31}

        @staticmethod
        def load_binary(name, kernel, shared, device):
            if shared > limit:
                over.add(f"{name}: {shared} B of shared memory > {limit} B")
            return None, None, 0, 0, 1024  # module, function, registers, spills, most threads

    class DryRun(cg.stand_in_driver_class(lambda: arch)):
        utils = Utils()

        def launcher_cls(self, src, metadata):
            return lambda *args, **kwargs: None

    driver.set_active(DryRun())
    try:
        yield
    finally:
        try:
            driver.reset_active()
        except RuntimeError:
            driver.set_active(None)


def _prune(cache: Path) -> None:
    """Keep what a launch loads: Triton stores each kernel's first IR (`.source`) even when told to
    store binaries only; a third of the cache, never read back."""
    for group in cache.glob("*/__grp__*.json"):
        data = json.loads(group.read_text())
        keep = {}
        for name, path in data["child_paths"].items():
            if name.endswith((".cubin", ".json")):
                keep[name] = path
            else:
                Path(path).unlink(missing_ok=True)
        group.write_text(json.dumps({"child_paths": keep}))


def _groups(cache: Path) -> tp.Set[str]:
    return {p.parent.name for p in cache.glob("*/__grp__*.json")}


def check(cache: Path, arch: int = 90, full: bool = True, only: tp.Optional[str] = None) -> tp.Dict[str, tp.Any]:
    """The scenarios through Triton's JIT (in this process: run it in a fresh one) with its cache at
    `cache`: launches found there, launches compiled anew into it, and the kernels that could not
    launch on `arch` for their shared memory. Kernels `only` does not match are skipped."""
    from triton import knobs
    cg = _cg()
    launches = {"count": 0}

    def hook(*, fn, **_):  # before each compile (a launch new to this process): skip or count
        if not _wanted(fn.name, only):
            return True
        launches["count"] += 1
        return False

    cache = cache.resolve()
    before = _groups(cache)
    over: tp.Set[str] = set()
    previous_hook = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    with cg._env("TRITON_CACHE_DIR", str(cache)), _dry_run_driver(arch, over), cg.on_meta(), \
            cg._env("ENCODEC_FAST_AUTOTUNE", "0"):
        from encodec_fast.kernels import tuning
        tuning._ARCHS.clear()
        try:
            cg._scenarios(cg._Recorder(), ("ieee", "tf32x3", "tf32") if full else ("ieee",))
        finally:
            tuning._ARCHS.clear()
            knobs.runtime.jit_cache_hook = previous_hook
    missed = len(_groups(cache) - before)
    return {"found": launches["count"] - missed, "missed": missed, "over_shared_memory": sorted(over)}


def build(out: Path, arch: int, full: bool, libtriton: tp.Optional[str], jobs: int,
          only: tp.Optional[str] = None) -> int:
    """Capture, compile into `out` and write its manifest; the check runs in a process of its own
    (this one's JIT has seen every launch). Exit status 1 on a compile failure or a miss."""
    import subprocess

    import triton
    started = time.time()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    recorder = _exact_recorder(only)
    _cg().capture(full, [arch], recorder)
    entries = list(recorder.exact.values())
    print(f"triton {triton.__version__}: {len(entries)} launches captured for sm_{arch} in "
          f"{time.time() - started:.0f} s; compiling into {out}", flush=True)
    failures = []
    from tqdm import tqdm
    with cf.ProcessPoolExecutor(max_workers=max(1, jobs)) as pool, \
            tqdm(total=len(entries), desc="compiling", unit="kernel", disable=None) as bar:
        futures = {pool.submit(_compile, e, arch, str(out), libtriton): e for e in entries}
        for future in cf.as_completed(futures):
            result = future.result()
            if not result["ok"]:
                failures.append(f"{futures[future].name}: {result['error']}")
            bar.update()
    for line in failures:
        print("  compile failure:", line)
    _prune(out)
    # The check: Triton's JIT, with the keys the GPU machine computes, finds every launch.
    command = [sys.executable, "-m", "tools.triton_cache", "check", str(out), "--arch", str(arch),
               "--set", "full" if full else "default"] + (["--only", only] if only else []) + \
        (["--libtriton", libtriton] if libtriton else [])
    done = subprocess.run(command, capture_output=True, text=True)
    print(done.stdout.strip() or done.stderr.strip()[-2000:])
    try:
        counts = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):  # the check itself failed
        counts = {}
    manifest = {"triton": triton.__version__, "arch": arch, "set": "full" if full else "default", "only": only,
                "libtriton": _file_hash(libtriton) if libtriton else None, "root": str(out),
                "launches": len(entries), "compile_failures": failures, "check": counts,
                "entries": sorted(_groups(out)), "seconds": round(time.time() - started, 1)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{len(manifest['entries'])} kernels, {size / 2**20:.1f} MiB, in {manifest['seconds']:.0f} s")
    return 1 if failures or not counts or counts["missed"] or counts["over_shared_memory"] else 0


def pack(cache: Path, tarball: Path) -> None:
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball, "w:xz") as tar:  # cubins: xz keeps 7%, gzip 15%
        tar.add(cache, arcname="triton_cache")
    print(f"{tarball}: {tarball.stat().st_size / 2**20:.1f} MiB")


def unpack(tarball: Path, dest: Path) -> int:
    """Unpack and point every group's paths at `dest`; returns the number of kernels."""
    dest = dest.resolve()
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            if not (member.isfile() or member.isdir()) or member.name.startswith("/") or ".." in member.name:
                raise ValueError(f"{tarball}: unexpected entry {member.name!r}")
            parts = Path(member.name).parts[1:]
            if not parts:
                continue
            target = dest.joinpath(*parts)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    count = 0
    for group in dest.glob("*/__grp__*.json"):
        data = json.loads(group.read_text())
        data["child_paths"] = {name: str(group.parent / name) for name in data["child_paths"]}
        group.write_text(json.dumps(data))
        count += 1
    return count


def report(cache: Path) -> str:
    """Which kernels in `cache` are not the carried ones (compiled on this machine)."""
    manifest_path = cache / MANIFEST
    carried = set(json.loads(manifest_path.read_text())["entries"]) if manifest_path.exists() else set()
    names: tp.Dict[str, int] = {}
    new = sorted(_groups(cache) - carried)
    for key in new:
        for group in (cache / key).glob("__grp__*.json"):
            name = group.name[len("__grp__"):-len(".json")]
            names[name] = names.get(name, 0) + 1
    listed = ", ".join(f"{n} x{c}" for n, c in sorted(names.items()))
    return (f"triton cache {cache}: {len(carried)} kernels carried, {len(new)} compiled on this machine"
            + (f" ({listed})" if listed else ""))


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("build", "check"):
        b = sub.add_parser(name)
        b.add_argument("cache", type=Path)
        b.add_argument("--arch", type=int, default=90)
        b.add_argument("--set", choices=("default", "full"), default="full",
                       help="full (default): every precision mode's launches, as the benchmarks run them")
        b.add_argument("--libtriton", default=None, help="the GPU machine's triton/_C/libtriton.so")
        b.add_argument("--only", default=None, help="regex on kernel names")
        if name == "build":
            b.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p = sub.add_parser("pack")
    p.add_argument("cache", type=Path)
    p.add_argument("tarball", type=Path)
    u = sub.add_parser("unpack")
    u.add_argument("tarball", type=Path)
    u.add_argument("dest", type=Path)
    r = sub.add_parser("report")
    r.add_argument("cache", type=Path)
    args = parser.parse_args(argv)
    if args.command in ("build", "check") and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("triton_cache compiles real GPU code: unset TRITON_INTERPRET")
    if args.command == "build":
        return build(args.cache, args.arch, args.set == "full", args.libtriton, args.jobs, args.only)
    if args.command == "check":
        _use_libtriton(args.libtriton)  # this process's JIT computes the GPU machine's keys
        counts = check(args.cache, args.arch, args.set == "full", args.only)
        print(f"check through Triton's JIT: {counts['found']} launches found in the cache, "
              f"{counts['missed']} compiled anew")
        for line in counts["over_shared_memory"]:
            print(f"  could not launch on sm_{args.arch}: {line}")
        print(json.dumps(counts))
        return 1 if counts["missed"] or counts["over_shared_memory"] else 0
    if args.command == "pack":
        pack(args.cache, args.tarball)
    elif args.command == "unpack":
        print(f"{unpack(args.tarball, args.dest)} kernels in {args.dest}")
    else:
        print(report(args.cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
