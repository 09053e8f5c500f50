"""Compare two suite runs: for every measurement present in both (same benchmark, case,
implementation and metric), the ratio new/old of the medians, its noise band, and a flag when the
ratio leaves the band. The band is the larger relative interquartile range of the two runs (their
repetitions' spread), at least --noise-floor. A flagged change in the worse direction (slower,
bigger, lower quality) is a regression; with --fail-above F the exit status is 1 when one is
worse than 1 + F.

    python -m bench --compare OLD_DIR --out NEW_DIR --no-run [--fail-above 0.25] [--noise-floor 0.05]
                    [--normalize-by upstream]

On a VM whose speed drifts between runs (this project's: 5-15% within ten minutes, every
implementation alike), `--normalize-by upstream` compares our code against the drift: each of
our ratios is divided by upstream's on the same case.
"""

import json
import sys
import typing as tp
from pathlib import Path

from bench.summary import _fmt, _key, _label


def load(folder: Path) -> tp.Dict[str, tp.Any]:
    path = folder / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (not a `python -m bench` output folder)")
    return json.loads(path.read_text())


def compare(old: tp.Dict[str, tp.Any], new: tp.Dict[str, tp.Any], noise_floor: float = 0.05,
            normalize_by: tp.Optional[str] = None) -> tp.List[tp.Dict[str, tp.Any]]:
    """Rows for the measurements in both runs (n/a on either side is skipped). With
    `normalize_by` (an implementation, e.g. 'upstream'), each other implementation's ratio is
    divided by that implementation's ratio on the same case and metric (when it has one): what
    the machine's drift between the runs does to both cancels; the reference's own rows are
    shown, not flagged."""
    def index(results):
        return {(r["benchmark"], _key(r["params"]), r["implementation"], r["metric"]): r
                for r in results["records"] if not r.get("na") and r.get("median")}
    before, after = index(old), index(new)
    rows = []
    for key in sorted(before.keys() & after.keys()):
        a, b = before[key], after[key]
        ratio = b["median"] / a["median"]
        band = max(noise_floor, a["iqr"] / abs(a["median"]), b["iqr"] / abs(b["median"]))
        reference = None
        if normalize_by:
            ref_key = (key[0], key[1], normalize_by, key[3])
            if key[2] == normalize_by:
                reference = "reference"
            elif ref_key in before and ref_key in after:
                ra, rb = before[ref_key], after[ref_key]
                ratio /= rb["median"] / ra["median"]
                band = max(band, ra["iqr"] / abs(ra["median"]), rb["iqr"] / abs(rb["median"]))
                reference = normalize_by
        higher = bool(b.get("higher_is_better"))
        worse = ratio < 1 / (1 + band) if higher else ratio > 1 + band
        better = ratio > 1 + band if higher else ratio < 1 / (1 + band)
        if reference == "reference":
            worse = better = False
        # how much worse, as a factor >= 1 (time x1.3 or throughput / 1.3 are both 1.3)
        worse_by = (1 / ratio if higher else ratio) if ratio > 0 else float("inf")
        rows.append({"benchmark": key[0], "case": _label(key[0], b["params"]).split(": ", 1)[1],
                     "implementation": key[2], "metric": key[3], "unit": b["unit"], "old": a["median"],
                     "new": b["median"], "ratio": ratio, "band": band, "normalized_by": reference,
                     "flag": "regression" if worse else "improvement" if better else "", "worse_by": worse_by})
    return rows


def drift(rows: tp.List[tp.Dict[str, tp.Any]], implementation: str) -> tp.Optional[float]:
    """Median new/old of an implementation's times (lower-is-better metrics): the machine's drift
    between the runs, as far as that implementation's code did not change."""
    ratios = sorted(r["new"] / r["old"] for r in rows if r["implementation"] == implementation
                    and r["metric"] in ("time", "time_per_symbol"))
    return ratios[len(ratios) // 2] if ratios else None


def table(rows: tp.List[tp.Dict[str, tp.Any]], only_flagged: bool = False) -> str:
    lines = ["| benchmark | case | implementation | metric | old | new | new/old | noise band | flag |",
             "|---|---|---|---|---|---|---|---|---|"]
    normalized = any(r.get("normalized_by") not in (None, "reference") for r in rows)
    if normalized:
        lines[0] = lines[0].replace("new/old", "new/old over the reference's")
    for r in rows:
        if only_flagged and not r["flag"]:
            continue
        lines.append(f"| {r['benchmark']} | {r['case']} | {r['implementation']} | {r['metric']} | {_fmt(r['old'])} | "
                     f"{_fmt(r['new'])} | {r['ratio']:.3f} | ±{100 * r['band']:.0f}% | {r['flag']} |")
    return "\n".join(lines)


def main(old_dir: Path, new_dir: Path, fail_above: tp.Optional[float], noise_floor: float = 0.05,
         normalize_by: tp.Optional[str] = None) -> int:
    try:
        old, new = load(old_dir), load(new_dir)
    except FileNotFoundError as err:
        print(f"--compare: {err}", file=sys.stderr)
        return 2
    rows = compare(old, new, noise_floor, normalize_by)
    flagged = [r for r in rows if r["flag"] == "regression"]
    text = [f"# {new_dir} against {old_dir}", "",
            f"{len(rows)} measurements in both runs; {len(flagged)} regressions and "
            f"{sum(r['flag'] == 'improvement' for r in rows)} improvements outside their noise band.", ""]
    for side, res in (("old", old), ("new", new)):
        c = res["context"]
        text.append(f"- {side}: {c.get('date')}, commit {str(c.get('git_commit', ''))[:12]}, {c.get('cpu')}, "
                    f"{c.get('torch_threads')} threads, torch {c.get('versions', {}).get('torch')}")
    for impl in ("upstream", "transformers"):
        d = drift(compare(old, new, noise_floor), impl)
        if d is not None:
            text.append(f"- {impl}'s times, new/old (median): {d:.3f}: the machine's drift between the runs, as far "
                        f"as {impl} did not change" + ("" if normalize_by else
                                                       "; `--normalize-by upstream` divides it out"))
    if normalize_by:
        text.append(f"- ratios of the other implementations are divided by {normalize_by}'s on the same case")
    if old["context"].get("cpu") != new["context"].get("cpu") or old["context"].get("torch_threads") != \
            new["context"].get("torch_threads") or old["context"].get("allocator") != new["context"].get("allocator"):
        text.append("- note: the runs differ in machine, threads or allocator setting: ratios mix those in")
    text += ["", table(rows)]
    report = "\n".join(text) + "\n"
    (new_dir / "COMPARE.md").write_text(report)
    print(report)
    if fail_above is not None:
        bad = [r for r in flagged if r["worse_by"] > 1 + fail_above]
        if bad:
            print(f"{len(bad)} regressions worse than {1 + fail_above:.2f}x:\n" + table(bad), file=sys.stderr)
            return 1
    return 0
