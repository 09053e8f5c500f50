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


class RaggedRows:
    """Rows of a batch, each with its own valid length, every op one call for the whole batch.

    `Groups` runs the shape-sensitive ops once per group so that CPU results keep upstream's bits;
    on a GPU that is a launch per clip per layer, and lengths held as Python numbers tie a captured
    CUDA graph to one batch. Here the valid lengths are a device tensor: a convolution's padding is
    rebuilt for every row at once by one gather (`padded`), each row reflected at its own end with
    upstream's rule for short inputs; elementwise ops, the LSTM (it runs forward in time, so the
    steps past a row's end never reach its valid steps) and the codebook search run on the whole
    batch. Every shape comes from the batch tensor, so a batch padded to a fixed width (a length
    bucket) repeats its shapes whatever its clips' lengths.

    The same values as `Groups` in exact arithmetic; on CPU the ELU's and the LSTM's roundings can
    depend on the call's shape, which is why `Groups` stays the CPU path.
    """

    def __init__(self, lengths: torch.Tensor):
        if lengths.dim() != 1 or lengths.dtype != torch.int64:
            raise ValueError(f"lengths must be a 1-d int64 tensor, got {tuple(lengths.shape)} {lengths.dtype}")
        self.lengths = lengths

    def uniform(self, x: torch.Tensor) -> bool:
        return False

    def map_lengths(self, fn: tp.Callable[[torch.Tensor], torch.Tensor]) -> "RaggedRows":
        """`fn` maps the lengths tensor (e.g. a convolution's `output_length`, tensor-friendly)."""
        return RaggedRows(fn(self.lengths))

    def elu_(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu_(x)

    def valid(self, width: int) -> torch.Tensor:
        """[N, width] bool: the positions inside each row."""
        return torch.arange(width, device=self.lengths.device)[None, :] < self.lengths[:, None]

    def padded(self, x: torch.Tensor, left: int, fixed_right: int, stride: int, width: int,
               mode: str) -> torch.Tensor:
        """Each row's valid part padded as `pad1d(row, (left, fixed_right + extra), mode)` with
        extra = ceil(L / stride) * stride - L for its length L, written at the start of a
        [N, C, width] tensor (zeros after it)."""
        L = self.lengths[:, None]
        extra = (L + stride - 1) // stride * stride - L
        right = fixed_right + extra
        j = torch.arange(width, device=x.device)[None, :] - left
        if mode == "reflect":
            # upstream's pad1d: a row no longer than the padding is first extended with zeros to
            # max(left, right) + 1 samples, reflected, then cut back to left + L + right
            span = torch.maximum(L, torch.clamp(right, min=left) + 1)
            src = torch.where(j < 0, -j, torch.where(j >= span, 2 * (span - 1) - j, j))
        elif mode in ("constant", "zero"):
            src = j
        else:
            raise ValueError(f"padding mode {mode!r} is not supported for ragged rows")
        inside = (src >= 0) & (src < L) & (j < L + right)
        index = src.clamp(0, max(x.shape[-1] - 1, 0))
        N, C = x.shape[:2]
        out = torch.gather(x, 2, index[:, None, :].expand(N, C, width))
        return out.masked_fill_(~inside[:, None, :], 0)
