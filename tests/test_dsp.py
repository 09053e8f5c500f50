"""encodec_fast.dsp against torchaudio (the test-only oracle): resampling filters and samples,
spectrograms, mel filterbanks and mel spectrograms, all identical (max abs diff 0)."""

import math
import os
import warnings

import pytest
import torch
import torchaudio

from encodec_fast import dsp
from encodec_fast.audio import convert_audio
from encodec_fast.testing import make_signal

# Every rate a corpus commonly has, to both model rates, plus the model rates to each other.
RATE_PAIRS = [(sr, target) for target in (24000, 48000)
              for sr in (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000) if sr != target]
RATE_PAIRS += [(24000, 16000), (48000, 44100), (7, 5), (1, 3)]


def signal(sr: int, length: int, channels: int, seed: int) -> torch.Tensor:
    """Half a real-like test signal, half fresh white noise (full band: every filter tap matters)."""
    gen = torch.Generator().manual_seed(seed)
    x = make_signal(sr if sr > 1000 else 16000, length, channels, seed=seed)
    return x + 0.3 * torch.randn(x.shape, generator=gen)


@pytest.mark.parametrize("sr, target", RATE_PAIRS)
def test_resample_filters_equal_torchaudio(sr, target):
    ref = torchaudio.transforms.Resample(sr, target)
    ours = dsp.sinc_resample_kernel(sr, target)
    assert ours.width == ref.width
    assert ours.kernel.dtype == ref.kernel.dtype == torch.float32
    assert ours.kernel.shape == ref.kernel.shape and torch.equal(ours.kernel, ref.kernel)


@pytest.mark.parametrize("sr, target", RATE_PAIRS)
@pytest.mark.parametrize("shape", [(1,), (5,), (157,), (2, 4411), (3, 2, 1000)])
def test_resample_equals_torchaudio(sr, target, shape):
    *lead, length = shape
    seed = sr * 7 + target + length
    x = signal(sr, length, int(math.prod(lead)) if lead else 1, seed).reshape(*lead, length)
    ref = torchaudio.transforms.Resample(sr, target)(x)
    got = dsp.resample(x, sr, target)
    assert got.shape == ref.shape
    assert got.shape[-1] == dsp.resampled_length(length, sr, target)
    assert torch.equal(got, ref), (got - ref).abs().max().item()


@pytest.mark.parametrize("sr, channels", [(44100, 2), (16000, 1), (48000, 1), (22050, 2)])
def test_convert_audio_equals_torchaudio_transform(sr, channels):
    """convert_audio (channels, then our resampler) = the channel rule then torchaudio's transform."""
    x = signal(sr, sr * 3 + 11, channels, seed=sr)
    for target_sr, target_ch in ((24000, 1), (48000, 2)):
        mixed = x.mean(-2, keepdim=True) if target_ch == 1 else x.expand(2, -1)
        ref = torchaudio.transforms.Resample(sr, target_sr)(mixed)
        assert torch.equal(convert_audio(x, sr, target_sr, target_ch), ref)


def test_resample_keeps_dtype_and_refuses_bad_input():
    x = signal(44100, 3000, 1, seed=3)
    assert dsp.resample(x, 44100, 44100) is x
    assert dsp.resample(x.double(), 44100, 24000).dtype == torch.float64
    with pytest.raises(TypeError, match="floating-point"):
        dsp.resample((x * 1000).short(), 44100, 24000)
    for bad in ((44100.5, 24000), (0, 24000), (44100, -1)):
        with pytest.raises(ValueError, match="positive integers"):
            dsp.sinc_resample_kernel(*bad)


def test_resampled_length_float32_rule():
    """Past 2**24 output samples, torchaudio rounds length * ratio to float32 before ceil."""
    sr, target = 44100, 24000
    n = next(n for n in range(31_000_000, 31_001_000)
             if math.ceil(float(torch.tensor(n * 80 / 147, dtype=torch.float32))) != math.ceil(n * 80 / 147))
    assert dsp.resampled_length(n, sr, target) == math.ceil(n * 80 / 147) - 1
    assert dsp.resampled_length(1000, sr, target) == math.ceil(1000 * 80 / 147)
    assert dsp.resampled_length(1000, sr, sr) == 1000


SPEC_CONFIGS = [
    # n_fft, hop, win, power, normalized, center, pad_mode, pad
    (1024, 256, 1024, None, True, False, "reflect", 0),      # the discriminator's scales
    (2048, 512, 2048, None, True, False, "reflect", 0),
    (512, 128, 512, None, True, False, "reflect", 0),
    (256, 64, 200, None, "window", False, "reflect", 0),     # window shorter than n_fft
    (64, 16, 64, 1.0, False, False, "reflect", 0),           # the mel losses' magnitudes and powers
    (128, 32, 128, 2.0, False, True, "reflect", 0),
    (400, 100, 300, 2.0, "frame_length", True, "constant", 3),
    (32, 8, 32, 0.5, True, True, "reflect", 0),
]


@pytest.mark.parametrize("cfg", SPEC_CONFIGS, ids=[f"{c[0]}-{c[3]}-{c[4]}-{c[5]}" for c in SPEC_CONFIGS])
@pytest.mark.parametrize("shape", [(2, 1, 4800), (3, 2, 2049), (4001,)])  # each holds a whole 2048 frame
def test_spectrogram_equals_torchaudio(cfg, shape):
    n_fft, hop, win, power, normalized, center, pad_mode, pad = cfg
    x = torch.randn(shape, generator=torch.Generator().manual_seed(n_fft + shape[-1]))
    window = torch.hann_window(win)
    ref = torchaudio.functional.spectrogram(x, pad, window, n_fft, hop, win, power, normalized, center=center,
                                            pad_mode=pad_mode, onesided=True)
    got = dsp.spectrogram(x, window, n_fft, hop, win, power, normalized, center, pad_mode, True, pad)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert torch.equal(got, ref)


def test_spectrogram_gradient_equals_torchaudio():
    x = torch.randn(2, 1, 3000, generator=torch.Generator().manual_seed(5))
    grads = []
    for fn in (lambda v, w: torchaudio.functional.spectrogram(v, 0, w, 512, 128, 512, 1.0, True, center=False),
               lambda v, w: dsp.spectrogram(v, w, 512, 128, 512, 1.0, True, center=False)):
        v = x.clone().requires_grad_()
        fn(v, torch.hann_window(512)).sum().backward()
        grads.append(v.grad)
    assert torch.equal(*grads)


def test_spectrogram_refuses_unknown_normalization():
    with pytest.raises(ValueError, match="normalized"):
        dsp.spectrogram(torch.randn(1000), torch.hann_window(64), 64, 16, 64, normalized="peak")


FBANK_CONFIGS = [
    # n_freqs, f_min, f_max, n_mels, sample_rate
    (513, 0.0, 12000.0, 64, 24000),   # the paper's 64-bin mels at 24 kHz, n_fft 1024
    (1025, 64.0, 24000.0, 64, 48000),  # audiocraft's f_min 64 at 48 kHz, n_fft 2048
    (17, 0.0, 12000.0, 64, 24000),    # n_fft 32: some filters all zero (a warning, as torchaudio)
    (201, 20.0, 7600.0, 80, 16000),
]


@pytest.mark.parametrize("cfg", FBANK_CONFIGS)
@pytest.mark.parametrize("norm", [None, "slaney"])
@pytest.mark.parametrize("mel_scale", ["htk", "slaney"])
def test_melscale_fbanks_equal_torchaudio(cfg, norm, mel_scale):
    with warnings.catch_warnings(record=True) as ref_warn:
        warnings.simplefilter("always")
        ref = torchaudio.functional.melscale_fbanks(*cfg, norm=norm, mel_scale=mel_scale)
    with warnings.catch_warnings(record=True) as our_warn:
        warnings.simplefilter("always")
        got = dsp.melscale_fbanks(*cfg, norm=norm, mel_scale=mel_scale)
    assert got.shape == ref.shape and torch.equal(got, ref)
    assert bool(ref_warn) == bool(our_warn)


@pytest.mark.parametrize("freq", [0.0, 64.0, 999.9, 1000.0, 5000.0, 24000.0])
@pytest.mark.parametrize("mel_scale", ["htk", "slaney"])
def test_hz_to_mel_round_trip(freq, mel_scale):
    mel = dsp.hz_to_mel(freq, mel_scale)
    assert mel == torchaudio.functional.functional._hz_to_mel(freq, mel_scale)
    assert dsp.mel_to_hz(torch.tensor([mel], dtype=torch.float64), mel_scale).item() == pytest.approx(freq, abs=1e-6)


@pytest.mark.parametrize("kwargs", [
    dict(sample_rate=24000, n_fft=1024, hop_length=256, n_mels=64, center=False, power=1.0),
    dict(sample_rate=24000, n_fft=64, win_length=64, hop_length=16, n_mels=8, f_min=64.0, normalized=True),
    dict(sample_rate=48000, n_fft=2048, hop_length=512, n_mels=64, f_min=64.0, norm="slaney", mel_scale="slaney"),
])
def test_mel_spectrogram_equals_torchaudio(kwargs):
    ref = torchaudio.transforms.MelSpectrogram(**kwargs)
    ours = dsp.MelSpectrogram(**kwargs)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    x = signal(kwargs["sample_rate"], 5000, 2, seed=len(kwargs))[None]
    assert torch.equal(ours(x), ref(x))


def test_spectrogram_module_state_dict_and_refusals():
    ours = dsp.Spectrogram(n_fft=512, hop_length=128, power=None, normalized=True, center=False)
    ref = torchaudio.transforms.Spectrogram(n_fft=512, hop_length=128, power=None, normalized=True, center=False)
    assert ours.state_dict().keys() == ref.state_dict().keys() == {"window"}
    x = torch.randn(2, 3000)
    assert torch.equal(ours(x), ref(x))
    with pytest.raises(ValueError, match="f_min"):
        dsp.MelScale(n_mels=8, sample_rate=8000, f_min=5000.0)
    with pytest.raises(ValueError, match="norm"):
        dsp.melscale_fbanks(65, 0.0, 4000.0, 8, 8000, norm="area")
    with pytest.raises(ValueError, match="mel_scale"):
        dsp.hz_to_mel(100.0, "bark")


def test_package_never_imports_torchaudio(tmp_path):
    """With a torchaudio that cannot load (as 2.11.1 beside torch 2.11), every module of the package
    imports and resampling, the discriminator and a model round trip work."""
    import subprocess
    import sys
    fake = tmp_path / "torchaudio"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise OSError('libtorchaudio.so: undefined symbol')\n")
    script = """
import importlib, pkgutil, sys, torch
import encodec_fast
for mod in pkgutil.walk_packages(encodec_fast.__path__, 'encodec_fast.'):
    if mod.name not in ('encodec_fast.__main__', 'encodec_fast.tokenize.ray_engine'):
        importlib.import_module(mod.name)
from encodec_fast import convert_audio
from encodec_fast.train import MultiScaleSTFTDiscriminator
x = torch.randn(1, 2, 4410)
y = convert_audio(x, 44100, 24000, 1)
assert y.shape == (1, 1, 2400), y.shape
logits, _ = MultiScaleSTFTDiscriminator(filters=4)(y)
model = encodec_fast.EncodecModel.encodec_model_24khz(pretrained=False)
assert model(y).shape[-1] == 2400
assert 'torchaudio' not in sys.modules, 'torchaudio was imported'
print('ok')
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
