"""`encodec-fast info`: one screen of versions, backends and checkpoints, never a traceback, also
when pieces are missing or broken (simulated with stand-in modules and settings)."""

import json
import os
import subprocess
import sys

import torch

from encodec_fast import info
from encodec_fast.pretrained import CHECKPOINTS


def run_info(*args, env=None, pythonpath=None):
    full_env = dict(os.environ, **(env or {}))
    if pythonpath:
        full_env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "encodec_fast", "info", *args], capture_output=True, text=True,
                          env=full_env, timeout=300)


def test_info_screen_and_json():
    proc = run_info()
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    out = proc.stdout
    for needle in (f"torch       {torch.__version__}", "triton", "numpy", "soundfile", "pyarrow", "torchaudio",
                   "C++ coder", "optional    matplotlib",
                   "ops ", "checkpoints"):
        assert needle in out, out
    assert len(out.splitlines()) <= 30  # one screen
    facts = json.loads(run_info("--json").stdout)
    assert facts["torch"]["version"] == torch.__version__
    assert facts["backend"]["ops"] in ("torch", "triton")
    assert set(facts["optional"]) == {"matplotlib", "tensorboard", "ray"}
    assert set(facts["checkpoints"]["files"]) == set(CHECKPOINTS)


def test_info_through_the_console_script():
    exe = os.path.join(os.path.dirname(sys.executable), "encodec-fast")
    proc = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "encodec_fast " in proc.stdout, proc.stderr


def test_info_reports_a_broken_torchaudio_without_traceback(tmp_path):
    fake = tmp_path / "torchaudio"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "raise OSError('libtorchaudio.so: undefined symbol: torch_exception_get_what_without_backtrace')\n")
    proc = run_info(pythonpath=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert "torchaudio  BROKEN" in proc.stdout
    assert "undefined symbol" in proc.stdout and "2.11.0 loads with torch 2.11-2.12" in proc.stdout


def test_info_backend_choices_and_bad_settings(tmp_path):
    proc = run_info(env={"ENCODEC_FAST_BACKEND": "torch"})
    assert "ops         torch: ENCODEC_FAST_BACKEND=torch" in proc.stdout
    proc = run_info(env={"ENCODEC_FAST_BACKEND": "bogus", "ENCODEC_FAST_RVQ_PRECISION": "fp8"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "backend settings" in proc.stdout and "bogus" in proc.stdout


def test_info_finds_checkpoints_in_the_repository(tmp_path):
    name = CHECKPOINTS["encodec_24khz"]
    (tmp_path / name).write_bytes(b"x" * 2_000_000)
    proc = run_info(env={"ENCODEC_FAST_REPOSITORY": str(tmp_path)})
    line = next(ln for ln in proc.stdout.splitlines() if name in ln)
    assert "present, 2.0 MB" in line
    assert "offline:" not in proc.stdout  # advice only when no checkpoint is anywhere


def test_problems_lists_missing_pieces_with_fixes():
    facts = info.collect()
    facts["coder"] = {"built": False, "error": "No module named 'encodec_fast.kernels._arith'"}
    facts["triton"] = {"installed": True, "version": "3.6.0"}
    facts["numpy"] = {"installed": True, "version": "2.4.6"}
    facts["soundfile"] = {"installed": False}
    facts["pyarrow"] = {"installed": False}
    found = info.problems(facts)
    assert any("C++ arithmetic coder is not built" in p and "--no-build-isolation" in p for p in found)
    assert any("numpy<2.4" in p for p in found)
    assert any(p.startswith("soundfile is missing") for p in found)
    assert any(p.startswith("pyarrow is missing (required by tokenize's") for p in found)
    facts["optional"]["tensorboard"] = None
    text = info.format_facts(facts)
    assert "soundfile   not installed" in text and "NOT built" in text
    assert "tensorboard not installed" in text and "the trainer's TensorBoard logs" in text
    assert not any("tensorboard" in p for p in info.problems(facts))  # optional: never a problem
    facts = info.collect()
    facts["triton"] = {"installed": True, "version": "3.9.0"}
    assert not any("numpy<2.4" in p for p in info.problems(facts))


def test_info_on_a_gpu_machine_says_where_the_convolutions_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("ENCODEC_FAST_BACKEND", raising=False)
    facts = info._backend_facts({"cuda_available": True, "devices": ["NVIDIA H100 80GB HBM3"]}, {"version": "3.6.0"})
    assert facts["ops"] == "triton"
    assert "ours on the 6 of 26 layer/mode pairs measured faster on an NVIDIA H200" in facts["why"]
    assert "cuDNN elsewhere" in facts["why"]
