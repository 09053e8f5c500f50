"""Audio I/O through soundfile (libsndfile) and channel / sample-rate conversion.

torchaudio >= 2.9 routes `load`/`save` through TorchCodec; we read and write with soundfile
(wav, flac, ogg, mp3 where the bundled libsndfile supports them) and resample with torchaudio.
"""

import functools
import typing as tp
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

PathLike = tp.Union[str, Path]


class AudioError(ValueError):
    """An audio file cannot be read or written."""


def read_audio(path: PathLike) -> tp.Tuple[torch.Tensor, int]:
    """Read an audio file -> (wav [C, T] float32 in [-1, 1], sample_rate)."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file {path} does not exist")
    try:
        data, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioError(f"cannot read audio file {path}: {err}") from err
    if data.shape[0] == 0:
        raise AudioError(f"audio file {path} holds no samples")
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(sample_rate)


def save_audio(wav: torch.Tensor, path: PathLike, sample_rate: int, rescale: bool = False) -> None:
    """Write wav [C, T] as 16-bit PCM (wav/flac; ogg/mp3 at their codec's default).

    As upstream: samples beyond +-0.99 are clamped, or with `rescale` the whole signal is scaled
    down so that its peak is 0.99.
    """
    limit = 0.99
    wav = wav.detach().float().cpu()
    if wav.dim() == 1:
        wav = wav[None]
    if wav.dim() != 2:
        raise ValueError(f"expected audio [C, T], got {tuple(wav.shape)}")
    if rescale:
        mx = wav.abs().max()
        wav = wav * min(limit / mx, 1) if mx > 0 else wav
    else:
        wav = wav.clamp(-limit, limit)
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    subtype = "PCM_16" if fmt in ("wav", "flac", "aiff", "aif") else None
    try:
        sf.write(str(path), wav.numpy().T, sample_rate, subtype=subtype)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioError(f"cannot write audio file {path}: {err}") from err


def convert_audio(wav: torch.Tensor, sr: int, target_sr: int, target_channels: int) -> torch.Tensor:
    """Convert wav [..., C, T] to `target_channels` and `target_sr` (upstream's rules).

    To mono: mean over channels. To stereo: mono is duplicated, stereo kept. Resampling uses
    torchaudio's default windowed-sinc filter (identity when the rates are equal).
    """
    if wav.dim() < 2:
        raise ValueError(f"expected audio [..., C, T], got {tuple(wav.shape)}")
    channels = wav.shape[-2]
    if target_channels == 1:
        wav = wav.mean(-2, keepdim=True)
    elif channels == 1 or channels == target_channels:
        *shape, _, length = wav.shape
        wav = wav.expand(*shape, target_channels, length)
    else:
        raise ValueError(f"cannot convert {channels} channels to {target_channels}")
    if sr != target_sr:
        # The transform (not torchaudio.functional.resample, whose bits differ) as upstream uses.
        wav = _resampler(sr, target_sr).to(wav.device)(wav)
    return wav


@functools.lru_cache(maxsize=16)
def _resampler(sr: int, target_sr: int) -> torchaudio.transforms.Resample:
    return torchaudio.transforms.Resample(sr, target_sr)
