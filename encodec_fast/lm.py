"""The entropy-coding language model (architecture and checkpoint loading).

Coding with it (`compress(..., use_lm=True)`) is not implemented yet.
"""

import typing as tp

import torch
from torch import nn

from .modules.transformer import StreamingTransformerEncoder


class LMModel(nn.Module):
    """Predicts, for every codebook in parallel, the distribution of the next frame's code.

    forward(indices[B, K, T], states, offset) -> (probabilities [B, card, K, T], states, offset).
    `indices` are 1 + the previous frame's codes; 0 means "no previous frame".
    """

    def __init__(self, n_q: int = 32, card: int = 1024, dim: int = 200, **kwargs):
        super().__init__()
        self.card = card
        self.n_q = n_q
        self.dim = dim
        self.transformer = StreamingTransformerEncoder(dim=dim, **kwargs)
        self.emb = nn.ModuleList([nn.Embedding(card + 1, dim) for _ in range(n_q)])
        self.linears = nn.ModuleList([nn.Linear(dim, card) for _ in range(n_q)])

    def forward(self, indices: torch.Tensor, states: tp.Optional[tp.List[torch.Tensor]] = None, offset: int = 0):
        B, K, T = indices.shape
        if K > self.n_q:
            raise ValueError(f"{K} codebooks given, the LM has {self.n_q}")
        x = sum([self.emb[k](indices[:, k]) for k in range(K)])
        out, states, offset = self.transformer(x, states, offset)
        logits = torch.stack([self.linears[k](out) for k in range(K)], dim=1).permute(0, 3, 1, 2)
        return torch.softmax(logits, dim=1), states, offset
