"""`python -m bench`: run the registered benchmarks, write results.json and REPORT.md with plots,
compare with an earlier run.

    python -m bench [--suite smoke|quick|full] [--device cpu|cuda] [--only NAME ...] [--skip NAME ...]
                    [--checkpoint PATH] [--out DIR] [--compare OLD_DIR] [--fail-above 0.25] [--normalize-by upstream]
                    [--budget-seconds S] [--threads N] [--default-allocator] [--list]
    python -m bench --compare OLD_DIR --out NEW_DIR --no-run      # compare two finished runs

Benchmarks run in priority order (the headline first); with --budget-seconds, no new case starts
after the budget and the report lists what was skipped. results.json is rewritten after every
benchmark, so an interrupted run keeps what it measured. Every implementation of a benchmark runs
in this process with the same thread count and allocator setting, except where a benchmark says
otherwise (memory and tokenization run each implementation in its own process, with the same
settings), and the context records both.
"""

import argparse
import datetime
import json
import signal
import sys
import tempfile
import threading
import time
import traceback
import typing as tp
from pathlib import Path

from bench.core import REGISTRY, SUITES, BudgetExceeded, Context, context

DEFAULT_OUT = Path("bench/results")


def load_benchmarks() -> None:
    import bench.benchmarks  # noqa: F401  (registers every benchmark)


def parse(argv: tp.Optional[tp.Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=SUITES, default="quick",
                        help="smoke: every benchmark at toy size (< 1 min); quick: < 15 min on 2 CPU cores; full")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    parser.add_argument("--skip", nargs="+", metavar="NAME", default=[], help="leave these out")
    parser.add_argument("--checkpoint", type=Path, help="the checkpoint whose quality is measured")
    parser.add_argument("--out", type=Path, help="output folder (default: bench/results/<suite>_<device>_<date>)")
    parser.add_argument("--compare", type=Path, metavar="OLD_DIR", help="compare with an earlier run's folder")
    parser.add_argument("--fail-above", type=float, default=None, metavar="FRACTION",
                        help="with --compare: exit status 1 when a flagged regression is worse than 1 + FRACTION")
    parser.add_argument("--noise-floor", type=float, default=0.05,
                        help="with --compare: the smallest noise band (relative) a ratio must leave to be flagged")
    parser.add_argument("--normalize-by", metavar="IMPL", default=None,
                        help="with --compare: divide each implementation's ratio by IMPL's on the same case "
                             "(e.g. upstream: cancels the machine's drift between the runs)")
    parser.add_argument("--no-run", action="store_true", help="with --compare: compare OUT with OLD_DIR, run nothing")
    parser.add_argument("--budget-seconds", type=float, default=None, help="start no new case after this")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--default-allocator", action="store_true",
                        help="keep glibc's default allocator settings (by default the suite tunes them as the "
                             "encodec-fast command does, for every implementation alike)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.no_run and (args.compare is None or args.out is None):
        parser.error("--no-run needs --compare OLD_DIR and --out NEW_DIR")
    return args


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    """The command; an I/O failure writing the results (a full disk, an unwritable --out) is one line and
    exit status 1, and leaves no partial results.json."""
    from encodec_fast.jobs import report_failure
    try:
        return _main(argv)
    except OSError as err:
        return report_failure("python -m bench", err, 1)


def _main(argv: tp.Optional[tp.Sequence[str]]) -> int:
    args = parse(argv)
    load_benchmarks()
    if args.list:
        for b in sorted(REGISTRY.values(), key=lambda b: b.priority):
            print(f"{b.name:12s} {'/'.join(b.devices):9s} {b.title}")
        return 0
    from bench import compare, summary
    if args.no_run:
        return compare.main(args.compare, args.out, args.fail_above, args.noise_floor, args.normalize_by)
    unknown = sorted((set(args.only or []) | set(args.skip)) - set(REGISTRY))
    if unknown:
        print(f"unknown benchmarks {unknown}; known: {sorted(REGISTRY)}", file=sys.stderr)
        return 2
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.default_allocator:
        from encodec_fast.cpu import tune_cpu_allocator
        tune_cpu_allocator()
    out = args.out or DEFAULT_OUT / f"{args.suite}_{args.device}_{datetime.date.today().isoformat()}"
    out.mkdir(parents=True, exist_ok=True)
    selected = [b for b in sorted(REGISTRY.values(), key=lambda b: b.priority)
                if (not args.only or b.name in args.only) and b.name not in args.skip]
    start = time.monotonic()
    deadline = None if args.budget_seconds is None else start + args.budget_seconds
    results: tp.Dict[str, tp.Any] = {
        "suite": args.suite, "context": context(args.device),
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "checkpoint": str(args.checkpoint) if args.checkpoint else None, "budget_seconds": args.budget_seconds,
        "benchmarks": {}, "records": [], "skipped": []}
    from tqdm import tqdm
    terminated = False
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    with tempfile.TemporaryDirectory(prefix="encodec_fast_bench_") as tmp:
        bar = tqdm(selected, desc=f"bench {args.suite}", unit="benchmark", file=sys.stderr)
        for bench in bar:
            bar.set_postfix_str(bench.name)
            entry: tp.Dict[str, tp.Any] = {"title": bench.title, "priority": bench.priority}
            results["benchmarks"][bench.name] = entry
            if args.device not in bench.devices:
                entry["status"] = f"not for {args.device} (runs on {', '.join(bench.devices)})"
                continue
            if deadline is not None and time.monotonic() > deadline:
                entry["status"] = "skipped: time budget spent"
                results["skipped"].append(bench.name)
                continue
            workdir = Path(tmp) / bench.name
            workdir.mkdir()
            ctx = Context(suite=args.suite, device=args.device, workdir=workdir, checkpoint=args.checkpoint,
                          deadline=deadline, benchmark=bench.name)
            t0 = time.monotonic()
            try:
                bench.run(ctx)
                entry["status"] = "ok"
            except BudgetExceeded as err:
                entry["status"] = f"stopped by the time budget before: {err}"
            except Terminated as err:  # `timeout` or a job scheduler: keep what was measured, stop
                entry["status"] = f"stopped: {err}"
                terminated = True
            except (Exception, SystemExit) as err:  # a broken benchmark is a result: report it, run the others
                entry["status"] = f"error: {type(err).__name__}: {err}"
                entry["traceback"] = traceback.format_exc()[-4000:]
                print(f"\n{bench.name}: {entry['status']}\n{entry['traceback']}", file=sys.stderr)
            entry["seconds"] = round(time.monotonic() - t0, 2)
            results["records"] += ctx.records
            results["skipped"] += ctx.skipped
            results["seconds"] = round(time.monotonic() - start, 2)
            _save(out, results)
            if terminated:
                for rest in selected[selected.index(bench) + 1:]:
                    results["benchmarks"][rest.name] = {"title": rest.title, "priority": rest.priority,
                                                        "status": "skipped: the run was terminated"}
                    results["skipped"].append(rest.name)
                break
    if main_thread:
        signal.signal(signal.SIGTERM, previous)
    results["seconds"] = round(time.monotonic() - start, 2)
    _save(out, results)
    summary.write(out, results)
    print(f"wrote {out / 'results.json'} and {out / 'REPORT.md'} ({results['seconds']:.0f} s)")
    print(summary.headline_table(results))
    status = 0
    errors = [name for name, e in results["benchmarks"].items() if str(e.get("status", "")).startswith("error")]
    if errors:
        print(f"benchmarks that failed: {', '.join(errors)}", file=sys.stderr)
        status = 1
    if args.compare:
        status = max(status, compare.main(args.compare, out, args.fail_above, args.noise_floor, args.normalize_by))
    return status


class Terminated(Exception):
    """SIGTERM arrived (a time limit): the benchmark running stops, what it recorded is written."""


def _terminate(signum: int, frame: tp.Any) -> None:
    raise Terminated("terminated by SIGTERM (a time limit); the records made before it are kept")


def _save(out: Path, results: tp.Dict[str, tp.Any]) -> None:
    from encodec_fast.jobs import written_then_renamed
    with written_then_renamed(out / "results.json", out / "results.json.tmp") as tmp:
        tmp.write_text(json.dumps(results, indent=1, default=str))
