"""The benchmark suite (`python -m bench`): the smoke suite runs every benchmark and writes the
report; the schema, the n/a rule, the time budget and the regression check do what they say.
Nothing here checks a speed (speed is measured, not asserted)."""

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import compare, core

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # runs the benchmark suite end to end (CI: the readme environment only)

SCHEMA = {"benchmark", "params", "implementation", "metric", "unit", "higher_is_better", "reps"}


def run_bench(*args, timeout=900):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)  # the suite runs what users run: no interpreter on CPU paths
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_smoke")
    t0 = time.monotonic()
    proc = run_bench("--suite", "smoke", "--out", str(out))
    return out, proc, time.monotonic() - t0


def test_smoke_suite_runs_every_benchmark_and_writes_the_report(smoke_run):
    out, proc, seconds = smoke_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads((out / "results.json").read_text())
    import bench.benchmarks  # noqa: F401
    cpu_benchmarks = {name for name, b in core.REGISTRY.items() if "cpu" in b.devices}
    assert set(results["benchmarks"]) == set(core.REGISTRY)
    for name in cpu_benchmarks:
        assert results["benchmarks"][name]["status"] == "ok", (name, results["benchmarks"][name])
        assert any(r["benchmark"] == name for r in results["records"]), name
    assert results["benchmarks"]["kernels"]["status"].startswith("not for cpu")
    for key in ("cpu", "cpu_count", "torch_threads", "versions", "git_commit", "date", "allocator"):
        assert key in results["context"], key
    for r in results["records"]:
        assert SCHEMA <= set(r), r
        if r.get("na"):
            assert r["reps"] == [] and isinstance(r["na"], str) and r["na"]
        else:
            assert r["n"] == len(r["reps"]) >= 1
            assert r["min"] <= r["median"] <= r["max"] and r["iqr"] >= 0
    # the three implementations ran the same cases; ours gives upstream's codes (same weights)
    codec = [r for r in results["records"] if r["benchmark"] == "codec" and not r.get("na")]
    assert {r["implementation"] for r in codec if r["metric"] == "time"} == {"ours", "upstream", "transformers"}
    agree = [r for r in codec if r["metric"] == "codes_equal_upstream" and r["implementation"] == "ours"]
    assert agree and all(r["median"] == 100.0 for r in agree)
    assert any(r["metric"] == "peak_memory" for r in codec)
    quality = [r for r in results["records"] if r["benchmark"] == "quality" and r["metric"] == "si_snr"
               and not r.get("na")]
    assert {r["params"]["kbps"] for r in quality if r["implementation"] == "ours"} == {1.5, 3.0, 6.0, 12.0, 24.0}
    # the decoder's ceiling on unquantized latents, per kind of audio (speech needs espeak-ng)
    kinds = {"music"} | ({"speech"} if shutil.which("espeak-ng") else set())
    assert {r["params"]["kind"] for r in quality if r["implementation"] == "ours, unquantized"} == kinds
    # the smoke shortcuts are on the records, not hidden: transformers' own processes are left
    # out with the reason; processes run side by side say so (and with how many threads)
    for name in ("tokenize", "long_file"):
        recs = [r for r in results["records"] if r["benchmark"] == name and r["metric"] == "time"]
        assert {r["implementation"] for r in recs if not r.get("na")} == {"ours", "upstream"}, name
        assert all(r["na"] == core.SMOKE_LEFT_OUT for r in recs if r["implementation"] == "transformers"), name
        assert all("ran at once, OMP_NUM_THREADS=" in r["note"] for r in recs if not r.get("na")), name
    memory = [r for r in codec if r["metric"] == "peak_memory"]
    assert {r["implementation"] for r in memory} == {"ours", "upstream"}
    report = (out / "REPORT.md").read_text()
    assert "| workload | unit | ours | upstream | transformers |" in report
    for png in ("throughput_vs_batch.png", "throughput_vs_length.png", "memory_vs_length.png",
                "quality_vs_bitrate.png", "speedups.png"):
        assert (out / png).stat().st_size > 10_000, png
        assert f"]({png})" in report
    print(f"smoke suite: {seconds:.0f} s")


def test_compare_flags_a_regression_and_fails_above_the_threshold(smoke_run, tmp_path):
    out, proc, _ = smoke_run
    assert proc.returncode == 0
    same = run_bench("--compare", str(out), "--out", str(out), "--no-run", "--fail-above", "0.25", timeout=120)
    assert same.returncode == 0, same.stdout[-2000:] + same.stderr[-2000:]
    assert " 0 regressions" in same.stdout
    results = json.loads((out / "results.json").read_text())
    slower = copy.deepcopy(results)
    victim = next(r for r in slower["records"] if r["benchmark"] == "codec" and r["metric"] == "time"
                  and r["implementation"] == "ours" and not r.get("na"))
    for key in ("median", "min", "max", "iqr"):
        victim[key] *= 3
    victim["reps"] = [3 * v for v in victim["reps"]]
    new = tmp_path / "new"
    new.mkdir()
    (new / "results.json").write_text(json.dumps(slower))
    bad = run_bench("--compare", str(out), "--out", str(new), "--no-run", "--fail-above", "0.25", timeout=120)
    assert bad.returncode == 1, bad.stdout[-2000:]
    assert "regression" in (new / "COMPARE.md").read_text()
    lenient = run_bench("--compare", str(out), "--out", str(new), "--no-run", "--fail-above", "5", timeout=120)
    assert lenient.returncode == 0


def test_compare_noise_band_and_direction():
    def rec(median, iqr, higher=False, impl="ours", na=None):
        r = {"benchmark": "b", "params": {"x": 1}, "implementation": impl, "metric": "time", "unit": "s",
             "higher_is_better": higher, "reps": [median], "median": median, "iqr": iqr, "min": median,
             "max": median, "n": 1}
        if na:
            r.update(na=na, reps=[])
        return r
    old = {"records": [rec(1.0, 0.2)], "context": {}}
    assert compare.compare(old, {"records": [rec(1.15, 0.0)]})[0]["flag"] == ""          # inside the 20% IQR band
    assert compare.compare(old, {"records": [rec(1.3, 0.0)]})[0]["flag"] == "regression"
    assert compare.compare(old, {"records": [rec(0.7, 0.0)]})[0]["flag"] == "improvement"
    up = {"records": [rec(10.0, 0.0, higher=True)]}
    row = compare.compare(up, {"records": [rec(5.0, 0.0, higher=True)]})[0]  # throughput halved
    assert row["flag"] == "regression" and row["worse_by"] == pytest.approx(2.0)
    assert compare.compare(old, {"records": [rec(1.0, 0.0, na="out of memory")]}) == []
    # the machine got 30% slower for everyone: normalised by upstream, ours did not regress
    before = {"records": [rec(1.0, 0.0), rec(2.0, 0.0, impl="upstream")]}
    after = {"records": [rec(1.3, 0.0), rec(2.6, 0.0, impl="upstream")]}
    raw = {r["implementation"]: r for r in compare.compare(before, after)}
    assert raw["ours"]["flag"] == raw["upstream"]["flag"] == "regression"
    fair = {r["implementation"]: r for r in compare.compare(before, after, normalize_by="upstream")}
    assert fair["ours"]["flag"] == "" and fair["ours"]["ratio"] == pytest.approx(1.0)
    assert fair["upstream"]["normalized_by"] == "reference" and fair["upstream"]["flag"] == ""
    assert compare.drift(raw.values(), "upstream") == pytest.approx(1.3)


def test_timed_records_every_repetition_and_na_with_the_reason(tmp_path):
    ctx = core.Context(suite="quick", device="cpu", workdir=tmp_path, benchmark="t")
    calls = []

    def oom():
        raise MemoryError("cannot allocate 64 GB")
    out = ctx.timed({"case": 1}, {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "big": oom})
    assert calls.count("a") == 1 + ctx.reps and calls.count("b") == 1 + ctx.reps
    assert calls[2:] == ["a", "b", "b", "a", "a", "b"]  # interleaved, alternating order
    assert out["a"]["n"] == ctx.reps and len(out["a"]["reps"]) == ctx.reps
    assert out["big"]["na"].startswith("out of memory") and "median" not in out["big"]
    # torch's allocator message: the size comes first, where a table cell still shows it
    torch_oom = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                             "memory: you tried to allocate 11059200000 bytes. Error code 12")
    assert core._reason(torch_oom).startswith("out of memory: one tensor of 10.3 GB (RuntimeError: [enforce")
    assert core.summary([1, 2, 3, 4, 100]) == {"median": 3, "min": 1, "max": 100, "iqr": 2, "n": 5}


def test_time_budget_skips_what_would_start_late_and_keeps_the_report(tmp_path):
    proc = run_bench("--suite", "smoke", "--only", "roofline", "quantizer", "--budget-seconds", "0", "--out",
                     str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted(results["skipped"]) == ["quantizer", "roofline"]
    assert results["records"] == []
    assert "## Skipped" in (tmp_path / "REPORT.md").read_text()
    ctx = core.Context(suite="smoke", device="cpu", workdir=tmp_path, deadline=time.monotonic() - 1, benchmark="x")
    with pytest.raises(core.BudgetExceeded):
        ctx.check_time("case 1")
    assert ctx.skipped == ["x: case 1"]


def test_bad_arguments_are_refused(tmp_path):
    proc = run_bench("--only", "nope", "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2 and "unknown benchmarks ['nope']" in proc.stderr
    proc = run_bench("--compare", str(tmp_path / "missing"), "--out", str(tmp_path), "--no-run", timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_random_state_is_made_once_and_each_call_gets_its_own_copy():
    """peers.random_state caches per (model, seed) and still behaves as making it afresh: equal
    weights, a copy the caller may change, torch's generator left where making it leaves it."""
    import torch

    from bench import peers
    peers._random_state.cache_clear()
    first = peers.random_state("small", seed=4)
    after_first = torch.rand(4)
    key = next(k for k in first if k.endswith("embed"))
    first[key].add_(1.0)
    second = peers.random_state("small", seed=4)
    after_second = torch.rand(4)
    assert peers._random_state.cache_info().hits == 1
    assert torch.equal(after_first, after_second)
    assert not torch.equal(first[key], second[key]) and torch.allclose(first[key] - 1.0, second[key], atol=1e-6)
    other = peers.random_state("small", seed=5)
    assert not torch.equal(other[key], second[key])


def test_quality_checkpoint_is_recognised_by_its_architecture(tmp_path):
    """--checkpoint PATH: the quality benchmark finds which model the state dict belongs to."""
    import torch

    from bench import peers
    from bench.benchmarks import quality
    state = peers.random_state("small", seed=3)
    path = tmp_path / "mine.th"
    torch.save(state, path)
    ctx = core.Context(suite="smoke", device="cpu", workdir=tmp_path, checkpoint=path, benchmark="quality")
    (model, loaded, source), = quality.checkpoints(ctx)
    assert model == "small" and source == f"checkpoint {path}"
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.th")
    ctx.checkpoint = tmp_path / "bad.th"
    with pytest.raises(ValueError, match="loads into none"):
        quality.checkpoints(ctx)


def test_report_without_matplotlib_says_so_and_keeps_the_tables(tmp_path):
    """matplotlib is not a requirement of the library: the report is written all the same, saying the
    plots were not drawn; with matplotlib the same results give the plots. (The first in a process of its
    own: hiding matplotlib in this one would leave its submodules stale for later tests.)"""
    from bench import summary
    results = ROOT / "bench/results/quantizer_cpu_2026-12-06/results.json"
    code = ("import json, sys\nfrom pathlib import Path\nsys.modules['matplotlib'] = None  # not installed\n"
            "from bench import summary\n"
            f"summary.write(Path({str(tmp_path)!r}), json.loads(Path({str(results)!r}).read_text()))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (tmp_path / "REPORT.md").read_text()
    assert "plots: not drawn, matplotlib is not installed" in report
    assert "| 24 kbps, stages 32, frames 600, batch 8 | upstream | time (ms) |" in report
    assert not list(tmp_path.glob("*.png"))
    summary.write(tmp_path, json.loads(results.read_text()))
    assert (tmp_path / "speedups.png").exists() and "not drawn" not in (tmp_path / "REPORT.md").read_text()


def test_report_puts_the_roofline_floor_next_to_gpu_times():
    """On an H100 or H200 the detail tables show each time's floor: the floor of what its Triton
    launches did where the record has one, else the case's own model for that GPU; a CPU run's tables
    keep their columns."""
    from bench import summary

    def rec(impl, median, unit="ms", **extra):
        return {"benchmark": "kernels", "params": {"op": "conv"}, "implementation": impl, "metric": "time",
                "unit": unit, "median": median, "iqr": 0.0, "min": median, "max": median, "n": 3, **extra}
    records = [rec("torch", 2.0, predicted_ms_h100=0.5, predicted_ms_h200=0.4),
               rec("triton", 1.0, predicted_ms_h100=0.5, predicted_ms_h200=0.4, launch_floor_ms=0.25),
               rec("triton", 9.0, unit="audio s / s", launch_floor_ms=0.25),
               {"benchmark": "kernels", "params": {"op": "conv"}, "implementation": "peer", "metric": "time",
                "unit": "ms", "na": "not installed"}]
    results = {"records": records, "benchmarks": {"kernels": {"title": "kernels", "status": "ok"}},
               "context": {"gpu": "NVIDIA H200"}}
    table = [line for line in summary.detail_tables(results) if line.startswith("|")]
    assert table[0].endswith("| floor ms | floor / median |")
    assert table[2].endswith("| 0.4 | 20.0% |")      # torch: the case's H200 model
    assert table[3].endswith("| 0.25 | 25.0% |")     # ours: its launches' floor
    assert table[4].endswith("|  |  |")              # not a time in ms: no floor
    assert len({line.count("|") for line in table}) == 1
    results["context"] = {"gpu": None}
    assert not any("floor" in line for line in summary.detail_tables(results))
