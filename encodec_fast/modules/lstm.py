"""LSTM over the time axis of a [B, C, T] tensor, with a skip connection."""

import typing as tp

import torch
from torch import nn
from torch.nn import functional as F

from .. import timing
from .groups import Groups, RaggedRows


class SLSTM(nn.Module):
    """`nn.LSTM(dim, dim, num_layers)` on [T, B, C], plus the input (skip), back to [B, C, T].

    The ELU that follows the LSTM in SEANet can be applied here (`elu=True`) so that it runs on
    the LSTM's own [T, B, C] memory layout, as upstream's `nn.ELU` does.
    """

    def __init__(self, dimension: int, num_layers: int = 2, skip: bool = True):
        super().__init__()
        self.skip = skip
        self.lstm = nn.LSTM(dimension, dimension, num_layers)

    def run(self, x: torch.Tensor, elu: bool, state: tp.Optional[tp.Tuple[torch.Tensor, torch.Tensor]] = None
            ) -> tp.Tuple[torch.Tensor, tp.Tuple[torch.Tensor, torch.Tensor]]:
        """x [B, C, T] -> (output [B, C, T], the LSTM's (h, c) after it); `state` continues an
        earlier call (streaming), None starts from zeros."""
        x = x.permute(2, 0, 1)
        y, state = self.lstm(x, state)
        if self.skip:
            y = y + x
        y = y.permute(1, 2, 0)
        if elu:
            y = F.elu(y) if torch.is_grad_enabled() else F.elu_(y)
        return y, state

    def _run(self, x: torch.Tensor, elu: bool) -> torch.Tensor:
        return self.run(x, elu)[0]

    def forward(self, x: torch.Tensor, groups: tp.Optional[Groups] = None, elu: bool = False) -> torch.Tensor:
        with timing.stage("encoder LSTM", x.device):
            if groups is None or isinstance(groups, RaggedRows) or groups.uniform(x):
                return self._run(x, elu)  # (ragged rows: forward in time, padding never reaches a valid step)
            # The LSTM's results depend on the batch size: run each group as its own call.
            out = x.new_zeros(x.shape)
            for g in groups:
                out[g.start:g.stop, :, : g.length] = self._run(groups.slab(x, g).contiguous(), elu)
            return out
