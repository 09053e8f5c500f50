"""Training data: random fixed-length crops of audio files, decoded, resampled and converted to
the model's channels in DataLoader worker processes.

Inputs are what the tokenizer takes (files, directories, globs, manifests with optional spans).
`scan` reads every file's header once and keeps the usable ones; a file that is unreadable, has
an unsupported format or is shorter than one crop is skipped and reported, never fatal.

Batches are a pure function of (seed, step): global example g = (step x accumulate + micro) x
global batch + rank x batch per rank + j draws its file and offset from `np.random.default_rng
([seed, g])`. So the data position of a run is its step (resume needs nothing else), and N ranks
with b examples each read exactly the examples one process reads with a batch of N x b.
A crop that fails to decode (a file corrupt past its header) or is silent is replaced by another
draw from the same generator; the problem is returned with the batch so the trainer can log it.
"""

import dataclasses
import math
import typing as tp

import numpy as np
import torch

from ..audio import convert_channels, resample
from ..jobs import ignore_stop_signals
from ..tokenize.loading import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, open_audio
from ..tokenize.sources import Item, in_shard, list_items

#: A crop whose RMS is under this (-60 dBFS) counts as silent and is drawn again.
SILENCE_RMS = 1e-3


@dataclasses.dataclass(frozen=True)
class Clip:
    """A usable stretch of one file: frames [first, first + frames) at the file's own rate."""
    id: str
    path: str
    rate: int
    channels: int
    first: int
    frames: int
    offset: int = -1  # a tar archive's member: its byte range of `path` (`Item.offset`, `Item.size`)
    size: int = 0

    @property
    def seconds(self) -> float:
        return self.frames / self.rate

    def item(self) -> Item:
        return Item(self.id, self.path, offset=self.offset, size=self.size)


@dataclasses.dataclass(frozen=True)
class Skipped:
    id: str
    path: str
    reason: str


def _clip(item: Item, min_seconds: float) -> Clip:
    try:
        with open_audio(item) as f:
            rate, frames, channels = int(f.samplerate), int(f.frames), int(f.channels)
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError or OSError
        raise ValueError(f"unreadable audio: {exc}") from None
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"unsupported sample rate {rate} Hz")
    first = 0 if item.start is None else int(round(item.start * rate))
    last = frames if item.end is None else min(frames, int(round(item.end * rate)))
    count = max(0, last - first)
    if count < math.ceil(min_seconds * rate):
        raise ValueError(f"too short: {count / rate:.3f} s, a crop needs {min_seconds:g} s")
    return Clip(item.id, item.path, rate, channels, first, count, item.offset, item.size)


def scan(inputs: tp.Sequence[str], min_seconds: float) -> tp.Tuple[tp.List[Clip], tp.List[Skipped]]:
    """Every input's usable clips (sorted by id) and what was skipped, with the reason."""
    items, problems = list_items(inputs)
    clips, skipped = [], [Skipped(p.id, p.path, p.error) for p in problems]
    for item in items:
        try:
            clips.append(_clip(item, min_seconds))
        except ValueError as err:
            skipped.append(Skipped(item.id, item.path, str(err)))
    return clips, skipped


def spread(clips: tp.Sequence[Clip], limit: int) -> tp.List[Clip]:
    """At most `limit` clips evenly spread over the (sorted) list: every folder gets its share,
    not only the first one."""
    if len(clips) <= limit:
        return list(clips)
    return [clips[i * len(clips) // limit] for i in range(max(0, limit))]


def split_validation(clips: tp.Sequence[Clip], percent: float, limit: int) -> tp.Tuple[tp.List[Clip], tp.List[Clip]]:
    """(train, valid): a clip goes to validation when its id hashes into the first `percent` of
    100 buckets (stable whatever else the inputs hold), at most `limit` of them, and never all."""
    if percent <= 0 or limit <= 0 or len(clips) < 2:
        return list(clips), []
    buckets = max(1, round(100 / percent))
    valid = spread([c for c in clips if in_shard(c.id, (0, buckets))], limit)
    if not valid:
        valid = [clips[-1]]
    if len(valid) == len(clips):
        valid = valid[:-1]
    chosen = {c.id for c in valid}
    return [c for c in clips if c.id not in chosen], valid


def read_crop(clip: Clip, offset: int, count: int, sample_rate: int, channels: int) -> torch.Tensor:
    """`count` samples at `sample_rate` starting `offset` frames (file rate) into the clip -> [channels, count].
    ValueError when the file cannot be decoded there."""
    need = min(clip.frames - offset, math.ceil(count * clip.rate / sample_rate) + 64)
    try:
        with open_audio(clip.item()) as f:
            f.seek(clip.first + offset)
            data = f.read(need, dtype="float32", always_2d=True)
    except Exception as exc:
        raise ValueError(f"unreadable audio: {exc}") from None
    if not np.isfinite(data).all():
        raise ValueError("NaN or infinite samples")
    wav = convert_channels(torch.from_numpy(np.ascontiguousarray(data.T)), channels)
    wav = resample(wav, clip.rate, sample_rate)[:, :count]
    if wav.shape[-1] < count:
        raise ValueError(f"decoded {wav.shape[-1]} samples where {count} were expected (truncated file?)")
    return wav.contiguous()


class CropDataset(torch.utils.data.Dataset):
    """Global example index -> (crop [channels, samples], problems [(path, reason)])."""

    def __init__(self, clips: tp.Sequence[Clip], sample_rate: int, channels: int, samples: int, seed: int,
                 tries: int = 16):
        if not clips:
            raise ValueError("no usable training audio")
        self.clips, self.sample_rate, self.channels = list(clips), sample_rate, channels
        self.samples, self.seed, self.tries = samples, seed, tries

    def __len__(self) -> int:  # examples are drawn by index; any non-negative index is valid
        return 2 ** 62

    def __getitem__(self, index: int) -> tp.Tuple[torch.Tensor, tp.List[tp.Tuple[str, str]]]:
        rng = np.random.default_rng([self.seed, index])
        problems: tp.List[tp.Tuple[str, str]] = []
        quiet: tp.Optional[torch.Tensor] = None
        for _ in range(self.tries):
            clip = self.clips[int(rng.integers(len(self.clips)))]
            span = max(1, clip.frames - math.ceil(self.samples * clip.rate / self.sample_rate) + 1)
            offset = int(rng.integers(span))
            try:
                wav = read_crop(clip, offset, self.samples, self.sample_rate, self.channels)
            except ValueError as err:
                problems.append((clip.path, str(err)))
                continue
            if float(wav.pow(2).mean().sqrt()) >= SILENCE_RMS:
                return wav, problems
            quiet = wav
        if quiet is not None:  # every draw was silent: a quiet corpus, not an error
            return quiet, problems
        raise RuntimeError(f"no readable audio in {self.tries} draws; last problems: {problems[-3:]}")


class StepBatches(torch.utils.data.Sampler):
    """Batches of global example indices for steps [start, stop): `accumulate` micro-batches of
    `batch` examples per step, this rank's share of a global batch of `batch x world` examples."""

    def __init__(self, start: int, stop: int, batch: int, accumulate: int = 1, rank: int = 0, world: int = 1):
        self.start, self.stop, self.batch, self.accumulate = start, stop, batch, accumulate
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.accumulate

    def __iter__(self) -> tp.Iterator[tp.List[int]]:
        per_step = self.batch * self.world
        for step in range(self.start, self.stop):
            for micro in range(self.accumulate):
                base = (step * self.accumulate + micro) * per_step + self.rank * self.batch
                yield list(range(base, base + self.batch))


def collate(examples: tp.Sequence[tp.Tuple[torch.Tensor, tp.List[tp.Tuple[str, str]]]]):
    """-> (audio [B, C, T], problems of the whole batch)."""
    return torch.stack([wav for wav, _ in examples]), [p for _, problems in examples for p in problems]


def loader(dataset: CropDataset, sampler: StepBatches, workers: int,
           pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Workers' seeds come from a generator of their own, not from torch's global one: the training
    process's random stream (k-means, code expiry) does not depend on when loaders are made, so a
    resumed run draws what an uninterrupted one does (the crops themselves are seeded by index).
    `pin_memory` (the trainer's on CUDA): batches in page-locked memory, whose copy to the GPU does
    not wait for the work queued before it (a copy from pageable memory waits for the stream)."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                                       pin_memory=pin_memory,
                                       persistent_workers=False, prefetch_factor=4 if workers else None,
                                       generator=torch.Generator().manual_seed(dataset.seed),
                                       worker_init_fn=_worker_init if workers else None)


def _worker_init(_: int) -> None:
    ignore_stop_signals()  # the trainer stops at the end of a step, then shuts its workers down


def load_validation(clips: tp.Sequence[Clip], sample_rate: int, channels: int, seconds: float
                    ) -> tp.Tuple[tp.List[torch.Tensor], tp.List[Skipped]]:
    """The first `seconds` of each validation clip (the whole clip if shorter) -> [channels, n] each."""
    out, skipped = [], []
    for clip in clips:
        count = min(math.floor(clip.seconds * sample_rate), round(seconds * sample_rate))
        try:
            out.append(read_crop(clip, 0, count, sample_rate, channels))
        except ValueError as err:
            skipped.append(Skipped(clip.id, clip.path, str(err)))
    return out, skipped
