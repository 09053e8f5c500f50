"""`encodec-fast train report RUN_DIR`: the run's curves as PNG plots and a markdown summary.

Reads RUN_DIR/metrics.jsonl (written by the trainer) and writes RUN_DIR/report/: losses.png (the
generator's losses and the discriminator's, smoothed, against steps), validation.png (SI-SNR and
mel distance per bandwidth against steps), codebooks.png (perplexity and unused codes per stage
at the last validation) and REPORT.md. Needs matplotlib.

`encodec-fast train report RUN_A RUN_B ... -o OUT` compares runs (the same recipe in bf16 and fp32,
say): OUT/compare.png overlays each loss of every run (smoothed) against steps, OUT/COMPARE.md
tables each run's precision, speed and last losses (means over the last 10 logged steps).
"""

import argparse
import json
import sys
import typing as tp
from pathlib import Path

from .trainer import CONFIG, METRICS

LOSSES = (("l1", "time L1"), ("mel", "multi-scale mel"), ("adv", "adversarial (G)"), ("feat", "feature matching"),
          ("commit", "commitment"), ("disc", "discriminator"))


def read_metrics(run_dir: Path) -> tp.List[tp.Dict[str, tp.Any]]:
    path = run_dir / METRICS
    if not path.exists():
        raise ValueError(f"no {METRICS} in {run_dir}: not a training run")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            print(f"encodec-fast train report: {path}:{n}: unreadable line skipped", file=sys.stderr)
    return rows


def _smooth(values: tp.Sequence[float], width: int) -> tp.List[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > width:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def write_report(run_dir: tp.Union[str, Path]) -> Path:
    """Plots and REPORT.md under RUN_DIR/report -> that folder."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    train = [r for r in rows if r.get("split") == "train"]
    valid = [r for r in rows if r.get("split") == "valid"]
    books = [r for r in rows if r.get("split") == "codebooks"]
    config = json.loads((run_dir / CONFIG).read_text()) if (run_dir / CONFIG).exists() else {}

    fig, axes = plt.subplots(2, 3, figsize=(14, 7), constrained_layout=True)
    for ax, (key, label) in zip(axes.flat, LOSSES):
        points = [(r["step"], r[key]) for r in train if isinstance(r.get(key), (int, float))]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, color="0.8", linewidth=0.8, label="logged")
            ax.plot(steps, _smooth(values, 10), color="C0", label="mean of 10")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not in this run", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Training losses: {run_dir.name} ({config.get('model', '?')} model)")
    fig.savefig(out / "losses.png", dpi=110)
    plt.close(fig)

    bandwidths = sorted({r["bandwidth"] for r in valid})
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    for ax, (key, label) in zip(axes, (("si_snr", "SI-SNR (dB, higher is better)"),
                                       ("mel_distance", "mel distance (lower is better)"),
                                       ("stft_distance", "multi-scale STFT distance (lower is better)"))):
        for bw in bandwidths:
            points = [(r["step"], r[key]) for r in valid if r["bandwidth"] == bw]
            ax.plot(*zip(*points), marker="o", markersize=3, label=f"{bw:g} kbps")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if bandwidths:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("Validation (held-out files)")
    fig.savefig(out / "validation.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.5), constrained_layout=True)
    if books:
        last = books[-1]
        stages = range(1, len(last["perplexity"]) + 1)
        axes[0].bar(stages, last["perplexity"], color="C2")
        axes[0].set_title(f"codebook perplexity per stage, step {last['step']} (max = bins)")
        axes[1].bar(stages, last["unused"], color="C3", label="unused on validation")
        axes[1].plot(stages, last["dead_ema"], "k.", label="dead by EMA count")
        axes[1].legend(fontsize=8)
        axes[1].set_title("codes never used per stage")
        for ax in axes:
            ax.set_xlabel("quantizer stage")
            ax.grid(alpha=0.3)
    fig.savefig(out / "codebooks.png", dpi=110)
    plt.close(fig)

    lines = [f"# Training run `{run_dir.name}`", ""]
    if config:
        lines += ["Model `{}`, batch {} x {:g} s, lr {}, {} steps planned.".format(
            config.get("model"), config.get("batch_size"), config.get("segment_seconds", 0), config.get("lr"),
            config.get("steps")), ""]
    if train:
        t = train[-1]
        lines += [f"Last logged step {t['step']}: " + ", ".join(
            f"{label} {t[key]:.4g}" for key, label in LOSSES if isinstance(t.get(key), (int, float))) +
            f"; {t.get('steps_per_s', 0):.3g} steps/s, {t.get('audio_s_per_s', 0):.3g} audio s/s; "
            f"{t.get('skipped_steps', 0)} steps skipped.", ""]
    if valid:
        step = valid[-1]["step"]
        lines += [f"Validation at step {step}:", "", "| kbps | SI-SNR (dB) | mel distance | STFT distance |",
                  "|---:|---:|---:|---:|"]
        lines += [f"| {r['bandwidth']:g} | {r['si_snr']:.2f} | {r['mel_distance']:.3f} | {r['stft_distance']:.3f} |"
                  for r in valid if r["step"] == step]
        lines.append("")
    lines += ["![losses](losses.png)", "", "![validation](validation.png)", "", "![codebooks](codebooks.png)", ""]
    (out / "REPORT.md").write_text("\n".join(lines))
    return out


def _label(run_dir: Path, config: tp.Dict[str, tp.Any]) -> str:
    return f"{run_dir.name} ({config.get('precision', '?')})"


def write_comparison(run_dirs: tp.Sequence[tp.Union[str, Path]], out: tp.Union[str, Path]) -> Path:
    """compare.png and COMPARE.md in `out` for several runs -> `out`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for run_dir in map(Path, run_dirs):
        every = read_metrics(run_dir)
        rows = [r for r in every if r.get("split") == "train"]
        config = json.loads((run_dir / CONFIG).read_text()) if (run_dir / CONFIG).exists() else {}
        started = [r for r in every if r.get("split") == "start" and "precision" in r]
        if started:  # the precision the run computed in ('auto' resolved)
            config = {**config, "precision": started[-1]["precision"]}
        runs.append((run_dir, config, rows))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 3, figsize=(14, 7), constrained_layout=True)
    for ax, (key, label) in zip(axes.flat, LOSSES):
        drawn = False
        for i, (run_dir, config, rows) in enumerate(runs):
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, _smooth(values, 10), color=f"C{i}", label=_label(run_dir, config))
                drawn = True
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "in none of the runs", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{label} (mean of 10)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle("Training losses, run against run")
    fig.savefig(out / "compare.png", dpi=110)
    plt.close(fig)
    present = [(key, label) for key, label in LOSSES if any(key in r for _, _, rows in runs for r in rows)]
    lines = ["# Training runs compared", "",
             "| run | precision | model | batch | steps logged | steps/s | " +
             " | ".join(label for _, label in present) + " |",
             "|---|---|---|---:|---:|---:|" + "---:|" * len(present)]
    for run_dir, config, rows in runs:
        last = rows[-10:]
        cells = []
        for key, _ in present:
            values = [r[key] for r in last if isinstance(r.get(key), (int, float))]
            cells.append(f"{sum(values) / len(values):.4g}" if values else "—")
        speed = rows[-1].get("steps_per_s") if rows else None
        lines.append(f"| {run_dir.name} | {config.get('precision', '?')} | {config.get('model', '?')} | "
                     f"{config.get('batch_size', '?')} | {rows[-1]['step'] if rows else 0} | "
                     f"{'—' if speed is None else f'{speed:.3g}'} | " + " | ".join(cells) + " |")
    lines += ["", "Losses: means over each run's last 10 logged steps.", "", "![losses](compare.png)", ""]
    (out / "COMPARE.md").write_text("\n".join(lines))
    return out


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser("encodec-fast train report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, nargs="+", help="one run: its report; several: compared (needs -o)")
    parser.add_argument("-o", "--out", type=Path, default=None, help="where the comparison of several runs goes")
    args = parser.parse_args(argv)
    if len(args.run_dir) > 1 and args.out is None:
        parser.error("several runs are compared into a folder: give -o OUT")
    try:
        if len(args.run_dir) > 1:
            out = write_comparison(args.run_dir, args.out)
            print(f"encodec-fast train report: {out / 'COMPARE.md'}", file=sys.stderr)
            return 0
        out = write_report(args.run_dir[0])
    except (ValueError, OSError) as err:
        print(f"encodec-fast train report: error: {err}", file=sys.stderr)
        return 1
    except ImportError:
        print("encodec-fast train report: needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 1
    print(f"encodec-fast train report: {out / 'REPORT.md'}", file=sys.stderr)
    return 0
