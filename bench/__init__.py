"""encodec_fast's benchmark suite: `python -m bench --suite smoke|quick|full` from the repository root.

bench/core.py (registry, record schema, timing, context), bench/runner.py (the command),
bench/summary.py (REPORT.md and plots), bench/compare.py (regressions), bench/peers.py (ours,
upstream encodec and transformers on the same weights), bench/benchmarks/ (one module per
benchmark). The older scripts in bench/ keep their command lines; the suite calls their measuring
functions.
"""
