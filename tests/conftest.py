"""Test setup: Triton's interpreter on machines without a GPU, shared model fixtures."""

import os
import warnings

from bench.core import side_by_side_env  # (imports no torch)

# Under pytest-xdist (`-n N`), each worker gets its share of the cores, as the suite's processes
# run side by side do: N processes each running torch's default (every core) intra-op threads spin
# against each other, which made CPU tests up to 40x slower on 2 cores. Set before torch is
# imported, so subprocesses inherit it too.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if _workers > 1:
    for _key, _value in side_by_side_env(_workers).items():
        os.environ.setdefault(_key, _value)

try:
    import torch
    _cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _cuda = False
if not _cuda:
    # Must be set before any module defining @triton.jit kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _check_test_environment() -> None:
    """Refuse to run, with what to do, on the two known broken combinations (instead of hundreds of
    failures): an upstream oracle whose torchaudio does not load with this torch, and triton 3.4-3.6's
    interpreter with numpy >= 2.4."""
    from encodec_fast.info import TORCHAUDIO_PAIRS, interpreter_numpy_problem
    try:
        import encodec  # noqa: F401  (imports torchaudio)
    except Exception as err:  # an OSError or ImportError from libtorchaudio.so, typically
        raise pytest.UsageError(
            f"the tests' oracle, upstream encodec, does not import: {type(err).__name__}: {err}\n"
            f"torch {torch.__version__} needs a torchaudio that loads with it: {TORCHAUDIO_PAIRS}. "
            "Install a tested set: pip install -e \".[test]\" -c constraints/gpu-image.txt "
            "(or -c constraints/newest.txt).") from None
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        import numpy
        try:
            import triton
        except Exception:
            return
        problem = interpreter_numpy_problem(triton.__version__, numpy.__version__)
        if problem:
            raise pytest.UsageError(problem + ", or use a tested set (constraints/).")


def pytest_configure(config):
    _check_test_environment()

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*weight_norm.*")


@pytest.fixture(scope="session")
def pair_24():
    """(upstream model, our model) with the same random weights and data-like codebooks."""
    from encodec_fast.testing import make_model_pair
    return make_model_pair("encodec_24khz", seed=1)


@pytest.fixture(scope="session")
def pair_48():
    from encodec_fast.testing import make_model_pair
    return make_model_pair("encodec_48khz", seed=2)


@pytest.fixture(scope="session")
def checkpoint_24(pair_24, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "my_24khz.th"
    torch.save(pair_24[1].state_dict(), path)
    return path


@pytest.fixture(scope="session")
def checkpoint_48(pair_48, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "my_48khz.th"
    torch.save(pair_48[1].state_dict(), path)
    return path
