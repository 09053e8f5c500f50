"""Test setup: Triton's interpreter on machines without a GPU, shared model fixtures."""

import os
import warnings

try:
    import torch
    _cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _cuda = False
if not _cuda:
    # Must be set before any module defining @triton.jit kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers import make_model_pair  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*weight_norm.*")


@pytest.fixture(scope="session")
def pair_24():
    """(upstream model, our model) with the same random weights and data-like codebooks."""
    return make_model_pair("encodec_24khz", seed=1)


@pytest.fixture(scope="session")
def pair_48():
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
