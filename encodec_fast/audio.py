"""Audio I/O through soundfile (libsndfile) and channel / sample-rate conversion.

torchaudio >= 2.9 routes `load`/`save` through TorchCodec; we read and write with soundfile
(wav, flac, ogg, mp3 where the bundled libsndfile supports them) and resample with our own
windowed-sinc resampler (`encodec_fast.dsp`, the bits of torchaudio's `transforms.Resample`, which
upstream's `convert_audio` uses).
"""

import errno
import os
import typing as tp
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from . import dsp
from .dsp import resampled_length

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


def convert_channels(wav: torch.Tensor, target_channels: int) -> torch.Tensor:
    """wav [..., C, T] -> [..., target_channels, T] (upstream's rules): to mono, the mean over
    channels; to stereo, mono duplicated (a view) and stereo kept."""
    if wav.dim() < 2:
        raise ValueError(f"expected audio [..., C, T], got {tuple(wav.shape)}")
    channels = wav.shape[-2]
    if target_channels == 1:
        return wav.mean(-2, keepdim=True)
    if channels == 1 or channels == target_channels:
        *shape, _, length = wav.shape
        return wav.expand(*shape, target_channels, length)
    raise ValueError(f"cannot convert {channels} channels to {target_channels}")


def convert_audio(wav: torch.Tensor, sr: int, target_sr: int, target_channels: int) -> torch.Tensor:
    """Convert wav [..., C, T] to `target_channels` and `target_sr` (upstream's rules).

    To mono: mean over channels. To stereo: mono is duplicated, stereo kept. Resampling uses
    the windowed-sinc filter of torchaudio's `transforms.Resample` (identity when the rates are equal).
    """
    return resample(convert_channels(wav, target_channels), sr, target_sr)


def resample(wav: torch.Tensor, sr: int, target_sr: int) -> torch.Tensor:
    """wav [..., T] at `sr` -> at `target_sr`, as upstream's convert_audio resamples (torchaudio's
    `transforms.Resample` defaults: Hann-windowed sinc, 6 zero crossings, roll-off 0.99)."""
    return dsp.resample(wav, sr, target_sr)


class StreamingResampler:
    """`convert_audio`'s resampling of one signal of `length` samples fed in consecutive pieces:
    `push(piece [C, n])` returns the output samples that are ready, `finish()` the rest; all of
    them together equal resampling the whole signal at once, bit for bit.

    The filter is a strided convolution (one output frame of target_sr/g samples per sr/g input
    samples, g = gcd). CPU convolutions give the same values at every position for long enough
    calls (measured: with 3 samples per frame, calls of 16,000 frames gave other values than the
    whole signal's, calls of 40,000 the same), so frames are computed in calls of at least
    `min_frames` (default: 30,000 frames and 2 million output samples), the last call taking the
    remainder (up to 2 x min_frames - 1 frames). Memory: about two calls' input and output.
    """

    def __init__(self, sr: int, target_sr: int, length: int, min_frames: tp.Optional[int] = None):
        self.sr, self.target_sr = sr, target_sr
        self.filters = dsp.resample_filters(sr, target_sr)
        self.stride, self.per_frame = self.filters.stride, self.filters.per_frame
        self.width = self.filters.width
        self.span = int(self.filters.kernel.shape[-1])
        self.length = length
        self.min_frames = max(1, min_frames if min_frames is not None else max(30_000, -(-2_000_000 // self.per_frame)))
        self.total_out = resampled_length(length, sr, target_sr)
        # The whole call pads `width` zeros on the left and width + stride on the right.
        self.frames = (length + 2 * self.width + self.stride - self.span) // self.stride + 1
        self.pending: tp.List[torch.Tensor] = []  # the padded input from frame `done`'s first sample on
        self.pushed = self.done = self.emitted = 0

    def push(self, piece: torch.Tensor) -> torch.Tensor:
        """piece [C, n], the next n samples -> the output samples now computable (maybe none)."""
        if self.pushed + piece.shape[-1] > self.length:
            raise ValueError(f"more than the {self.length} samples announced")
        if not self.pending:
            self.pending.append(piece.new_zeros(piece.shape[0], self.width))
        self.pending.append(piece)
        self.pushed += piece.shape[-1]
        available = sum(p.shape[-1] for p in self.pending)
        ready = (available - self.span) // self.stride + 1 if available >= self.span else 0
        n = 0
        while n + self.min_frames <= ready and self.frames - self.done - n - self.min_frames >= self.min_frames:
            n += self.min_frames
        return self._emit(n)

    def finish(self) -> torch.Tensor:
        """The remaining output samples (all input given)."""
        if self.pushed != self.length or not self.pending:
            raise ValueError(f"{self.pushed} samples given of the {self.length} announced")
        self.pending.append(self.pending[-1].new_zeros(self.pending[-1].shape[0], self.width + self.stride))
        return self._emit(self.frames - self.done)

    def _emit(self, n: int) -> torch.Tensor:
        channels = self.pending[-1].shape[0]
        if n == 0:
            return self.pending[-1].new_zeros(channels, 0)
        buf = torch.cat(self.pending, dim=-1) if len(self.pending) > 1 else self.pending[0]
        filters = dsp.resample_filters(self.sr, self.target_sr, buf.device, buf.dtype)
        out = []
        a = 0
        while a < n:
            b = n if n - a < 2 * self.min_frames else a + self.min_frames
            out.append(dsp.apply_filters(buf[:, a * self.stride:(b - 1) * self.stride + self.span], filters))
            a = b
        rest = buf[:, n * self.stride:].clone()  # a copy: a view would keep the whole buffer alive
        self.pending = [rest]
        self.done += n
        y = torch.cat(out, dim=-1)
        y = y[:, : max(0, self.total_out - self.emitted)]
        self.emitted += y.shape[-1]
        return y


def audio_length(path: PathLike, target_sr: int) -> tp.Tuple[int, int, int]:
    """-> (samples at `target_sr`, the file's rate, its channels), from the header only."""
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioError(f"cannot read audio file {path}: {err}") from err
    if info.frames <= 0:
        raise AudioError(f"audio file {path} holds no samples")
    return resampled_length(info.frames, info.samplerate, target_sr), info.samplerate, info.channels


class AudioWriter:
    """Write audio [C, n] chunk by chunk as `save_audio` writes the whole (16-bit PCM for wav and
    flac; samples beyond +-0.99 clamped, or with `rescale` the whole signal scaled so that its
    peak is 0.99, which needs a second pass over a float32 scratch file next to `path`).
    Writes into a temporary file that replaces `path` only at `close()`: a failure midway
    leaves any earlier `path` as it was. `peak` is the largest |sample| written."""

    LIMIT = 0.99

    def __init__(self, path: PathLike, sample_rate: int, channels: int, rescale: bool = False):
        self.path, self.sample_rate, self.channels, self.rescale = Path(path), sample_rate, channels, rescale
        fmt = self.path.suffix.lower().lstrip(".")
        self.subtype = "PCM_16" if fmt in ("wav", "flac", "aiff", "aif") else None
        self.tmp = self.path.with_name(f".{self.path.name}.part{self.path.suffix}")
        self.scratch = self.path.with_name(f".{self.path.name}.float.wav") if rescale else None
        self.peak = 0.0
        try:
            if rescale:
                self._file = sf.SoundFile(str(self.scratch), "w", sample_rate, channels, subtype="FLOAT", format="WAV")
            else:
                self._file = sf.SoundFile(str(self.tmp), "w", sample_rate, channels, subtype=self.subtype)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
            raise AudioError(f"cannot write audio file {self.path}: {err}") from err

    def write(self, wav: torch.Tensor) -> None:
        wav = wav.detach().float().cpu()
        if wav.dim() != 2 or wav.shape[0] != self.channels:
            raise ValueError(f"expected audio [{self.channels}, n], got {tuple(wav.shape)}")
        if wav.shape[-1] == 0:
            return
        self.peak = max(self.peak, float(wav.abs().max()))
        if not self.rescale:
            wav = wav.clamp(-self.LIMIT, self.LIMIT)
        try:
            self._file.write(wav.numpy().T)
        except sf.LibsndfileError as err:  # libsndfile says "System error." for a full disk
            raise OSError(errno.EIO, f"writing audio failed (libsndfile: {err}; is the disk full?)",
                          str(self.path)) from None

    def close(self, block: int = 1 << 20) -> None:
        """Finish the file and move it into place."""
        self._file.close()
        if self.rescale:
            gain = min(self.LIMIT / self.peak, 1) if self.peak > 0 else 1.0
            with sf.SoundFile(str(self.scratch)) as src, \
                    sf.SoundFile(str(self.tmp), "w", self.sample_rate, self.channels, subtype=self.subtype) as dst:
                while True:
                    data = src.read(block, dtype="float32", always_2d=True)
                    if not len(data):
                        break
                    dst.write((torch.from_numpy(data) * gain).numpy() if gain != 1 else data)
            self.scratch.unlink()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drop what was written (the temporary files)."""
        try:
            self._file.close()
        except (sf.LibsndfileError, RuntimeError):
            pass
        for p in (self.tmp, self.scratch):
            if p is not None and p.exists():
                p.unlink()
