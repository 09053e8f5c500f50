"""What to tokenize: inputs (directories, files, globs, manifests) -> items, and `--shard i/n`.

An item is one row of output: a whole file, or the span [start, end) seconds of one. Its id is
the key of resume and of the output: the path relative to the directory it was found in, the path
as given for files and glob matches, or the manifest's `id` (default: the path, with
`@start-end` for a span).
"""

import csv
import dataclasses
import glob
import json
import math
import os
import typing as tp
import zlib
from pathlib import Path

AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".w64", ".opus"})
MANIFEST_EXTENSIONS = frozenset({".txt", ".lst", ".jsonl", ".csv", ".tsv"})


@dataclasses.dataclass(frozen=True)
class Item:
    id: str
    path: str
    start: tp.Optional[float] = None  # seconds; None: from the beginning
    end: tp.Optional[float] = None    # seconds; None: to the end


@dataclasses.dataclass(frozen=True)
class Problem:
    """An input that yields no item (nothing matched, a bad manifest line, a duplicate id)."""
    id: str
    path: str
    error: str


def parse_shard(text: str) -> tp.Tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: i must be in [0, n)")
    return i, n


def in_shard(item_id: str, shard: tp.Tuple[int, int]) -> bool:
    """Items go to shards by a hash of their id: the same split whatever else the inputs hold."""
    i, n = shard
    return n == 1 or zlib.crc32(item_id.encode("utf-8")) % n == i


def _span(value: tp.Any, name: str) -> tp.Optional[float]:
    if value is None or value == "":
        return None
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return number


def _manifest_item(base: Path, record: tp.Dict[str, tp.Any]) -> Item:
    path = record.get("path")
    if not isinstance(path, str) or not path:
        raise ValueError("no 'path'")
    start, end = _span(record.get("start"), "start"), _span(record.get("end"), "end")
    if start is not None and end is not None and end <= start:
        raise ValueError(f"end ({end}) must be after start ({start})")
    full = path if os.path.isabs(path) else str(base / path)
    item_id = record.get("id")
    if item_id in (None, ""):
        item_id = (path if start is None and end is None
                   else f"{path}@{start or 0:g}-{'' if end is None else f'{end:g}'}")
    return Item(str(item_id), full, start, end)


def _read_manifest(path: Path) -> tp.Iterator[tp.Union[Item, Problem]]:
    base = path.parent
    suffix = path.suffix.lower()
    with open(path, newline="", encoding="utf-8") as f:
        if suffix in (".csv", ".tsv"):
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                yield Problem(str(path), str(path), "manifest without a 'path' column")
                return
            rows: tp.Iterable[tp.Tuple[int, tp.Any]] = enumerate(reader, start=2)
        else:
            rows = enumerate(f, start=1)
        for number, row in rows:
            where = f"{path}:{number}"
            try:
                if suffix == ".jsonl":
                    if not row.strip():
                        continue
                    record = json.loads(row)
                    if not isinstance(record, dict):
                        raise ValueError("not a JSON object")
                elif suffix in (".csv", ".tsv"):
                    record = row
                else:
                    line = row.strip()
                    if not line or line.startswith("#"):
                        continue
                    record = {"path": line}
                yield _manifest_item(base, record)
            except ValueError as exc:
                yield Problem(where, where, f"bad manifest line: {exc}")


def _expand(spec: str) -> tp.Iterator[tp.Union[Item, Problem]]:
    path = Path(spec)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
        for p in found:
            yield Item(p.relative_to(path).as_posix(), str(p))
        if not found:
            yield Problem(spec, spec, "no audio files in this directory")
    elif path.is_file():
        if path.suffix.lower() in MANIFEST_EXTENSIONS:
            yield from _read_manifest(path)
        else:
            yield Item(path.as_posix(), str(path))
    else:
        matches = sorted(m for m in glob.glob(spec, recursive=True)
                         if Path(m).suffix.lower() in AUDIO_EXTENSIONS and os.path.isfile(m))
        for m in matches:
            yield Item(Path(m).as_posix(), m)
        if not matches:
            yield Problem(spec, spec, "no such file or directory, and no audio file matches it as a pattern")


def list_items(inputs: tp.Sequence[tp.Union[str, Path]],
               shard: tp.Tuple[int, int] = (0, 1)) -> tp.Tuple[tp.List[Item], tp.List[Problem]]:
    """Items of this shard (sorted by id) and the problems found while listing (also of this shard).
    A second item with an id already seen is a problem, not an item."""
    items: tp.Dict[str, Item] = {}
    problems: tp.List[Problem] = []
    for spec in inputs:
        for found in _expand(str(spec)):
            if not in_shard(found.id, shard):
                continue
            if isinstance(found, Problem):
                problems.append(found)
            elif found.id in items:
                if items[found.id] != found:
                    problems.append(Problem(found.id + f" ({found.path})", found.path,
                                            f"duplicate id {found.id!r} (first from {items[found.id].path})"))
            else:
                items[found.id] = found
    return [items[k] for k in sorted(items)], problems
