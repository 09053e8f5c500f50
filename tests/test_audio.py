"""Audio I/O and conversion."""

import encodec.utils
import numpy as np
import pytest
import soundfile as sf
import torch

from encodec_fast import audio
from encodec_fast.testing import make_signal


@pytest.mark.parametrize("channels,sr,target_sr,target_ch", [(1, 16000, 24000, 1), (2, 44100, 24000, 1),
                                                            (1, 22050, 48000, 2), (2, 48000, 48000, 2)])
def test_convert_audio_matches_upstream(channels, sr, target_sr, target_ch):
    wav = make_signal(sr, sr // 3, channels, seed=sr)
    ref = encodec.utils.convert_audio(wav, sr, target_sr, target_ch)
    out = audio.convert_audio(wav, sr, target_sr, target_ch)
    assert out.shape == ref.shape and torch.equal(out, ref)


def test_convert_audio_errors():
    with pytest.raises(ValueError):
        audio.convert_audio(torch.zeros(10), 8000, 8000, 1)
    with pytest.raises(ValueError, match="channels"):
        audio.convert_audio(torch.zeros(3, 10), 8000, 8000, 2)
    assert audio.convert_audio(make_signal(8000, 100, 1)[:1].expand(6, 100), 8000, 8000, 1).shape == (1, 100)


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg"])
def test_read_write_round_trip(tmp_path, ext):
    wav = make_signal(24000, 12000, 2, seed=4)
    path = tmp_path / f"a.{ext}"
    audio.save_audio(wav, path, 24000)
    back, sr = audio.read_audio(path)
    assert sr == 24000 and back.shape == wav.shape
    tol = 2e-4 if ext != "ogg" else 0.5
    assert float((back - wav).abs().max()) < tol


def test_save_clamps_or_rescales(tmp_path):
    wav = torch.tensor([[0.0, 0.5, 1.5, -2.0]])
    audio.save_audio(wav, tmp_path / "c.wav", 8000)
    clamped, _ = audio.read_audio(tmp_path / "c.wav")
    assert np.allclose(clamped.numpy(), [[0, 0.5, 0.99, -0.99]], atol=1e-4)
    audio.save_audio(wav, tmp_path / "r.wav", 8000, rescale=True)
    rescaled, _ = audio.read_audio(tmp_path / "r.wav")
    assert np.allclose(rescaled.numpy(), (wav * 0.99 / 2.0).numpy(), atol=1e-4)


def test_unreadable_audio(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00not really a wave file")
    with pytest.raises(audio.AudioError, match="cannot read"):
        audio.read_audio(bad)
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros((0, 1), dtype=np.float32), 8000)
    with pytest.raises(audio.AudioError, match="no samples"):
        audio.read_audio(empty)
    with pytest.raises(audio.AudioError, match="does not exist"):
        audio.read_audio(tmp_path / "nope.wav")
