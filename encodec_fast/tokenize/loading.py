"""Reading one item's audio, as the model wants it: decode, span, channels, sample rate, checks.
Runs in DataLoader worker processes (`ItemAudio`)."""

import dataclasses
import os
import typing as tp

import numpy as np
import soundfile as sf
import torch

from ..audio import convert_audio
from .sources import Item

MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 768_000


@dataclasses.dataclass
class Loaded:
    index: int                      # position in the job's item list
    wav: tp.Optional[torch.Tensor]  # [C, T] at the model's rate and channels; None on error
    source_rate: int = 0
    source_channels: int = 0
    error: str = ""


def load_item(item: Item, sample_rate: int, channels: int) -> tp.Tuple[torch.Tensor, int, int]:
    """-> (wav [channels, T] float32 at `sample_rate`, source rate, source channels).
    ValueError (with the reason) for anything that cannot be tokenized."""
    try:
        with sf.SoundFile(item.path) as f:
            rate, n_channels, frames = f.samplerate, f.channels, f.frames
            if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
                raise ValueError(f"unsupported sample rate {rate} Hz")
            first = 0 if item.start is None else int(round(item.start * rate))
            last = frames if item.end is None else min(frames, int(round(item.end * rate)))
            if first >= frames and frames > 0:
                raise ValueError(f"start {item.start} s is past the end of the file ({frames / rate:.3f} s)")
            f.seek(min(first, frames))
            data = f.read(max(0, last - first), dtype="float32", always_2d=True)
    except FileNotFoundError:
        raise ValueError("no such file (deleted?)") from None
    except sf.LibsndfileError as exc:
        if not os.path.exists(item.path):
            raise ValueError("no such file (deleted?)") from None
        raise ValueError(f"unreadable audio: {exc}") from None
    except RuntimeError as exc:  # soundfile's errors on truncated data
        raise ValueError(f"unreadable audio: {exc}") from None
    if data.shape[0] == 0:
        raise ValueError("no samples (empty file or span)")
    if not np.isfinite(data).all():
        raise ValueError("NaN or infinite samples")
    wav = torch.from_numpy(np.ascontiguousarray(data.T))
    if channels == 2 and n_channels > 2:
        raise ValueError(f"{n_channels} channels: the stereo model takes mono or stereo audio")
    return convert_audio(wav, rate, sample_rate, channels).contiguous(), rate, n_channels


def load_or_error(index: int, item: Item, sample_rate: int, channels: int) -> Loaded:
    """`load_item` as a `Loaded`: the audio, or the reason it cannot be tokenized (never raises for a bad input)."""
    try:
        wav, rate, n = load_item(item, sample_rate, channels)
        return Loaded(index, wav, rate, n)
    except (ValueError, OSError, MemoryError) as exc:
        return Loaded(index, None, error=str(exc) or type(exc).__name__)


class ItemAudio(torch.utils.data.Dataset):
    """Map-style dataset over items: index -> `Loaded` (never raises for a bad input)."""

    def __init__(self, items: tp.Sequence[Item], sample_rate: int, channels: int):
        self.items, self.sample_rate, self.channels = items, sample_rate, channels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Loaded:
        return load_or_error(index, self.items[index], self.sample_rate, self.channels)


def worker_init(_: int) -> None:
    torch.set_num_threads(1)  # resampling in each worker; the encoder has the main process's threads
