"""The local engine: DataLoader workers decode and resample (on CUDA only decode: the clips are
resampled on the GPU), the main thread encodes length-sorted batches, a writer thread turns codes
into rows and commits shards."""

import functools
import queue
import sys
import threading
import time
import typing as tp

import numpy as np
import torch

from .. import timing
from ..jobs import GracefulStop
from ..model import EncodecModel, length_batches
from ..streaming import LongInputs, encode_long, encode_pieces
from .loading import ItemAudio, Loaded, ReadRate, resampled, stream_item, worker_init
from .sources import Item

if tp.TYPE_CHECKING:  # pyarrow's: training imports this package's loading without it
    from .sink import ShardSink

#: The main thread's wait for decoded audio (with workers=0, the decoding itself).
READ_STAGE = "read audio (decoding, or waiting for workers)"
WRITE_STAGE = "write rows (writer thread)"


def _identity(x: tp.Any) -> tp.Any:
    return x


class Progress:
    """A status line on stderr: files, audio hours, x real time, failures; redrawn at most twice a
    second on a terminal, a new line every 30 s otherwise (logs)."""

    def __init__(self, total: int, skipped: int, quiet: bool):
        self.total, self.skipped, self.quiet = total, skipped, quiet
        self.tty = sys.stderr.isatty()
        self.done = self.failed = 0
        self.seconds = 0.0
        self.start = self.last = time.perf_counter()

    def update(self, done: int = 0, failed: int = 0, seconds: float = 0.0) -> None:
        self.done += done
        self.failed += failed
        self.seconds += seconds
        now = time.perf_counter()
        if not self.quiet and now - self.last >= (0.5 if self.tty else 30.0):
            self.last = now
            print("\r" + self.line() if self.tty else self.line(), end="" if self.tty else "\n", file=sys.stderr,
                  flush=True)

    def line(self) -> str:
        wall = max(time.perf_counter() - self.start, 1e-9)
        return (f"{self.skipped + self.done + self.failed}/{self.total} files ({self.skipped} done before), "
                f"{self.seconds / 3600:.3f} h of audio, {self.seconds / wall:.1f}x real time, {self.failed} failed")

    def finish(self) -> None:
        if not self.quiet and self.tty:
            print("\r" + self.line(), file=sys.stderr, flush=True)


def _batches(pool: tp.List[Loaded], budget: int) -> tp.Iterator[tp.List[Loaded]]:
    """Length-sorted batches whose padded size (count x longest, at the model's rate) stays within
    `budget` samples."""
    for batch in length_batches([ld.length for ld in pool], budget):
        yield [pool[i] for i in batch]


class _Writer(threading.Thread):
    """Takes (items, loaded, frames, event) from a queue: waits for the copies, builds rows, commits."""

    def __init__(self, sink: "ShardSink", model: EncodecModel, bandwidth: float):
        super().__init__(daemon=True)
        self.sink, self.bandwidth = sink, bandwidth
        self.sample_rate, self.segmented = model.sample_rate, model.segment is not None
        self.jobs: "queue.Queue[tp.Any]" = queue.Queue(maxsize=8)
        self.failure: tp.Optional[BaseException] = None
        self.busy = self.waiting_for_device = 0.0  # seconds: building rows and writing; waiting for copies

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.failure is not None:
                continue
            t0 = time.perf_counter()
            try:
                self._write(*job)
            except BaseException as exc:  # reported to the main thread by put/close
                self.failure = exc
            self.busy += time.perf_counter() - t0

    def put(self, job: tp.Any) -> None:
        if self.failure is not None:
            raise self.failure
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self.join()
        if self.failure is not None:
            raise self.failure

    def _write(self, kind: str, payload: tp.Any) -> None:
        if kind == "error":
            item, error = payload
            self.sink.add_error(item.id, item.path, error)
            return
        items, loaded, frames, event = payload
        if event is not None:
            t0 = time.perf_counter()
            event.synchronize()
            self.waiting_for_device += time.perf_counter() - t0
        for item, ld, segments in zip(items, loaded, frames):
            self.sink.add(make_row(item, ld.source_rate, ld.source_channels, ld.length, segment_arrays(segments),
                                   self.sample_rate, self.bandwidth, self.segmented))


def segment_arrays(segments) -> tp.Tuple[np.ndarray, tp.List[float], tp.List[int]]:
    """One item's [(codes [1, K, T_i], scale or None)] on CPU -> (codes int16 [K, sum T_i], scales, frames per
    segment)."""
    codes = np.concatenate([c[0].numpy() for c, _ in segments], axis=-1).astype(np.int16)
    scales = [float(s.reshape(-1)[0]) for _, s in segments if s is not None]
    return codes, scales, [int(c.shape[-1]) for c, _ in segments]


def make_row(item: Item, source_rate: int, source_channels: int, num_samples: int,
             arrays: tp.Tuple[np.ndarray, tp.List[float], tp.List[int]], sample_rate: int, bandwidth: float,
             segmented: bool) -> tp.Dict[str, tp.Any]:
    codes, scales, segment_frames = arrays
    return {"id": item.id, "path": item.path, "start": item.start, "end": item.end, "sample_rate": sample_rate,
            "source_sample_rate": source_rate, "source_channels": source_channels, "num_samples": num_samples,
            "frames": codes.shape[1], "codebooks": codes.shape[0], "bandwidth": bandwidth,
            "scales": scales if segmented else None, "segment_frames": segment_frames if segmented else None,
            "codes": codes}


def encode_wavs_async(model: EncodecModel, wavs: tp.List[torch.Tensor], budget: int,
                      long: LongInputs) -> tp.Callable[[], tp.List[tp.Any]]:
    """Clips [C, T_i] on the model's device -> a function giving per clip [(codes [1, K, T], scale)],
    as `encode` gives them: long clips one by one through `encode_long` (bounded memory, the same
    codes), now; the others together through `encode_batch_async`, queued now and read (fp16
    overflow checks included) when the function is called."""
    out: tp.List[tp.Any] = [None] * len(wavs)
    short = []
    with torch.no_grad():
        for i, wav in enumerate(wavs):
            if wav.shape[-1] > long.after(model.sample_rate):
                out[i] = encode_long(model, wav[None], long.chunk_seconds)
            else:
                short.append(i)
        pending = model.encode_batch_async([wavs[i] for i in short], max_batch_samples=budget) if short else None

    def result() -> tp.List[tp.Any]:
        if pending is not None:
            for i, frames in zip(short, pending.result()):
                out[i] = frames
        return out
    return result


def queue_or_errors(model: EncodecModel, wavs: tp.List[torch.Tensor], budget: int,
                    long: LongInputs) -> tp.Callable[[], tp.List[tp.Any]]:
    """`encode_wavs_async`, whose function gives per clip its frames or the reason (a str) it failed:
    where the batch fails, when queued or when read (out of memory, an input the model refuses),
    each clip is encoded alone, so that only the culprit fails."""
    def alone(exc: BaseException) -> tp.List[tp.Any]:
        if len(wavs) == 1:
            return [f"encoding failed: {exc}"]
        return [encode_or_errors(model, [wav], budget, long)[0] for wav in wavs]

    try:
        result = encode_wavs_async(model, wavs, budget, long)
    except (RuntimeError, ValueError) as exc:
        return functools.partial(alone, exc)

    def read() -> tp.List[tp.Any]:
        try:
            return result()
        except (RuntimeError, ValueError) as exc:
            return alone(exc)
    return read


def encode_or_errors(model: EncodecModel, wavs: tp.List[torch.Tensor], budget: int,
                     long: LongInputs) -> tp.List[tp.Any]:
    """`queue_or_errors`, read at once: per clip its frames, or the reason (a str) it failed."""
    return queue_or_errors(model, wavs, budget, long)()


def encode_streamed(model: EncodecModel, item: Item, length: int, device: torch.device, long: LongInputs) -> tp.Any:
    """An item too long to hold, read and resampled (`stream_item`) and encoded (`encode_pieces`)
    piece by piece: bounded memory, the codes of the whole file. -> its frames, or the reason (a
    str) it failed: the file went bad midway, the model refuses it, out of memory."""
    pieces = (piece[None].to(device) for piece in stream_item(item, model.sample_rate, model.channels))
    try:
        with torch.no_grad():
            return encode_pieces(model, pieces, length, long.chunk_seconds)
    except (ValueError, OSError, MemoryError) as exc:
        return str(exc) or type(exc).__name__
    except RuntimeError as exc:
        return f"encoding failed: {exc}"


def run_local(model: EncodecModel, items: tp.Sequence[Item], sink: "ShardSink", bandwidth: float,
              device: torch.device, batch_seconds: float, workers: int, progress: Progress,
              long: LongInputs = LongInputs(), pool_batches: int = 4, *, stop: GracefulStop,
              timer: tp.Optional[timing.StageTimer] = None, resample_on_device: tp.Optional[bool] = None,
              reading: tp.Optional[ReadRate] = None) -> bool:
    """Tokenize `items` (none of them done yet) into `sink`; False when it stopped early. When `stop` is
    requested (SIGTERM, SIGINT), no new item starts; what was encoded reaches the sink, the items read
    but not yet encoded are left for the next run. `timer` (a `timing.StageTimer`) gets where the time
    went: waiting for decoded audio, copies, the model's stages, the writer thread's work; its
    `loop_seconds` the loop's wall time. `resample_on_device` (default: on CUDA): the workers only
    decode, and each clip is resampled on `device` after its copy (in fp32, TF32 off), off the
    workers' CPUs; elsewhere the workers resample (upstream's values, bit for bit). `reading` (a
    `ReadRate`) gets the reading processes' time and the audio they delivered."""
    cuda = device.type == "cuda"
    on_device = cuda if resample_on_device is None else resample_on_device
    loader = torch.utils.data.DataLoader(
        ItemAudio(items, model.sample_rate, model.channels, long_after=long.after(model.sample_rate),
                  resample=not on_device),
        batch_size=None, shuffle=False, num_workers=workers,
        collate_fn=_identity, worker_init_fn=worker_init if workers else None,
        prefetch_factor=2 if workers else None, persistent_workers=False, pin_memory=cuda)
    budget = max(1, int(batch_seconds * model.sample_rate))
    writer = _Writer(sink, model, bandwidth)
    writer.start()

    def submit(batch: tp.List[Loaded], frames) -> None:
        with timing.stage("to host", device):
            frames = [[(c.to("cpu", non_blocking=True), s.to("cpu", non_blocking=True) if s is not None else None)
                       for c, s in f] for f in frames]
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        writer.put(("rows", ([items[ld.index] for ld in batch], batch, frames, event)))
        progress.update(done=len(batch), seconds=sum(ld.length for ld in batch) / model.sample_rate)

    def fail(loaded: Loaded, error: str) -> None:
        writer.put(("error", (items[loaded.index], error)))
        progress.update(failed=1)

    def submit_or_fail(batch: tp.List[Loaded], results: tp.List[tp.Any]) -> None:
        """results: per item its frames, or the reason (a str) it failed."""
        for loaded, result in zip(batch, results):
            if isinstance(result, str):
                fail(loaded, result)
        good = [(loaded, result) for loaded, result in zip(batch, results) if not isinstance(result, str)]
        if good:
            submit([loaded for loaded, _ in good], [result for _, result in good])

    copies = torch.cuda.Stream(device) if cuda else None

    def upload(batch: tp.List[Loaded]) -> tp.Tuple[tp.List[torch.Tensor], tp.Any]:
        """The batch's audio to the device: on CUDA from pinned memory on a copy stream of its own
        (-> the tensors and the event that ends their copies), so that it overlaps the encoding of
        the batch before."""
        if not cuda:
            with timing.stage("to device", device):
                wavs = [ld.wav.to(device) for ld in batch]
            return resampled(wavs, [ld.rate for ld in batch], model.sample_rate, device), None
        with torch.cuda.stream(copies):
            with timing.stage("to device", device):
                wavs = [ld.pin_memory().wav.to(device, non_blocking=True) for ld in batch]
            wavs = resampled(wavs, [ld.rate for ld in batch], model.sample_rate, device)  # on the copy stream too
            done = torch.cuda.Event()
            done.record()
        return wavs, done

    def encode(pool: tp.List[Loaded]) -> None:
        batches = list(_batches(pool, budget))
        ahead = upload(batches[0]) if batches else None
        queued = None  # the batch before, queued on the device: its results are read after this one is queued
        for k, batch in enumerate(batches):
            wavs, done = ahead
            # double buffering: the next batch's copies are queued before this batch's kernels
            ahead = upload(batches[k + 1]) if k + 1 < len(batches) else None
            if done is not None:
                stream = torch.cuda.current_stream(device)
                stream.wait_event(done)
                for wav in wavs:  # made on the copy stream, used on this one
                    wav.record_stream(stream)
            current = (batch, queue_or_errors(model, wavs, budget, long))
            if queued is not None:  # the device has this batch's work while the host reads the one before
                submit_or_fail(queued[0], queued[1]())
            queued = current
        if queued is not None:
            submit_or_fail(queued[0], queued[1]())

    timer = timer if timer is not None else timing.StageTimer()
    loop_start = time.perf_counter()
    pool: tp.List[Loaded] = []
    pooled = 0
    try:
        with timer.active():
            with timing.stage(READ_STAGE):  # starting the decoding processes is part of waiting for them
                loaded_items = iter(loader)
            while True:
                with timing.stage(READ_STAGE):
                    loaded = next(loaded_items, None)
                if loaded is None:
                    break
                if reading is not None:
                    reading.add(loaded, model.sample_rate)
                if stop.requested is not None:
                    return False
                if loaded.long:
                    submit_or_fail([loaded], [encode_streamed(model, items[loaded.index], loaded.long, device, long)])
                    continue
                if loaded.wav is None:
                    fail(loaded, loaded.error)
                    continue
                pool.append(loaded)
                pooled += loaded.length
                if pooled >= pool_batches * budget:
                    encode(pool)
                    pool, pooled = [], 0
            if pool:
                encode(pool)
            return True
    finally:
        try:
            writer.close()
        finally:
            timer.add(WRITE_STAGE, writer.busy - writer.waiting_for_device)
            timer.loop_seconds = time.perf_counter() - loop_start
