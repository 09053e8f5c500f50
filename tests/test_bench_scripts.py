"""The benchmark scripts run (their numbers are not checked: speed is measured, not asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the benchmark scripts end to end (CI: the readme environment only)

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_smoke_run(tmp_path):
    """bench/gpu.py --smoke: every correctness check of the GPU script passes on tiny shapes in
    Triton's interpreter, and the report is written; keeps the script ready for a GPU session."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=1200)
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
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--quick", "--configs", "legacy",
                           "--stages", "rvq,training", "--budget-seconds", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(next(tmp_path.glob("gpu_*_legacy_smoke.json")).read_text())
    assert report["stages_run"] == [] and report["stages_skipped"] == ["rvq", "training"]
    assert "skipped for the time budget: rvq, training" in next(tmp_path.glob("gpu_*_legacy_smoke.md")).read_text()
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--stages", "nope"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "unknown stages" in bad.stderr


def test_gpu_sweep_smoke_run(tmp_path):
    """bench/gpu_sweep.py --smoke: forced configurations give the reference's codes (ties only)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_sweep.py"), "--smoke", "--only",
                           "rvq_encode,vq_assign", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(next(tmp_path.glob("gpu_sweep_*_smoke.json")).read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"rvq_encode", "vq_assign"}
    assert all("error" not in r and r["non_ties"] == 0 for r in rows)
    assert len({json.dumps(r["config"], sort_keys=True) for r in rows if r["kernel"] == "rvq_encode"}) == 3


def test_quantizer_cpu_benchmark_smoke_run(tmp_path):
    """bench/quantizer_cpu.py on a tiny batch: every implementation runs, the table and files come out."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "quantizer_cpu.py"), "--batch", "1", "--seconds", "0.2",
                           "--reps", "1", "--threads", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(next(tmp_path.glob("quantizer_cpu_*.json")).read_text())["rows"]
    assert {r["implementation"] for r in rows} == {"ours (scatter)", "ours (onehot)", "upstream encodec 0.1.1"}
    assert all(r["median_ms"] > 0 for r in rows)


def test_tokenize_corpus_benchmark_smoke_run(tmp_path):
    """bench/tokenize_corpus.py --smoke: a few clips through ours, upstream's loop and
    transformers (weights converted to its layout); our codes equal upstream's."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "tokenize_corpus.py"), "--smoke", "--workers", "1",
                           "--corpus", str(tmp_path / "corpus"), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| ours |" in proc.stdout and "| transformers |" in proc.stdout
    assert "| 100.0000% |" in proc.stdout.split("| ours |")[1].splitlines()[0]


def test_long_input_memory_benchmark_smoke_run():
    """bench/long_input_memory.py: the command on a made-up long file (peaks polled from /proc)
    and encode_long in memory, for a few seconds of audio."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "long_input_memory.py"), "--modes", "tokenize,stream",
                           "--seconds", "6", "--chunk", "2", "--rate", "22050"],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tokenized, streamed = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    assert tokenized["mode"] == "tokenize" and tokenized["peak_rss_main_mb"] > 0 and tokenized["peak_rss_sum_mb"] > 0
    assert streamed["mode"] == "stream" and streamed["frames"] == 6 * 75


def test_training_benchmarks_smoke_run(tmp_path):
    """bench/make_train_corpus.py (a few clips), bench/train_step.py (the tiny model, ours and the
    step on upstream's modules) and bench/codec_quality.py (the shipped small model and a random
    init on the corpus' held-out part) run and write their files."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    corpus = tmp_path / "corpus"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "make_train_corpus.py"), str(corpus),
                           "--speech-clips", "2", "--music-clips", "1", "--heldout-clips", "1", "--allow-no-speech"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list((corpus / "train" / "music").glob("*.wav")) and list((corpus / "heldout" / "music").glob("*.wav"))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), "--model", "tiny", "--batch", "1",
                           "--seconds", "0.3", "--reps", "1", "--threads", "1", "--bandwidths", "1.5",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(next(tmp_path.glob("train_step_cpu_*.json")).read_text())["rows"]
    assert {r["implementation"] for r in rows} == {"ours", "upstream modules"}
    assert all(r["median_ms"] > 0 and 0 <= r["quantizer_share"] <= 1 for r in rows)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "codec_quality.py"), str(corpus / "heldout"),
                           "--model", "small", "--random", "--seconds", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(next(tmp_path.glob("codec_quality_small_*.json")).read_text())["rows"]
    assert {r["kbps"] for r in rows} == {1.5, 3.0, 6.0, 12.0, 24.0} and len({r["weights"] for r in rows}) == 2
