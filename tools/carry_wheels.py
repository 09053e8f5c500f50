#!/usr/bin/env python
"""Wheels for a machine without a registry, made small enough to carry (tools/gpu_prepare.sh).

    python -m tools.carry_wheels trim WHEEL OUT_DIR --prune transformers/models --keep auto encodec
    python -m tools.carry_wheels check SITE CODE

`trim`: the wheel without the subpackages a run does not import, still a valid wheel (its RECORD
rewritten). Why: the GPU machine has no registry, and the device tool carries 64 MiB with the
working tree. transformers' wheel is 13 MiB, nearly all of it the code of ~560 models under
transformers/models; the benchmarks' transformers peer imports EncodecModel only (through
transformers/models/auto's lazy maps, which name the other models as strings), so the wheel with
models/encodec and models/auto alone is 2.1 MiB and imports and runs EncodecModel the same.
Everything outside the pruned folder is kept, as is every file directly in it (its __init__.py).

`check`: runs CODE in an interpreter that sees only the standard library, SITE (the wheels installed
there with `pip install --target`) and what the GPU image is known to have (torch and everything it
requires, numpy, triton), so a list of wheels to carry is checked on a machine that has much more
installed (transformers imports optional packages such as PIL when it finds them: only a run without
them shows what it cannot do without).
"""

import argparse
import base64
import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
import typing as tp
import zipfile
from pathlib import Path


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _kept(name: str, prune: str, keep: tp.Collection[str]) -> bool:
    if not name.startswith(prune + "/"):
        return True
    rest = name[len(prune) + 1:].split("/")
    return len(rest) == 1 or rest[0] in keep


def trim(wheel: Path, out_dir: Path, prune: str, keep: tp.Collection[str]) -> tp.Tuple[Path, int, int]:
    """Writes OUT_DIR/<the wheel's name> without prune/<x>/ for every x not in keep. Returns (path,
    files kept, files dropped)."""
    prune = prune.strip("/")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / wheel.name
    if out.resolve() == wheel.resolve():
        raise ValueError("the trimmed wheel would overwrite its source: choose another OUT_DIR")
    kept = dropped = 0
    with zipfile.ZipFile(wheel) as src:
        names = src.namelist()
        records = [n for n in names if n.endswith(".dist-info/RECORD") and n.count("/") == 1]
        if len(records) != 1:
            raise ValueError(f"{wheel.name}: not a wheel (found {len(records)} .dist-info/RECORD files)")
        record = records[0]
        if not any(n.startswith(prune + "/") for n in names):
            raise ValueError(f"{wheel.name} has no {prune}/ to prune")
        missing = [k for k in keep if not any(n.startswith(f"{prune}/{k}/") for n in names)]
        if missing:
            raise ValueError(f"{wheel.name} has no {', '.join(f'{prune}/{k}/' for k in missing)}")
        lines = []
        tmp = out.with_name(out.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
            for info in src.infolist():
                if info.filename == record or info.is_dir():
                    continue
                if not _kept(info.filename, prune, keep):
                    dropped += 1
                    continue
                data = src.read(info)
                dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
                lines.append(_record_line(info.filename, data))
                kept += 1
            lines.append(f"{record},,")
            dst.writestr(record, "\n".join(lines) + "\n")
        tmp.replace(out)
    return out, kept, dropped


#: What the GPU image is known to have besides the standard library: these distributions and
#: everything they require (torch's requirements, theirs, and so on).
IMAGE_HAS = ("torch", "numpy", "triton")


def _requirement_closure(roots: tp.Iterable[str]) -> tp.Set[str]:
    """The installed distributions named, and all they require (extras left out), recursively."""
    seen, todo = set(), list(roots)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            reqs = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        seen.add(name)
        todo += [re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0] for r in reqs if "extra ==" not in r]
    return seen


def image_view(dest: Path, roots: tp.Iterable[str] = IMAGE_HAS) -> Path:
    """A folder of links to the installed files of `roots` and their requirements (modules and
    .dist-info alike): with the standard library, what a python3 of the GPU image can import."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in _requirement_closure(roots):
        dist = importlib.metadata.distribution(name)
        for f in dist.files or []:
            top = f.parts[0]
            if top == ".." or top.endswith(".data"):
                continue
            src = Path(dist.locate_file(top))
            if src.exists() and not (dest / top).exists():
                (dest / top).symlink_to(src)
    return dest


def check(site: Path, code: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter that sees the standard library, `site` (wheels installed
    there with `pip install --target`) and the GPU image's packages (image_view), nothing else."""
    with tempfile.TemporaryDirectory() as tmp:
        view = image_view(Path(tmp) / "image")
        boot = (f"import sys; sys.path[1:1] = [{str(site.resolve())!r}, {str(view)!r}]; "
                f"exec(compile({code!r}, '<check>', 'exec'))")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        return subprocess.run([sys.executable, "-S", "-c", boot], capture_output=True, text=True, env=env,
                              cwd=tmp)


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("trim", help="a wheel without some subpackages")
    t.add_argument("wheel", type=Path)
    t.add_argument("out_dir", type=Path)
    t.add_argument("--prune", required=True, help="a folder in the wheel, e.g. transformers/models")
    t.add_argument("--keep", nargs="*", default=[], help="subfolders of --prune to keep")
    c = sub.add_parser("check", help="CODE runs with SITE and the GPU image's packages only")
    c.add_argument("site", type=Path)
    c.add_argument("code")
    args = p.parse_args(argv)
    try:
        if args.command == "trim":
            out, kept, dropped = trim(args.wheel, args.out_dir, args.prune, set(args.keep))
            print(f"{out}: {kept} files kept, {dropped} dropped under {args.prune}/, "
                  f"{args.wheel.stat().st_size / 2**20:.1f} -> {out.stat().st_size / 2**20:.1f} MiB")
            return 0
        proc = check(args.site, args.code)
    except (ValueError, zipfile.BadZipFile, OSError) as err:
        print(f"carry_wheels: {err}", file=sys.stderr)
        return 2
    if proc.returncode != 0:
        print(f"fails with {args.site} and the GPU image's packages only ({', '.join(IMAGE_HAS)} and what they "
              f"require):\n{proc.stderr[-3000:]}")
        return 1
    print(f"runs with {args.site} and the GPU image's packages only ({', '.join(IMAGE_HAS)} and what they require)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
