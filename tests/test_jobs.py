"""Jobs at a cluster's edges: one writer per output (a second tokenize or train job on it is refused at
once, naming the holder; shards of one directory run side by side), preemption (SIGTERM, then a rerun
continues exactly), and I/O faults (a full disk, made with a file-size limit: one line, no partial
file, a rerun completes once space is back)."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from encodec_fast import jobs
from encodec_fast.testing import make_signal
from encodec_fast.tokenize import read_codes
from encodec_fast.train import trainer as T

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TRAIN_FAST = ["--model", "tiny", "--disc-filters", "4", "--segment-seconds", "0.25", "--valid-seconds", "0.5",
              "--valid-every", "0", "--log-every", "1", "--quiet", "--batch-size", "2", "--workers", "0"]


def _command(*args) -> list:
    return [sys.executable, "-m", "encodec_fast", *map(str, args)]


def _file_size_limit(limit: int):
    """A full disk, as the process sees it: writes past `limit` bytes fail with EFBIG (SIGXFSZ ignored)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _one_line_error(proc: subprocess.CompletedProcess, prefix: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def _leftovers(folder: Path) -> list:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".part." in p.name]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 real-signal clips of 2 s (24 kHz mono): long enough for a job to be caught mid-run."""
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(24):
        sf.write(folder / f"clip{i:02d}.wav", make_signal(24000, 48000, 1, seed=i).numpy().T, 24000)
    return folder


def _tokenize_args(corpus: Path, out: Path, checkpoint: Path, *extra) -> list:
    return _command("tokenize", corpus, "-o", out, "--checkpoint", checkpoint, "--workers", "1",
                    "--batch-seconds", "1", "--rows-per-shard", "2", "--device", "cpu", "--quiet", *extra)


def _wait_for(condition, proc: subprocess.Popen, seconds: float = 300) -> bool:
    deadline = time.time() + seconds
    while not condition() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    return proc.poll() is None


# -- the lock ----------------------------------------------------------------------------------------
HOLD = ("import sys, time\nfrom encodec_fast.jobs import OutputLock\n"
        "lock = OutputLock(sys.argv[1], 'the output').acquire()\nprint('held', flush=True)\ntime.sleep(600)\n")


def test_lock_names_its_holder_and_dies_with_it(tmp_path):
    path = tmp_path / "out" / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(jobs.JobLockError, match=f"in use by another job .*pid {holder.pid}"):
            jobs.OutputLock(path, "the output").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # SIGKILL leaves no stale lock; a lock taken twice in one process is refused too
    with jobs.OutputLock(path, "the output"):
        assert f"pid {os.getpid()}" in path.read_text()
        with pytest.raises(jobs.JobLockError, match="in this process"):
            jobs.OutputLock(path, "the output").acquire()
    with jobs.OutputLock(path, "the output"):
        pass


def test_graceful_stop_asks_once_then_interrupts():
    before = signal.getsignal(signal.SIGTERM)
    with jobs.GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested == signal.SIGTERM
        with pytest.raises(jobs.Interrupted) as second:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert second.value.exit_status == 128 + signal.SIGINT
        with pytest.raises(jobs.Interrupted) as asked:
            stop.raise_if_requested("written")
        assert asked.value.exit_status == 143 and "written" in str(asked.value)
    assert signal.getsignal(signal.SIGTERM) is before


def test_written_then_renamed_leaves_nothing_partial(tmp_path):
    final = tmp_path / "result.json"
    with pytest.raises(OSError) as failed:
        with jobs.written_then_renamed(final) as tmp:
            tmp.write_text("half")
            raise OSError(28, "No space left on device")
    assert not final.exists() and not list(tmp_path.iterdir())
    assert failed.value.filename == str(final)
    assert jobs.describe_os_error(failed.value) == f"{final}: no space left on device"
    with jobs.written_then_renamed(final) as tmp:
        tmp.write_text("whole")
    assert final.read_text() == "whole" and [p.name for p in tmp_path.iterdir()] == ["result.json"]


@pytest.mark.slow
def test_two_tokenize_jobs_on_one_output(corpus, checkpoint_24, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen(_tokenize_args(corpus, out, checkpoint_24), env=ENV, stderr=subprocess.PIPE, text=True)
    running = _wait_for(lambda: any(out.glob("part-*.parquet")), first)
    assert running, "the first job finished before the second could start: make the corpus longer"
    second = subprocess.run(_tokenize_args(corpus, out, checkpoint_24), env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert first.poll() is None, "the second job must be refused while the first runs"
    line = _one_line_error(second, "encodec-fast tokenize: error:")
    assert second.returncode == 101 and f"pid {first.pid}" in line and str(out) in line
    assert first.wait(timeout=600) == 0, first.stderr.read()
    ids = [r["id"] for r in read_codes(out, columns=["id"])]
    assert len(ids) == len(set(ids)) == 24
    # shards of one directory run side by side
    both = [subprocess.Popen(_tokenize_args(corpus, tmp_path / "sharded", checkpoint_24, "--shard", f"{i}/2"),
                             env=ENV) for i in range(2)]
    assert [p.wait(timeout=600) for p in both] == [0, 0]
    ids = [r["id"] for r in read_codes(tmp_path / "sharded", columns=["id"])]
    assert len(ids) == len(set(ids)) == 24


@pytest.mark.slow
def test_tokenize_sigterm_then_rerun_gives_every_item_once(corpus, checkpoint_24, tmp_path):
    out = tmp_path / "out"
    stopped = 0
    for shards in (1, 4):  # early and later in the run
        proc = subprocess.Popen(_tokenize_args(corpus, out, checkpoint_24), env=ENV, stderr=subprocess.PIPE,
                                text=True)
        if _wait_for(lambda: len(list(out.glob("part-*.parquet"))) >= shards, proc):
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 143, err
            assert "interrupted (SIGTERM)" in err and "run the same command again" in err
            assert json.loads((out / "_manifest.json").read_text())["last_run"]["interrupted"] is True
            assert not _leftovers(out)
            stopped += 1
        else:
            proc.communicate()
    assert stopped == 2, "the job finished before it could be stopped: make the corpus longer"
    done = subprocess.run(_tokenize_args(corpus, out, checkpoint_24), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ids = [r["id"] for r in read_codes(out, columns=["id"])]
    assert len(ids) == len(set(ids)) == 24
    clean = tmp_path / "clean"
    assert subprocess.run(_tokenize_args(corpus, clean, checkpoint_24), env=ENV).returncode == 0
    got = {r["id"]: r["codes"] for r in read_codes(out)}
    for row in read_codes(clean):
        assert np.array_equal(got[row["id"]], row["codes"]), row["id"]


def _train(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "encodec_fast.train", *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, **kw)


def _start_training(args, run: Path) -> subprocess.Popen:
    """A training job, returned once it has logged two steps (still running)."""
    proc = subprocess.Popen([sys.executable, "-m", "encodec_fast.train", *map(str, args), "-o", str(run)], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run / T.METRICS
    assert _wait_for(lambda: metrics.exists() and metrics.read_text().count('"train"') >= 2, proc), \
        "training finished before it could be stopped"
    return proc


@pytest.mark.slow
def test_train_one_job_per_run_directory(corpus, tmp_path):
    run = tmp_path / "run"
    args = [corpus, *TRAIN_FAST, "--steps", "100000", "--checkpoint-every", "100000"]
    proc = _start_training(args, run)
    try:
        other = _train([*args, "-o", run, "--resume"], timeout=300)
        assert proc.poll() is None, "the second job must be refused while the first runs"
        line = _one_line_error(other, "encodec-fast train: error:")
        assert other.returncode == 1 and f"pid {proc.pid}" in line and str(run) in line
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert "interrupted (SIGTERM)" in err and "checkpoint written" in err
    assert torch.load(run / T.CHECKPOINT, weights_only=False)["step"] >= 2


@pytest.mark.slow
def test_train_sigterm_checkpoints_the_step_and_resumes_bit_for_bit(corpus, tmp_path):
    args = [corpus, *TRAIN_FAST, "--steps", "8", "--checkpoint-every", "100"]
    full = _train([*args, "-o", tmp_path / "full"], timeout=600)
    assert full.returncode == 0, full.stderr
    run = tmp_path / "stopped"
    proc = _start_training(args, run)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    stopped_at = torch.load(run / T.CHECKPOINT, weights_only=False)["step"]
    assert 2 <= stopped_at < 8
    resumed = _train([*args, "-o", run, "--resume"], timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "full" / T.CHECKPOINT, weights_only=False)
    b = torch.load(run / T.CHECKPOINT, weights_only=False)
    assert a["step"] == b["step"] == 8
    for part in ("model", "discriminator"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)


# -- full disks ------------------------------------------------------------------------------------------
def test_command_on_a_full_disk(tmp_path):
    wav = tmp_path / "in.wav"
    sf.write(wav, make_signal(24000, 5 * 24000, 1, seed=3).numpy().T, 24000)
    ecdc = tmp_path / "out.ecdc"
    full = subprocess.run(_command(wav, ecdc, "--model", "small"), capture_output=True, text=True,
                          preexec_fn=_file_size_limit(1000), timeout=300)
    line = _one_line_error(full, "encodec-fast: error:")
    assert full.returncode == 1 and str(ecdc) in line and "file too large" in line
    assert not ecdc.exists() and not _leftovers(tmp_path)
    assert subprocess.run(_command(wav, ecdc, "--model", "small"), capture_output=True, timeout=300).returncode == 0
    back = tmp_path / "back.wav"
    for extra in ([], ["-r"]):  # written directly, or through the rescaling scratch file
        full = subprocess.run(_command(ecdc, back, *extra), capture_output=True, text=True,
                              preexec_fn=_file_size_limit(20000), timeout=300)
        line = _one_line_error(full, "encodec-fast: error:")
        assert full.returncode == 1 and str(back) in line
        assert not back.exists() and not _leftovers(tmp_path)
    (tmp_path / "a_dir.wav").mkdir()
    refused = subprocess.run(_command(ecdc, tmp_path / "a_dir.wav", "-f"), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "is a directory" in _one_line_error(refused, "encodec-fast: error:")
    debug = subprocess.run(_command(wav, ecdc, "--model", "small", "-f", "--debug"), capture_output=True, text=True,
                           preexec_fn=_file_size_limit(1000), timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.slow
def test_tokenize_and_train_on_a_full_disk(corpus, checkpoint_24, tmp_path):
    out = tmp_path / "out"
    args = _tokenize_args(corpus, out, checkpoint_24)
    args[args.index("--workers") + 1] = "0"  # the limit would also stop the workers' shared-memory files
    full = subprocess.run(args, env=ENV, capture_output=True, text=True, preexec_fn=_file_size_limit(3000),
                          timeout=600)
    line = _one_line_error(full, "encodec-fast tokenize: error:")
    assert full.returncode == 101 and "part-s0of1-" in line and "file too large" in line
    assert not list(out.glob("part-*.parquet")) and not _leftovers(out)
    assert subprocess.run(args, env=ENV, capture_output=True).returncode == 0
    ids = [r["id"] for r in read_codes(out, columns=["id"])]
    assert len(ids) == len(set(ids)) == 24

    run = tmp_path / "run"
    train = [corpus, *TRAIN_FAST, "--steps", "2", "-o", run]
    full = _train(train, preexec_fn=_file_size_limit(200_000), timeout=600)
    line = _one_line_error(full, "encodec-fast train: error:")
    assert full.returncode == 1 and str(run / T.CHECKPOINT) in line
    assert not (run / T.CHECKPOINT).exists() and not _leftovers(run)
    resumed = _train([*train, "--resume"], timeout=600)  # no checkpoint yet: starts again at step 0
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(run / T.CHECKPOINT, weights_only=False)["step"] == 2
