"""Reading one item's audio, as the model wants it: decode, span, channels, sample rate, checks.
`load_item` runs in DataLoader worker processes (`ItemAudio`) and Ray decoding tasks; items too
long to hold are only measured there and read piece by piece by the encoding process
(`stream_item`). For a CUDA job the workers only decode and the encoding process resamples on the
GPU: resampling 44.1 kHz stereo to 24 kHz mono costs a CPU about 3x the WAV decoding (measured on
one core: 917 audio-s per CPU-s decoded and resampled, 3,591 decoded alone)."""

import contextlib
import dataclasses
import io
import os
import time
import typing as tp

import numpy as np
import soundfile as sf
import torch

from .. import precision, timing
from ..audio import StreamingResampler, convert_channels, resample, resampled_length
from ..jobs import ignore_stop_signals
from .sources import Item

MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 768_000


@dataclasses.dataclass
class Loaded:
    index: int                      # position in the job's item list
    wav: tp.Optional[torch.Tensor]  # [C, T] at the model's channels and `rate`; None on error or when `long`
    source_rate: int = 0
    source_channels: int = 0
    error: str = ""
    long: int = 0                   # samples at the model's rate, for an item too long to load whole (`stream_item`)
    length: int = 0                 # samples at the model's rate (of `wav` once resampled)
    rate: int = 0                   # the rate `wav` is at: the model's, or the source's when resampling is left
                                    # to the encoding process (`ItemAudio(resample=False)`)
    seconds: float = 0.0            # the reading process's time on this item (open, decode, resample where it does)

    def pin_memory(self) -> "Loaded":
        """The audio in page-locked memory (the DataLoader's pinning thread calls this for CUDA jobs), so
        that its copy to the GPU runs asynchronously."""
        if self.wav is not None and not self.wav.is_pinned():
            self.wav = self.wav.pin_memory()
        return self


class _Member(io.RawIOBase):
    """`size` bytes at `offset` of the file at `path` as a seekable file of their own (a member of an
    uncompressed tar archive, read in place)."""

    def __init__(self, path: str, offset: int, size: int, label: str = ""):
        super().__init__()
        self._file = open(path, "rb")
        self._offset, self._size, self._pos = offset, size, 0
        self._label = label or f"{path}[{offset}:{offset + size}]"

    def __repr__(self) -> str:  # soundfile's errors name the file by it
        return repr(self._label)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        self._file.seek(self._offset + self._pos)
        data = self._file.read(n)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        self._file.close()
        super().close()


@contextlib.contextmanager
def open_audio(item: Item) -> tp.Iterator[sf.SoundFile]:
    """The item's audio file open for reading: the file at its path, or its byte range of a tar archive."""
    if item.offset < 0:
        with sf.SoundFile(item.path) as f:
            yield f
        return
    with _Member(item.path, item.offset, item.size, item.id) as member, sf.SoundFile(member) as f:
        yield f


@contextlib.contextmanager
def _reading(path: str):
    """Errors of opening and decoding a file as ValueError with the reason."""
    try:
        yield
    except FileNotFoundError:
        raise ValueError("no such file (deleted?)") from None
    except sf.LibsndfileError as exc:
        if not os.path.exists(path):
            raise ValueError("no such file (deleted?)") from None
        raise ValueError(f"unreadable audio: {exc}") from None
    except RuntimeError as exc:  # soundfile's errors on truncated data
        raise ValueError(f"unreadable audio: {exc}") from None


def _span(f: sf.SoundFile, item: Item, channels: int) -> tp.Tuple[int, int]:
    """Check the file's format against the model, seek to the item's start -> (first frame, frame count)."""
    rate, frames = f.samplerate, f.frames
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"unsupported sample rate {rate} Hz")
    if channels == 2 and f.channels > 2:
        raise ValueError(f"{f.channels} channels: the stereo model takes mono or stereo audio")
    first = 0 if item.start is None else int(round(item.start * rate))
    last = frames if item.end is None else min(frames, int(round(item.end * rate)))
    if first >= frames and frames > 0:
        raise ValueError(f"start {item.start} s is past the end of the file ({frames / rate:.3f} s)")
    f.seek(min(first, frames))
    return first, max(0, last - first)


def _block(data: np.ndarray, channels: int) -> torch.Tensor:
    """Decoded frames [n, C] -> [channels, n] (checked: finite)."""
    if not np.isfinite(data).all():
        raise ValueError("NaN or infinite samples")
    return convert_channels(torch.from_numpy(np.ascontiguousarray(data.T)), channels)


def load_item(item: Item, sample_rate: int, channels: int, long_after: tp.Optional[int] = None,
              resample_here: bool = True) -> tp.Tuple[tp.Optional[torch.Tensor], int, int, int]:
    """-> (wav [channels, T] float32 at `sample_rate`, source rate, source channels, T).
    When T would exceed `long_after`, nothing is decoded and wav is None (read it with
    `stream_item`). With `resample_here` False, wav stays at the source rate (T is still the
    length at `sample_rate`): the caller resamples it (`resample`, e.g. on the GPU). ValueError
    (with the reason) for anything that cannot be tokenized."""
    with _reading(item.path), open_audio(item) as f:
        _, count = _span(f, item, channels)
        rate, n_channels = f.samplerate, f.channels
        if count == 0:
            raise ValueError("no samples (empty file or span)")
        length = resampled_length(count, rate, sample_rate)
        if long_after is not None and length > long_after:
            return None, rate, n_channels, length
        data = f.read(count, dtype="float32", always_2d=True)
    if data.shape[0] == 0:
        raise ValueError("no samples (empty file or span)")
    wav = _block(data, channels)
    if not resample_here:
        return wav.contiguous(), rate, n_channels, resampled_length(wav.shape[-1], rate, sample_rate)
    wav = resample(wav, rate, sample_rate)
    return wav.contiguous(), rate, n_channels, wav.shape[-1]


def stream_item(item: Item, sample_rate: int, channels: int,
                block_seconds: float = 10.0) -> tp.Iterator[torch.Tensor]:
    """`load_item`'s audio in consecutive pieces [channels, n], the same values, decoded and
    resampled `block_seconds` of the source at a time (`StreamingResampler`): for items too long
    to hold. ValueError (with the reason) for anything that cannot be tokenized, also midway (a
    NaN, or a file shorter than its header says)."""
    with _reading(item.path), open_audio(item) as f:
        _, count = _span(f, item, channels)
        rate = f.samplerate
        if count == 0:
            raise ValueError("no samples (empty file or span)")
        resampler = StreamingResampler(rate, sample_rate, count) if rate != sample_rate else None
        block = max(1, int(block_seconds * rate))
        got = 0
        while got < count:
            data = f.read(min(block, count - got), dtype="float32", always_2d=True)
            if data.shape[0] == 0:
                raise ValueError(f"the file ends after {got} of the {count} frames its header announces")
            got += data.shape[0]
            wav = _block(data, channels)
            out = resampler.push(wav) if resampler is not None else wav.contiguous()
            if out.shape[-1]:
                yield out
        if resampler is not None:
            yield resampler.finish()


def load_or_error(index: int, item: Item, sample_rate: int, channels: int,
                  long_after: tp.Optional[int] = None, resample_here: bool = True) -> Loaded:
    """`load_item` as a `Loaded`: the audio (or, past `long_after` samples, its length), or the
    reason it cannot be tokenized (never raises for a bad input)."""
    try:
        wav, rate, n, length = load_item(item, sample_rate, channels, long_after, resample_here)
        if wav is None:
            return Loaded(index, None, rate, n, long=length, length=length)
        return Loaded(index, wav, rate, n, length=length, rate=sample_rate if resample_here else rate)
    except (ValueError, OSError, MemoryError) as exc:
        return Loaded(index, None, error=str(exc) or type(exc).__name__)


#: The stage of resampling in the encoding process (`resampled`).
RESAMPLE_STAGE = "resample (device)"


def resampled(wavs: tp.List[torch.Tensor], rates: tp.Sequence[int], sample_rate: int,
              device: torch.device) -> tp.List[torch.Tensor]:
    """What `load_item(resample_here=False)` left to its caller: each clip (at its rate in `rates`)
    not yet at `sample_rate` resampled where it lies (e.g. on the GPU), in exact fp32 whatever the
    job's precision mode (the same filter as `load_item`'s)."""
    if all(rate == sample_rate for rate in rates):
        return wavs
    with timing.stage(RESAMPLE_STAGE, device), precision.torch_precision("exact"):
        return [resample(w, rate, sample_rate).contiguous() if rate != sample_rate else w
                for w, rate in zip(wavs, rates)]


class ItemAudio(torch.utils.data.Dataset):
    """Map-style dataset over items: index -> `Loaded` (never raises for a bad input); with
    `resample` False the audio stays at its source rate (the encoding process resamples it)."""

    def __init__(self, items: tp.Sequence[Item], sample_rate: int, channels: int, long_after: tp.Optional[int] = None,
                 resample: bool = True):
        self.items, self.sample_rate, self.channels, self.long_after = items, sample_rate, channels, long_after
        self.resample = resample

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Loaded:
        start = time.perf_counter()
        loaded = load_or_error(index, self.items[index], self.sample_rate, self.channels, self.long_after,
                               self.resample)
        loaded.seconds = time.perf_counter() - start
        return loaded


@dataclasses.dataclass
class ReadRate:
    """What the reading processes (DataLoader workers, or this process with none) did: their summed
    time on the items, and the audio they delivered (items read whole; those streamed later, past
    `long_after`, are read by the encoding process and not counted)."""
    seconds: float = 0.0
    audio_seconds: float = 0.0

    def add(self, loaded: Loaded, sample_rate: int) -> None:
        if loaded.long:
            return
        self.seconds += loaded.seconds
        if loaded.wav is not None:
            self.audio_seconds += loaded.length / sample_rate


def worker_init(_: int) -> None:
    ignore_stop_signals()  # the main process stops the job at a safe point, then shuts the workers down
    torch.set_num_threads(1)  # resampling in each worker; the encoder has the main process's threads
