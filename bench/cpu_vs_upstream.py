"""Ours vs upstream encodec 0.1.1 (and transformers) on CPU under both allocator settings: the
suite's `codec` benchmark run twice, each run in its own process, every implementation inside a
run sharing its setting:

    python bench/cpu_vs_upstream.py [--suite quick] [--out DIR]

- tuned: glibc keeps freed memory (`encodec_fast.cpu.tune_cpu_allocator`, what the `encodec-fast`
  command applies), for every implementation;
- default: glibc's defaults (`python -m bench --default-allocator`), what a plain Python
  process running upstream gets.
Writes DIR/tuned/ and DIR/default/ (results.json, REPORT.md, plots) and prints both headline
tables; the difference between them is what the allocator setting alone is worth.
(Before the suite existed this script had its own timing loop; the results of 2026-11-25 in
bench/results/cpu_vs_upstream_2026-11-25.* came from it.)
"""

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="quick", choices=["smoke", "quick", "full"])
    parser.add_argument("--out", type=Path,
                        default=ROOT / "bench" / "results" / f"cpu_allocators_{datetime.date.today().isoformat()}")
    args = parser.parse_args()
    status = 0
    for name, extra in (("tuned", []), ("default", ["--default-allocator"])):
        cmd = [sys.executable, "-m", "bench", "--suite", args.suite, "--only", "codec", "--out", str(args.out / name),
               *extra]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        status = max(status, subprocess.run(cmd, cwd=ROOT).returncode)
    return status


if __name__ == "__main__":
    sys.exit(main())
