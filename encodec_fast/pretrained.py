"""Official checkpoints: names, URLs, hash prefixes, and where they are looked for.

Order of lookup for an official checkpoint:
0. a checkpoint in `PACKAGED` comes from the package's own folder (unless `repository` is given);
1. `repository=DIR` (argument), else the `ENCODEC_FAST_REPOSITORY` environment variable: the file
   must be `DIR/<file name>` (offline use); its SHA-256 must start with the hash in its name;
2. otherwise the torch hub cache (`$TORCH_HOME/hub/checkpoints/<file name>`), downloading from
   `ROOT_URL` (or `ENCODEC_FAST_ROOT_URL`) on first use, hash checked.
A user's own state dict loads with `load_state_dict_file(path)` (no hash check).
"""

import hashlib
import os
import re
import typing as tp
import urllib.error
from pathlib import Path

import torch

ROOT_URL = "https://dl.fbaipublicfiles.com/encodec/v0/"

CHECKPOINTS = {
    "encodec_24khz": "encodec_24khz-d7cc33bc.th",
    "encodec_48khz": "encodec_48khz-7e698e3e.th",
    "encodec_lm_24khz": "encodec_lm_24khz-1608e3c0.th",
    "encodec_lm_48khz": "encodec_lm_48khz-7add9fc3.th",
}

#: Checkpoints that ship inside the package (encodec_fast/checkpoints/), trained by this project
#: (see README, "The small model"): found without a download, hash checked like the others.
PACKAGED_DIR = Path(__file__).resolve().parent / "checkpoints"
PACKAGED = {
    "encodec_24khz_small": "encodec_24khz_small-5b2e87c6.th",
}
CHECKPOINTS.update(PACKAGED)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreachable, corrupt or does not fit the model."""


def _hash_prefix(file_name: str) -> str:
    match = re.search(r"-([a-f0-9]+)\.", file_name)
    if match is None:
        raise ValueError(f"no hash in checkpoint name {file_name}")
    return match.group(1)


def sha256_file(path: tp.Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _how_to_supply(file_name: str) -> str:
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return (f"download {ROOT_URL}{file_name} elsewhere and either pass repository=DIR (command: "
            f"--repository DIR) or set ENCODEC_FAST_REPOSITORY=DIR for the folder holding it, or copy it "
            f"to {cache}/")


def load_state_dict_file(path: tp.Union[str, Path], expected_hash: tp.Optional[str] = None) -> tp.Dict[str,
                                                                                                       torch.Tensor]:
    """Load a state dict saved with `torch.save` (tensors only), optionally checking a hash prefix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if expected_hash is not None:
        actual = sha256_file(path)[: len(expected_hash)]
        if actual != expected_hash:
            raise CheckpointError(f"checkpoint {path} is corrupt or not the official file: sha256 starts with "
                                  f"{actual}, expected {expected_hash}; delete it and supply the right file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle of other objects, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    return state


def get_checkpoint(name: str, repository: tp.Optional[tp.Union[str, Path]] = None,
                   root_url: tp.Optional[str] = None) -> tp.Dict[str, torch.Tensor]:
    """State dict of official checkpoint `name` (a key of `CHECKPOINTS`), hash checked."""
    if name not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint {name!r}; known: {sorted(CHECKPOINTS)}")
    file_name = CHECKPOINTS[name]
    expected = _hash_prefix(file_name)
    if name in PACKAGED and repository is None:
        path = PACKAGED_DIR / file_name
        if not path.is_file():
            raise CheckpointError(f"{file_name} is missing from the installed package ({PACKAGED_DIR}); reinstall "
                                  "encodec-fast")
        return load_state_dict_file(path, expected)
    if repository is None and os.environ.get("ENCODEC_FAST_REPOSITORY"):
        repository = os.environ["ENCODEC_FAST_REPOSITORY"]
    if repository is not None:
        repository = Path(repository)
        if not repository.is_dir():
            raise CheckpointError(f"repository {repository} is not a directory")
        path = repository / file_name
        if not path.is_file():
            raise CheckpointError(f"{file_name} is not in repository {repository}; {_how_to_supply(file_name)}")
        return load_state_dict_file(path, expected)

    url = (root_url or os.environ.get("ENCODEC_FAST_ROOT_URL") or ROOT_URL)
    url = (url if url.endswith("/") else url + "/") + file_name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Downloads to a temporary name, checks the hash prefix, then renames.
            torch.hub.download_url_to_file(url, str(cached), hash_prefix=expected, progress=False)
        except (urllib.error.URLError, OSError) as err:
            raise CheckpointError(f"{file_name} is not in the cache and cannot be downloaded from {url} ({err}); "
                                  f"{_how_to_supply(file_name)}") from err
        except RuntimeError as err:
            raise CheckpointError(f"downloaded {file_name} from {url} but it is not the official file ({err}); "
                                  f"{_how_to_supply(file_name)}") from err
    return load_state_dict_file(cached, expected)
