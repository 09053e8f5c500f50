"""tools/carry_wheels.py: wheels trimmed for carrying to a GPU machine, and the check that a carried
set runs with the GPU image's packages alone."""

import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tools import carry_wheels

ROOT = Path(__file__).resolve().parents[1]


def _wheel(tmp_path: Path) -> Path:
    """A small pure wheel: demo_pkg with models a and b under demo_pkg/models, and a helper module."""
    files = {
        "demo_pkg/__init__.py": "from .helper import NAME\n",
        "demo_pkg/helper.py": "NAME = 'demo'\n",
        "demo_pkg/models/__init__.py": "KNOWN = ['a', 'b']\n",
        "demo_pkg/models/a/__init__.py": "from .impl import VALUE\n",
        "demo_pkg/models/a/impl.py": "VALUE = 41 + 1\n",
        "demo_pkg/models/b/__init__.py": "VALUE = 'b' * 1000\n",
        "demo_pkg/models/b/data/table.txt": "x" * 5000,
        "demo_pkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: demo_pkg\nVersion: 1.0\n",
        "demo_pkg-1.0.dist-info/WHEEL": ("Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                         "Tag: py3-none-any\n"),
    }
    path = tmp_path / "src" / "demo_pkg-1.0-py3-none-any.whl"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as z:
        record = []
        for name, text in files.items():
            z.writestr(name, text)
            record.append(f"{name},,")
        z.writestr("demo_pkg-1.0.dist-info/RECORD", "\n".join(record + ["demo_pkg-1.0.dist-info/RECORD,,"]) + "\n")
    return path


def test_trim_keeps_a_valid_installable_wheel(tmp_path):
    src = _wheel(tmp_path)
    out, kept, dropped = carry_wheels.trim(src, tmp_path / "out", "demo_pkg/models", {"a"})
    assert (kept, dropped) == (7, 2)  # RECORD written anew, not counted
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        assert "demo_pkg/models/__init__.py" in names and "demo_pkg/models/a/impl.py" in names
        assert not any(n.startswith("demo_pkg/models/b/") for n in names)
        record = z.read("demo_pkg-1.0.dist-info/RECORD").decode().splitlines()
        listed = {}
        for line in record:
            name, digest, size = line.rsplit(",", 2)
            listed[name] = (digest, size)
        assert set(listed) == names
        for name in names - {"demo_pkg-1.0.dist-info/RECORD"}:
            data = z.read(name)
            want = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert listed[name] == (want, str(len(data))), name
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    str(out)], check=True)
    probe = ("import importlib.util, demo_pkg.models.a as a, demo_pkg; "
             "print(demo_pkg.NAME, a.VALUE, importlib.util.find_spec('demo_pkg.models.b'))")
    got = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert got == ["demo", "42", "None"]


def test_trim_refuses_what_it_cannot_do(tmp_path):
    src = _wheel(tmp_path)
    with pytest.raises(ValueError, match="no demo_pkg/models/c/"):
        carry_wheels.trim(src, tmp_path / "out", "demo_pkg/models", {"a", "c"})
    with pytest.raises(ValueError, match="no demo_pkg/plugins/ to prune"):
        carry_wheels.trim(src, tmp_path / "out", "demo_pkg/plugins", set())
    with pytest.raises(ValueError, match="overwrite its source"):
        carry_wheels.trim(src, src.parent, "demo_pkg/models", {"a"})
    plain = tmp_path / "plain.whl"
    with zipfile.ZipFile(plain, "w") as z:
        z.writestr("x.py", "")
    with pytest.raises(ValueError, match="not a wheel"):
        carry_wheels.trim(plain, tmp_path / "out", "x", set())
    rc = carry_wheels.main(["trim", str(tmp_path / "missing.whl"), str(tmp_path / "out"), "--prune", "a"])
    assert rc == 2
    assert not list((tmp_path / "out").glob("*.whl"))  # nothing half-written


def test_check_runs_with_the_site_and_the_image_only(tmp_path):
    site = tmp_path / "site"
    (site / "carried").mkdir(parents=True)
    (site / "carried" / "__init__.py").write_text("import json, torch\nDONE = torch.ones(2).sum().item()\n")
    ok = carry_wheels.check(site, "import carried; assert carried.DONE == 2.0")
    assert ok.returncode == 0, ok.stderr
    # pytest is installed here but is not the GPU image's (torch and what it requires, numpy, triton)
    missing = carry_wheels.check(site, "import carried, pytest")
    assert missing.returncode != 0 and "No module named 'pytest'" in missing.stderr
    proc = subprocess.run([sys.executable, "-m", "tools.carry_wheels", "check", str(site), "import pytest"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and "No module named 'pytest'" in proc.stdout
