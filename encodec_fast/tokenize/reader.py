"""Reading tokenized corpora back: `read_codes` (an iterator of rows) and `CodesDataset` (a lazy,
indexable torch Dataset for training language models on the codes)."""

import functools
import typing as tp
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch


def _shards(out_dir: tp.Union[str, Path]) -> tp.List[Path]:
    shards = sorted(Path(out_dir).glob("part-*.parquet"))
    if not shards and not Path(out_dir).is_dir():
        raise FileNotFoundError(f"no such directory: {out_dir}")
    return shards


def _codes_of(column, row: int) -> np.ndarray:
    """codes of one row of a list<list<int16>> column -> int16 [K, T]."""
    per_codebook = column[row].values  # ListArray of K lists
    k = len(per_codebook)
    flat = per_codebook.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(k, -1) if k else flat.reshape(0, 0)


def read_codes(out_dir: tp.Union[str, Path], columns: tp.Optional[tp.Sequence[str]] = None
               ) -> tp.Iterator[tp.Dict[str, tp.Any]]:
    """Every row of every committed shard in `out_dir`, as a dict; `codes` as int16 [K, T]."""
    for shard in _shards(out_dir):
        f = pq.ParquetFile(shard)
        for group in range(f.num_row_groups):
            table = f.read_row_group(group, columns=list(columns) if columns else None)
            names = [n for n in table.column_names if n != "codes"]
            plain = table.select(names).to_pylist()
            codes = table.column("codes").combine_chunks() if "codes" in table.column_names else None
            for i, row in enumerate(plain):
                if codes is not None:
                    row["codes"] = _codes_of(codes, i)
                yield row


class CodesDataset(torch.utils.data.Dataset):
    """Lazy dataset over a tokenize output directory: item i -> dict with `codes` (LongTensor
    [K, T]) and the row's other fields. Only row counts are read up front; rows are read one
    Parquet row group at a time (a few groups cached per worker)."""

    def __init__(self, out_dir: tp.Union[str, Path], columns: tp.Sequence[str] = ("id", "codes")):
        self.columns = list(columns) if "codes" in columns else ["codes", *columns]
        self.index: tp.List[tp.Tuple[Path, int, int]] = []  # (shard, group, rows in group)
        for shard in _shards(out_dir):
            meta = pq.ParquetFile(shard).metadata
            self.index += [(shard, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        self.starts = np.cumsum([0] + [n for _, _, n in self.index])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @functools.lru_cache(maxsize=4)
    def _group(self, position: int):
        """Row group `position` -> (its table, its codes column in one chunk)."""
        shard, group, _ = self.index[position]
        table = pq.ParquetFile(shard).read_row_group(group, columns=self.columns)
        return table, table.column("codes").combine_chunks()

    def __getitem__(self, i: int) -> tp.Dict[str, tp.Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        position = int(np.searchsorted(self.starts, i, side="right")) - 1
        table, codes = self._group(position)
        row = i - int(self.starts[position])
        out = {n: table.column(n)[row].as_py() for n in table.column_names if n != "codes"}
        out["codes"] = torch.from_numpy(_codes_of(codes, row).astype(np.int64))
        return out
