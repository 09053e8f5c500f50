"""The entropy-coding language model: architecture, checkpoint loading, and `LMStream`, the
frame-by-frame run with a key/value cache that LM-mode `.ecdc` coding uses.
"""

import contextlib
import typing as tp

import torch
from torch import nn
from torch.nn import functional as F

from .modules.transformer import StreamingTransformerEncoder, create_sin_embedding


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
        out, states, offset = self.transformer(self._embed(indices), states, offset)
        return self._probabilities(out, K), states, offset

    def _embed(self, indices: torch.Tensor) -> torch.Tensor:
        return sum([self.emb[k](indices[:, k]) for k in range(indices.shape[1])])

    def _probabilities(self, out: torch.Tensor, K: int) -> torch.Tensor:
        return self._softmax([self.linears[k](out) for k in range(K)])

    @staticmethod
    def _softmax(heads: tp.List[torch.Tensor]) -> torch.Tensor:
        """The K heads' logits [B, T, card] each -> probabilities [B, card, K, T]."""
        return torch.softmax(torch.stack(heads, dim=1).permute(0, 3, 1, 2), dim=1)


@contextlib.contextmanager
def lm_threads(n: int = 1) -> tp.Iterator[None]:
    """Run the LM's CPU ops on `n` threads inside the block.

    The LM's float32 outputs feed the CDFs, and CPU attention gives other bits on another thread
    count (measured on torch 2.11): LM-mode files are written and read with one fixed count, so
    they decode on any machine setting (upstream's own test and benchmark also use one thread)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class LMStream:
    """The LM run one frame at a time with a key/value cache.

    `step(indices [B, K, 1])` -> probabilities [B, card, K, 1], the same bits as calling
    `lm(indices, states, offset)` one frame at a time (upstream's way, which projects the keys
    and values of the whole past window again at every step; tests compare the two over more
    than a full window). Per layer it keeps the window of layer inputs and their key/value
    projections, and projects only the newest row: in a block of the last `exact_rows` rows, so
    that the matrix product runs with the same row count class as upstream's full-window product
    (CPU GEMMs give other bits for very few rows, measured for 1-3 rows; blocks of 16 or more
    rows gave each row the same bits whatever the row count). While the window is shorter than
    `exact_rows` the whole window is projected, as upstream does.
    """

    def __init__(self, lm: LMModel, exact_rows: int = 32):
        self.lm = lm
        self.exact_rows = exact_rows
        tr = lm.transformer
        self.past_context = tr.past_context
        self.offset = 0
        n = len(tr.layers)
        self._inputs: tp.List[tp.Optional[torch.Tensor]] = [None] * n  # per layer: [B, cap, E] window inputs
        self._kv: tp.List[tp.Optional[torch.Tensor]] = [None] * n      # per layer: [2, cap, B, E] keys, values
        self._start, self._rows = [0] * n, [0] * n                     # the window: rows start .. start+rows-1
        self._blocks = [self._plain_ops(layer) for layer in tr.layers]

    @torch.no_grad()
    def step(self, indices: torch.Tensor) -> torch.Tensor:
        B, K, T = indices.shape
        if T != 1:
            raise ValueError("LMStream.step takes one frame at a time")
        x = self._input(indices, self.offset)
        for i, layer in enumerate(self.lm.transformer.layers):
            x = self._layer(i, layer, x)
        self.offset += 1
        return self.lm._probabilities(x, K)

    @torch.no_grad()
    def run_known(self, codes: torch.Tensor) -> torch.Tensor:
        """The probabilities of every frame of codes [B, K, T] given the frames before it ->
        [T, B, card, K], bit-identical to T calls of `step` (frame t fed 1 + codes of frame t-1,
        frame 0 fed zeros), for an encoder, which knows all frames in advance.

        Every operation is called with exactly the arguments `step` gives it, so the bits are the
        same; only the order changes: layer by layer over all frames, then head by head, so that
        one layer's weights serve all frames while they are in cache (frame by frame, each step
        streams all the LM's weights from memory)."""
        B, K, T = codes.shape
        xs = [self._input(torch.zeros_like(codes[:, :, :1]) if t == 0 else 1 + codes[:, :, t - 1:t], self.offset + t)
              for t in range(T)]
        for i, layer in enumerate(self.lm.transformer.layers):
            xs = [self._layer(i, layer, x) for x in xs]
        self.offset += T
        heads = [[self.lm.linears[k](x) for x in xs] for k in range(K)]
        out = torch.empty(T, B, self.lm.card, K)
        for t in range(T):
            out[t] = self.lm._softmax([heads[k][t] for k in range(K)])[..., 0]
        return out

    def _input(self, indices: torch.Tensor, position: int) -> torch.Tensor:
        """The first layer's input for one frame: summed embeddings, input norm, position."""
        tr = self.lm.transformer
        x = self.lm._embed(indices)
        positions = torch.arange(1, device=x.device).view(1, -1, 1) + position
        return tr.norm_in(x) + create_sin_embedding(positions, x.shape[-1], max_period=tr.max_period)

    @staticmethod
    def _plain_ops(layer: nn.TransformerEncoderLayer):
        """(norm1, norm2, feed-forward) of a layer: in eval mode with a function activation, the
        same operations without the module-call overhead (dropout is then the identity)."""
        if layer.training or isinstance(layer.activation, nn.Module) or not callable(layer.activation):
            return layer.norm1, layer.norm2, layer._ff_block

        def norm(n: nn.LayerNorm) -> tp.Callable[[torch.Tensor], torch.Tensor]:
            return lambda v: F.layer_norm(v, n.normalized_shape, n.weight, n.bias, n.eps)

        a, b, act = layer.linear1, layer.linear2, layer.activation
        return norm(layer.norm1), norm(layer.norm2), lambda v: F.linear(act(F.linear(v, a.weight, a.bias)), b.weight,
                                                                        b.bias)

    def _layer(self, i: int, layer: nn.TransformerEncoderLayer, x: torch.Tensor) -> torch.Tensor:
        norm1, norm2, ff = self._blocks[i]
        if layer.norm_first:
            x = x + self._attend(i, layer, norm1(x))
            return x + ff(norm2(x))
        x = norm1(x + self._attend(i, layer, x))
        return norm2(x + ff(x))

    def _window(self, i: int, x: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Append layer input x [B, 1, E] to layer i's window. Returns the window's inputs
        [B, S, E] and its key and value buffers [cap, B, E] and the window's first row. Rows live
        in preallocated buffers (twice the window), compacted when full: no per-step copy of the
        whole window."""
        B, _, E = x.shape
        if self._inputs[i] is None:
            cap = 2 * (self.past_context + 1)
            self._inputs[i] = torch.zeros(B, cap, E, dtype=x.dtype, device=x.device)  # row 0: the zero start state
            self._kv[i] = torch.empty(2, cap, B, E, dtype=x.dtype, device=x.device)
            self._start[i], self._rows[i] = 0, 1
        inputs, kv = self._inputs[i], self._kv[i]
        start, rows = self._start[i], self._rows[i]
        if start + rows + 1 > inputs.shape[1]:
            inputs[:, :rows] = inputs[:, start:start + rows].clone()
            kv[:, :rows] = kv[:, start:start + rows].clone()
            start = 0
        inputs[:, start + rows] = x[:, 0]
        return inputs[:, start:start + rows + 1], inputs, kv, start

    def _attend(self, i: int, layer: nn.TransformerEncoderLayer, x: torch.Tensor) -> torch.Tensor:
        """Self-attention of x [B, 1, E] over the window (torch's MultiheadAttention computation,
        keys and values from the cache)."""
        mha = layer.self_attn
        B, _, E = x.shape
        heads = mha.num_heads
        hd = E // heads
        keys, inputs, kv, start = self._window(i, x)
        S = keys.shape[1]
        w_q, w_kv = mha.in_proj_weight.split([E, 2 * E])
        b_q, b_kv = mha.in_proj_bias.split([E, 2 * E])
        if S <= self.exact_rows:  # the whole window, as upstream
            rows = F.linear(keys.transpose(1, 0), w_kv, b_kv)  # [S, B, 2E]
            kv[0, start:start + S] = rows[..., :E]
            kv[1, start:start + S] = rows[..., E:]
        else:  # the newest row, in a block of exact_rows rows
            block = inputs[:, start + S - self.exact_rows:start + S]
            newest = F.linear(block.transpose(1, 0), w_kv, b_kv)[-1]
            kv[0, start + S - 1] = newest[..., :E]
            kv[1, start + S - 1] = newest[..., E:]
        k_rows, v_rows = kv[0, start:start + S], kv[1, start:start + S]  # [S, B, E], contiguous
        kept = min(S, self.past_context)
        self._start[i], self._rows[i] = start + S - kept, kept
        q = F.linear(x.transpose(1, 0), w_q, b_q)  # [1, B, E]
        q = q.view(1, B * heads, hd).transpose(0, 1).view(B, heads, 1, hd)
        k = k_rows.view(S, B * heads, hd).transpose(0, 1).view(B, heads, S, hd)
        v = v_rows.view(S, B * heads, hd).transpose(0, 1).view(B, heads, S, hd)
        mask = torch.zeros(1, S, dtype=x.dtype, device=x.device).unsqueeze(0).unsqueeze(0)  # nothing masked
        out = F.scaled_dot_product_attention(q, k, v, mask, 0.0, False)
        out = out.permute(2, 0, 1, 3).contiguous().view(B, E)
        out = F.linear(out, mha.out_proj.weight, mha.out_proj.bias).view(1, B, E)
        out = out.transpose(1, 0)
        return out if not layer.training else layer.dropout1(out)
