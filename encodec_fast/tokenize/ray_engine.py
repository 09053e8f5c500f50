"""The Ray engine (`--engine ray`): the same stages on Ray Data, for clusters.

read (the item list) -> decode/resample in CPU tasks -> encode in actors (one per GPU, or CPU
actors) -> rows back to the driver, which commits shards with the local engine's sink. The sink
(and so resume: the done-list, atomic shards, exactly-once) is the same as the local engine's;
the driver filters done items before the dataset is built. `ray.init(address=...)` joins a
running cluster (`address="auto"` or ray://...), or starts a local instance when none is given.
"""

import copy
import typing as tp

import numpy as np
import torch

from ..model import EncodecModel
from .loading import load_or_error
from .local import Progress, encode_wavs, make_row, segment_arrays
from .sink import ShardSink
from .sources import Item


def _decode(row: tp.Dict[str, tp.Any], sample_rate: int, channels: int) -> tp.Dict[str, tp.Any]:
    torch.set_num_threads(1)
    loaded = load_or_error(row["index"], Item(row["id"], row["path"], row["start"], row["end"]), sample_rate, channels)
    wav = loaded.wav.numpy() if loaded.wav is not None else np.zeros((channels, 0), np.float32)
    return {"index": row["index"], "error": loaded.error, "source_rate": loaded.source_rate,
            "source_channels": loaded.source_channels, "wav": wav}


class _Encoder:
    """A Ray Data actor holding the model: a batch of decoded rows -> codes (or errors)."""

    def __init__(self, model_ref, device: str, budget: int, chunk_seconds: float):
        import ray
        self.model = ray.get(model_ref).to(device).eval()
        self.device, self.budget, self.chunk_seconds = torch.device(device), budget, chunk_seconds

    def __call__(self, batch: tp.Dict[str, np.ndarray]) -> tp.Dict[str, tp.Any]:
        n = len(batch["index"])
        out: tp.Dict[str, tp.List[tp.Any]] = {"index": list(batch["index"]), "error": list(batch["error"]),
                                             "codes": [np.zeros((0, 0), np.int16)] * n, "scales": [[]] * n,
                                             "segment_frames": [[]] * n, "num_samples": [0] * n,
                                             "source_rate": list(batch["source_rate"]),
                                             "source_channels": list(batch["source_channels"])}
        good = [i for i in range(n) if not batch["error"][i]]
        wavs = {i: torch.from_numpy(np.asarray(batch["wav"][i], dtype=np.float32)).to(self.device) for i in good}
        try:
            encoded = dict(zip(good, encode_wavs(self.model, [wavs[i] for i in good], self.budget, self.chunk_seconds)))
        except (RuntimeError, ValueError):  # out of memory, or an input the model refuses: find which, alone
            encoded = {}
            for i in good:
                try:
                    (encoded[i],) = encode_wavs(self.model, [wavs[i]], self.budget, self.chunk_seconds)
                except (RuntimeError, ValueError) as exc:
                    out["error"][i] = f"encoding failed: {exc}"
        for i, segments in encoded.items():
            cpu = [(c.cpu(), None if s is None else s.cpu()) for c, s in segments]
            out["codes"][i], out["scales"][i], out["segment_frames"][i] = segment_arrays(cpu)
            out["num_samples"][i] = int(wavs[i].shape[-1])
        return out


def run_ray(model: EncodecModel, items: tp.Sequence[Item], sink: ShardSink, bandwidth: float,
            device: torch.device, batch_seconds: float, workers: int, progress: Progress, chunk_seconds: float,
            address: tp.Optional[str] = None, encoders: tp.Optional[int] = None) -> None:
    import ray
    if not items:
        return
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    cuda = device.type == "cuda"
    if encoders is None:
        encoders = max(1, int(ray.cluster_resources().get("GPU", 0))) if cuda else 1
    model_ref = ray.put(copy.deepcopy(model).cpu())  # a copy: the caller's model stays where it is
    rows = [{"index": i, "id": it.id, "path": it.path, "start": it.start, "end": it.end} for i, it in enumerate(items)]
    ds = ray.data.from_items(rows)
    ds = ds.map(_decode, fn_kwargs={"sample_rate": model.sample_rate, "channels": model.channels}, num_cpus=1)
    ds = ds.map_batches(_Encoder, fn_constructor_kwargs={
        "model_ref": model_ref, "device": "cuda" if cuda else "cpu",
        "budget": max(1, int(batch_seconds * model.sample_rate)), "chunk_seconds": chunk_seconds},
        batch_size=4, concurrency=encoders, num_gpus=1 if cuda else 0, num_cpus=0 if cuda else 1,
        batch_format="numpy")
    segmented = model.segment is not None
    for row in ds.iter_rows():
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
