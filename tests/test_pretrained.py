"""Checkpoint lookup: repository folders, the download path (local URL), hash checks, errors."""

import functools
import http.server
import threading

import pytest
import torch

import encodec_fast
from encodec_fast import pretrained
from encodec_fast.pretrained import CheckpointError


@pytest.fixture()
def official_like(checkpoint_24, tmp_path, monkeypatch):
    """Our test weights stored under an official-style name whose hash prefix is right."""
    digest = pretrained.sha256_file(checkpoint_24)[:8]
    name = f"encodec_24khz-{digest}.th"
    folder = tmp_path / "served"
    folder.mkdir()
    (folder / name).write_bytes(checkpoint_24.read_bytes())
    monkeypatch.setitem(pretrained.CHECKPOINTS, "encodec_24khz", name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("ENCODEC_FAST_REPOSITORY", raising=False)
    return folder, name


def test_download_from_file_url_and_cache(official_like, pair_24, monkeypatch):
    folder, name = official_like
    monkeypatch.setenv("ENCODEC_FAST_ROOT_URL", folder.as_uri())
    model = encodec_fast.encodec_model_24khz()
    assert model.name == "encodec_24khz"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), pair_24[1].state_dict().values()))
    cached = torch.hub.get_dir() + "/checkpoints/" + name
    (folder / name).unlink()  # now only the cache has it
    assert pretrained.get_checkpoint("encodec_24khz") is not None
    assert pretrained.sha256_file(cached).startswith(name.split("-")[1][:8])


def test_download_from_local_http_server(official_like):
    folder, _ = official_like
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        state = pretrained.get_checkpoint("encodec_24khz", root_url=f"http://127.0.0.1:{server.server_port}/")
    finally:
        server.shutdown()
    assert "quantizer.vq.layers.0._codebook.embed" in state


def test_hash_mismatch_is_refused(official_like, monkeypatch):
    folder, name = official_like
    wrong = name.replace(name.split("-")[1][:8], "00000000")
    (folder / wrong).write_bytes((folder / name).read_bytes())
    monkeypatch.setitem(pretrained.CHECKPOINTS, "encodec_24khz", wrong)
    with pytest.raises(CheckpointError, match="not the official file|hash"):
        pretrained.get_checkpoint("encodec_24khz", root_url=folder.as_uri())
    with pytest.raises(CheckpointError, match="sha256"):
        pretrained.get_checkpoint("encodec_24khz", repository=folder)


def test_repository_argument_and_environment(official_like, monkeypatch):
    folder, _ = official_like
    assert encodec_fast.encodec_model_24khz(repository=folder).name == "encodec_24khz"
    monkeypatch.setenv("ENCODEC_FAST_REPOSITORY", str(folder))
    assert "decoder.model.15.conv.conv.weight_v" in pretrained.get_checkpoint("encodec_24khz")


def test_offline_errors_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.delenv("ENCODEC_FAST_REPOSITORY", raising=False)
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="encodec_48khz-7e698e3e.th.*ENCODEC_FAST_REPOSITORY"):
        encodec_fast.encodec_model_48khz(repository=empty)
    with pytest.raises(CheckpointError, match="cannot be downloaded.*repository"):
        pretrained.get_checkpoint("encodec_lm_24khz", root_url=empty.as_uri())


def test_custom_checkpoint_and_bad_files(checkpoint_24, tmp_path):
    model = encodec_fast.encodec_model_24khz(pretrained=False, checkpoint=checkpoint_24)
    assert model.name == "encodec_24khz"
    with pytest.raises(CheckpointError, match="does not fit"):
        encodec_fast.encodec_model_48khz(pretrained=False, checkpoint=checkpoint_24)
    truncated = tmp_path / "cut.th"
    truncated.write_bytes(checkpoint_24.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read"):
        encodec_fast.encodec_model_24khz(pretrained=False, checkpoint=truncated)
    with pytest.raises(CheckpointError, match="does not exist"):
        encodec_fast.encodec_model_24khz(pretrained=False, checkpoint=tmp_path / "missing.th")
