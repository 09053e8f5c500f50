"""`encodec-fast info`: what this installation has and what each op will run on, in one screen.

    encodec-fast info [--json]        (also: python -m encodec_fast info)

Versions (Python, torch, triton, numpy, soundfile, pyarrow, torchaudio if present), whether the C++ coder
extension is built, which backend each op takes here and why, and the official checkpoints in the
cache. Every probe is guarded: a missing or broken piece is reported with what to do, never as a
traceback. `collect()` returns the same facts as a dict (benchmark reports record it).
"""

import argparse
import importlib
import json
import os
import platform
import sys
import typing as tp
from pathlib import Path

Facts = tp.Dict[str, tp.Any]


def _version(module: str) -> Facts:
    """{'version': ...} or {'error': ...} for importing `module`."""
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        if getattr(err, "name", None) == module:
            return {"installed": False}
        return {"installed": True, "error": f"{type(err).__name__}: {err}"}
    except Exception as err:  # a broken binary extension can raise anything (OSError, RuntimeError)
        return {"installed": True, "error": f"{type(err).__name__}: {err}"}
    return {"installed": True, "version": getattr(mod, "__version__", "unknown")}


#: Packages only some jobs use (name, what for): reported by their installed metadata, not imported.
OPTIONAL = (("matplotlib", "train report's plots"), ("tensorboard", "the trainer's TensorBoard logs"),
            ("ray", "tokenize --engine ray"))


def _optional_facts() -> Facts:
    from importlib import metadata
    out: Facts = {}
    for name, _ in OPTIONAL:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _torch_facts() -> Facts:
    facts = _version("torch")
    if "version" not in facts:
        return facts
    import torch
    facts["cuda_build"] = torch.version.cuda
    facts["threads"] = torch.get_num_threads()
    try:
        facts["cuda_available"] = bool(torch.cuda.is_available())
        if facts["cuda_available"]:
            facts["devices"] = [f"{torch.cuda.get_device_name(i)} "
                                f"(sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
                                for i in range(torch.cuda.device_count())]
    except Exception as err:  # a driver problem
        facts["cuda_available"] = False
        facts["cuda_error"] = f"{type(err).__name__}: {err}"
    return facts


def _soundfile_facts() -> Facts:
    facts = _version("soundfile")
    if "version" in facts:
        import soundfile
        facts["libsndfile"] = getattr(soundfile, "__libsndfile_version__", "unknown")
    return facts


def _coder_facts() -> Facts:
    try:
        from .ops import arith
    except Exception as err:
        return {"built": False, "error": f"{type(err).__name__}: {err}"}
    ext = arith._extension()
    if isinstance(ext, Exception):
        return {"built": False, "error": str(ext)}
    return {"built": True, "path": getattr(ext, "__file__", "")}


def _backend_facts(torch_facts: Facts, triton_facts: Facts) -> Facts:
    """Which implementation the ops take by default on this machine, and why."""
    facts: Facts = {"requested": os.environ.get("ENCODEC_FAST_BACKEND", "auto") or "auto",
                    "interpreter": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")}
    try:
        from .ops import backend, conv, rvq
        facts["requested"] = backend.requested_backend()
        facts["rvq_precision"] = rvq.rvq_precision()
        if facts["rvq_precision"] == "exact":
            facts["rvq_precision"] = f"exact (certified, {rvq.certify_with()} tensor cores)"
        facts["conv_precision"] = conv.conv_precision()
    except Exception as err:  # a bad ENCODEC_FAST_* value
        facts["error"] = f"{type(err).__name__}: {err}"
        return facts
    cuda = torch_facts.get("cuda_available", False)
    triton_ok = "version" in triton_facts
    want = facts["requested"]
    if want == "torch":
        facts["ops"], facts["why"] = "torch", "ENCODEC_FAST_BACKEND=torch"
    elif not triton_ok:
        facts["ops"] = "torch"
        facts["why"] = "triton is not installed" if not triton_facts.get("installed") else \
            f"triton does not import ({triton_facts.get('error')})"
    elif want == "triton":
        facts["ops"] = "triton"
        facts["why"] = ("ENCODEC_FAST_BACKEND=triton" + (" (CPU tensors in Triton's interpreter: slow, for tests)"
                        if facts["interpreter"] else "" if cuda else "; CPU tensors will be refused without "
                        "TRITON_INTERPRET=1"))
    elif facts["interpreter"]:
        facts["ops"] = "torch"
        facts["why"] = "TRITON_INTERPRET is set: auto keeps the reference (force triton to test kernels)"
    elif cuda:
        from .ops import dispatch
        ours = sum(r["runs"] == "ours" for r in dispatch.table())
        facts["ops"] = "triton"
        facts["why"] = (f"CUDA tensors on {torch_facts['devices'][0]} (convolutions: ours on the {ours} of "
                        f"{len(dispatch.table())} layer/mode pairs measured faster on an {dispatch.MEASURED_ON}, "
                        "cuDNN elsewhere); CPU tensors take the PyTorch reference")
    else:
        facts["ops"], facts["why"] = "torch", "no CUDA device: the PyTorch reference (Triton kernels need a GPU)"
    return facts


def _checkpoint_facts() -> Facts:
    try:
        import torch

        from .pretrained import CHECKPOINTS, ROOT_URL
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    repo = os.environ.get("ENCODEC_FAST_REPOSITORY")
    files = {}
    for name, file_name in CHECKPOINTS.items():
        where = [p for p in ([Path(repo) / file_name] if repo else []) + [cache / file_name] if p.is_file()]
        files[name] = {"file": file_name, "path": str(where[0]) if where else None,
                       "bytes": where[0].stat().st_size if where else None}
    return {"cache": str(cache), "repository": repo, "url": os.environ.get("ENCODEC_FAST_ROOT_URL", ROOT_URL),
            "files": files}


def collect() -> Facts:
    """Everything `encodec-fast info` shows, as a dict (JSON-serialisable)."""
    from . import __version__
    torch_facts = _torch_facts()
    triton_facts = _version("triton") if "version" in torch_facts else {"installed": False}
    numpy_facts = _version("numpy")
    return {
        "encodec_fast": {"version": __version__, "path": str(Path(__file__).parent)},
        "python": {"version": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}"},
        "torch": torch_facts, "triton": triton_facts, "numpy": numpy_facts,
        "soundfile": _soundfile_facts(), "pyarrow": _version("pyarrow"),
        "torchaudio": _version("torchaudio") if "version" in torch_facts else {"installed": False},
        "coder": _coder_facts(), "backend": _backend_facts(torch_facts, triton_facts),
        "checkpoints": _checkpoint_facts(), "optional": _optional_facts(),
    }


# The two known broken pairs, both for the tests only (measured; see README "Installing").
TORCHAUDIO_PAIRS = ("torchaudio 2.11.0 loads with torch 2.11-2.12, 2.11.1 with torch 2.13 and newer "
                    "(pip install -c constraints/gpu-image.txt or -c constraints/newest.txt)")


def version_tuple(text: str) -> tp.Tuple[int, ...]:
    """'2.11.0+cu130' -> (2, 11, 0)."""
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def interpreter_numpy_problem(triton_version: str, numpy_version: str) -> tp.Optional[str]:
    """The known failure of triton 3.4-3.6's interpreter with numpy >= 2.4, with its fix, or None."""
    if version_tuple(triton_version) < (3, 7) and version_tuple(numpy_version) >= (2, 4):
        return (f"triton {triton_version}'s interpreter (TRITON_INTERPRET=1, the tests' CPU kernels) fails with "
                f"numpy {numpy_version} in loops with a runtime bound (fixed in triton 3.7): pip install "
                "'numpy<2.4' for the tests (GPU runs are unaffected)")
    return None


def problems(facts: Facts) -> tp.List[str]:
    """Each thing that is missing or broken, with what to do about it."""
    out = []
    for name, fix, need in (("torch", "pip install torch", "required"), ("numpy", "pip install numpy", "required"),
                            ("soundfile", "pip install soundfile", "required"),
                            ("pyarrow", "pip install pyarrow", "required by tokenize's Parquet shards and "
                                                               "read_codes; the rest runs without it")):
        if "error" in facts[name] or not facts[name].get("installed"):
            problem = "does not import: " + facts[name]["error"] if "error" in facts[name] else "is missing"
            out.append(f"{name} {problem}"
                       f" ({need}): {fix}")
    if "error" in facts["triton"]:
        out.append(f"triton is installed but does not import ({facts['triton']['error']}): the ops use the PyTorch "
                   "reference; reinstall the triton that your torch names (pip install --force-reinstall torch)")
    tv, nv = facts["triton"].get("version"), facts["numpy"].get("version")
    if tv and nv and interpreter_numpy_problem(tv, nv):
        out.append(interpreter_numpy_problem(tv, nv))
    if "error" in facts["torchaudio"]:
        first = facts["torchaudio"]["error"].splitlines()[0][:160]
        out.append(f"torchaudio is installed but does not import ({first}). "
                   "encodec_fast does not need it; the tests' oracle (upstream encodec) does: " + TORCHAUDIO_PAIRS)
    if not facts["coder"].get("built"):
        out.append(f"the C++ arithmetic coder is not built ({facts['coder'].get('error')}): LM-coded .ecdc files use "
                   "the Python coder (same bytes, much slower); reinstall with a C++ compiler: "
                   "pip install --no-build-isolation -e .")
    if "error" in facts["backend"]:
        out.append(f"backend settings: {facts['backend']['error']}")
    if facts["torch"].get("cuda_error"):
        out.append(f"CUDA is present but unusable: {facts['torch']['cuda_error']}")
    return out


def format_facts(facts: Facts) -> str:
    def version(name: str) -> str:
        f = facts[name]
        if "version" in f:
            return f["version"]
        return "not installed" if not f.get("installed") else "BROKEN (see below)"

    t = facts["torch"]
    lines = [f"encodec_fast {facts['encodec_fast']['version']}  ({facts['encodec_fast']['path']})",
             f"  python      {facts['python']['version']} ({facts['python']['platform']})"]
    torch_line = f"  torch       {version('torch')}"
    if "version" in t:
        cuda = f"CUDA {t['cuda_build']} build" if t["cuda_build"] else "CPU build"
        gpus = ", ".join(t.get("devices", [])) or "no GPU visible"
        torch_line += f" ({cuda}; {gpus}; {t['threads']} CPU threads)"
    lines.append(torch_line)
    lines.append(f"  triton      {version('triton')}")
    lines.append(f"  numpy       {version('numpy')}")
    sf = facts["soundfile"]
    lines.append(f"  soundfile   {version('soundfile')}"
                 + (f" (libsndfile {sf['libsndfile']})" if "libsndfile" in sf else ""))
    lines.append(f"  pyarrow     {version('pyarrow')} (tokenize's Parquet shards)")
    lines.append(f"  torchaudio  {version('torchaudio')} (optional: only the tests' oracle uses it)")
    optional = facts.get("optional", {})
    lines.append("  optional    " + ", ".join(f"{name} {optional.get(name) or 'not installed'}"
                                              for name, _ in OPTIONAL))
    lines.append("              (" + "; ".join(why for _, why in OPTIONAL) + ")")
    c = facts["coder"]
    lines.append("  C++ coder   " + (f"built ({Path(c['path']).name})" if c.get("built") else "NOT built (see below)"))
    b = facts["backend"]
    if "ops" in b:
        lines.append(f"  ops         {b['ops']}: {b['why']}")
        lines.append(f"              (ENCODEC_FAST_BACKEND={b['requested']}; RVQ precision {b.get('rvq_precision')}, "
                     f"conv precision {b.get('conv_precision')})")
    ck = facts["checkpoints"]
    if "files" in ck:
        lines.append(f"  checkpoints {ck['cache']}" + (f" and $ENCODEC_FAST_REPOSITORY={ck['repository']}"
                                                       if ck["repository"] else ""))
        for name, f in ck["files"].items():
            state = f"present, {f['bytes'] / 1e6:.1f} MB" if f["path"] else "missing (downloaded on first use)"
            lines.append(f"              {f['file']:<28} {state}")
        if not any(f["path"] for f in ck["files"].values()):
            lines.append(f"              offline: copy the files from {ck['url']} into a folder and pass "
                         "--repository DIR (or set ENCODEC_FAST_REPOSITORY)")
    issues = problems(facts)
    lines.append("")
    lines.extend(["Problems:"] + [f"  - {p}" for p in issues] if issues else ["No problems found."])
    return "\n".join(lines)


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser("encodec-fast info", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")
    args = parser.parse_args(argv)
    facts = collect()
    print(json.dumps(facts, indent=2) if args.json else format_facts(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
