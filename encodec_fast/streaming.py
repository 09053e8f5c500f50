"""Encoding long audio in bounded memory with the whole-file codes.

`encode_long(model, x)` returns what `model.encode(x)` returns, for inputs of any length, holding
one chunk's activations at a time:
- causal models without segments (24 kHz): the SEANet encoder runs chunk by chunk, each
  convolution keeping the input samples its next outputs need (its left context, the stride's
  remainder) and the LSTM its state, with the file's own left padding at the first chunk and
  right padding at the last. Each layer then computes the same values from the same samples as
  over the whole file; the codebook search runs on each chunk's frames.
- models with segments (48 kHz): `encode` already runs segment by segment; audio is passed in
  slices of whole segments.

`encode_pieces(model, pieces, length)` does the same for an input given as consecutive pieces
(tokenize reads, resamples and encodes a long file piece by piece: `tokenize.loading.stream_item`).

Exactness: on CPU, tested bit for bit against `encode` of the whole file
(tests/test_streaming.py). It rests on CPU convolution and LSTM results not depending on the
call's length, which holds for long calls (measured: oneDNN picks another algorithm for the
1-channel first convolution below about 24,000 output samples); hence chunks are long (20 s by
default; 1 s chunks still gave the whole file's encoder output bit for bit here) and the last
one is merged into its predecessor when shorter. Memory and speed were best around 10-20 s
chunks (a 15 min file through tokenize with the tuned allocator, decoded whole in-process: peak
RSS 1.3 GB at 10 s, 1.6-2.0 GB at 20-30 s, 3.0 GB at 60 s; the tuned allocator keeps freed
blocks, so bigger chunks fragment more). On CUDA the convolutions are cuDNN's, whose algorithm
may change with the length: codes may differ at near-ties.
"""

import dataclasses
import typing as tp

import torch
from torch.nn import functional as F

from .modules.conv import SConv1d, pad1d
from .modules.lstm import SLSTM
from .modules.seanet import SEANetEncoder, SEANetResnetBlock, elu_plan

DEFAULT_CHUNK_SECONDS = 20.0
DEFAULT_STREAM_SECONDS = 120.0


@dataclasses.dataclass(frozen=True)
class LongInputs:
    """How tokenize treats long inputs: those over `after_seconds` are read, resampled and encoded
    `chunk_seconds` at a time (`encode_pieces`); shorter ones whole, in batches."""
    after_seconds: float = DEFAULT_STREAM_SECONDS
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS

    def after(self, sample_rate: int) -> int:
        return int(self.after_seconds * sample_rate)


class _Conv:
    """One SConv1d over consecutive chunks: keeps the padded input its next outputs need."""

    def __init__(self, conv: SConv1d, elu_first: bool, total: int, owns_input: bool = True):
        if not conv.causal:
            raise ValueError("streaming needs a causal encoder")
        self.conv, self.elu_first, self.total = conv, elu_first, total  # total: the layer's input length
        self.owns_input = owns_input  # the ELU may overwrite the chunk it is given
        self.buf: tp.Optional[torch.Tensor] = None
        self.span = (conv.kernel_size - 1) * conv.dilation + 1
        self.seen = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.elu_first:
            x = F.elu_(x) if self.owns_input else F.elu(x)
        self.seen += x.shape[-1]
        left, right = self.conv.paddings(self.total)  # the whole input's padding: left at its start, right at its end
        buf = pad1d(x, (left, 0), mode=self.conv.pad_mode) if self.buf is None else torch.cat([self.buf, x], dim=-1)
        if self.seen == self.total:
            buf = pad1d(buf, (0, right), mode=self.conv.pad_mode)
        s = self.conv.stride
        n_out = max(0, (buf.shape[-1] - self.span) // s + 1)
        y = self.conv.conv(buf[..., :(n_out - 1) * s + self.span]) if n_out else buf.new_zeros(
            buf.shape[0], self.conv.conv.conv.out_channels, 0)
        self.buf = buf[..., n_out * s:].clone()  # a copy: a view would keep the whole chunk alive
        return y


class _Block:
    def __init__(self, block: SEANetResnetBlock, total: int):
        convs = [m for m in block.block if isinstance(m, SConv1d)]
        self.convs = [_Conv(c, True, total, owns_input=i > 0) for i, c in enumerate(convs)]  # x: for the shortcut
        self.shortcut = _Conv(block.shortcut, False, total) if isinstance(block.shortcut, SConv1d) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for conv in self.convs:
            h = conv(h)
        skip = self.shortcut(x) if self.shortcut is not None else x
        return skip + h


class _LSTM:
    def __init__(self, lstm: SLSTM, then_elu: bool):
        self.lstm, self.then_elu = lstm, then_elu
        self.state: tp.Optional[tp.Tuple[torch.Tensor, torch.Tensor]] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y, self.state = self.lstm.run(x, self.then_elu, self.state)
        return y


class StreamingEncoder:
    """A causal SEANet encoder fed consecutive chunks of one input of `total` samples:
    the frames of each chunk, in order; together, `encoder(whole input)`."""

    def __init__(self, encoder: SEANetEncoder, total: int):
        self.stages: tp.List[tp.Callable[[torch.Tensor], torch.Tensor]] = []
        length = total
        for layer, with_elu in elu_plan(list(encoder.model)):
            if layer is None:
                self.stages.append(F.elu_)
            elif isinstance(layer, SConv1d):
                self.stages.append(_Conv(layer, with_elu, length))
                length = layer.output_length(length)
            elif isinstance(layer, SEANetResnetBlock):
                self.stages.append(_Block(layer, length))
            elif isinstance(layer, SLSTM):
                self.stages.append(_LSTM(layer, with_elu))
            else:
                raise ValueError(f"cannot stream through {type(layer).__name__}")

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        chunk = chunk.clone()  # the stages write into their input
        for stage in self.stages:
            chunk = stage(chunk)
        return chunk


def chunk_bounds(length: int, chunk: int) -> tp.List[tp.Tuple[int, int]]:
    """[start, stop) of consecutive chunks of `chunk` samples; the last one merged into its
    predecessor when shorter than `chunk` (so every call is long)."""
    bounds = [(a, min(a + chunk, length)) for a in range(0, length, chunk)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < chunk:
        bounds[-2:] = [(bounds[-2][0], length)]
    return bounds


class _Windows:
    """Consecutive pieces [..., n_i] of one signal read as windows [a, b) of it, with
    non-decreasing a; holds only the pieces that the current window touches."""

    def __init__(self, pieces: tp.Iterable[torch.Tensor], length: int):
        self.pieces, self.length = iter(pieces), length
        self.parts: tp.List[torch.Tensor] = []
        self.base = 0  # position of parts[0]'s first sample
        self.end = 0   # position after the last part

    def take(self, a: int, b: int) -> torch.Tensor:
        while self.parts and self.base + self.parts[0].shape[-1] <= a:
            self.base += self.parts.pop(0).shape[-1]
        while self.end < b:
            piece = next(self.pieces, None)
            if piece is None:
                raise ValueError(f"the audio ended after {self.end} of the {self.length} samples announced")
            if not self.parts:
                self.base = self.end
            self.parts.append(piece)
            self.end += piece.shape[-1]
        joined = self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts, dim=-1)
        return joined[..., a - self.base:b - self.base]

    def close(self) -> None:
        """Check that nothing follows the announced length."""
        self.parts = []
        if self.end > self.length or any(p.shape[-1] for p in self.pieces):
            raise ValueError(f"the audio holds more than the {self.length} samples announced")


def encode_pieces(model, pieces: tp.Iterable[torch.Tensor], length: int,
                  chunk_seconds: float = DEFAULT_CHUNK_SECONDS):
    """`model.encode(x)` for the input `x` [B, C, length] given as consecutive pieces
    [B, C, n_i] (e.g. read from a file as it is decoded), holding one chunk's activations and a
    chunk of input at a time (module docstring). A stream shorter or longer than `length` raises
    ValueError."""
    chunk = max(1, int(chunk_seconds * model.sample_rate))
    windows = _Windows(pieces, length)
    if length <= 0:
        raise ValueError("cannot encode empty audio (0 samples)")
    if model.segment_length is not None:
        # Slices of whole segments: segment i starts at i * stride, as in the whole call.
        stride, seg = model.segment_stride, model.segment_length
        per_slice = max(1, chunk // stride)
        starts = list(range(0, length, stride))
        frames = []
        for first in range(0, len(starts), per_slice):
            idx = starts[first:first + per_slice]
            part = model.encode(windows.take(idx[0], min(length, idx[-1] + seg)))
            frames += part[:len(idx)]
        windows.close()
        return frames
    if length < 2 * chunk or model.normalize or not model.encoder.causal:
        frames = model.encode(windows.take(0, length))
        windows.close()
        return frames
    streamer = StreamingEncoder(model.encoder, length)
    codes = []
    with torch.no_grad():
        for a, b in chunk_bounds(length, chunk):
            x = windows.take(a, b)
            model._check_audio(x, batched=True)
            emb = streamer(x)
            codes.append(model.quantizer.encode(emb, model.frame_rate, model.bandwidth).transpose(0, 1))
    windows.close()
    return [(torch.cat(codes, dim=-1), None)]


def encode_long(model, x: torch.Tensor, chunk_seconds: float = DEFAULT_CHUNK_SECONDS):
    """`model.encode(x)` (x [B, C, T]) holding one chunk's activations at a time (module docstring)."""
    model._check_audio(x, batched=True)
    return encode_pieces(model, [x], x.shape[-1], chunk_seconds)
