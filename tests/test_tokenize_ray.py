"""`--engine ray` on a local Ray instance (CPU): the same rows and errors as the local engine, and
resume from a partial run and after the job was killed."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import ray
import soundfile as sf
import torch

from encodec_fast.tokenize import read_codes, tokenize
from test_tokenize import make_corpus, write_bad_inputs

pytestmark = pytest.mark.slow  # starts a local Ray instance (CI: the readme environment only)


def test_ray_job_killed_then_restarted_gives_every_item_exactly_once(tmp_path, checkpoint_24):
    """The command with --engine ray, its driver killed (SIGKILL) while it commits shards, then run
    again: every input in the shards exactly once, every failure reported once, no temporary file
    left. (Its local Ray instance shares the driver's fate: the restart starts a new one.)"""
    make_corpus(tmp_path / "in", 24, seconds=(0.8, 2.0))
    write_bad_inputs(tmp_path / "in" / "bad")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "encodec_fast", "tokenize", str(tmp_path / "in"), "-o", str(out),
            "--checkpoint", str(checkpoint_24), "--engine", "ray", "--rows-per-shard", "2", "--device", "cpu",
            "--quiet"]
    # a Ray instance of its own, whatever else this machine (or another test's process) runs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": "local"}
    proc = subprocess.Popen(args, env=env)
    deadline = time.time() + 300
    while len(list(out.glob("part-*.parquet"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the job finished before it could be killed: make the corpus longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(list(out.glob("part-*.parquet")))
    assert 2 <= committed < 12
    assert subprocess.run(args, env=env, timeout=600).returncode == 7  # the 7 bad inputs
    ids = [r["id"] for r in read_codes(out, columns=["id"])]
    assert len(ids) == len(set(ids)) == 24
    errors = [json.loads(line)["id"] for line in (out / "_errors.jsonl").read_text().splitlines()]
    assert len(errors) == len(set(errors)) == 7
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


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


def test_ray_engine_reads_tar_archives_in_place(tmp_path, pair_24, local_ray):
    """Tar members (WebDataset shards) through Ray's decoding tasks and encoder actors, one of them
    streamed: the local engine's rows and errors."""
    from test_tokenize import make_tar_shards
    _, ours = pair_24
    files = make_corpus(tmp_path / "in", 6, seconds=(0.3, 1.6))
    shards = make_tar_shards(tmp_path / "shards", files, tmp_path / "in")
    runs = {engine: tokenize([shards], tmp_path / engine, model=ours, bandwidth=6.0, engine=engine, workers=1,
                             quiet=True, stream_seconds=0.8) for engine in ("local", "ray")}
    assert [(s.tokenized, s.failed) for s in runs.values()] == [(6, 3), (6, 3)]
    local = {r["id"]: r["codes"] for r in read_codes(tmp_path / "local")}
    got = {r["id"]: r["codes"] for r in read_codes(tmp_path / "ray")}
    assert set(got) == set(local) and all(np.array_equal(got[k], local[k]) for k in local)
    errors = [(tmp_path / e / "_errors.jsonl").read_text().splitlines() for e in ("local", "ray")]
    assert sorted(json.loads(line)["id"] for line in errors[0]) == sorted(json.loads(line)["id"] for line in errors[1])
