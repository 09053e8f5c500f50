"""The `encodec-fast` command end to end, in subprocesses."""

import os
import subprocess
import sys

import pytest
import torch

import encodec_fast
from encodec_fast import audio
from encodec_fast.testing import make_signal, rel_err


def run(*args, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "encodec_fast", *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=600)


def one_line_error(proc, pattern):
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert pattern.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    path = folder / "speech.wav"
    audio.save_audio(make_signal(16000, 16000, 2, seed=9), path, 16000)  # stereo 16 kHz: converted
    return path


def test_compress_decompress_round_trip(speech, checkpoint_24, pair_24):
    out = speech.with_suffix(".ecdc")
    proc = run(speech, "--checkpoint", checkpoint_24, "-b", "3")
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    # same bytes as the library
    wav, sr = audio.read_audio(speech)
    _, ours = pair_24
    ours.set_target_bandwidth(3.0)
    assert out.read_bytes() == encodec_fast.compress(ours, audio.convert_audio(wav, sr, 24000, 1))
    proc = run(out, "--checkpoint", checkpoint_24)
    assert proc.returncode == 0, proc.stderr
    decoded = speech.with_name("speech_decompressed.wav")
    back, sr = audio.read_audio(decoded)
    assert sr == 24000 and back.shape == (1, 24000)
    ref, _ = encodec_fast.decompress(out.read_bytes(), model=ours)
    assert rel_err(back, ref.clamp(-0.99, 0.99)) < 1e-3
    # existing output without -f
    one_line_error(run(speech, "--checkpoint", checkpoint_24), "exists")
    assert run(speech, "--checkpoint", checkpoint_24, "-f").returncode == 0


def test_round_trip_to_wav_48khz(speech, checkpoint_48, tmp_path):
    out = tmp_path / "rt.wav"
    proc = run(speech, out, "--hq", "--checkpoint", checkpoint_48, "-b", "12", "-r")
    assert proc.returncode == 0, proc.stderr
    back, sr = audio.read_audio(out)
    assert sr == 48000 and back.shape == (2, 48000)


@pytest.mark.slow
def test_user_errors(speech, checkpoint_24, tmp_path):
    one_line_error(run(tmp_path / "missing.wav"), "does not exist")
    one_line_error(run(speech, tmp_path / "out.mp4"), "extension")
    one_line_error(run(speech, tmp_path / "x.ecdc", "--hq", "-b", "1.5"), "not supported")
    bad_audio = tmp_path / "noise.wav"
    bad_audio.write_bytes(b"RIFF....WAVEjunkjunkjunk")
    one_line_error(run(bad_audio, tmp_path / "n.ecdc", "--checkpoint", checkpoint_24), "cannot read")
    corrupt = tmp_path / "corrupt.ecdc"
    corrupt.write_bytes(b"ECDC\x00\x00\x00\x00\x05{bad}")
    one_line_error(run(corrupt, "--checkpoint", checkpoint_24), "json")
    truncated = tmp_path / "trunc.ecdc"
    good = tmp_path / "good.ecdc"
    assert run(speech, good, "--checkpoint", checkpoint_24).returncode == 0
    truncated.write_bytes(good.read_bytes()[:-10])
    one_line_error(run(truncated, "--checkpoint", checkpoint_24), "truncated")
    # official weights unavailable offline
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"TORCH_HOME": str(tmp_path / "th"), "ENCODEC_FAST_ROOT_URL": empty.as_uri()}
    one_line_error(run(speech, tmp_path / "lm.ecdc", "--lm", "--checkpoint", checkpoint_24, env=env),
                   "encodec_lm_24khz-1608e3c0.th")
    one_line_error(run(speech, tmp_path / "o.ecdc", env=env), "encodec_24khz-d7cc33bc.th")
    one_line_error(run(speech, tmp_path / "o.ecdc", "--repository", empty), "repository")


def test_help_and_module_entry():
    proc = run("--help")
    assert proc.returncode == 0 and "--checkpoint" in proc.stdout and "--hq" in proc.stdout
    assert torch.__version__
