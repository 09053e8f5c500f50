"""The dispatch table (`encodec_fast/ops/dispatch.py`'s CONV_MS) from a GPU run of the `kernels`
benchmark: per SEANet layer (and fused block or level: the gemm family's), precision mode and kernel
family, cuDNN's and our milliseconds, which family wins, and whether it beats cuDNN.

    python -m tools.dispatch_table RESULTS.json [--family direct|gemm|best] [--out TABLE.md]

RESULTS.json: the suite's results (`python -m bench --device cuda --only kernels`, or a
`tools/gpu_session.sh` run's `conv/results.json`). Prints a markdown table of every measured
(layer, mode, family), then the CONV_MS entries for `--family` as Python source to paste into
`encodec_fast/ops/dispatch.py` (with MEASUREMENT, MEASURED_ON and FAMILY): `best` takes, per
layer and mode, the family with the smaller time (the table then names it per entry in a comment,
and FAMILY must be the one that wins most, or the dispatch extended to per-entry families).
"""

import argparse
import json
import sys
import typing as tp
from pathlib import Path


def _layer_keys() -> tp.Dict[str, tp.Tuple[str, int, int, int, int]]:
    """The kernels benchmark's CONV_LAYERS: name -> (op, C_in, C_out, K, stride), `ops.dispatch`'s key."""
    from bench.benchmarks.kernels import CONV_LAYERS
    return {name: ("conv_transpose1d" if transposed else "conv1d", c_in, c_out, k, s)
            for name, c_in, c_out, k, s, _d, _L, _res, transposed in CONV_LAYERS}


def _fused_keys() -> tp.Dict[str, tp.Tuple[str, int, int, int, int]]:
    """The kernels benchmark's fused stages (`block` stage, family `fused`): row name -> the key
    `ops.conv` asks `ops.dispatch` with (residual_block: C, H, 3, 1; residual_block_down: C, C_out,
    kernel, stride; up_residual_block: C_in, C, kernel, stride). Always the gemm family's."""
    from bench.benchmarks.kernels import BLOCK_LAYERS, STAGE_LAYERS, UP_STAGE_LAYERS
    keys = {f"block: {name}": ("residual_block", c, c // 2, 3, 1) for name, c, _L in BLOCK_LAYERS}
    keys.update({f"block+down: {name}": ("residual_block_down", c, 2 * c, 2 * s, s) for name, c, s, _L in STAGE_LAYERS})
    keys.update({f"up+block: {name}": ("up_residual_block", 2 * c, c, 2 * s, s) for name, c, s, _L in UP_STAGE_LAYERS})
    return keys


def measurements(results: tp.Dict[str, tp.Any]) -> tp.Dict[tp.Tuple[str, str, str], tp.Dict[str, float]]:
    """{(layer name, mode, family): {"torch": ms, "triton": ms}} from the conv stage's records and
    the block stage's fused ones (family 'gemm': the fused kernels are that family's)."""
    out: tp.Dict[tp.Tuple[str, str, str], tp.Dict[str, float]] = {}
    for r in results.get("records", []):
        p = r.get("params", {})
        stage, family = p.get("stage"), p.get("family")
        wanted = stage == "conv" or (stage == "block" and family == "fused")
        if r.get("benchmark") != "kernels" or not wanted or r.get("metric") != "time" or r.get("na"):
            continue
        name = str(p.get("op", "")).removeprefix("conv: ")
        key = (name, p.get("precision"), "gemm" if family == "fused" else family)
        out.setdefault(key, {})[r["implementation"]] = float(r["median"])
    return {k: v for k, v in out.items() if {"torch", "triton"} <= set(v)}


def render(results: tp.Dict[str, tp.Any], family: str) -> str:
    keys = {**_layer_keys(), **_fused_keys()}
    found = measurements(results)
    if not found:
        raise ValueError("no conv-stage records of the kernels benchmark in these results")
    ctx = results.get("context", {})
    device = ctx.get("device") or ctx.get("gpu") or "?"
    lines = [f"# Convolutions against cuDNN, per precision mode and kernel family ({device})", "",
             "| layer | mode | family | cuDNN ms | ours ms | speed-up |", "|---|---|---|---:|---:|---:|"]
    for (name, mode, fam), t in sorted(found.items(), key=lambda kv: (list(keys).index(kv[0][0])
                                                                       if kv[0][0] in keys else 99, kv[0][1:])):
        lines.append(f"| {name} | {mode} | {fam} | {t['torch']:.3f} | {t['triton']:.3f} | "
                     f"{t['torch'] / t['triton']:.2f}x |")
    entries: tp.Dict[str, tp.Dict[str, tp.Tuple[float, float, str]]] = {}
    for (name, mode, fam), t in found.items():
        if name not in keys or (family != "best" and fam != family):
            continue
        best = entries.setdefault(name, {}).get(mode)
        if best is None or t["triton"] < best[1]:
            entries[name][mode] = (t["torch"], t["triton"], fam)
    lines += ["", "```python", f"FAMILY = {family!r}" if family != "best" else "# per entry: the faster family",
              "CONV_MS: tp.Dict[tp.Tuple[str, int, int, int, int], tp.Dict[str, tp.Tuple[float, float]]] = {"]
    for name in keys:
        if name not in entries:
            continue
        modes = ", ".join(f'"{m}": ({c:.3f}, {o:.3f})' for m, (c, o, _) in sorted(entries[name].items()))
        fams = ", ".join(sorted({f for _, _, f in entries[name].values()}))
        lines.append(f"    {keys[name]!r}: {{{modes}}},  # {name}" + (f" ({fams})" if family == "best" else ""))
    lines += ["}", "```", ""]
    return "\n".join(lines)


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--family", default="best", choices=["direct", "gemm", "best"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        text = render(json.loads(args.results.read_text()), args.family)
    except (OSError, ValueError) as err:
        print(f"dispatch_table: {err}", file=sys.stderr)
        return 1
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
