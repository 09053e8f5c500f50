"""Signal processing that EnCodec needs, written in PyTorch: windowed-sinc resampling, STFT
spectrograms, mel filterbanks.

These are the algorithms of torchaudio's functions that upstream EnCodec (and its training recipe)
calls, computed with the same floating-point operations in the same order, so that the results are
the same bits (tests/test_dsp.py compares them with torchaudio wherever torchaudio imports). We
do not import torchaudio at run time: `import torchaudio` loads a C++ library built against
particular torch releases, and the pair pip picks is not always one that loads.

Resampling (`sinc_resample_kernel`, `resample`): band-limited interpolation with a Hann-windowed
sinc. With g = gcd(sr, target_sr), every `target_sr / g` output samples take the same set of
filters over a window that moves by `sr / g` input samples, so resampling is one strided
convolution with `target_sr / g` output channels; the filter's cutoff is `rolloff` (0.99) times
the lower Nyquist frequency and it spans `lowpass_filter_width` (6) zero crossings on each side.
The filters are computed in float64 and stored as float32, as torchaudio's `transforms.Resample`
does (its `functional.resample` computes them in the input's dtype: other bits).
"""

import functools
import math
import typing as tp
import warnings

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# --- resampling -------------------------------------------------------------------------------

class SincFilters(tp.NamedTuple):
    """The resampling filters of one rate pair: `kernel` [target_sr/g, 1, 2*width + sr/g] float32,
    applied with stride sr/g after padding `width` zeros left and `width + sr/g` right."""
    kernel: torch.Tensor
    width: int
    stride: int      # sr / g: input samples per output frame
    per_frame: int   # target_sr / g: output samples per frame


def sinc_resample_kernel(sr: int, target_sr: int, lowpass_filter_width: int = 6,
                         rolloff: float = 0.99) -> SincFilters:
    """Hann-windowed sinc filters from `sr` to `target_sr` (both integers, different)."""
    if int(sr) != sr or int(target_sr) != target_sr or sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive integers, got {sr} and {target_sr}")
    if lowpass_filter_width <= 0:
        raise ValueError("lowpass_filter_width must be positive")
    g = math.gcd(int(sr), int(target_sr))
    stride, per_frame = int(sr) // g, int(target_sr) // g
    cutoff = min(stride, per_frame) * rolloff  # in units of the reduced rates
    width = math.ceil(lowpass_filter_width * stride / cutoff)
    # Time of every tap relative to each output phase, in input periods / stride; the phase offsets
    # (0, -1/per_frame, ...) are float32, as torchaudio's integer range divided by an int gives.
    taps = torch.arange(-width, width + stride, dtype=torch.float64)[None, None] / stride
    phases = torch.arange(0, -per_frame, -1, dtype=torch.float32)[:, None, None] / per_frame
    t = (phases + taps) * cutoff
    t = t.clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones((), dtype=t.dtype), t.sin() / t)
    kernel = sinc * (window * (cutoff / stride))
    return SincFilters(kernel.to(torch.float32), width, stride, per_frame)


@functools.lru_cache(maxsize=32)
def _cached_filters(sr: int, target_sr: int) -> SincFilters:
    return sinc_resample_kernel(sr, target_sr)


_device_kernels: tp.Dict[tp.Tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}


def resample_filters(sr: int, target_sr: int, device: tp.Optional[torch.device] = None,
                     dtype: torch.dtype = torch.float32) -> SincFilters:
    """The default filters (width 6, roll-off 0.99) for a rate pair, cached, on `device` in `dtype`."""
    filters = _cached_filters(int(sr), int(target_sr))
    device = torch.device(device) if device is not None else filters.kernel.device
    if device == filters.kernel.device and dtype == filters.kernel.dtype:
        return filters
    key = (int(sr), int(target_sr), device, dtype)
    kernel = _device_kernels.get(key)
    if kernel is None:
        if len(_device_kernels) > 64:
            _device_kernels.clear()
        kernel = _device_kernels[key] = filters.kernel.to(device=device, dtype=dtype)
    return filters._replace(kernel=kernel)


def resampled_length(length: int, sr: int, target_sr: int) -> int:
    """Output samples of `resample` for `length` input samples: ceil(length * target_sr / sr), with the
    quotient rounded to float32 first (torchaudio's rule: for many millions of samples it can fall
    one short of the exact value), and at most what the filter produced."""
    if sr == target_sr:
        return length
    g = math.gcd(sr, target_sr)
    frames = length // (sr // g) + 1  # filter output frames, target_sr // g samples each
    exact = np.ceil(np.float32((target_sr // g) * length / (sr // g)))  # host arithmetic: no tensor op
    return min(frames * (target_sr // g), int(exact))


def apply_filters(x: torch.Tensor, filters: SincFilters) -> torch.Tensor:
    """x [N, L'] already padded (`width` zeros before the signal's first sample, at least
    `width + stride` after its end, or its continuation) -> [N, frames * per_frame]."""
    frames = F.conv1d(x[:, None], filters.kernel, stride=filters.stride)  # [N, per_frame, frames]
    return frames.transpose(1, 2).reshape(x.shape[0], -1)


def resample(wav: torch.Tensor, sr: int, target_sr: int) -> torch.Tensor:
    """wav [..., T] (floating point) at `sr` -> [..., T'] at `target_sr` (see the module docstring);
    the identity when the rates are equal. T' = `resampled_length(T, sr, target_sr)`."""
    if sr == target_sr:
        return wav
    if not wav.is_floating_point():
        raise TypeError(f"resampling needs floating-point audio, got {wav.dtype}")
    filters = resample_filters(sr, target_sr, wav.device, wav.dtype)
    *lead, length = wav.shape
    flat = F.pad(wav.reshape(-1, length), (filters.width, filters.width + filters.stride))
    out = apply_filters(flat, filters)[:, :resampled_length(length, sr, target_sr)]
    return out.reshape(*lead, out.shape[-1])


# --- spectrograms -------------------------------------------------------------------------------

def spectrogram(x: torch.Tensor, window: torch.Tensor, n_fft: int, hop_length: int, win_length: int,
                power: tp.Optional[float] = None, normalized: tp.Union[bool, str] = False, center: bool = True,
                pad_mode: str = "reflect", onesided: bool = True, pad: int = 0) -> torch.Tensor:
    """x [..., T] -> STFT [..., freq, frames]: complex when `power` is None, else |STFT| ** power.

    normalized: False; True or "window" (divide by the window's L2 norm); "frame_length" (torch.stft's
    1/sqrt(n_fft)). `pad` zeros are added on both sides first; `center` pads n_fft // 2 more with
    `pad_mode` so frame t is centred on sample t * hop_length.
    """
    if normalized is True or normalized == "window":
        by_window, by_length = True, False
    elif normalized is False or normalized == "frame_length":
        by_window, by_length = False, normalized == "frame_length"
    else:
        raise ValueError(f"normalized must be a bool, 'window' or 'frame_length', got {normalized!r}")
    if pad > 0:
        x = F.pad(x, (pad, pad))
    *lead, length = x.shape
    spec = torch.stft(x.reshape(-1, length), n_fft=n_fft, hop_length=hop_length, win_length=win_length,
                      window=window, center=center, pad_mode=pad_mode, normalized=by_length, onesided=onesided,
                      return_complex=True)
    spec = spec.reshape(*lead, *spec.shape[-2:])
    if by_window:
        spec = spec / window.pow(2.0).sum().sqrt()
    if power is None:
        return spec
    return spec.abs() if power == 1.0 else spec.abs().pow(power)


class Spectrogram(nn.Module):
    """`spectrogram` as a module, with its window as the buffer `window` (a state-dict key that
    upstream's discriminator checkpoints carry as `spec_transform.window`)."""

    def __init__(self, n_fft: int = 400, win_length: tp.Optional[int] = None, hop_length: tp.Optional[int] = None,
                 pad: int = 0, window_fn: tp.Callable[..., torch.Tensor] = torch.hann_window,
                 power: tp.Optional[float] = 2.0, normalized: tp.Union[bool, str] = False,
                 wkwargs: tp.Optional[dict] = None, center: bool = True, pad_mode: str = "reflect",
                 onesided: bool = True):
        super().__init__()
        self.n_fft = n_fft
        self.win_length = win_length if win_length is not None else n_fft
        self.hop_length = hop_length if hop_length is not None else self.win_length // 2
        self.register_buffer("window", window_fn(self.win_length, **(wkwargs or {})))
        self.pad, self.power, self.normalized = pad, power, normalized
        self.center, self.pad_mode, self.onesided = center, pad_mode, onesided

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., T] -> [..., n_fft // 2 + 1, frames]."""
        return spectrogram(x, self.window, self.n_fft, self.hop_length, self.win_length, self.power,
                           self.normalized, self.center, self.pad_mode, self.onesided, self.pad)


# --- mel scale --------------------------------------------------------------------------------

_SLANEY_STEP = 200.0 / 3          # Hz per mel below 1 kHz (Slaney's scale is linear there)
_SLANEY_KNEE_HZ = 1000.0
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


def hz_to_mel(freq: float, mel_scale: str = "htk") -> float:
    """One frequency in Hz -> mels ("htk": 2595 log10(1 + f / 700); "slaney": linear to 1 kHz, then log)."""
    if mel_scale == "htk":
        return 2595.0 * math.log10(1.0 + (freq / 700.0))
    if mel_scale != "slaney":
        raise ValueError(f"mel_scale must be 'htk' or 'slaney', got {mel_scale!r}")
    if freq < _SLANEY_KNEE_HZ:
        return freq / _SLANEY_STEP
    return _SLANEY_KNEE_HZ / _SLANEY_STEP + math.log(freq / _SLANEY_KNEE_HZ) / _SLANEY_LOG_STEP


def mel_to_hz(mels: torch.Tensor, mel_scale: str = "htk") -> torch.Tensor:
    """The inverse of `hz_to_mel`, element-wise on a tensor."""
    if mel_scale == "htk":
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    if mel_scale != "slaney":
        raise ValueError(f"mel_scale must be 'htk' or 'slaney', got {mel_scale!r}")
    knee_mel = _SLANEY_KNEE_HZ / _SLANEY_STEP
    linear = _SLANEY_STEP * mels
    log = _SLANEY_KNEE_HZ * torch.exp(_SLANEY_LOG_STEP * (mels - knee_mel))
    return torch.where(mels >= knee_mel, log, linear)


def melscale_fbanks(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int,
                    norm: tp.Optional[str] = None, mel_scale: str = "htk") -> torch.Tensor:
    """Triangular mel filters [n_freqs, n_mels] over the STFT bins 0 .. sample_rate // 2: filter m
    rises from mel point m to m + 1 and falls to m + 2 (n_mels + 2 points evenly spaced in mels from
    f_min to f_max). norm="slaney" scales each to unit area (2 / its width in Hz)."""
    if norm not in (None, "slaney"):
        raise ValueError(f"norm must be None or 'slaney', got {norm!r}")
    bins = torch.linspace(0, sample_rate // 2, n_freqs)
    points = mel_to_hz(torch.linspace(hz_to_mel(f_min, mel_scale), hz_to_mel(f_max, mel_scale), n_mels + 2),
                       mel_scale)
    gaps = points[1:] - points[:-1]
    to_points = points[None, :] - bins[:, None]  # [n_freqs, n_mels + 2]
    rising = (-1.0 * to_points[:, :-2]) / gaps[:-1]
    falling = to_points[:, 2:] / gaps[1:]
    fb = torch.max(torch.zeros(1), torch.min(rising, falling))
    if norm == "slaney":
        fb = fb * (2.0 / (points[2:n_mels + 2] - points[:n_mels]))[None, :]
    if (fb.max(dim=0).values == 0.0).any():
        warnings.warn(f"some of the {n_mels} mel filters are all zero over {n_freqs} frequency bins: "
                      "fewer mels or a longer FFT")
    return fb


class MelScale(nn.Module):
    """A spectrogram [..., n_stft, frames] -> [..., n_mels, frames] through `melscale_fbanks` (buffer `fb`)."""

    def __init__(self, n_mels: int = 128, sample_rate: int = 16000, f_min: float = 0.0,
                 f_max: tp.Optional[float] = None, n_stft: int = 201, norm: tp.Optional[str] = None,
                 mel_scale: str = "htk"):
        super().__init__()
        self.f_max = f_max if f_max is not None else float(sample_rate // 2)
        if f_min > self.f_max:
            raise ValueError(f"f_min {f_min} is above f_max {self.f_max}")
        self.n_mels, self.sample_rate, self.f_min, self.n_stft = n_mels, sample_rate, f_min, n_stft
        self.register_buffer("fb", melscale_fbanks(n_stft, f_min, self.f_max, n_mels, sample_rate, norm, mel_scale))

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        return torch.matmul(spec.transpose(-1, -2), self.fb).transpose(-1, -2)


class MelSpectrogram(nn.Module):
    """x [..., T] -> mel spectrogram [..., n_mels, frames]: `Spectrogram` (power 2 by default) then
    `MelScale`; submodules `spectrogram` and `mel_scale` (state-dict keys `spectrogram.window`,
    `mel_scale.fb`)."""

    def __init__(self, sample_rate: int = 16000, n_fft: int = 400, win_length: tp.Optional[int] = None,
                 hop_length: tp.Optional[int] = None, f_min: float = 0.0, f_max: tp.Optional[float] = None,
                 pad: int = 0, n_mels: int = 128, window_fn: tp.Callable[..., torch.Tensor] = torch.hann_window,
                 power: float = 2.0, normalized: tp.Union[bool, str] = False, wkwargs: tp.Optional[dict] = None,
                 center: bool = True, pad_mode: str = "reflect", norm: tp.Optional[str] = None,
                 mel_scale: str = "htk"):
        super().__init__()
        self.sample_rate, self.n_mels = sample_rate, n_mels
        self.spectrogram = Spectrogram(n_fft=n_fft, win_length=win_length, hop_length=hop_length, pad=pad,
                                       window_fn=window_fn, power=power, normalized=normalized, wkwargs=wkwargs,
                                       center=center, pad_mode=pad_mode, onesided=True)
        self.mel_scale = MelScale(n_mels, sample_rate, f_min, f_max, n_fft // 2 + 1, norm, mel_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mel_scale(self.spectrogram(x))
