"""tools/carry_wheels.py: what runs with only the wheels carried to a GPU machine and the packages of
its image, checked here where much more is installed."""

import subprocess
import sys
from pathlib import Path

import pytest

from tools import carry_wheels

ROOT = Path(__file__).resolve().parents[1]


def test_check_runs_with_the_site_and_the_image_only(tmp_path):
    site = tmp_path / "site"
    (site / "carried").mkdir(parents=True)
    (site / "carried" / "__init__.py").write_text("import json, torch\nDONE = torch.ones(2).sum().item()\n")
    ok = carry_wheels.check(site, "import carried; assert carried.DONE == 2.0")
    assert ok.returncode == 0, ok.stderr
    # ruff is installed here (the test extra) but is not the GPU image's
    missing = carry_wheels.check(site, "import carried, ruff")
    assert missing.returncode != 0 and "No module named 'ruff'" in missing.stderr
    # processes it starts are in the same view
    code = "import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', 'import carried, ruff']))"
    assert carry_wheels.check(site, code).returncode != 0
    proc = subprocess.run([sys.executable, "-m", "tools.carry_wheels", "check", str(site), "import ruff"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and "No module named 'ruff'" in proc.stdout


def test_image_view_leaves_out_what_the_image_lacks(tmp_path):
    view = carry_wheels.image_view(tmp_path / "view", roots=("torch", "numpy"), exclude=("numpy",))
    names = {p.name for p in view.iterdir()}
    assert "torch" in names and not any(n == "numpy" or n.startswith("numpy-") for n in names)
    assert any(n.startswith("torch-") and n.endswith(".dist-info") for n in names)  # metadata for versions


@pytest.mark.slow
@pytest.mark.skipif(not carry_wheels._editable_install(), reason="needs encodec_fast installed with pip install -e .")
def test_session_check_runs_the_gpu_sessions_steps_and_names_a_missing_peer(tmp_path):
    """The session's GPU tests collect and its codec benchmark runs (ours, upstream, transformers) with
    the wheels gpu_prepare.sh carries (here: links to this environment's soundfile and encodec with
    their needs beyond the image's); without upstream's wheel, the check names what fails."""
    image = carry_wheels._requirement_closure(carry_wheels.IMAGE_HAS, carry_wheels.IMAGE_LACKS)
    site = carry_wheels.image_view(tmp_path / "site", roots=("soundfile", "encodec"), exclude=image)
    assert carry_wheels.check_session(site, ["codec"], ROOT) == []
    lacking = carry_wheels.image_view(tmp_path / "lacking", roots=("soundfile",), exclude=image)
    problems = carry_wheels.check_session(lacking, ["codec"], ROOT)
    assert any(p.startswith("the GPU tests do not collect") and "encodec" in p for p in problems), problems
    assert any(p.startswith("upstream (codec): n/a: encodec 0.1.1 cannot be imported") for p in problems), problems
