"""The Ray engine (`--engine ray`): the same stages on Ray Data, for clusters.

read (the item list) -> decode/resample in CPU tasks (on GPUs: decode only, the actors resample)
-> encode in actors (one per GPU, or CPU actors) -> rows back to the driver, which commits shards
with the local engine's sink. The sink (and so resume: the done-list, atomic shards, exactly-once)
is the same as the local engine's; the driver filters done items before the dataset is built.
`ray.init(address=...)` joins a running cluster (`address="auto"` or ray://...), or starts a local
instance when none is given.
"""

import copy
import dataclasses
import math
import typing as tp

import numpy as np
import torch

from ..jobs import GracefulStop
from ..model import EncodecModel
from ..streaming import LongInputs
from .loading import load_or_error, resampled
from .local import Progress, encode_or_errors, encode_streamed, make_row, segment_arrays
from .sink import ShardSink
from .sources import Item

#: An item's fields, as the dataset's rows carry them.
ITEM_FIELDS = tuple(f.name for f in dataclasses.fields(Item))


def _item(row: tp.Dict[str, tp.Any]) -> Item:
    def seconds(v: tp.Any) -> tp.Optional[float]:  # Ray Data may hand a missing span end back as NaN
        return None if v is None or math.isnan(float(v)) else float(v)
    fields = {name: row[name] for name in ITEM_FIELDS}  # Ray's batches hold numpy scalars: back to Python's
    fields.update(id=str(fields["id"]), path=str(fields["path"]), start=seconds(fields["start"]),
                  end=seconds(fields["end"]), offset=int(fields["offset"]), size=int(fields["size"]))
    return Item(**fields)


def _decode(row: tp.Dict[str, tp.Any], sample_rate: int, channels: int, long_after: int,
            resample_here: bool = True) -> tp.Dict[str, tp.Any]:
    """An item -> its audio (at the model's rate, or at its own with `resample_here` False: the
    encoder actor resamples it on its device); a long one (over `long_after` samples) is left to
    the encoder actor, which reads it piece by piece."""
    torch.set_num_threads(1)
    loaded = load_or_error(row["index"], _item(row), sample_rate, channels, long_after, resample_here)
    wav = loaded.wav.numpy() if loaded.wav is not None else np.zeros((channels, 0), np.float32)
    return {**row, "error": loaded.error, "source_rate": loaded.source_rate,
            "source_channels": loaded.source_channels, "long": loaded.long, "wav": wav,
            "rate": loaded.rate or sample_rate}


class _Encoder:
    """A Ray Data actor holding the model: a batch of decoded rows -> codes (or errors)."""

    def __init__(self, model_ref, device: str, budget: int, long: LongInputs):
        import ray
        self.model = ray.get(model_ref).to(device).eval()
        self.device, self.budget, self.long = torch.device(device), budget, long

    def __call__(self, batch: tp.Dict[str, np.ndarray]) -> tp.Dict[str, tp.Any]:
        n = len(batch["index"])
        out: tp.Dict[str, tp.List[tp.Any]] = {"index": list(batch["index"]), "error": list(batch["error"]),
                                             "codes": [np.zeros((0, 0), np.int16)] * n, "scales": [[]] * n,
                                             "segment_frames": [[]] * n, "num_samples": [0] * n,
                                             "source_rate": list(batch["source_rate"]),
                                             "source_channels": list(batch["source_channels"])}
        whole = [i for i in range(n) if not batch["error"][i] and not batch["long"][i]]
        wavs = [torch.from_numpy(np.asarray(batch["wav"][i], dtype=np.float32)).to(self.device) for i in whole]
        wavs = resampled(wavs, [int(batch["rate"][i]) for i in whole], self.model.sample_rate, self.device)
        results = dict(zip(whole, encode_or_errors(self.model, wavs, self.budget, self.long)))
        for i, wav in zip(whole, wavs):
            out["num_samples"][i] = int(wav.shape[-1])
        for i in range(n):
            if batch["long"][i] and not batch["error"][i]:
                item = _item({key: batch[key][i] for key in ITEM_FIELDS})
                results[i] = encode_streamed(self.model, item, int(batch["long"][i]), self.device, self.long)
                out["num_samples"][i] = int(batch["long"][i])
        for i, result in results.items():
            if isinstance(result, str):
                out["error"][i] = result
                continue
            cpu = [(c.cpu(), None if s is None else s.cpu()) for c, s in result]
            out["codes"][i], out["scales"][i], out["segment_frames"][i] = segment_arrays(cpu)
        return out


def run_ray(model: EncodecModel, items: tp.Sequence[Item], sink: ShardSink, bandwidth: float,
            device: torch.device, batch_seconds: float, workers: int, progress: Progress, long: LongInputs,
            address: tp.Optional[str] = None, encoders: tp.Optional[int] = None, *, stop: GracefulStop,
            resample_on_device: tp.Optional[bool] = None) -> bool:
    """Tokenize `items` into `sink` with Ray Data; False when `stop` ended it early.
    `resample_on_device` (default: on CUDA): the decoding tasks only decode, and the encoder actors
    resample each clip on their device (as the local engine)."""
    import ray
    if not items:
        return True
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    cuda = device.type == "cuda"
    if encoders is None:
        encoders = max(1, int(ray.cluster_resources().get("GPU", 0))) if cuda else 1
    model_ref = ray.put(copy.deepcopy(model).cpu())  # a copy: the caller's model stays where it is
    rows = [{"index": i, **dataclasses.asdict(it)} for i, it in enumerate(items)]
    ds = ray.data.from_items(rows)
    on_device = cuda if resample_on_device is None else resample_on_device
    ds = ds.map(_decode, fn_kwargs={"sample_rate": model.sample_rate, "channels": model.channels,
                                    "long_after": long.after(model.sample_rate), "resample_here": not on_device},
                num_cpus=1)
    ds = ds.map_batches(_Encoder, fn_constructor_kwargs={
        "model_ref": model_ref, "device": "cuda" if cuda else "cpu",
        "budget": max(1, int(batch_seconds * model.sample_rate)), "long": long},
        batch_size=4, concurrency=encoders, num_gpus=1 if cuda else 0, num_cpus=0 if cuda else 1,
        batch_format="numpy")
    segmented = model.segment is not None
    for row in ds.iter_rows():
        if stop.requested is not None:
            return False  # the rows not taken yet are done again by the next run
        item = items[int(row["index"])]
        if row["error"]:
            sink.add_error(item.id, item.path, str(row["error"]))
            progress.update(failed=1)
            continue
        codes = np.asarray(row["codes"], dtype=np.int16)
        arrays = (codes, [float(v) for v in row["scales"]], [int(v) for v in row["segment_frames"]])
        sink.add(make_row(item, int(row["source_rate"]), int(row["source_channels"]), int(row["num_samples"]),
                          arrays, model.sample_rate, bandwidth, segmented))
        progress.update(done=1, seconds=int(row["num_samples"]) / model.sample_rate)
    return True
