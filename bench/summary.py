"""REPORT.md and the plots of a suite run (matplotlib, Agg, where installed): the headline table, throughput
against batch size and clip length, memory against length, quality against bitrate, speed-ups
(and the GPU kernels' when there are any), then every record in a table per benchmark."""

import json
import re
import typing as tp
from collections import defaultdict
from pathlib import Path

from bench.peaks import predicted_key

PEERS = ("upstream", "transformers")
COLORS = {"ours": "#d62728", "upstream": "#1f77b4", "transformers": "#2ca02c"}
STYLES = {"24khz": "-", "48khz": "--", "small": ":"}
Record = tp.Dict[str, tp.Any]


def _key(params: tp.Dict[str, tp.Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def _fmt(v: tp.Optional[float]) -> str:
    if v is None:
        return "n/a"
    if v == 0:
        return "0"
    a = abs(v)
    return f"{v:.3g}" if a < 1000 else f"{v:,.0f}"


def _label(bench: str, params: tp.Dict[str, tp.Any]) -> str:
    skip = {"device", "weights", "files"}
    parts = []
    for k, v in params.items():
        if k in skip:
            continue
        if k == "seconds":
            parts.append(f"{v:g} s")
        elif k == "kbps":
            parts.append(f"{v:g} kbps")
        elif k == "batch":
            parts.append(f"batch {v}")
        elif k == "audio_hours":
            parts.append(f"{v:g} h of audio")
        elif k in ("model", "op"):
            parts.append(str(v))
        else:
            parts.append(f"{k} {v}")
    return f"{bench}: " + ", ".join(parts)


def _ours(impls: tp.Dict[str, Record]) -> tp.Optional[str]:
    if "ours" in impls:
        return "ours"
    return next((k for k in impls if k.startswith("ours") and "reference" not in k), None)


def headline_rows(results: tp.Dict[str, tp.Any]) -> tp.List[tp.Dict[str, tp.Any]]:
    """One row per headline workload: ours, upstream, transformers (throughput in audio seconds
    per second where the work is audio, else the metric itself) and the speed-ups."""
    groups: tp.Dict[tp.Tuple[str, str, str], tp.Dict[str, Record]] = defaultdict(dict)
    order = []
    for r in results["records"]:
        if not r.get("headline") or r["metric"] not in ("time", "time_per_symbol"):
            continue
        key = (r["benchmark"], _key(r["params"]), r["metric"])
        if key not in groups:
            order.append(key)
        groups[key][r["implementation"]] = r
    # n/a records carry no headline flag: attach them to the groups they belong to
    for r in results["records"]:
        key = (r["benchmark"], _key(r["params"]), r["metric"])
        if r.get("na") and key in groups:
            groups[key].setdefault(r["implementation"], r)
    rows = []
    for key in order:
        impls = groups[key]
        ours = _ours(impls)
        if ours is None:
            continue
        first = impls[ours]
        audio = first.get("audio_seconds")
        unit = "audio s / s" if audio else first["unit"]

        def value(rec: tp.Optional[Record]) -> tp.Optional[float]:
            if rec is None or rec.get("na"):
                return None
            return audio / rec["median"] if audio else rec["median"]
        row = {"workload": _label(key[0], first["params"]), "unit": unit, "ours_impl": ours,
               "ours": value(impls[ours]), "spread": first.get("iqr",
                                                               0) / first["median"] if first.get("median") else 0}
        for peer in PEERS:
            rec = impls.get(peer)
            row[peer] = value(rec)
            row[f"{peer}_na"] = rec.get("na") if rec else None  # None: no such peer for this workload
            # speed-up: the peer's time over ours
            row[f"{peer}_ratio"] = (rec["median"] / impls[ours]["median"]
                                    if rec and not rec.get("na") and not impls[ours].get("na") else None)
        rows.append(row)
    return rows


def headline_table(results: tp.Dict[str, tp.Any]) -> str:
    rows = headline_rows(results)
    lines = ["| workload | unit | ours | upstream | transformers | ours vs upstream | ours vs transformers |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for peer in PEERS:
            cells.append(_fmt(r[peer]) if r[peer] is not None else
                         f"n/a ({_short(r[peer + '_na'])})" if r[peer + "_na"] else "—")
        ratios = [f"{r[p + '_ratio']:.2f}x" if r[p + "_ratio"] else "n/a" if r[p + "_na"] else "—" for p in PEERS]
        ours = _fmt(r["ours"]) + ("" if r["ours_impl"] == "ours" else f" ({r['ours_impl']})")
        lines.append(f"| {r['workload']} | {r['unit']} | {ours} | {cells[0]} | {cells[1]} | {ratios[0]} "
                     f"| {ratios[1]} |")
    return "\n".join(lines)


def _short(reason: tp.Optional[str]) -> str:
    if not reason:
        return "not measured"
    reason = str(reason).replace("|", "/").replace("\n", " ")
    return reason if len(reason) < 70 else reason[:67] + "..."


# ---------------------------------------------------------------------------------------------
# Plots


def _codec_series(results, metric: str, axis: str) -> tp.Dict[tp.Tuple[str, str, str], tp.List[tp.Tuple[float, float]]]:
    """{(model, op, impl): [(x, y)]} along `axis` ('batch' or 'seconds') at the suite's base case."""
    from bench.benchmarks.codec import BASE
    base = BASE[results["suite"]]
    series: tp.Dict[tp.Tuple[str, str, str], tp.List[tp.Tuple[float, float]]] = defaultdict(list)
    for r in results["records"]:
        if r["benchmark"] != "codec" or r["metric"] != metric or r.get("na"):
            continue
        p = r["params"]
        b0, s0, k0 = base[p["model"]]
        fixed = {"batch": b0, "seconds": s0, "kbps": k0}
        if any(p[k] != v for k, v in fixed.items() if k != axis):
            continue
        y = r["audio_seconds"] / r["median"] if metric == "time" else r["median"]
        series[(p["model"], p["op"], r["implementation"])].append((p[axis], y))
    return {k: sorted(v) for k, v in series.items()}


def _plot_lines(ax, series, op: str) -> None:
    xs_all = set()
    for (model, sop, impl), pts in sorted(series.items()):
        if sop != op or not pts:
            continue
        xs, ys = zip(*pts)
        xs_all |= set(xs)
        ax.plot(xs, ys, STYLES.get(model, "-"), marker="o", color=COLORS.get(impl, "gray"), label=f"{impl}, {model}")
    _log_axes(ax, sorted(xs_all))


def _log_axes(ax, xticks: tp.Sequence[float]) -> None:
    """Log-log with plain numbers: ticks at the measured x values, y labels as numbers."""
    from matplotlib.ticker import FuncFormatter, NullFormatter
    ax.set_xscale("log")
    ax.set_yscale("log")
    if xticks:
        ax.set_xticks(list(xticks))
        ax.set_xticklabels([f"{x:g}" for x in xticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:.1g}")[0] in "235" else ""))


def plot_throughput(results, axis: str, path: Path) -> bool:
    series = _codec_series(results, "time", axis)
    if not series:
        return False
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    what = "batch size (clips per call)" if axis == "batch" else "clip length (s)"
    for ax, op in zip(axes, ("encode", "decode")):
        _plot_lines(ax, series, op)
        ax.set_xlabel(what)
        ax.set_ylabel("throughput (audio seconds per second)")
        ax.set_title(f"{op}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    from bench.benchmarks.codec import BASE
    base = BASE[results["suite"]].values()
    fixed = (f"{'/'.join(sorted({f'{b[1]:g}' for b in base}))} s clips" if axis == "batch"
             else f"batch {'/'.join(sorted({str(b[0]) for b in base}))}")
    fig.suptitle(f"EnCodec {('throughput against batch size' if axis == 'batch' else 'throughput against clip length')}"
                 f" ({fixed}, 6 kbps, {_device(results)}); higher is better")
    return _save(fig, path)


def _save(fig, path: Path, left: tp.Optional[float] = None) -> bool:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    if left is not None:  # long tick labels: tight_layout alone clips them
        fig.subplots_adjust(left=left)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _device(results) -> str:
    c = results["context"]
    if c.get("gpu"):
        return c["gpu"]
    return f"{c.get('cpu', 'CPU')}, {c.get('torch_threads')} threads"


def plot_memory(results, path: Path) -> bool:
    series = _codec_series(results, "peak_memory", "seconds")
    longs = [r for r in results["records"] if r["benchmark"] == "long_file" and r["metric"] == "peak_memory"]
    if not series and not longs:
        return False
    import matplotlib.pyplot as plt
    ops = [op for op in ("encode", "decode") if any(k[1] == op for k in series) or (op == "encode" and longs)]
    fig, axes = plt.subplots(1, len(ops), figsize=(5.5 * len(ops) + (1.5 if len(ops) == 1 else 0), 4.2),
                             squeeze=False)
    for ax, op in zip(axes[0], ops):
        _plot_lines(ax, series, op)
        if op == "encode" and longs:
            for r in longs:
                color = COLORS.get(r["implementation"], "gray")
                limit = re.search(r"under a ([\d.]+) GB", r.get("na") or "")
                if r.get("na") and limit:  # it needed more than the limit: drawn at the limit, hollow
                    ax.scatter([r["params"]["seconds"]], [float(limit.group(1)) * 1024], marker="^", s=120,
                               facecolors="none", edgecolors=color, linewidths=1.5,
                               label=f"{r['implementation']}, one long file: out of memory"
                                     f" (> {limit.group(1)} GB limit)")
                elif not r.get("na"):
                    ax.scatter([r["params"]["seconds"]], [r["median"]], marker="*", s=150, color=color,
                               label=f"{r['implementation']}, one long file, {r.get('how', '')}")
            ticks = {x for k, pts in series.items() if k[1] == op for x, _ in pts}
            _log_axes(ax, sorted(ticks | {r["params"]["seconds"] for r in longs}))
        ax.set_xlabel("clip length (s), batch 1")
        ax.set_ylabel("peak memory over the loaded model (MB)")
        ax.set_title(op)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    kind = ("CUDA max allocated" if results["context"].get("gpu")
            else "CPU peak RSS during the call, one process per model")
    title = f"Peak memory against clip length ({kind}); lower is better"
    fig.suptitle(title if len(ops) > 1 else title.replace(" (", "\n(", 1))
    return _save(fig, path)


def plot_quality(results, path: Path) -> bool:
    recs = [r for r in results["records"] if r["benchmark"] == "quality" and r["implementation"] == "ours"
            and not r.get("na") and r["metric"] in ("si_snr", "mel_distance")]
    if not recs:
        return False
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series: tp.Dict[tp.Tuple[str, str, str], tp.List[tp.Tuple[float, float]]] = defaultdict(list)
    for r in recs:
        series[(r["metric"], r["params"]["model"], r["params"]["kind"])].append((r["params"]["kbps"], r["mean"]))
    kinds = {"speech": "#9467bd", "music": "#ff7f0e"}
    for ax, metric, label in ((axes[0], "si_snr", "SI-SNR (dB), higher is better"),
                              (axes[1], "mel_distance", "mel distance, lower is better")):
        for (m, model, kind), pts in sorted(series.items()):
            if m != metric:
                continue
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, STYLES.get(model, "-"), marker="o", color=kinds.get(kind, "gray"), label=f"{model}, {kind}")
        for r in results["records"]:  # the decoder on unquantized latents: the ceiling, dashed
            if (r["benchmark"] == "quality" and r["implementation"] == "ours, unquantized" and not r.get("na")
                    and r["metric"] == metric):
                ax.axhline(r["mean"], linestyle=":", color=kinds.get(r["params"]["kind"], "gray"), linewidth=1,
                           label=f"{r['params']['model']}, {r['params']['kind']}: unquantized latents")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1.5, 3, 6, 12, 24])
        ax.set_xticklabels(["1.5", "3", "6", "12", "24"])
        ax.set_xlabel("bitrate (kbps)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    files = recs[0]["params"].get("files")
    fig.suptitle(f"Codec quality against bitrate, held-out audio ({files} clips per kind, mean over clips)")
    return _save(fig, path)


def plot_speedups(results, path: Path) -> bool:
    rows = [r for r in headline_rows(results) if any(r[p + "_ratio"] for p in PEERS)]
    if not rows:
        return False
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(12, 0.45 * len(rows) + 1.6))
    height = 0.38
    for i, peer in enumerate(PEERS):
        ys = [j + (i - 0.5) * height for j in range(len(rows))]
        vals = [r[peer + "_ratio"] or 0 for r in rows]
        # bars grow from 1x (equal speed) towards the ratio, on a log axis
        ax.barh(ys, [v - 1 if v else 0 for v in vals], left=1, height=height, color=COLORS[peer],
                label=f"ours vs {peer}")
        for y, v in zip(ys, vals):
            if v:
                ax.text(v, y, f" {v:.2f}x", va="center", fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([_short_label(r["workload"]) for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up, log scale (the peer's time / ours; > 1: ours is faster)")
    ax.set_title(f"encodec_fast against its peers, same weights and inputs ({_device(results)})")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path, left=0.3)


def _short_label(text: str) -> str:
    for noise in ("alphabet 1024, ", ", workers 1", ", device cpu"):
        text = text.replace(noise, "")
    return text if len(text) < 60 else text[:57] + "..."


def plot_kernels(results, path: Path) -> bool:
    recs = [r for r in results["records"] if r["benchmark"] == "kernels" and r["implementation"] == "triton"
            and r.get("speedup")]
    if not recs:
        return False
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(recs) + 1.6))
    labels = [", ".join(f"{v}" for k, v in r["params"].items() if k not in ("device",)) for r in recs]
    vals = [r["speedup"] for r in recs]
    ax.barh(range(len(recs)), vals, color=["#d62728" if v >= 1 else "#7f7f7f" for v in vals])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(recs)))
    ax.set_yticklabels(labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up of the Triton kernel over the PyTorch path (> 1: faster)")
    ax.set_title(f"Triton kernels vs PyTorch ({_device(results)})")
    return _save(fig, path)


PLOTS = [("throughput_vs_batch.png", "Throughput against batch size",
          lambda res, p: plot_throughput(res, "batch", p)),
         ("throughput_vs_length.png", "Throughput against clip length",
          lambda res, p: plot_throughput(res, "seconds", p)),
         ("memory_vs_length.png", "Peak memory against clip length", plot_memory),
         ("quality_vs_bitrate.png", "Quality against bitrate", plot_quality),
         ("speedups.png", "Speed-ups over the peers", plot_speedups),
         ("kernels.png", "Triton kernels against their PyTorch paths", plot_kernels)]


# ---------------------------------------------------------------------------------------------
# The report


def _context_lines(results) -> tp.List[str]:
    c = results["context"]
    v = c.get("versions", {})
    versions = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    missing = ", ".join(k for k, val in v.items() if not val)
    lines = [f"- suite `{results['suite']}`, device `{c['device']}`, {c['date']}; `{results.get('command', '')}`",
             f"- machine: {c.get('cpu')}, {c.get('cpu_count')} cores visible, {c.get('torch_threads')} torch threads"
             + (f"; GPU {c['gpu']} (CUDA {c.get('cuda')})" if c.get("gpu") else "; no GPU"),
             f"- allocator: {c.get('allocator')}",
             f"- versions: {versions}" + (f" (not installed: {missing})" if missing else ""),
             f"- commit {c.get('git_commit', '')[:12]}" + (" (with uncommitted changes)" if c.get("git_dirty") else ""),
             f"- total time {results.get('seconds', 0):.0f} s"]
    return lines


def floor_ms(record: Record, device_name: str) -> tp.Optional[float]:
    """The roofline a time record in ms carries for the GPU it ran on: the floor of what its Triton
    launches did (`launch_floor_ms`), else the case's own model (`predicted_ms_h100` / `_h200`)."""
    key = predicted_key(device_name)
    if key is None or record.get("unit") != "ms" or record.get("na"):
        return None
    if record.get("launch_floor_ms") is not None:
        return record["launch_floor_ms"]
    return record.get(key)


def detail_tables(results) -> tp.List[str]:
    """Every record per benchmark; on an H100 or H200, with each time's roofline floor and the share
    of it reached (floor / median: 1 would be at the hardware's limit)."""
    lines: tp.List[str] = []
    by_bench: tp.Dict[str, tp.List[Record]] = defaultdict(list)
    for r in results["records"]:
        by_bench[r["benchmark"]].append(r)
    gpu = results["context"].get("gpu") or ""
    for name, entry in results["benchmarks"].items():
        lines += ["", f"### {name}: {entry['title']}", "",
                  f"status: {entry.get('status')}" + (f", {entry['seconds']:.0f} s" if "seconds" in entry else "")]
        recs = by_bench.get(name, [])
        if not recs:
            continue
        floors = [floor_ms(r, gpu) for r in recs]
        with_floor = any(f is not None for f in floors)
        head = "| case | implementation | metric | median | IQR | min - max | n |"
        lines += ["", head + (" floor ms | floor / median |" if with_floor else ""),
                  "|---|---|---|---|---|---|---|" + ("---|---|" if with_floor else "")]
        for r, floor in zip(recs, floors):
            case = _label(name, r["params"]).split(": ", 1)[1]
            metric = r["metric"] + (f" ({r['unit']})" if r["unit"] else "")
            if r.get("na"):
                lines.append(f"| {case} | {r['implementation']} | {metric} | n/a: {_short(r['na'])} | | | |"
                             + (" | |" if with_floor else ""))
                continue
            row = (f"| {case} | {r['implementation']} | {metric} | {_fmt(r['median'])} | {_fmt(r['iqr'])} | "
                   f"{_fmt(r['min'])} - {_fmt(r['max'])} | {r['n']} |")
            if with_floor:
                share = f"{floor / r['median']:.1%}" if floor is not None and r.get("median") else ""
                row += f" {'' if floor is None else _fmt(floor)} | {share} |"
            lines.append(row)
    return lines


def write(out: Path, results: tp.Dict[str, tp.Any]) -> None:
    """OUT/REPORT.md and OUT/*.png from results (also callable on a saved results.json). Without
    matplotlib (not a requirement of the library) the report says so instead of holding the plots;
    `python -m bench.summary OUT` draws them later where it is installed."""
    made = []
    try:
        import matplotlib
        matplotlib.use("Agg")
    except ImportError:
        made.append((None, "plots: not drawn, matplotlib is not installed here (pip install matplotlib; then "
                           "`python -m bench.summary DIR` on this folder)"))
    else:
        for file, title, fn in PLOTS:
            try:
                if fn(results, out / file):
                    made.append((file, title))
            except Exception as err:  # a plot that fails must not lose the report
                made.append((None, f"{title}: plot failed ({type(err).__name__}: {err})"))
    lines = [f"# encodec_fast benchmark report ({results['suite']}, {results['context']['device']})", ""]
    lines += _context_lines(results)
    lines += ["", "## Headline", "",
              "Throughput in seconds of audio per second (higher is better) where the work is audio, else the "
              "metric's unit (lower is better); ratios are the peer's time over ours (> 1: ours is faster). "
              "Medians over the repetitions; n/a says why a peer could not run; — : the peer has no such job.", "",
              headline_table(results), ""]
    for file, title in made:
        lines += [f"![{title}]({file})" if file else f"- {title}", ""]
    if results.get("skipped"):
        lines += ["## Skipped", "", *[f"- {s}" for s in results["skipped"]], ""]
    lines += ["## Every measurement"] + detail_tables(results) + [""]
    (out / "REPORT.md").write_text("\n".join(lines))


if __name__ == "__main__":  # re-render a saved run: python -m bench.summary DIR
    import sys
    folder = Path(sys.argv[1])
    write(folder, json.loads((folder / "results.json").read_text()))
    print(f"wrote {folder / 'REPORT.md'}")
