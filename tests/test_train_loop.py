"""The trainer (encodec_fast.train.trainer) and `encodec-fast train`: one step against a reference
built from upstream's modules, resume after SIGKILL, data-parallel exactness with 2 gloo processes,
export loaded by upstream, bad data, non-finite losses, Ctrl-C, the report."""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import encodec
import numpy as np
import pytest
import soundfile as sf
import torch

from encodec_fast.testing import make_signal, rel_err
from encodec_fast.train import data as D
from encodec_fast.train import reference
from encodec_fast.train import trainer as T
from encodec_fast.train.balancer import Balancer
from encodec_fast.train.losses import MultiScaleMelLoss, time_l1

ROOT = Path(__file__).resolve().parents[1]

# A run small enough for a 2-core CI machine: the tiny model, a 4-filter discriminator, 0.25 s crops.
FAST = ["--model", "tiny", "--disc-filters", "4", "--segment-seconds", "0.25", "--valid-seconds", "0.5",
        "--valid-every", "0", "--log-every", "1", "--quiet", "--batch-size", "2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Six speech/music-like files at three rates (mono and stereo) plus three bad ones."""
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        rate = (24000, 16000, 44100)[i % 3]
        wav = make_signal(rate, int(rate * (0.8 + 0.3 * i)), channels=1 + i % 2, seed=i)
        sf.write(folder / f"clip{i}.{'wav' if i % 2 else 'flac'}", wav.T.numpy(), rate)
    (folder / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio" * 8)
    sf.write(folder / "short.wav", make_signal(24000, 1000).T.numpy(), 24000)
    sf.write(folder / "silent.wav", np.zeros((24000, 1), np.float32), 24000)
    return folder


def _config(corpus, **kw) -> T.TrainConfig:
    base = dict(data=[str(corpus)], model="tiny", disc_filters=4, segment_seconds=0.25, batch_size=2, workers=0,
                steps=2, valid_every=0, valid_seconds=0.5, log_every=1)
    base.update(kw)
    return T.TrainConfig(**base)


def _run(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "encodec_fast.train", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, **kw)


def _state(run_dir: Path):
    return torch.load(run_dir / T.CHECKPOINT, weights_only=False)


# -- data -------------------------------------------------------------------------------------------
def test_scan_skips_bad_files_with_reasons(corpus):
    clips, skipped = D.scan([str(corpus)], 0.25)
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert set(reasons) == {"corrupt.wav", "short.wav"}
    assert "unreadable" in reasons["corrupt.wav"] and "too short" in reasons["short.wav"]
    assert {Path(c.path).name for c in clips} == {f"clip{i}.{'wav' if i % 2 else 'flac'}" for i in range(6)} | {
        "silent.wav"}


def test_crops_are_a_function_of_the_index_and_never_silent(corpus):
    clips, _ = D.scan([str(corpus)], 0.25)
    ds = D.CropDataset(clips, 24000, 1, 6000, seed=3)
    a, b = ds[17][0], ds[17][0]
    assert a.shape == (1, 6000) and torch.equal(a, b)
    assert not torch.equal(ds[18][0], a)
    rms = [float(ds[i][0].pow(2).mean().sqrt()) for i in range(40)]
    assert min(rms) >= D.SILENCE_RMS  # the silent file is drawn sometimes and replaced


def test_training_reads_tar_archives_in_place(corpus, tmp_path):
    """Tar shards of the corpus give the same clips (ids under the archive's) and the same crops."""
    import tarfile
    with tarfile.open(tmp_path / "corpus.tar", "w") as archive:
        for f in sorted(corpus.iterdir()):
            archive.add(f, arcname=f.name)
    clips, skipped = D.scan([str(corpus)], 0.25)
    tar_clips, tar_skipped = D.scan([str(tmp_path / "corpus.tar")], 0.25)
    assert [c.id.split("corpus.tar/")[-1] for c in tar_clips] == [c.id for c in clips]
    # the same reasons, each naming its input (the member by its id)
    assert [(s.id.split("/")[-1], s.reason.replace(s.id, "X")) for s in tar_skipped] == [
        (s.id, s.reason.replace(s.path, "X")) for s in skipped]
    for clip, member in zip(clips, tar_clips):
        assert member.offset > 0 and (member.rate, member.channels, member.frames) == (clip.rate, clip.channels,
                                                                                        clip.frames)
        assert torch.equal(D.read_crop(member, 100, 3000, 24000, 1), D.read_crop(clip, 100, 3000, 24000, 1))


def test_a_file_corrupt_past_its_header_is_replaced_and_reported(tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, make_signal(24000, 24000).T.numpy(), 24000)
    bad = tmp_path / "bad.wav"
    sf.write(bad, make_signal(24000, 24000, seed=1).T.numpy(), 24000)
    clips, _ = D.scan([str(tmp_path)], 0.25)
    bad.write_bytes(bad.read_bytes()[:2000])  # truncated after the scan: the header still says 1 s
    ds = D.CropDataset(clips, 24000, 1, 6000, seed=0)
    problems = [p for i in range(12) for p in ds[i][1]]
    assert problems and all(path == str(bad) for path, _ in problems)
    assert all(ds[i][0].shape == (1, 6000) for i in range(12))


def test_ranks_read_the_examples_of_the_combined_batch():
    one = [i for batch in D.StepBatches(3, 6, batch=8) for i in batch]
    two = [i for step in range(3, 6) for rank in range(2)
           for i in list(D.StepBatches(step, step + 1, batch=4, rank=rank, world=2))[0]]
    assert one == two
    acc = list(D.StepBatches(0, 2, batch=2, accumulate=2))
    assert acc == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_validation_split_is_stable_and_never_everything(corpus):
    clips, _ = D.scan([str(corpus)], 0.25)
    train, valid = D.split_validation(clips, 50, 3)
    assert valid and len(valid) <= 3 and len(train) + len(valid) == len(clips)
    assert D.split_validation(list(reversed(clips)), 50, 3)[1] == valid or \
        {c.id for c in D.split_validation(list(reversed(clips)), 50, 3)[1]} == {c.id for c in valid}
    assert D.split_validation(clips[:1], 100, 3) == (clips[:1], [])


# -- one step against upstream's modules ------------------------------------------------------------
@pytest.mark.parametrize("layout,tolerance,compared", [("nchw", 1e-6, 3), ("channels_last", 1e-4, 1)])
def test_one_step_equals_a_reference_step_built_from_upstream_modules(corpus, tmp_path, layout, tolerance, compared,
                                                                      monkeypatch):
    """The trainer's steps against steps built from upstream's modules: in upstream's discriminator
    layout three steps within 1e-6; channels-last (the CPU default) moves the discriminator's
    gradients by fp32 rounding, which Adam's normalisation magnifies where a gradient is near zero,
    and from the second step on a code can flip (the first step, within 1e-4)."""
    monkeypatch.setenv("ENCODEC_FAST_DISC_LAYOUT", layout)
    trainer = T.Trainer(_config(corpus, batch_size=3), tmp_path / "run", quiet=True)
    model, disc = reference.upstream_copy(trainer)
    cfg = trainer.config
    opt_g = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    balancer = Balancer(cfg.weights())
    mel = MultiScaleMelLoss(24000)
    steps = {}
    for step in range(20):  # one step where the discriminator learns, one where it does not
        steps.setdefault(trainer.draws(step)[1], step)
    order = [steps[True], steps[False], steps[True]][:compared]
    for n, step in enumerate(order):
        x = torch.stack([trainer.dataset[100 * n + j][0] for j in range(3)])
        bandwidth, learn_d = trainer.draws(step)
        torch.manual_seed(n)
        values = trainer.train_step(step, [x])
        torch.manual_seed(n)
        reference.reference_step(model, disc, opt_g, opt_d, balancer, mel, x, bandwidth, learn_d)
        assert values is not None and values["disc_step"] == float(learn_d)
        ours, theirs = trainer.model.state_dict(), model.state_dict()
        for key in theirs:
            assert rel_err(ours[key].float(), theirs[key].float()) < tolerance, (n, key)
        for key, value in disc.state_dict().items():
            assert rel_err(trainer.disc.state_dict()[key], value) < tolerance, (n, key)
    # the codebooks were trained (k-means, EMA), not only carried along
    assert bool(trainer.model.quantizer.vq.layers[0]._codebook.inited)


# -- checkpoints, resume, Ctrl-C --------------------------------------------------------------------
@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(corpus, tmp_path):
    args = [str(corpus), *FAST, "--steps", "8", "--checkpoint-every", "2", "--workers", "1", "--batch-size", "2"]
    full = _run([*args, "-o", str(tmp_path / "full")], timeout=600)
    assert full.returncode == 0, full.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "encodec_fast.train", *args, "-o", str(run)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / T.CHECKPOINT).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _state(run)["step"]
    assert 2 <= killed_at < 8, "the kill must land mid-run"
    resumed = _run([*args, "-o", str(run), "--resume"], timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _state(tmp_path / "full"), _state(run)
    assert a["step"] == b["step"] == 8
    for part in ("model", "discriminator"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)
    for key, value in torch.load(tmp_path / "full" / T.EXPORT).items():
        assert torch.equal(value, torch.load(run / T.EXPORT)[key])
    assert a["balancer"] == b["balancer"]


@pytest.mark.slow
def test_resume_refuses_other_options_and_runs_are_not_overwritten(corpus, tmp_path):
    run = tmp_path / "run"
    assert _run([str(corpus), *FAST, "--steps", "1", "--workers", "0", "-o", str(run)]).returncode == 0
    again = _run([str(corpus), *FAST, "--steps", "2", "--workers", "0", "-o", str(run)])
    assert again.returncode == 1 and "--resume" in again.stderr
    other = _run([*FAST, "--steps", "2", "--lr", "0.1", "-o", str(run), "--resume"])
    assert other.returncode == 1 and "--lr" in other.stderr
    more = _run([*FAST, "--steps", "2", "--workers", "0", "-o", str(run), "--resume"])
    assert more.returncode == 0, more.stderr
    assert _state(run)["step"] == 2
    missing = _run([*FAST, "-o", str(tmp_path / "none"), "--resume"])
    assert missing.returncode == 1 and ("checkpoint" in missing.stderr.lower() or "config" in missing.stderr)


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint(corpus, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "encodec_fast.train", str(corpus), *FAST, "--steps", "100000",
                             "--checkpoint-every", "100000", "--workers", "0", "-o", str(run)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        metrics = run / T.METRICS
        if metrics.exists() and metrics.read_text().count('"train"') >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint written" in err
    state = _state(run)
    assert state["step"] >= 2
    assert (run / T.EXPORT).exists()


# -- export ------------------------------------------------------------------------------------------
def test_export_of_the_24khz_model_loads_strictly_in_upstream_and_in_our_command(corpus, tmp_path):
    cfg = _config(corpus, model="24khz", steps=1, batch_size=1, segment_seconds=0.1)
    T.train(cfg, tmp_path / "run", quiet=True)
    export = tmp_path / "run" / T.EXPORT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        up = encodec.EncodecModel.encodec_model_24khz(pretrained=False)
    up.load_state_dict(torch.load(export), strict=True)
    from encodec_fast import EncodecModel, cli
    ours = EncodecModel.encodec_model_24khz(pretrained=False, checkpoint=export)
    assert ours.name == "encodec_24khz"
    wav = tmp_path / "in.wav"
    sf.write(wav, make_signal(24000, 12000).T.numpy(), 24000)
    assert cli.main([str(wav), str(tmp_path / "out.ecdc"), "--checkpoint", str(export), "-b", "6"]) == 0
    up.set_target_bandwidth(6.0)
    ours.set_target_bandwidth(6.0)
    x = make_signal(24000, 12000)[None]
    with torch.no_grad():
        assert torch.equal(ours.encode(x)[0][0], up.encode(x)[0][0])


# -- non-finite losses --------------------------------------------------------------------------------
def test_non_finite_steps_are_skipped_then_the_run_stops_clearly(corpus, tmp_path, monkeypatch):
    calls = {"n": 0}

    def flaky_l1(x, y):
        calls["n"] += 1
        value = time_l1(x, y)
        return value * float("nan") if calls["n"] in (2, 3) or calls["n"] >= 6 else value

    monkeypatch.setattr(T, "time_l1", flaky_l1)
    trainer = T.Trainer(_config(corpus, steps=20, max_nonfinite=3, checkpoint_every=1), tmp_path / "run", quiet=True)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="non-finite"), pytest.raises(T.TrainingError, match="3 steps in a row"):
        trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / T.METRICS).read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert train[-1]["skipped_steps"] >= 2
    state = _state(tmp_path / "run")  # the last checkpoint is intact and finite
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert any(not torch.equal(before[k], v) for k, v in state["model"].items())


def test_a_run_in_one_process_reads_once_per_step(corpus, tmp_path):
    """`run()` in one process adds no read of tensor values to its steps' own (`HostReads`: the
    losses and norms, one per step): the stop check between steps stays on the host (it went through
    the device, and on a GPU waited for the whole step, once per step)."""
    from encodec_fast.testing import HostReads
    trainer = T.Trainer(_config(corpus, steps=3), tmp_path / "run", quiet=True)
    trainer.validate = lambda: []
    trainer.save_checkpoint = lambda: None  # the weights' copies to the host: per checkpoint, not per step
    with HostReads(ignore=("torch/optim", "torch/utils/data")) as reads:
        trainer.run()
    own = [op for op, where in reads.reads if where.startswith("trainer.py")]
    assert own == ["tolist"] * 3, [r for r in reads.reads if r[1].startswith("trainer.py")]


def test_a_non_finite_gradient_norm_skips_the_step_before_the_balancer_takes_it(corpus, tmp_path, monkeypatch):
    """A loss whose value is finite but whose gradient is not (read with the losses, in one go)
    skips the step: no weight moves and the balancer's moving averages stay as they were (taking
    an infinite norm in would scale that loss's share to zero for the rest of the run)."""
    class InfiniteGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            ctx.shape = y.shape
            return y.new_zeros(())

        @staticmethod
        def backward(ctx, grad):
            return torch.full(ctx.shape, float("inf"), dtype=grad.dtype)

    trainer = T.Trainer(_config(corpus), tmp_path / "run", quiet=True)
    x = torch.stack([trainer.dataset[i][0] for i in range(2)])
    trainer.draws = lambda step: (trainer.model.target_bandwidths[0], True)
    assert trainer.train_step(0, [x]) is not None
    balancer = copy.deepcopy(trainer.balancer.state_dict())
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items() if "_codebook" not in k}
    monkeypatch.setattr(T, "time_l1", lambda x, y: time_l1(x, y) + InfiniteGradient.apply(y))
    with pytest.warns(RuntimeWarning, match="gradient norm of l1"):
        assert trainer.train_step(1, [x]) is None
    assert trainer.balancer.state_dict() == balancer and trainer.skipped == 1
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in weights.items())
    monkeypatch.setattr(T, "time_l1", time_l1)
    assert trainer.train_step(2, [x]) is not None and trainer.balancer.state_dict() != balancer


# -- data parallel -------------------------------------------------------------------------------------
def _codebook_err(a, b, prefix, tolerance):
    """Relative difference of two codebooks (rows of embed, embed_avg, cluster_size) over their
    codewords, leaving out at most 2% of them (20 of 1024) that differ by more than `tolerance`.
    With fewer vectors per batch than codes, k-means seeds near-duplicate codewords (crops of one
    file share frames), and later stages fit residuals that are rounding noise; a vector almost
    equidistant to two codewords can land on either when sums round differently. Seen in fp64:
    1 codeword in one stage (torch 2.11), 6 in one stage (torch 2.14), the other stages equal."""
    rows = [torch.cat([s[prefix + "embed"], s[prefix + "embed_avg"], s[prefix + "cluster_size"][:, None]], 1)
            for s in (a, b)]
    assert bool(a[prefix + "inited"] == b[prefix + "inited"])
    per_row = (rows[0] - rows[1]).norm(dim=1) / rows[0].norm(dim=1).clamp_min(1e-30)
    keep = per_row <= tolerance
    assert int((~keep).sum()) <= len(keep) // 50, f"{prefix}: {int((~keep).sum())} codewords differ"
    return rel_err(rows[1][keep], rows[0][keep])


def _one_and_two(corpus, tmp_path, precision, tolerance):
    args = [str(corpus), *FAST, "--steps", "3", "--batch-size", "4", "--workers", "0", "--device", "cpu",
            "--checkpoint-every", "100", "--precision", precision]
    one = _run([*args, "-o", str(tmp_path / "one")], timeout=600)
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "encodec_fast.train", *args, "-o", str(tmp_path / "two")], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _state(tmp_path / "one"), _state(tmp_path / "two")
    assert a["step"] == b["step"] == 3
    rows = [json.loads(line) for line in (tmp_path / "two" / T.METRICS).read_text().splitlines()]
    assert rows[0]["world"] == 2
    errors = {}
    for part in ("model", "discriminator"):
        for key, value in a[part].items():
            if "_codebook." in key:
                continue
            if value.is_floating_point():
                errors[f"{part}.{key}"] = rel_err(b[part][key], value)
            else:
                assert torch.equal(value, b[part][key]), key
    stages = sorted({k.split("._codebook.")[0] for k in a["model"] if "._codebook." in k})
    for stage in stages:
        errors[stage + "._codebook"] = _codebook_err(a["model"], b["model"], stage + "._codebook.", tolerance)
    return errors


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_on_the_combined_batch(corpus, tmp_path):
    """In fp64: N workers of batch b compute exactly what one process does with N x b (same
    examples, draws, k-means, expiry, EMA statistics, balancer norms, feature-matching scales,
    gradients), up to the order of floating-point sums."""
    errors = _one_and_two(corpus, tmp_path, "fp64", 1e-5)
    assert max(errors.values()) < 1e-5, max(errors.items(), key=lambda kv: kv[1])


@pytest.mark.slow
def test_two_gloo_processes_in_fp32(corpus, tmp_path):
    """In fp32 the order of sums differs at 1e-7, and two things amplify it: Adam's first steps
    (an update of about lr whatever the gradient, so an element whose gradient is rounding noise
    moves by noise), and codebooks that k-means fitted to residuals that are themselves rounding
    noise (a stage with more codes than the batch has vectors leaves a residual of ~1e-7). The
    weights and the first stage's codebook still agree closely."""
    errors = _one_and_two(corpus, tmp_path, "fp32", 1.0)
    params = {k: v for k, v in errors.items() if "_codebook" not in k}
    assert max(params.values()) < 5e-4, max(params.items(), key=lambda kv: kv[1])
    first_stage = errors["quantizer.vq.layers.0._codebook"]
    assert first_stage < 1e-4, first_stage


# -- report --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_report_writes_plots_and_a_summary(corpus, tmp_path):
    run = tmp_path / "run"
    T.train(_config(corpus, steps=3, valid_every=2, valid_samples=1), run, quiet=True)
    rows = [json.loads(line) for line in (run / T.METRICS).read_text().splitlines()]
    valid = [r for r in rows if r["split"] == "valid"]
    assert {r["bandwidth"] for r in valid} == {1.5, 3.0, 6.0, 12.0, 24.0}
    assert all(np.isfinite(r["si_snr"]) for r in valid)
    books = [r for r in rows if r["split"] == "codebooks"]
    assert len(books[-1]["perplexity"]) == 32
    assert len(books[-1]["replaced"]) == 32 and all(isinstance(n, int) and n >= 0 for n in books[-1]["replaced"])
    assert any((run / "samples").rglob("*_reference.wav"))
    from encodec_fast import cli
    assert cli.main(["train", "report", str(run)]) == 0
    for name in ("losses.png", "validation.png", "codebooks.png", "REPORT.md"):
        assert (run / "report" / name).stat().st_size > 0
    assert "| 24 |" in (run / "report" / "REPORT.md").read_text()
    assert cli.main(["train", "report", str(tmp_path / "nothing")]) == 1


def test_without_adversarial_weights_the_discriminator_never_runs(corpus, tmp_path):
    trainer = T.Trainer(_config(corpus, l_g=0.0, l_feat=0.0, steps=3), tmp_path / "run", quiet=True)
    before = {k: v.clone() for k, v in trainer.disc.state_dict().items()}
    calls = []
    trainer.disc.register_forward_hook(lambda *a: calls.append(1))
    trainer.run()
    assert not calls
    assert all(torch.equal(v, trainer.disc.state_dict()[k]) for k, v in before.items())
    rows = [json.loads(line) for line in (tmp_path / "run" / T.METRICS).read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert train and all("adv" not in r and "disc" not in r and r["disc_step"] == 0.0 for r in train)
    assert all(np.isfinite(r["mel"]) for r in train)
    with pytest.raises(ValueError, match="every loss weight is 0"):
        T.Trainer(_config(corpus, l_g=0.0, l_feat=0.0, l_t=0.0, l_f=0.0), tmp_path / "other", quiet=True)


def test_a_time_limit_stops_the_run_with_a_checkpoint_and_an_export(corpus, tmp_path):
    summary = T.train(_config(corpus, steps=10 ** 6, max_minutes=0.02), tmp_path / "run", quiet=True)
    assert 1 <= summary["step"] < 10 ** 6
    assert _state(tmp_path / "run")["step"] == summary["step"]
    assert (tmp_path / "run" / T.EXPORT).exists()


def test_gradient_accumulation_steps_each_optimizer_once_per_step(corpus, tmp_path):
    trainer = T.Trainer(_config(corpus, batch_size=4, accumulate=2, steps=3, disc_prob=1.0), tmp_path / "run",
                        quiet=True)
    assert trainer.micro_batch == 2
    trainer.run()
    for opt in (trainer.opt_g, trainer.opt_d):
        assert {int(s["step"]) for s in opt.state_dict()["state"].values()} == {3}
    rows = [json.loads(line) for line in (tmp_path / "run" / T.METRICS).read_text().splitlines()]
    assert all(np.isfinite(r["l1"]) and np.isfinite(r["disc"]) for r in rows if r["split"] == "train")
    with pytest.raises(ValueError, match="accumulate"):
        T.Trainer(_config(corpus, batch_size=3, accumulate=2), tmp_path / "bad", quiet=True)


def test_a_validation_folder_with_the_same_file_names_takes_nothing_from_training(tmp_path):
    for folder, seed in (("train", 0), ("valid", 1)):
        (tmp_path / folder).mkdir()
        for i in range(2):
            sf.write(tmp_path / folder / f"clip{i}.wav", make_signal(24000, 12000, seed=seed + 10 * i).T.numpy(), 24000)
    trainer = T.Trainer(_config(tmp_path / "train", valid=[str(tmp_path / "valid")]), tmp_path / "run", quiet=True)
    assert len(trainer.train_clips) == 2 and len(trainer.valid_audio) == 2
    assert all("/train/" in c.path for c in trainer.train_clips)
    both = T.Trainer(_config(tmp_path, valid=[str(tmp_path / "valid")]), tmp_path / "run2", quiet=True)
    assert len(both.train_clips) == 2 and all("/train/" in c.path for c in both.train_clips)


def test_validation_files_are_spread_over_the_folders():
    clips = [D.Clip(f"{kind}/{i:02d}.wav", f"/x/{kind}/{i:02d}.wav", 24000, 1, 0, 24000)
             for kind in ("music", "speech") for i in range(10)]
    chosen = D.spread(clips, 4)
    assert len(chosen) == 4 and {c.id.split("/")[0] for c in chosen} == {"music", "speech"}
    assert D.spread(clips[:3], 4) == clips[:3] and D.spread(clips, 0) == []


@pytest.mark.parametrize("precision", ["bf16", "tf32", "fp32"])
def test_each_precision_trains_and_says_so(corpus, tmp_path, precision):
    """A short run in each precision mode: the start line names it, the losses are finite and the
    reconstruction loss falls; on CPU tf32 computes what fp32 does (no TF32 on CPUs), bit for bit."""
    trainer = T.Trainer(_config(corpus, steps=12, precision=precision, l_g=0.0, l_feat=0.0, lr=3e-3, seed=5),
                        tmp_path / precision, quiet=True)
    assert trainer.precision_name == precision
    trainer.run()
    rows = [json.loads(line) for line in (tmp_path / precision / T.METRICS).read_text().splitlines()]
    assert [r["precision"] for r in rows if r["split"] == "start"] == [precision]
    mel = [r["mel"] for r in rows if r["split"] == "train"]
    assert len(mel) == 12 and all(np.isfinite(mel))
    assert np.mean(mel[-4:]) < np.mean(mel[:4]), mel
    if precision == "tf32":
        fp32 = T.Trainer(_config(corpus, steps=12, precision="fp32", l_g=0.0, l_feat=0.0, lr=3e-3, seed=5),
                         tmp_path / "fp32_again", quiet=True)
        fp32.run()
        for (name, a), b in zip(trainer.model.state_dict().items(), fp32.model.state_dict().values()):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("precision,mode", [("fp32", "exact"), ("tf32", "tf32"), ("bf16", "bf16")])
def test_the_step_declares_its_precision_mode_to_our_ops_and_marks_its_parts(corpus, tmp_path, precision, mode):
    """Inside a training step our ops see the run's precision mode (`encodec_fast.precision.current`:
    the kernels' products follow it) and nowhere else; the step's parts are timed stages
    (`encodec_fast.timing`) that the train_step benchmark reads."""
    from encodec_fast import precision as precision_modes
    from encodec_fast import timing
    trainer = T.Trainer(_config(corpus, precision=precision), tmp_path / "run", quiet=True)
    seen = []
    trainer.disc.register_forward_hook(lambda *a: seen.append(precision_modes.current()))
    x = torch.stack([trainer.dataset[i][0] for i in range(2)])
    timer = timing.StageTimer()
    with timer.active():
        trainer.draws = lambda step: (trainer.model.target_bandwidths[0], True)
        assert trainer.train_step(0, [x]) is not None
    assert seen and set(seen) == {mode} and precision_modes.current() is None
    assert set(timer.seconds()) == {"generator", "quantizer", "discriminator", "balancer", "optimizers"}


def test_train_report_compares_runs(corpus, tmp_path):
    """`encodec-fast train report RUN_A RUN_B -o OUT`: the runs' losses overlaid in one plot, a table
    with each run's precision (as it ran), speed and last losses; several runs need -o."""
    from encodec_fast import cli
    for precision in ("fp32", "bf16"):
        T.train(_config(corpus, steps=4, precision=precision, l_g=0.0, l_feat=0.0), tmp_path / precision,
                quiet=True)
    out = tmp_path / "compared"
    assert cli.main(["train", "report", str(tmp_path / "fp32"), str(tmp_path / "bf16"), "-o", str(out)]) == 0
    assert (out / "compare.png").stat().st_size > 0
    table = (out / "COMPARE.md").read_text()
    assert "| fp32 | fp32 | tiny |" in table and "| bf16 | bf16 | tiny |" in table
    assert "multi-scale mel" in table and "adversarial" not in table  # only the losses the runs have
    with pytest.raises(SystemExit):
        cli.main(["train", "report", str(tmp_path / "fp32"), str(tmp_path / "bf16")])
    assert cli.main(["train", "report", str(tmp_path / "fp32"), str(tmp_path / "nothing"), "-o", str(out)]) == 1


def test_deterministic_mode_is_scoped_to_the_step(corpus, tmp_path):
    """--deterministic: torch's deterministic algorithms (and cuDNN's) inside each step and
    validation, the caller's settings untouched outside; the run trains as without it (on CPU the
    same bits: CPU steps are deterministic already)."""
    seen = []
    runs = {}
    for deterministic in (True, False):
        trainer = T.Trainer(_config(corpus, steps=3, deterministic=deterministic, seed=3),
                            tmp_path / f"run_{deterministic}", quiet=True)
        trainer.disc.register_forward_hook(
            lambda *a, d=deterministic: seen.append((d, torch.are_deterministic_algorithms_enabled(),
                                                     torch.backends.cudnn.deterministic)))
        trainer.run()
        runs[deterministic] = trainer.model.state_dict()
    assert {s for s in seen if s[0]} == {(True, True, True)}
    assert {s for s in seen if not s[0]} == {(False, False, False)}
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    assert all(torch.equal(a, runs[False][k]) for k, a in runs[True].items())
    from encodec_fast.train.command import config_from_args, get_parser
    args = get_parser().parse_args(["x", "-o", str(tmp_path / "cli"), "--deterministic"])
    assert config_from_args(args).deterministic is True


def test_a_step_reads_its_losses_and_norms_once_per_micro_batch(corpus, tmp_path):
    """The trainer's own reads of tensor values in a step (on a GPU each one waits for the device;
    `HostReads`, here on CPU): per micro-batch one, the losses and the balancer's gradient norms
    together (the finite check, the metrics and the balancer), whatever the number of losses. The optimizers' step
    counters are host tensors, and the quantizer's reads are its own test's."""
    from encodec_fast.testing import HostReads
    trainer = T.Trainer(_config(corpus), tmp_path / "run", quiet=True)
    x = torch.stack([trainer.dataset[i][0] for i in range(2)])
    trainer.draws = lambda step: (trainer.model.target_bandwidths[0], True)
    assert trainer.train_step(0, [x]) is not None  # k-means initialisation
    reads = HostReads(ignore=("torch/optim",))
    with reads:
        logged = trainer.train_step(1, [x[:1], x[1:]])
    innermost = [(op, where.split(":")[0]) for op, where in reads.reads]
    own = [read for read in innermost if read[1] in ("trainer.py", "balancer.py")]
    assert own == [("tolist", "trainer.py")] * 2, reads.reads
    assert {"l1", "mel", "adv", "feat", "commit", "disc"} <= set(logged) and all(map(math.isfinite, logged.values()))


def test_tensorboard_holds_the_metrics_lines_scalars(corpus, tmp_path):
    """Where tensorboard is installed (the test and train extras), the run's scalars go to
    RUN_DIR/tensorboard as well: every number of each train and valid line of metrics.jsonl, at its
    step, under train/NAME and valid/BANDWIDTHkbps/NAME."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    trainer = T.Trainer(_config(corpus, steps=3), tmp_path / "run", quiet=True)
    trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / T.METRICS).read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {}
    for row in rows:
        if row["split"] not in ("train", "valid"):
            continue
        tag = row["split"] + (f"/{row['bandwidth']:g}kbps" if row["split"] == "valid" else "")
        for key, value in row.items():
            if key not in ("step", "time", "bandwidth") and isinstance(value, (int, float)):
                expected.setdefault(f"{tag}/{key}", []).append((row["step"], float(value)))
    assert "train/mel" in expected and any(t.startswith("valid/") for t in expected), sorted(expected)
    assert tags == set(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert np.allclose([v for _, v in got], [v for _, v in points], rtol=1e-6, atol=0), tag  # stored as fp32
