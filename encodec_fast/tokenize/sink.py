"""Output of a tokenize job: Parquet shards, committed atomically, and what resume needs.

    OUT_DIR/part-s{i}of{n}-{seq:06d}.parquet  one row per tokenized item (schema: `SCHEMA`)
    OUT_DIR/_config.json                      model, bandwidth, checkpoint hash: a resume must match
    OUT_DIR/_errors/part-...jsonl             the failed items committed with that shard
    OUT_DIR/_errors.jsonl                     all failed items, one JSON line each (id, path, error)
    OUT_DIR/_manifest.json                    config + counts over everything committed

Names starting with "_" or "." are what pyarrow, DuckDB globs of part-*.parquet and Hugging Face
`datasets` leave out, so the directory reads as one Parquet dataset as it is.

One job writes each `--shard i/n` of a directory: it holds `shard_lock` (OUT_DIR/.lock-s{i}of{n},
an `encodec_fast.jobs.OutputLock`, dropped by the OS when the process ends) before it opens a sink; a
second job on the same shard is refused at once. Jobs on different shards run side by side.

A shard is written to a temporary name, flushed to disk, then renamed: a killed job leaves
only whole shards. Its errors file is committed first, then the shard. The ids in committed
shards and error files are the done-list: a restarted job skips them, so every item lands
exactly once (a job killed between the two renames redoes that shard's good items; its failed
ones are already recorded).
"""

import hashlib
import json
import typing as tp
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ..jobs import OutputLock, written_then_renamed

FORMAT = "encodec_fast.codes/1"

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("path", pa.string()),
    ("start", pa.float64()),               # seconds into the file; null: its beginning
    ("end", pa.float64()),                 # null: its end
    ("sample_rate", pa.int32()),           # the model's
    ("source_sample_rate", pa.int32()),
    ("source_channels", pa.int16()),
    ("num_samples", pa.int64()),           # audio length at the model's rate
    ("frames", pa.int32()),
    ("codebooks", pa.int16()),
    ("bandwidth", pa.float32()),
    ("scales", pa.list_(pa.float32())),          # 48 kHz: one scale per segment; null for 24 kHz
    ("segment_frames", pa.list_(pa.int32())),    # 48 kHz: frames of each segment; null for 24 kHz
    ("codes", pa.list_(pa.list_(pa.int16()))),   # [codebooks][frames]
])

ROW_GROUP_ROWS = 64  # rows per Parquet row group: CodesDataset reads one group at a time


def write_json_atomic(path: Path, obj: tp.Any) -> None:
    with written_then_renamed(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def state_dict_sha256(state: tp.Mapping[str, tp.Any]) -> str:
    """SHA-256 over the names and bytes of a state dict's tensors (in name order)."""
    h = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        h.update(name.encode())
        if hasattr(value, "detach"):
            h.update(str(value.dtype).encode() + str(tuple(value.shape)).encode())
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def codes_table(rows: tp.Sequence[tp.Dict[str, tp.Any]]) -> pa.Table:
    """Rows (dicts with the schema's fields; `codes` an int16 array [K, T]) -> a Parquet table."""
    columns: tp.Dict[str, tp.Any] = {}
    for field in SCHEMA:
        if field.name != "codes":
            columns[field.name] = pa.array([r.get(field.name) for r in rows], type=field.type)
    codes = [np.ascontiguousarray(r["codes"], dtype=np.int16) for r in rows]
    values = pa.array(np.concatenate([c.reshape(-1) for c in codes]) if codes else np.zeros(0, np.int16))
    inner = np.concatenate([[0], np.cumsum([c.shape[1] for c in codes for _ in range(c.shape[0])])]).astype(np.int32)
    outer = np.concatenate([[0], np.cumsum([c.shape[0] for c in codes])]).astype(np.int32)
    per_codebook = pa.ListArray.from_arrays(pa.array(inner), values)
    columns["codes"] = pa.ListArray.from_arrays(pa.array(outer), per_codebook)
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def shard_lock(out_dir: tp.Union[str, Path], shard: tp.Tuple[int, int] = (0, 1)) -> OutputLock:
    """The lock a job holds while it writes `shard` of `out_dir` (acquire it before opening a sink)."""
    return OutputLock(Path(out_dir) / f".lock-s{shard[0]}of{shard[1]}", f"{out_dir} (shard {shard[0]}/{shard[1]})")


class ShardSink:
    """Commits rows and errors of one job (one `--shard i/n`) to `out_dir`; the caller holds `shard_lock`."""

    def __init__(self, out_dir: tp.Union[str, Path], config: tp.Dict[str, tp.Any], shard: tp.Tuple[int, int] = (0, 1),
                 overwrite: bool = False, rows_per_shard: int = 1000):
        self.out = Path(out_dir)
        self.tag = f"s{shard[0]}of{shard[1]}"
        self.rows_per_shard = rows_per_shard
        self.config = {"format": FORMAT, **config}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "_errors").mkdir(exist_ok=True)
        if overwrite:
            self._remove_outputs()
        self._check_config()
        stale = [*self.out.glob(f".part-{self.tag}-*.tmp"), *self.out.glob(f"_errors/.part-{self.tag}-*.tmp")]
        for path in stale:
            path.unlink()  # left by a killed run of this shard
        self.failed_before = {e["id"] for e in read_errors(self.out)}  # failed in committed error files
        self.done: tp.Set[str] = set(shard_ids(self.out)) | self.failed_before
        existing = [int(p.stem.rsplit("-", 1)[1]) for p in self.out.glob(f"part-{self.tag}-*.parquet")]
        existing += [int(p.stem.rsplit("-", 1)[1]) for p in self.out.glob(f"_errors/part-{self.tag}-*.jsonl")]
        self.seq = max(existing, default=-1) + 1
        self.rows: tp.List[tp.Dict[str, tp.Any]] = []
        self.errors: tp.List[tp.Dict[str, str]] = []

    def _remove_outputs(self) -> None:
        for p in [*self.out.glob("part-*.parquet"), *self.out.glob(".part-*.tmp"), *self.out.glob("_errors/*"),
                  self.out / "_errors.jsonl", self.out / "_manifest.json", self.out / "_config.json"]:
            if p.is_file():
                p.unlink()

    def _check_config(self) -> None:
        path = self.out / "_config.json"
        if path.exists():
            old = json.loads(path.read_text())
            keys = set(old) | set(self.config)
            differ = sorted(k for k in keys if k != "encodec_fast_version" and old.get(k) != self.config.get(k))
            if differ:
                raise ValueError(f"{self.out} holds codes made with another setting ({', '.join(differ)}: "
                                 f"{[old.get(k) for k in differ]} there, {[self.config.get(k) for k in differ]} now); "
                                 "use --overwrite to start over, or another output directory")
        elif any(self.out.glob("part-*.parquet")):
            raise ValueError(f"{self.out} holds shards but no _config.json; use --overwrite or another directory")
        else:
            write_json_atomic(path, self.config)

    def add(self, row: tp.Dict[str, tp.Any]) -> None:
        self.rows.append(row)
        self._maybe_commit()

    def add_error(self, item_id: str, path: str, error: str) -> None:
        self.errors.append({"id": item_id, "path": path, "error": error})
        self._maybe_commit()

    def _maybe_commit(self) -> None:
        if len(self.rows) + len(self.errors) >= self.rows_per_shard:
            self.commit()

    def commit(self) -> None:
        if not self.rows and not self.errors:
            return
        name = f"part-{self.tag}-{self.seq:06d}"
        if self.errors:
            errors_dir = self.out / "_errors"
            with written_then_renamed(errors_dir / f"{name}.jsonl", errors_dir / f".{name}.tmp") as tmp:
                tmp.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in self.errors))
        if self.rows:
            with written_then_renamed(self.out / f"{name}.parquet", self.out / f".{name}.tmp") as tmp:
                pq.write_table(codes_table(self.rows), tmp, row_group_size=ROW_GROUP_ROWS)
        self.done.update(r["id"] for r in self.rows)
        self.done.update(e["id"] for e in self.errors)
        self.rows, self.errors = [], []
        self.seq += 1

    def close(self, extra: tp.Optional[tp.Dict[str, tp.Any]] = None) -> tp.Dict[str, tp.Any]:
        """Commit what is buffered; rewrite _errors.jsonl and _manifest.json from everything
        committed in the directory (all shards of the job). Returns the manifest."""
        self.commit()
        errors = read_errors(self.out)
        with written_then_renamed(self.out / "_errors.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in errors))
        shards = sorted(self.out.glob("part-*.parquet"))
        items = frames = 0
        seconds = 0.0
        for shard in shards:
            t = pq.read_table(shard, columns=["frames", "num_samples", "sample_rate"])
            items += t.num_rows
            frames += int(pc.sum(t["frames"]).as_py() or 0)
            seconds += float(pc.sum(pc.divide(pc.cast(t["num_samples"], pa.float64()),
                                              pc.cast(t["sample_rate"], pa.float64()))).as_py() or 0)
        manifest = {**self.config, "items": items, "failed": len(errors), "frames": frames,
                    "audio_hours": seconds / 3600, "shards": [s.name for s in shards], **(extra or {})}
        write_json_atomic(self.out / "_manifest.json", manifest)
        return manifest


def read_errors(out_dir: tp.Union[str, Path]) -> tp.List[tp.Dict[str, str]]:
    errors: tp.List[tp.Dict[str, str]] = []
    for part in sorted(Path(out_dir).glob("_errors/part-*.jsonl")):
        errors += [json.loads(line) for line in part.read_text().splitlines() if line.strip()]
    return errors


def shard_ids(out_dir: tp.Union[str, Path]) -> tp.Iterator[str]:
    """Ids in committed shards."""
    for shard in sorted(Path(out_dir).glob("part-*.parquet")):
        yield from pq.read_table(shard, columns=["id"])["id"].to_pylist()
