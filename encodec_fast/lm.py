"""The entropy-coding language model: architecture, checkpoint loading, and `LMStream`, the
frame-by-frame run with a key/value cache that LM-mode `.ecdc` coding uses.
"""

import contextlib
import typing as tp
import warnings

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
    (CPU GEMMs give other bits for very few rows, measured for 1-3 rows; blocks of 8 or more
    rows gave each row the same bits whatever the row count, measured on torch 2.11 with MKL).
    While the window is shorter than `exact_rows` the whole window is projected, as upstream does.
    Both this and the encoder's batched order (`run_inputs`) rest on properties of the machine's
    matrix products that `batched_products_exact` checks once per process; where they fail, every
    window is projected whole, as upstream does, and the encoder steps frame by frame.
    """

    def __init__(self, lm: LMModel, exact_rows: int = 16):
        self.lm = lm
        tr = lm.transformer
        self.past_context = tr.past_context
        layers = tr.layers
        shapes = {tuple(p.shape) for layer in layers for p in (layer.linear1.weight, layer.linear2.weight)}
        shapes |= {(lm.dim, lm.dim), (lm.card, lm.dim)}
        self._products_exact = batched_products_exact(tuple(sorted(shapes)), lm.dim, exact_rows)
        self.exact_rows = exact_rows if self._products_exact else self.past_context + 1
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
        [T, B, card, K], bit-identical to T calls of `step` on a fresh stream (frame t fed
        1 + codes of frame t-1, frame 0 fed zeros), for an encoder, which knows all frames."""
        return self.run_inputs(self.inputs_of(codes))

    @staticmethod
    def inputs_of(codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] -> what each frame is fed: zeros for frame 0, 1 + codes of frame t-1."""
        return torch.cat([torch.zeros_like(codes[:, :, :1]), 1 + codes[:, :, :-1]], dim=2)

    @torch.no_grad()
    def run_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """`step` over the frames of inputs [B, K, T], continuing the stream -> [T, B, card, K],
        the same bits as T calls of `step(inputs[..., t:t + 1])`.

        The frames run layer by layer (`_run_frames`), each operation called as `step` calls it
        for one frame, or in a form measured to give each frame the same bits: row-wise products
        as one batched product (`_rowwise_linear`), norms, activation, softmax and embeddings
        over all frames at once (row-wise or element-wise operations), and, once windows are
        longer than `exact_rows`, the newest keys and values of all frames in one product whose
        rows each have at least `exact_rows` - 1 rows before them. Where this machine's products
        do not give those bits (`batched_products_exact`), the frames go through `step`."""
        B, K, T = inputs.shape
        if self._batchable():
            return self._run_frames(inputs)
        out = torch.empty(T, B, self.lm.card, K)
        for t in range(T):
            out[t] = self.step(inputs[..., t:t + 1])[..., 0]
        return out

    def _window_rows(self, frame: int) -> int:
        """Rows in the attention window of frame `frame` of the stream (the start row while it
        is in the window, the past inputs, the frame's own)."""
        return min(frame + 1, self.past_context) + 1

    def _batchable(self) -> bool:
        """Whether `_run_frames` applies: every layer plain (`_is_plain`), and this machine's
        products give the bits `_run_frames` relies on (`batched_products_exact`)."""
        return self._products_exact and all(map(self._is_plain, self.lm.transformer.layers))

    @staticmethod
    def _is_plain(layer: nn.TransformerEncoderLayer) -> bool:
        """In eval mode with a function activation: dropout is the identity and the activation
        can be called on any tensor."""
        return not layer.training and not isinstance(layer.activation, nn.Module) and callable(layer.activation)

    def _run_frames(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs [B, K, c] -> [c, B, card, K] (see `run_inputs`)."""
        B, K, c = inputs.shape
        lm, tr = self.lm, self.lm.transformer
        positions = torch.arange(c, device=inputs.device).view(1, -1, 1) + self.offset
        x = tr.norm_in(lm._embed(inputs)) + create_sin_embedding(positions, lm.dim, max_period=tr.max_period)
        x = x.transpose(0, 1).contiguous()  # [c, B, E]: frames lead, each frame's [B, E] as in `step`
        for i, layer in enumerate(tr.layers):
            norm1, norm2, _ = self._blocks[i]
            if layer.norm_first:
                x = x + self._attend_frames(i, layer, norm1(x))
                x = x + self._ff_frames(layer, norm2(x))
            else:
                x = norm1(x + self._attend_frames(i, layer, x))
                x = norm2(x + self._ff_frames(layer, x))
        self.offset += c
        heads = [_rowwise_linear(x, lin.weight, lin.bias).view(c * B, 1, -1) for lin in lm.linears[:K]]
        return lm._softmax(heads).view(c, B, lm.card, K)

    @staticmethod
    def _ff_frames(layer: nn.TransformerEncoderLayer, x: torch.Tensor) -> torch.Tensor:
        hidden = layer.activation(_rowwise_linear(x, layer.linear1.weight, layer.linear1.bias))
        return _rowwise_linear(hidden, layer.linear2.weight, layer.linear2.bias)

    def _attend_frames(self, i: int, layer: nn.TransformerEncoderLayer, x: torch.Tensor) -> torch.Tensor:
        """`_attend` for frames x [c, B, E] in order -> [c, B, E]; leaves layer i's window as c
        calls of `_attend` would.

        Frames whose window has at most exact_rows rows project their whole window, as `_attend`
        (and upstream) does; the later ones take their newest row's key and value from one
        product over all their rows, each preceded by at least exact_rows - 1 rows."""
        mha = layer.self_attn
        c, B, E = x.shape
        heads = mha.num_heads
        w_q, w_kv = mha.in_proj_weight.split([E, 2 * E])
        b_q, b_kv = mha.in_proj_bias.split([E, 2 * E])
        inputs, kv = self._buffers(i, B, x)
        start, rows = self._start[i], self._rows[i]
        window = torch.cat([inputs[:, start:start + rows], x.transpose(0, 1)], dim=1)  # [B, rows + c, E]
        sizes = [self._window_rows(self.offset + j) for j in range(c)]
        early = sum(S <= self.exact_rows for S in sizes)  # frames that project their whole window
        # keys/values hold the rows of window rows base, base + 1, ...: the buffer's, then the last
        # early frame's projection, then that extended with the later frames' newest rows.
        base, keys, values = 0, kv[0, start:start + rows], kv[1, start:start + rows]
        q = _rowwise_linear(x, w_q, b_q)  # [c, B, E]
        out = torch.empty(c, B, E, dtype=x.dtype, device=x.device)
        for j, S in enumerate(sizes):
            end = rows + j + 1
            if j < early:
                projected = F.linear(window[:, end - S:end].transpose(1, 0), w_kv, b_kv)  # [S, B, 2E]
                base, keys, values = end - S, projected[..., :E].contiguous(), projected[..., E:].contiguous()
            elif j == early:  # the newest rows of all later frames, appended to the coverage
                first = rows + early - (self.exact_rows - 1)
                new = F.linear(window[:, first:].transpose(1, 0), w_kv, b_kv)[self.exact_rows - 1:]  # [c - j, B, 2E]
                keys, values = torch.cat([keys, new[..., :E]]), torch.cat([values, new[..., E:]])
            out[j] = _attention(q[j], keys[end - S - base:end - base], values[end - S - base:end - base], heads)
        end = rows + c
        kept = min(sizes[-1], self.past_context)
        inputs[:, :kept] = window[:, end - kept:end]
        kv[0, :kept] = keys[end - kept - base:end - base]
        kv[1, :kept] = values[end - kept - base:end - base]
        self._start[i], self._rows[i] = 0, kept
        return _rowwise_linear(out, mha.out_proj.weight, mha.out_proj.bias)

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
        if not LMStream._is_plain(layer):
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

    def _buffers(self, i: int, B: int, x: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """Layer i's window buffers (inputs [B, cap, E], keys and values [2, cap, B, E]), made on
        first use with one row, the zero start state."""
        if self._inputs[i] is None:
            cap, E = 2 * (self.past_context + 1), x.shape[-1]
            self._inputs[i] = torch.zeros(B, cap, E, dtype=x.dtype, device=x.device)
            self._kv[i] = torch.empty(2, cap, B, E, dtype=x.dtype, device=x.device)
            self._start[i], self._rows[i] = 0, 1
        inputs, kv = self._inputs[i], self._kv[i]
        assert inputs is not None and kv is not None
        return inputs, kv

    def _window(self, i: int, x: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Append layer input x [B, 1, E] to layer i's window. Returns the window's inputs
        [B, S, E] and its key and value buffers [cap, B, E] and the window's first row. Rows live
        in preallocated buffers (twice the window), compacted when full: no per-step copy of the
        whole window."""
        B, _, E = x.shape
        inputs, kv = self._buffers(i, B, x)
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
        out = _attention(F.linear(x.transpose(1, 0), w_q, b_q), k_rows, v_rows, mha.num_heads)
        out = F.linear(out, mha.out_proj.weight, mha.out_proj.bias).view(1, B, E)
        out = out.transpose(1, 0)
        return out if not layer.training else layer.dropout1(out)


def _attention(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, heads: int) -> torch.Tensor:
    """One frame's attention as torch's MultiheadAttention computes it (the same calls, so the
    same bits): the query row [.., B, E] (contiguous) over keys and values [S, B, E] -> [B, E]."""
    S, B, E = k_rows.shape
    hd = E // heads
    q = q.reshape(1, B * heads, hd).transpose(0, 1).view(B, heads, 1, hd)
    k = k_rows.view(S, B * heads, hd).transpose(0, 1).view(B, heads, S, hd)
    v = v_rows.view(S, B * heads, hd).transpose(0, 1).view(B, heads, S, hd)
    mask = torch.zeros(1, S, dtype=q.dtype, device=q.device).unsqueeze(0).unsqueeze(0)  # nothing masked
    out = F.scaled_dot_product_attention(q, k, v, mask, 0.0, False)
    return out.permute(2, 0, 1, 3).contiguous().view(B, E)


_product_checks: tp.Dict[tp.Tuple[tp.Any, ...], bool] = {}


def batched_products_exact(shapes: tp.Tuple[tp.Tuple[int, int], ...], dim: int, exact_rows: int) -> bool:
    """Whether, on this machine and thread count, (1) `_rowwise_linear` gives each row the bits
    of its own `F.linear` for every weight shape [out, in] in `shapes`, and (2) the rows of a
    key/value product ([dim] -> [2 dim]) come out the same in a block of `exact_rows` rows as in
    a longer product. Both are what `_run_frames` relies on to give `step`'s bits (measured on
    torch 2.11 with MKL on x86; another BLAS may differ). Checked once per process on random
    numbers, in a few milliseconds; where it fails, `LMStream` projects every window whole and the
    encoder runs `step` frame by frame (upstream's products: slower, the same bytes), with a warning."""
    key = (shapes, dim, exact_rows, torch.get_num_threads())
    if key not in _product_checks:
        g = torch.Generator().manual_seed(0)
        ok = True
        for out_f, in_f in shapes + ((2 * dim, dim),):
            w, b = torch.randn(out_f, in_f, generator=g) * in_f ** -0.5, torch.randn(out_f, generator=g)
            x = torch.randn(5, 1, in_f, generator=g)
            ok &= torch.equal(_rowwise_linear(x, w, b), torch.stack([F.linear(r, w, b) for r in x]))
        x = torch.randn(exact_rows + 299, 1, dim, generator=g)
        for rows in (exact_rows, exact_rows + 1, exact_rows + 299):
            block = F.linear(x[rows - exact_rows:rows], w, b)[-1]
            ok &= torch.equal(F.linear(x[:rows], w, b)[-1], block)
        _product_checks[key] = bool(ok)
        if not ok:
            warnings.warn("this machine's matrix products give other bits in blocks or batches: the LM runs its "
                          "products as upstream does, frame by frame (slower; the files are the same)",
                          RuntimeWarning, stacklevel=3)
    return _product_checks[key]


def _rowwise_linear(x: torch.Tensor, weight: torch.Tensor, bias: tp.Optional[torch.Tensor]) -> torch.Tensor:
    """x [c, B, in] -> [c, B, out]: `F.linear(x[j], weight, bias)` for every j, with each frame's
    bits: the c products go through one batched call of c separate [B, in] x [in, out] products
    (CPU BLAS gives other bits when the rows of several frames share one product; a batch of
    separate products gives each the single product's bits, measured on torch 2.11 and tested
    in tests/test_lm_coding.py against `step`)."""
    c, B, _ = x.shape
    wt = weight.t().expand(c, weight.shape[1], weight.shape[0])
    if bias is None:
        return torch.bmm(x, wt)
    return torch.baddbmm(bias.expand(c, B, weight.shape[0]), x, wt)
