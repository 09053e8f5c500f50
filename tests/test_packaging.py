"""The top-level `kernels/` folder is installed as `encodec_fast.kernels` and never shadows an installed
package named `kernels` (PyPI's, a dependency of transformers 5.x): from the repository root (where
`python -m pytest` and `python -m bench` put it on sys.path), from tests/ and bench/, in an editable
install (this environment) and in a regular one (a wheel built from the sources)."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_MODULES = ("rvq", "conv", "stft", "tuning", "_arith")


def _python(code: str, cwd: Path, path: tuple = (), isolated: bool = False) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter from `cwd` with `path` first on PYTHONPATH (after the current
    directory, as Python puts it). isolated: no site-packages (nothing installed is importable)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if path:
        env["PYTHONPATH"] = os.pathsep.join(map(str, path))
    flags = ["-S"] if isolated else []
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def throwaway_kernels(tmp_path_factory) -> Path:
    """A folder holding a distribution named `kernels` (a regular package with its metadata)."""
    site = tmp_path_factory.mktemp("throwaway_site")
    (site / "kernels").mkdir()
    (site / "kernels" / "__init__.py").write_text("WHO = 'throwaway'\n")
    meta = site / "kernels-9.9.9.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 9.9.9\n")
    return site


CHECK_KERNELS = "import kernels, importlib.metadata as m; print(kernels.WHO, m.version('kernels'), kernels.__file__)"


@pytest.mark.parametrize("where", [".", "tests", "bench"])
def test_import_kernels_gets_the_installed_one(where, throwaway_kernels):
    out = _python(CHECK_KERNELS, cwd=ROOT / where, path=(throwaway_kernels,))
    assert out.returncode == 0, out.stderr
    who, version, file = out.stdout.split()
    assert (who, version) == ("throwaway", "9.9.9")
    assert Path(file).resolve() == (throwaway_kernels / "kernels" / "__init__.py").resolve()


def test_repository_root_on_sys_path_is_not_a_kernels_package(throwaway_kernels):
    # The root named explicitly (as bench scripts or PYTHONPATH=. would put it), ahead of the real one.
    out = _python(CHECK_KERNELS, cwd=ROOT / "tests", path=(ROOT, throwaway_kernels))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "throwaway"
    # With no `kernels` installed at all, the import fails as if the folder were not there, and leaves
    # nothing behind in sys.modules or sys.path.
    code = ("import sys\nbefore = list(sys.path)\ntry:\n    import kernels\nexcept ModuleNotFoundError as e:\n"
            "    print('missing', e.name, 'kernels' in sys.modules, sys.path == before)\n")
    out = _python(code, cwd=ROOT, isolated=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["missing", "kernels", "False", "True"]


def test_transformers_imports_from_the_repository_root():
    pytest.importorskip("transformers")
    out = _python("from transformers import EncodecModel; print(EncodecModel.__name__)", cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "EncodecModel"


def test_transformers_peer_imports_from_the_root_without_pypi_kernels(tmp_path):
    """transformers probes for PyPI's `kernels` when it loads a model's code; from the repository's root,
    with that package absent, the probe finds our kernels/ folder, imports it, and fails (kernels/
    __init__.py steps aside with nothing to hand over). bench.peers.import_transformers loads the model's
    code with the root off sys.path, so the benchmarks' transformers column runs there too. Run in an
    interpreter that sees torch, numpy, soundfile and transformers with their requirements but not
    `kernels` (as the GPU image: transformers 5.17, no `kernels`)."""
    pytest.importorskip("transformers")
    from tools import carry_wheels
    code = ("from bench.peers import import_transformers\nt = import_transformers()\n"
            "m = t.EncodecModel(t.EncodecConfig(num_filters=4, hidden_size=8))\n"
            "import torch\nprint(tuple(m(torch.randn(1, 1, 2400)).audio_values.shape))\n"
            "import os, sys\nprint(os.path.realpath(sys.path[0] or '.'))\n")
    (tmp_path / "site").mkdir()
    view = dict(roots=(*carry_wheels.IMAGE_HAS, "soundfile", "tqdm", "transformers"), exclude=("kernels",))
    out = carry_wheels.check(tmp_path / "site", code, cwd=ROOT, **view)
    assert out.returncode == 0, out.stderr[-3000:]
    shape, root = out.stdout.splitlines()[-2:]
    assert shape == "(1, 1, 2400)" and root == str(ROOT.resolve())  # the root back on sys.path after
    # what the peer steps around: the same import without it
    bare = carry_wheels.check(tmp_path / "site", "from transformers import EncodecModel", cwd=ROOT, **view)
    print("bare import from the root without PyPI's kernels:", "fails" if bare.returncode else "runs")


IMPORT_OURS = ("import importlib, encodec_fast.kernels as k\n"
               f"mods = [importlib.import_module('encodec_fast.kernels.' + n) for n in {KERNEL_MODULES!r}]\n"
               "print(k.__file__)\nprint(mods[-1].__file__)\n"
               "import encodec_fast.ops.arith as a\nprint(a.coder_backend())\n")


@pytest.mark.parametrize("where", [".", "tests"])
def test_encodec_fast_kernels_in_this_install(where):
    out = _python(IMPORT_OURS, cwd=ROOT / where)
    assert out.returncode == 0, out.stderr[-2000:]
    init, arith, backend = out.stdout.split()
    assert Path(init).resolve() == (ROOT / "kernels" / "__init__.py").resolve()
    assert Path(arith).parent.resolve() == (ROOT / "kernels").resolve()
    assert backend == "cpp"


def _can_build_wheels_here() -> bool:
    import importlib.metadata
    import importlib.util
    try:
        major, minor = (int(x) for x in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.mark.slow
def test_regular_install_from_a_wheel(tmp_path, throwaway_kernels):
    """A wheel built from a copy of the sources, unpacked as site-packages: `encodec_fast.kernels` holds
    the Triton modules and the compiled coder, and the repository root still does not shadow `kernels`."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for name in ("encodec_fast", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    # This environment's setuptools when it can build wheels by itself (>= 70.1, or with `wheel`); else pip's
    # isolated build environment (which downloads pyproject.toml's build requirements).
    isolation = ["--no-build-isolation"] if _can_build_wheels_here() else []
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("encodec_fast-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert not (site / "kernels").exists()
    out = _python(IMPORT_OURS, cwd=tmp_path, path=(site,))
    assert out.returncode == 0, out.stderr[-2000:]
    init, arith, backend = out.stdout.split()
    assert Path(init).resolve() == (site / "encodec_fast" / "kernels" / "__init__.py").resolve()
    assert Path(arith).parent.resolve() == (site / "encodec_fast" / "kernels").resolve()
    assert backend == "cpp"
    out = _python(CHECK_KERNELS, cwd=ROOT, path=(throwaway_kernels, site))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "throwaway"
