"""What to tokenize: inputs (directories, files, globs, manifests, tar archives) -> items, and `--shard i/n`.

An item is one row of output: a whole file, or the span [start, end) seconds of one, or an audio
member of an uncompressed tar archive (WebDataset shards: `key.flac` next to `key.json`; the other
members are skipped). Its id is the key of resume and of the output: the path relative to the
directory it was found in, the path as given for files and glob matches, or the manifest's `id`
(default: the path, with `@start-end` for a span); a tar member's is the archive's id, `/`, and the
member's name.
"""

import csv
import dataclasses
import glob
import json
import math
import os
import tarfile
import typing as tp
import zlib
from pathlib import Path

AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".w64", ".opus"})
MANIFEST_EXTENSIONS = frozenset({".txt", ".lst", ".jsonl", ".csv", ".tsv"})
#: Archives whose audio members are items (read in place: a member is a byte range of the archive).
TAR_EXTENSIONS = frozenset({".tar"})
#: Compressed archives: a member cannot be read without decompressing what comes before it.
COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")


@dataclasses.dataclass(frozen=True)
class Item:
    id: str
    path: str
    start: tp.Optional[float] = None  # seconds; None: from the beginning
    end: tp.Optional[float] = None    # seconds; None: to the end
    offset: int = -1                  # >= 0: the audio is the `size` bytes at this offset of `path` (a tar member)
    size: int = 0


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


def _is_compressed_tar(name: str) -> bool:
    return name.lower().endswith(COMPRESSED_TAR_SUFFIXES)


def _tar_items(path: Path, archive_id: str) -> tp.Iterator[tp.Union[Item, Problem]]:
    """The audio members of an uncompressed tar archive as items (id: archive_id/member name), each a
    byte range of the archive; a problem for an archive that cannot be listed or holds no audio."""
    if _is_compressed_tar(path.name):
        yield Problem(archive_id, str(path), "compressed tar archive: its members cannot be read in place; "
                                             "repack it uncompressed (tar -xf, then tar -cf NAME.tar)")
        return
    found = 0
    try:
        with tarfile.open(path, mode="r:") as archive:
            for member in archive:
                if not member.isreg() or member.issparse() or Path(member.name).suffix.lower() not in AUDIO_EXTENSIONS:
                    continue
                name = member.name[2:] if member.name.startswith("./") else member.name
                found += 1
                yield Item(f"{archive_id}/{name}", str(path), offset=member.offset_data, size=member.size)
    except (tarfile.TarError, OSError) as exc:
        yield Problem(archive_id, str(path), f"unreadable tar archive: {exc}")
        return
    if not found:
        yield Problem(archive_id, str(path), "no audio files in this tar archive")


def _is_tar(p: Path) -> bool:
    return p.suffix.lower() in TAR_EXTENSIONS or _is_compressed_tar(p.name)


def _wanted(p: Path) -> bool:
    """A file the directory scan and patterns take: audio, or an archive of audio."""
    return p.suffix.lower() in AUDIO_EXTENSIONS or _is_tar(p)


def _file_items(p: Path, item_id: str) -> tp.Iterator[tp.Union[Item, Problem]]:
    if _is_tar(p):
        yield from _tar_items(p, item_id)
    else:
        yield Item(item_id, str(p))


def _expand(spec: str) -> tp.Iterator[tp.Union[Item, Problem]]:
    path = Path(spec)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if _wanted(p) and p.is_file())
        for p in found:
            yield from _file_items(p, p.relative_to(path).as_posix())
        if not found:
            yield Problem(spec, spec, "no audio files in this directory")
    elif path.is_file():
        if path.suffix.lower() in MANIFEST_EXTENSIONS:
            yield from _read_manifest(path)
        else:
            yield from _file_items(path, path.as_posix())
    else:
        matches = sorted(m for m in glob.glob(spec, recursive=True) if _wanted(Path(m)) and os.path.isfile(m))
        for m in matches:
            yield from _file_items(Path(m), Path(m).as_posix())
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
