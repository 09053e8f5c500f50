"""The benchmark scripts and tools run (their numbers are not checked: speed is measured, not asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the benchmark scripts end to end (CI: the readme environment only)

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_smoke_run(tmp_path):
    """python -m bench.gpu --smoke: every correctness check of the GPU script passes on tiny shapes in
    Triton's interpreter, and the report is written; keeps the script ready for a GPU session."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = list(tmp_path.glob("gpu_*_smoke.json"))
    assert len(reports) == 1 and reports[0].with_suffix(".md").exists()
    report = json.loads(reports[0].read_text())
    assert report["checks"] and all(c["ok"] for c in report["checks"])
    assert {r["op"] for r in report["rvq"]} == {"rvq_encode", "rvq_decode"}
    assert len(report["training"]) == 2 and len(report["model"]) == 1
    assert len(report["stft"]) == 4
    assert len(report["conv"]) == 26 and all(r["rel_err"] < 2e-2 for r in report["conv"])
    assert len(report["conv2d"]) == 12 and all(r["rel_err"] < 2e-2 for r in report["conv2d"])


def test_gpu_benchmark_budget_and_stage_selection(tmp_path):
    """--stages picks stages, --budget-seconds skips what would start late; the report says which
    ran and which were skipped, and the file names carry the configuration set."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--quick", "--configs", "legacy",
                           "--stages", "rvq,training", "--budget-seconds", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(next(tmp_path.glob("gpu_*_legacy_smoke.json")).read_text())
    assert report["stages_run"] == [] and report["stages_skipped"] == ["rvq", "training"]
    assert "skipped for the time budget: rvq, training" in next(tmp_path.glob("gpu_*_legacy_smoke.md")).read_text()
    bad = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--stages", "nope"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert bad.returncode == 2 and "unknown stages" in bad.stderr


def test_gpu_sweep_smoke_run(tmp_path):
    """python -m tools.gpu_sweep --smoke: forced configurations give the reference's codes (ties only)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "tools.gpu_sweep", "--smoke", "--only",
                           "rvq_encode,vq_assign", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(next(tmp_path.glob("gpu_sweep_*_smoke.json")).read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"rvq_encode", "vq_assign"}
    assert all("error" not in r and r["non_ties"] == 0 for r in rows)
    assert len({json.dumps(r["config"], sort_keys=True) for r in rows if r["kernel"] == "rvq_encode"}) == 3


def test_quantizer_cpu_benchmark_smoke_run(tmp_path):
    """bench.quantizer_cpu on a tiny batch: every implementation runs, the table and files come out."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "bench.quantizer_cpu", "--batch", "1", "--seconds", "0.2",
                           "--reps", "1", "--threads", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(next(tmp_path.glob("quantizer_cpu_*.json")).read_text())["rows"]
    assert {r["implementation"] for r in rows} == {"ours (scatter)", "ours (onehot)", "upstream encodec 0.1.1"}
    assert all(r["median_ms"] > 0 for r in rows)


def test_tokenize_corpus_benchmark_smoke_run(tmp_path):
    """bench.tokenize_corpus --smoke: a few clips through ours, upstream's loop and
    transformers (weights converted to its layout); our codes equal upstream's."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "bench.tokenize_corpus", "--smoke", "--workers", "1",
                           "--corpus", str(tmp_path / "corpus"), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| ours |" in proc.stdout and "| transformers |" in proc.stdout
    assert "| 100.0000% |" in proc.stdout.split("| ours |")[1].splitlines()[0]


def test_training_benchmarks_smoke_run(tmp_path):
    """tools.make_train_corpus (a few clips) and bench.train_step (the tiny model, ours and the step on
    upstream's modules) run and write their files."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    corpus = tmp_path / "corpus"
    proc = subprocess.run([sys.executable, "-m", "tools.make_train_corpus", str(corpus),
                           "--speech-clips", "2", "--music-clips", "1", "--heldout-clips", "1", "--allow-no-speech"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list((corpus / "train" / "music").glob("*.wav")) and list((corpus / "heldout" / "music").glob("*.wav"))
    proc = subprocess.run([sys.executable, "-m", "bench.train_step", "--model", "tiny", "--batch", "1",
                           "--seconds", "0.3", "--reps", "1", "--threads", "1", "--bandwidths", "1.5",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(next(tmp_path.glob("train_step_cpu_*.json")).read_text())["rows"]
    assert {r["implementation"] for r in rows} == {"ours", "upstream modules"}
    assert all(r["median_ms"] > 0 and 0 <= r["quantizer_share"] <= 1 for r in rows)
