"""What every benchmark script records about the machine, and how it saves its results."""

import datetime
import json
import os
import platform
import typing as tp
from pathlib import Path

import torch


def machine() -> tp.Dict[str, tp.Any]:
    """Date, host, CPU, core and torch thread counts, Python, torch and the other packages' versions, GPUs."""
    info: tp.Dict[str, tp.Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
        "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__}
    try:
        from encodec_fast.info import collect
        facts = collect()
        info["versions"] = {name: facts[name].get("version") for name in
                            ("encodec_fast", "torch", "triton", "numpy", "soundfile", "torchaudio")}
        info["gpus"] = facts["torch"].get("devices", [])
    except Exception as err:  # the report must not fail on a probe
        info["versions"] = {"error": str(err)}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        info["cpu"] = info["machine"]
    return info


def save(out: Path, name: str, report: tp.Any, markdown: str) -> Path:
    """Write `out/<name>_<date>.json` and `.md`; returns the path without suffix."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}_{datetime.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(markdown)
    return stem


def publish(text: str, out: tp.Optional[Path], name: str, args: tp.Any, rows: tp.Any) -> None:
    """Print a benchmark's markdown table and, with `out`, save it with the machine, the
    arguments (paths as strings) and the rows as `out/<name>_<date>.json` and `.md`."""
    print(text)
    if out:
        arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        info = machine()
        stem = save(out, name, {"machine": info, "args": arguments, "rows": rows},
                    f"# {text}\n\n{machine_line(info)}\n")
        print(f"saved {stem}.json and .md")


def machine_line(info: tp.Dict[str, tp.Any]) -> str:
    """One markdown line naming the machine of `machine()`: date, CPU, cores, threads, versions, GPUs."""
    versions = info.get("versions", {})
    named = ", ".join(f"{k} {v}" for k, v in versions.items() if v and k != "error") or f"torch {info.get('torch')}"
    gpus = ", ".join(str(g.get("name", g)) if isinstance(g, dict) else str(g) for g in info.get("gpus") or []) or "none"
    return (f"Machine: {info.get('date')}, {info.get('cpu')}, {info.get('cpu_count')} CPUs, "
            f"{info.get('torch_threads')} torch threads, Python {info.get('python')}, {named}; GPUs: {gpus}.")
