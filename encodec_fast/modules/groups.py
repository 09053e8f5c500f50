"""Rows of a batch that share a valid length.

A batch `x[N, C, T]` may stack inputs that upstream would run in separate calls: the segments of
a 48 kHz file, or clips of different lengths. A `Group` is a run of rows `[start, stop)` whose
first `length` time steps are valid; what lies beyond is padding that never reaches a valid
output (the convolutions are padded per group and, for the causal model, an output frame only
depends on the inputs before it).

Convolutions and GroupNorm give each row the same bits whatever else is in the batch, so they run
on the whole batch. Operations whose CPU results depend on the shape of the call — elementwise
kernels (their vectorised and scalar tails round differently), the LSTM and small matrix products
— run once per group, on a contiguous tensor of exactly the shape upstream would have used. This
is what makes batched codes equal the codes of separate calls.
"""

import dataclasses
import typing as tp

import torch
from torch.nn import functional as F


@dataclasses.dataclass(frozen=True)
class Group:
    start: int
    stop: int
    length: int


class Groups(tp.Sequence[Group]):
    def __init__(self, groups: tp.Sequence[Group]):
        self._groups = list(groups)
        if not self._groups:
            raise ValueError("empty Groups")

    @classmethod
    def by_rows(cls, rows_per_group: int, lengths: tp.Sequence[int]) -> "Groups":
        """Groups of `rows_per_group` consecutive rows, one per entry of `lengths`."""
        return cls([Group(i * rows_per_group, (i + 1) * rows_per_group, n) for i, n in enumerate(lengths)])

    def __getitem__(self, i):  # type: ignore[override]
        return self._groups[i]

    def __len__(self):
        return len(self._groups)

    def uniform(self, x: torch.Tensor) -> bool:
        """True when one group covers the whole batch at full length (upstream's own call)."""
        g = self._groups[0]
        return len(self._groups) == 1 and g.start == 0 and g.stop == x.shape[0] and g.length == x.shape[-1]

    def map_lengths(self, fn: tp.Callable[[int], int]) -> "Groups":
        return Groups([Group(g.start, g.stop, fn(g.length)) for g in self._groups])

    def slab(self, x: torch.Tensor, g: Group, elu_first: bool = False) -> torch.Tensor:
        """The valid part of group `g` as a contiguous tensor, ELU applied if asked."""
        s = x[g.start:g.stop, :, : g.length]
        if not elu_first:
            return s
        if s.is_contiguous():
            return F.elu(s)
        return F.elu_(s.contiguous())

    def elu_(self, x: torch.Tensor) -> torch.Tensor:
        """ELU in place on each group's valid part, one call per group."""
        for g in self._groups:
            s = x[g.start:g.stop, :, : g.length]
            if s.is_contiguous():
                F.elu_(s)
            else:
                s.copy_(F.elu_(s.contiguous()))
        return x
