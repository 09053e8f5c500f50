"""`--engine ray` on a local Ray instance (CPU): the same rows and errors as the local engine, and
resume from a partial run."""

import json

import numpy as np
import pytest
import ray
import soundfile as sf
import torch

from encodec_fast.tokenize import read_codes, tokenize
from test_tokenize import make_corpus, write_bad_inputs

pytestmark = pytest.mark.slow  # starts a local Ray instance (CI: the readme environment only)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_engine_matches_local_engine_and_resumes(tmp_path, pair_24, local_ray):
    """Clips over 0.8 s are read and encoded piece by piece (in the encoder actors for Ray)."""
    _, ours = pair_24
    paths = make_corpus(tmp_path / "in", 8)
    assert sum(sf.info(str(p)).duration > 0.8 for p in paths[3:]) >= 2  # streamed in the second run
    expected_errors = write_bad_inputs(tmp_path / "in" / "bad")
    half = tmp_path / "half.txt"
    half.write_text("".join(f"{p}\n" for p in paths[:3]))
    # A partial run (3 files), then the whole job: ids are paths as given for a manifest, so
    # list the same files the same way both times.
    everything = tmp_path / "all.txt"
    everything.write_text("".join(f"{p}\n" for p in sorted((tmp_path / "in").rglob("*.*"))))
    first = tokenize([half], tmp_path / "ray", model=ours, bandwidth=6.0, engine="ray", quiet=True, rows_per_shard=2,
                     stream_seconds=0.8)
    assert (first.tokenized, first.failed) == (3, 0)
    # the rest resampled in the encoder actors (the default on GPUs): the same codes
    second = tokenize([everything], tmp_path / "ray", model=ours, bandwidth=6.0, engine="ray", quiet=True,
                      rows_per_shard=2, stream_seconds=0.8, resample_on_device=True)
    assert (second.tokenized, second.failed, second.skipped) == (5, len(expected_errors), 3)
    # Ray's actors run torch on one thread; the local engine on one thread gives the same codes
    # (another thread count can move a near-tie code, in upstream's encoder as in ours).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenize([everything], tmp_path / "local", model=ours, bandwidth=6.0, workers=0, quiet=True,
                 stream_seconds=0.8)
    finally:
        torch.set_num_threads(threads)
    got = {r["id"]: r for r in read_codes(tmp_path / "ray")}
    ref = {r["id"]: r for r in read_codes(tmp_path / "local")}
    assert sorted(got) == sorted(ref) and len(got) == 8
    for key, row in ref.items():
        assert np.array_equal(got[key]["codes"], row["codes"]), key
        assert {k: v for k, v in got[key].items() if k != "codes"} == {k: v for k, v in row.items() if k != "codes"}
    errors = [json.loads(line) for line in (tmp_path / "ray" / "_errors.jsonl").read_text().splitlines()]
    assert len(errors) == len({e["id"] for e in errors}) == len(expected_errors)
    for e in errors:
        assert expected_errors[e["path"].rsplit("/", 1)[1]] in e["error"], e
