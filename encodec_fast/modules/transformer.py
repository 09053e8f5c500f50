"""Streaming transformer used by the entropy-coding LM.

Each layer is a post-norm `nn.TransformerEncoderLayer` whose self-attention sees, for the query
at absolute step t, the inputs of steps t - past_context .. t. The state kept between calls is,
per layer, the last `past_context` layer *inputs* (initially one zero vector, which acts as a
start token until it slides out of the window).
"""

import typing as tp

import torch
from torch import nn
from torch.nn import functional as F


def create_sin_embedding(positions: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """positions [..., T, 1] -> [..., T, dim]: cos for the first half, sin for the second."""
    if dim % 2:
        raise ValueError("dim must be even")
    half = dim // 2
    adim = torch.arange(half, device=positions.device).view(1, 1, -1)
    phase = positions / (max_period ** (adim / (half - 1)))
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


class StreamingTransformerEncoderLayer(nn.TransformerEncoderLayer):
    def forward(self, x: torch.Tensor, x_past: torch.Tensor, past_context: int):  # type: ignore[override]
        """x [B, T, C], x_past [B, H, C] -> (output [B, T, C], this layer's input for the state)."""
        if self.norm_first:
            sa_input = self.norm1(x)
            x = x + self._sa(sa_input, x_past, past_context)
            x = x + self._ff_block(self.norm2(x))
        else:
            sa_input = x
            x = self.norm1(x + self._sa(sa_input, x_past, past_context))
            x = self.norm2(x + self._ff_block(x))
        return x, sa_input

    def _sa(self, x: torch.Tensor, x_past: torch.Tensor, past_context: int) -> torch.Tensor:
        T, H = x.shape[1], x_past.shape[1]
        keys = torch.cat([x_past, x], dim=1)
        delta = torch.arange(H, T + H, device=x.device).view(-1, 1) - torch.arange(T + H, device=x.device).view(1, -1)
        allowed = (delta >= 0) & (delta <= past_context)
        out = self.self_attn(x, keys, keys, attn_mask=~allowed, need_weights=False)[0]
        return self.dropout1(out)


class StreamingTransformerEncoder(nn.Module):
    """Transformer encoder with streaming state (see module docstring)."""

    def __init__(self, dim: int, hidden_scale: float = 4.0, num_heads: int = 8, num_layers: int = 5,
                 max_period: float = 10000, past_context: int = 1000, gelu: bool = True, norm_in: bool = True,
                 dropout: float = 0.0, **kwargs):
        super().__init__()
        if dim % num_heads:
            raise ValueError("dim must be a multiple of num_heads")
        self.max_period = max_period
        self.past_context = past_context
        activation: tp.Any = F.gelu if gelu else F.relu
        self.norm_in: nn.Module = nn.LayerNorm(dim) if norm_in else nn.Identity()
        self.layers = nn.ModuleList([
            StreamingTransformerEncoderLayer(dim, num_heads, int(dim * hidden_scale), activation=activation,
                                             batch_first=True, dropout=dropout, **kwargs)
            for _ in range(num_layers)])

    def forward(self, x: torch.Tensor, states: tp.Optional[tp.List[torch.Tensor]] = None,
                offset: tp.Union[int, torch.Tensor] = 0):
        """x [B, T, C] -> (out [B, T, C], new states, offset + T)."""
        B, T, C = x.shape
        if states is None:
            states = [torch.zeros_like(x[:, :1]) for _ in range(1 + len(self.layers))]
        positions = torch.arange(T, device=x.device).view(1, -1, 1) + offset
        x = self.norm_in(x) + create_sin_embedding(positions, C, max_period=self.max_period)
        new_states: tp.List[torch.Tensor] = []
        for state, layer in zip(states, self.layers):
            x, layer_input = layer(x, state, self.past_context)
            new_states.append(torch.cat([state, layer_input], dim=1)[:, -self.past_context:, :])
        return x, new_states, offset + T
