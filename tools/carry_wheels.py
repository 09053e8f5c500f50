#!/usr/bin/env python
"""Whether the wheels carried to a GPU machine (no registry there) are enough for what runs there,
checked on a machine that has much more installed (tools/gpu_prepare.sh).

    python -m tools.carry_wheels check SITE CODE [--cwd DIR]
    python -m tools.carry_wheels session SITE [--only rvq codec tokenize quantizer train_step]

`check`: runs CODE in an interpreter that sees only the standard library, SITE (the carried wheels
installed there with `pip install --target`) and what the GPU image is known to have (IMAGE_HAS and
everything they require, as installed here; not IMAGE_LACKS). The interpreter is a venv's (no system
site-packages) with SITE and links to those packages on its path, so the processes CODE starts are in
it too. Why not just import things here: packages find each other (transformers imports PIL, or
PyPI's `kernels`, where it finds them), so only a run without them shows what runs without them.

`session`: what the GPU session runs, from the repository's root in that interpreter with this
environment's editable install of encodec_fast copied in (the session's `pip install -e .`): the GPU
tests collected, and the benchmarks in their smoke suite on CPU; fails when the tests do not collect,
a benchmark fails or a peer (upstream, transformers, vector-quantize-pytorch) reads n/a for want of a
package.
"""

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import typing as tp
import venv
from pathlib import Path

#: What the GPU image ('cuda', of the device tool's H100 and H200) has that our runs use, besides the
#: standard library: these distributions and everything they require. From the image's package list
#: as read on 2026-11-17 (the device tool's KINDS.md; transformers 5.17.0, torch 2.11.0 there), which
#: has none of soundfile, cffi, encodec, vector-quantize-pytorch and PyPI's `kernels` (IMAGE_LACKS:
#: transformers 5.x names it as a requirement, so a check here would find it otherwise).
IMAGE_HAS = ("torch", "torchaudio", "numpy", "triton", "transformers", "matplotlib", "pyarrow", "pytest",
             "pytest-xdist", "einops", "tqdm")
IMAGE_LACKS = ("kernels",)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_closure(roots: tp.Iterable[str], exclude: tp.Iterable[str] = ()) -> tp.Set[str]:
    """The installed distributions named, and all they require on this platform (extras left out),
    recursively; not those in `exclude` (nor what only they require)."""
    from packaging.requirements import Requirement
    seen, todo, skip = set(), list(roots), {_normal(n) for n in exclude}
    while todo:
        name = _normal(todo.pop())
        if name in seen or name in skip:
            continue
        try:
            reqs = [Requirement(r) for r in importlib.metadata.requires(name) or []]
        except importlib.metadata.PackageNotFoundError:
            continue
        seen.add(name)
        todo += [r.name for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]
    return seen


def image_view(dest: Path, roots: tp.Iterable[str] = IMAGE_HAS, exclude: tp.Iterable[str] = IMAGE_LACKS) -> Path:
    """A folder of links to the installed files of `roots` and their requirements (modules and
    .dist-info alike; not `exclude`): with the standard library, what a python3 of the GPU image can
    import."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in _requirement_closure(roots, exclude):
        dist = importlib.metadata.distribution(name)
        for f in dist.files or []:
            top = f.parts[0]
            if top == ".." or top.endswith(".data"):
                continue
            src = Path(dist.locate_file(top))
            if src.exists() and not (dest / top).exists():
                (dest / top).symlink_to(src)
    return dest


def _editable_install() -> tp.List[Path]:
    """This environment's editable install of encodec_fast (`pip install -e .`, as the GPU session
    makes it): its .pth file, its finder module and its .dist-info; [] when there is none."""
    for folder in map(Path, sysconfig.get_paths()["purelib"].split(os.pathsep)):
        pth = sorted(folder.glob("__editable__.encodec_fast-*.pth"))
        if pth:
            return pth + sorted(folder.glob("__editable___encodec_fast_*_finder.py")) + sorted(
                folder.glob("encodec_fast-*.dist-info"))
    return []


def _image_python(tmp: Path, site: Path, roots: tp.Iterable[str] = IMAGE_HAS,
                  exclude: tp.Iterable[str] = IMAGE_LACKS, ours: bool = False) -> Path:
    """A venv in `tmp` (no system site-packages, no pip) whose path holds `site` and the image's
    packages (image_view) after its own empty site-packages: a python3 like the GPU image's with the
    carried wheels installed. Processes it starts with sys.executable are in it too. ours: with this
    environment's editable install of encodec_fast copied in (as the session's `pip install -e .`)."""
    env = tmp / "env"
    venv.create(env, with_pip=False, symlinks=True)
    packages = next(env.glob("lib/python*/site-packages"))
    view = image_view(tmp / "image", roots, exclude)
    (packages / "carried.pth").write_text(f"{site.resolve()}\n{view}\n")
    if ours:
        files = _editable_install()
        if not files:
            raise ValueError("encodec_fast is not installed editable here (pip install -e .)")
        for f in files:
            (shutil.copytree if f.is_dir() else shutil.copy)(f, packages / f.name)
    return env / "bin" / "python"


def _run(python: Path, code: str, cwd: Path, timeout: tp.Optional[float]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


def check(site: Path, code: str, cwd: tp.Optional[Path] = None, timeout: tp.Optional[float] = None,
          roots: tp.Iterable[str] = IMAGE_HAS, exclude: tp.Iterable[str] = IMAGE_LACKS, ours: bool = False
          ) -> subprocess.CompletedProcess:
    """Runs `code` (from `cwd`) in an interpreter that sees the standard library, `site` (wheels installed
    there with `pip install --target`) and the GPU image's packages, nothing else (_image_python; `roots`
    and `exclude` say which installed distributions stand for the image's; `ours` adds encodec_fast)."""
    with tempfile.TemporaryDirectory() as tmp:
        return _run(_image_python(Path(tmp), site, roots, exclude, ours), code, cwd or Path(tmp), timeout)


#: The peers the GPU session's benchmarks compare with, each from a carried wheel.
PEERS = ("upstream", "transformers", "vector-quantize-pytorch")


def check_session(site: Path, benchmarks: tp.Sequence[str], root: Path) -> tp.List[str]:
    """What tools/gpu_session.sh runs, from the repository's root `root`, with only the carried wheels,
    the image's packages and our editable install: the GPU tests collected (`pytest -m gpu`; they run
    only on a GPU) and the benchmarks' smoke suite on CPU. Returns the problems: tests that do not
    collect, a benchmark that failed, a peer that could not run (its n/a reason)."""
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        python = _image_python(Path(tmp), site, ours=True)  # one interpreter for both runs
        tests = _run(python, "import sys, pytest; sys.exit(pytest.main(['-q', '-m', 'gpu', '--collect-only', '-p', "
                             "'no:cacheprovider', 'tests/test_gpu.py']))", root, 600)
        if tests.returncode != 0:
            problems.append(f"the GPU tests do not collect: {(tests.stdout + tests.stderr)[-2000:]}")
        out = Path(tmp) / "bench"
        code = ("import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-m', 'bench', '--suite', "
                f"'smoke', '--only', *{list(benchmarks)!r}, '--out', {str(out)!r}]))")
        proc = _run(python, code, root, 1800)
        path = out / "results.json"
        if not path.exists():
            return problems + [f"the suite wrote no results (exit status {proc.returncode}): {proc.stderr[-2000:]}"]
        results = json.loads(path.read_text())
    problems += [f"{name}: {b.get('status')}" for name, b in results["benchmarks"].items()
                 if str(b.get("status", "")).startswith("error")]
    seen = set()
    for r in results["records"]:  # other n/a reasons (a case the smoke suite leaves out) are not problems
        if (r.get("na") and r["implementation"] in PEERS and r["implementation"] not in seen
                and re.search(r"cannot be imported|not installed", r["na"])):
            seen.add(r["implementation"])
            problems.append(f"{r['implementation']} ({r['benchmark']}): n/a: {r['na']}")
    return problems


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="CODE runs with SITE and the GPU image's packages only")
    c.add_argument("site", type=Path)
    c.add_argument("code")
    c.add_argument("--cwd", type=Path, help="where CODE runs (default: an empty folder)")
    bc = sub.add_parser("session", help="the GPU session's tests (collected) and benchmarks (smoke, CPU) with "
                                        "SITE and the image's packages only; every peer must import")
    bc.add_argument("site", type=Path)
    bc.add_argument("--only", nargs="+", default=["rvq", "codec", "tokenize", "quantizer", "train_step"],
                    help="benchmarks (default: those the session runs but `kernels`, which on CPU runs the "
                         "kernels in Triton's interpreter: 5-6 minutes)")
    args = p.parse_args(argv)
    try:
        if args.command == "session":
            problems = check_session(args.site, args.only, Path(__file__).resolve().parents[1])
            for line in problems:
                print(f"problem: {line}")
            print(f"{' '.join(args.only)}: {len(problems)} problems with {args.site} and the GPU image's packages only")
            return 1 if problems else 0
        proc = check(args.site, args.code, args.cwd)
    except (ValueError, OSError, subprocess.TimeoutExpired) as err:
        print(f"carry_wheels: {err}", file=sys.stderr)
        return 2
    if proc.returncode != 0:
        print(f"fails with {args.site} and the GPU image's packages only ({', '.join(IMAGE_HAS)}, what they require, "
              f"not {', '.join(IMAGE_LACKS)}):\n{proc.stderr[-3000:]}")
        return 1
    print(f"runs with {args.site} and the GPU image's packages only ({', '.join(IMAGE_HAS)} and what they require)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
