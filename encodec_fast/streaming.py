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

from .modules.conv import SConv1d, SConvTranspose1d, pad1d
from .modules.lstm import SLSTM
from .modules.seanet import SEANetDecoder, SEANetEncoder, SEANetResnetBlock, elu_plan

DEFAULT_CHUNK_SECONDS = 20.0
DEFAULT_STREAM_SECONDS = 120.0
# PyTorch runs a batch-1 fp32 CPU convolution with oneDNN when its input has more elements than
# this, else with its native im2col path (aten's ConvParams::use_mkldnn); the two give other last
# bits. A streamed call padded on the right past it takes oneDNN as the whole-file call does, and
# oneDNN's outputs do not depend on the call's length (measured: every length from 1 output up).
MKLDNN_MIN_NUMEL = 20480


@dataclasses.dataclass(frozen=True)
class LongInputs:
    """How tokenize treats long inputs: those over `after_seconds` are read, resampled and encoded
    `chunk_seconds` at a time (`encode_pieces`); shorter ones whole, in batches."""
    after_seconds: float = DEFAULT_STREAM_SECONDS
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS

    def after(self, sample_rate: int) -> int:
        return int(self.after_seconds * sample_rate)


class _Conv:
    """One SConv1d over consecutive pieces of its input: keeps the padded input its next outputs
    need (its left context, the stride's remainder). Causal convolutions only: the input's own
    left padding is added before the first piece (reflect padding reads the first samples, so the
    first outputs wait until more than the padding has arrived), the right (extra) padding after
    the last one, computed from the length seen by then."""

    def __init__(self, conv: SConv1d, elu_first: bool, owns_input: bool = True):
        if not conv.causal:
            raise ValueError("streaming needs a causal model (the 24 kHz model is; the 48 kHz one streams by segment)")
        self.conv, self.elu_first = conv, elu_first
        self.owns_input = owns_input  # the ELU may overwrite the piece it is given
        self.left = conv.padding_total
        self.span = (conv.kernel_size - 1) * conv.dilation + 1
        self.buf: tp.Optional[torch.Tensor] = None  # padded input not consumed yet (after the start)
        self.head: tp.List[torch.Tensor] = []       # the first samples, until the left padding can be made
        self.seen = 0
        self.pad_calls = False  # run short calls on oneDNN (SEANetStream.pad_short_calls)

    def __call__(self, x: torch.Tensor, last: bool = False) -> torch.Tensor:
        if self.elu_first and x.shape[-1]:
            x = F.elu_(x) if self.owns_input else F.elu(x)
        self.seen += x.shape[-1]
        if self.buf is None:
            self.head.append(x)
            head = torch.cat(self.head, dim=-1) if len(self.head) > 1 else x
            if head.shape[-1] <= self.left and not last:
                self.head = [head]
                return head.new_zeros(head.shape[0], self.conv.conv.conv.out_channels, 0)
            self.head = []
            if last:  # the whole input in one call: its padding exactly as the whole-file call's
                return self._emit(pad1d(head, self.conv.paddings(self.seen), mode=self.conv.pad_mode), True)
            buf = pad1d(head, (self.left, 0), mode=self.conv.pad_mode)
        else:
            buf = torch.cat([self.buf, x], dim=-1) if x.shape[-1] else self.buf
        if last:
            buf = pad1d(buf, (0, self.conv.paddings(self.seen)[1]), mode=self.conv.pad_mode)
        return self._emit(buf, last)

    def _emit(self, buf: torch.Tensor, last: bool) -> torch.Tensor:
        s = self.conv.stride
        n_out = max(0, (buf.shape[-1] - self.span) // s + 1)
        y = self._run(buf[..., :(n_out - 1) * s + self.span], n_out) if n_out else buf.new_zeros(
            buf.shape[0], self.conv.conv.conv.out_channels, 0)
        self.buf = None if last else buf[..., n_out * s:].clone()  # a copy: a view would keep the whole piece alive
        return y

    def _run(self, x: torch.Tensor, n_out: int) -> torch.Tensor:
        """The convolution's first n_out outputs on x; with `pad_calls`, a short CPU call gets zeros
        on the right (outputs t read inputs [t * stride, t * stride + span) only) so that it runs
        on oneDNN, as a long call does."""
        if self.pad_calls and x.device.type == "cpu" and x.numel() <= MKLDNN_MIN_NUMEL:
            width = MKLDNN_MIN_NUMEL // (x.shape[0] * x.shape[1]) + 1
            return self.conv.conv(F.pad(x, (0, width - x.shape[-1])))[..., :n_out]
        return self.conv.conv(x)


class _ConvTranspose:
    """One causal SConvTranspose1d over consecutive pieces: output sample t reads the inputs
    i with i * s <= t < i * s + k, so after input frames [0, n) the outputs [0, n * s) are final.
    Each call runs the transposed convolution on the new frames plus the floor((k - 1) / s)
    frames before them and keeps the outputs that those frames complete; the right end that the
    whole call trims (k - s samples, causal) is never produced."""

    def __init__(self, conv: SConvTranspose1d, elu_first: bool):
        if not conv.causal or conv.trim[0] != 0:
            raise ValueError("streaming needs a causal decoder (trim_right_ratio 1)")
        self.conv, self.elu_first = conv, elu_first
        inner = conv.convtr.convtr
        self.k, self.s = inner.kernel_size[0], inner.stride[0]
        self.context = (self.k - 1) // self.s
        self.prev: tp.Optional[torch.Tensor] = None  # the last `context` input frames (after the ELU)

    def __call__(self, x: torch.Tensor, last: bool = False) -> torch.Tensor:
        n = x.shape[-1]
        if n == 0:
            return x.new_zeros(x.shape[0], self.conv.convtr.convtr.out_channels, 0)
        if self.elu_first:
            x = F.elu(x)
        ctx = 0 if self.prev is None else self.prev.shape[-1]
        inp = x if ctx == 0 else torch.cat([self.prev, x], dim=-1)
        y = self.conv.convtr(inp)  # [B, C, (ctx + n - 1) * s + k]; trimming happens here
        self.prev = inp[..., inp.shape[-1] - self.context:].clone() if self.context else None
        return y[..., ctx * self.s:(ctx + n) * self.s]


class _Block:
    def __init__(self, block: SEANetResnetBlock):
        convs = [m for m in block.block if isinstance(m, SConv1d)]
        self.convs = [_Conv(c, True, owns_input=i > 0) for i, c in enumerate(convs)]  # x: for the shortcut
        self.shortcut = _Conv(block.shortcut, False) if isinstance(block.shortcut, SConv1d) else None
        self.pending: tp.Optional[torch.Tensor] = None  # input whose residual branch has not come out yet

    def __call__(self, x: torch.Tensor, last: bool = False) -> torch.Tensor:
        h = x
        for conv in self.convs:
            h = conv(h, last)
        skip = self.shortcut(x, last) if self.shortcut is not None else x
        # The branch may lag the input at the start (reflect padding waits for samples); the
        # skip path must line up with it.
        if self.pending is not None and self.pending.shape[-1]:
            skip = torch.cat([self.pending, skip], dim=-1)
        self.pending = skip[..., h.shape[-1]:].clone()
        return skip[..., :h.shape[-1]] + h


class _LSTM:
    def __init__(self, lstm: SLSTM, then_elu: bool):
        self.lstm, self.then_elu = lstm, then_elu
        self.state: tp.Optional[tp.Tuple[torch.Tensor, torch.Tensor]] = None

    def __call__(self, x: torch.Tensor, last: bool = False) -> torch.Tensor:
        if x.shape[-1] == 0:
            return x
        y, self.state = self.lstm.run(x, self.then_elu, self.state)
        return y


class _ELU:
    def __call__(self, x: torch.Tensor, last: bool = False) -> torch.Tensor:
        return F.elu_(x)


def _check_range(model: tp.Any, out: torch.Tensor, what: str, sample: int) -> None:
    """A stream cannot redo a call that overflowed fp16's range (its state has moved on, unlike
    `encode` and `decode`, which redo it in exact): a clear error instead of codes or audio from
    infinities."""
    from . import precision
    if precision.overflowed(model._mode(), out):
        raise FloatingPointError(f"fp16 overflowed in the streaming {what} near sample {sample} (values past "
                                 f"65504); stream this input in 'bf16' or 'exact' (model.set_precision)")


class SEANetStream:
    """A causal SEANet encoder or decoder fed consecutive pieces of one input: each call returns
    the outputs that are final so far; `last=True` on the final piece (possibly empty) ends the
    input and returns the rest. Together: `net(whole input)`."""

    def __init__(self, net: tp.Union[SEANetEncoder, SEANetDecoder]):
        self.stages: tp.List[tp.Callable[..., torch.Tensor]] = []
        for layer, with_elu in elu_plan(list(net.model)):
            if layer is None:
                self.stages.append(_ELU())
            elif isinstance(layer, SConv1d):
                self.stages.append(_Conv(layer, with_elu))
            elif isinstance(layer, SConvTranspose1d):
                self.stages.append(_ConvTranspose(layer, with_elu))
            elif isinstance(layer, SEANetResnetBlock):
                self.stages.append(_Block(layer))
            elif isinstance(layer, SLSTM):
                self.stages.append(_LSTM(layer, with_elu))
            else:
                raise ValueError(f"cannot stream through {type(layer).__name__}")
        self.ended = False

    def pad_short_calls(self) -> None:
        """From now on, run every convolution call on oneDNN (`_Conv._run`): the same bits as a
        call over the whole input, when that call's input is past MKLDNN_MIN_NUMEL in every layer
        (`min_long_input`)."""
        for stage in self.stages:
            for conv in _convs_of(stage):
                conv.pad_calls = True

    def min_long_input(self) -> int:
        """Input samples from which a batch-1 call over the whole input runs every convolution on
        oneDNN (each layer's input, padding aside, past MKLDNN_MIN_NUMEL elements)."""
        need, hop = 1, 1
        for stage in self.stages:
            layer = _convs_of(stage)
            for conv in layer:
                need = max(need, (MKLDNN_MIN_NUMEL // conv.conv.conv.conv.in_channels + 1) * hop)
            if layer:
                hop *= layer[0].conv.stride
        return need

    def __call__(self, piece: torch.Tensor, last: bool = False) -> torch.Tensor:
        if self.ended:
            raise RuntimeError("this stream has ended (flush was called)")
        self.ended = last
        piece = piece.clone()  # the stages write into their input
        for stage in self.stages:
            piece = stage(piece, last)
        return piece


def _convs_of(stage: tp.Any) -> tp.List[_Conv]:
    """The `_Conv`s of one SEANetStream stage (a residual block's branch and shortcut)."""
    if isinstance(stage, _Conv):
        return [stage]
    if isinstance(stage, _Block):
        return stage.convs + ([stage.shortcut] if stage.shortcut is not None else [])
    return []


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
    streamer = SEANetStream(model.encoder)
    codes = []
    with torch.no_grad():
        for a, b in chunk_bounds(length, chunk):
            x = windows.take(a, b)
            model._check_audio(x, batched=True)
            with model._precision_scope(x.device):
                emb = streamer(x, last=b == length)
            _check_range(model, emb, "encoder", a)
            emb = emb.to(model.quantizer.vq.layers[0]._codebook.embed.dtype)
            codes.append(model.quantizer.encode(emb, model.frame_rate, model.bandwidth).transpose(0, 1))
    windows.close()
    return [(torch.cat(codes, dim=-1), None)]


def encode_long(model, x: torch.Tensor, chunk_seconds: float = DEFAULT_CHUNK_SECONDS):
    """`model.encode(x)` (x [B, C, T]) holding one chunk's activations at a time (module docstring)."""
    model._check_audio(x, batched=True)
    return encode_pieces(model, [x], x.shape[-1], chunk_seconds)


# ---------------------------------------------------------------------------------------------
# The public streaming API: push / flush


EXACT_CHUNK_SECONDS = 1.0
CALL_ALIGN = 8  # frames: exact-mode calls are multiples of 8 frames of audio (StreamingEncoder._aligned)
MAX_CALL_SECONDS = 3.0  # audio per encoder call at most (bounded activations, whatever is pushed)


def _codes_of(model, emb: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Embeddings [1, D, t] -> codes [K, t] (the codebook search on these frames)."""
    if emb.shape[-1] == 0:
        return torch.zeros(model.quantizer.get_num_quantizers_for_bandwidth(model.frame_rate, bandwidth), 0,
                           dtype=torch.long, device=emb.device)
    # the search runs in the codebooks' dtype (fp32) whatever the precision mode left the latents in
    emb = emb.to(model.quantizer.vq.layers[0]._codebook.embed.dtype)
    return model.quantizer.encode(emb, model.frame_rate, bandwidth)[:, 0]


class StreamingEncoder:
    """Encode one signal pushed in chunks of any size, with the codes of `model.encode` of the
    whole signal.

    - 24 kHz model (causal, no segments): `push(audio [C, n])` returns the codes [K, t] of the
      frames completed so far (t may be 0), `flush()` the rest. With `exact=True` (default) every
      encoder call takes at least `chunk_seconds` (1 s) of audio and the last call gets the final
      stretch, so the codes equal `model.encode` of the whole signal bit for bit on CPU: short
      CPU calls give other last bits (~1e-7), which can flip a code at a near-tie. PyTorch runs
      a convolution whose input has at most MKLDNN_MIN_NUMEL elements on another path than
      oneDNN: such calls are padded on the right to run on oneDNN, as the whole-file call does
      (the first split waits until the signal is long enough for that: `min_split`, 2.15 s for
      the small model); calls are multiples of 8 frames (`_aligned`: the ELUs' scalar tails give
      other bits); and calls must still be long (chunk_seconds 0.5 gives the whole-file encoder
      output bit for bit, 0.1 does not: docs/streaming.md). The price is latency: audio is held
      until 2 x chunk_seconds are buffered and the last chunk_seconds are always held back
      (`latency_samples` says how much). `exact=False` encodes each push at once (after a start-up
      of 7 frames, 2240 samples, which the last convolution's reflect padding at the start reads,
      each frame comes out with its last sample): the low-latency mode, whose agreement with the
      whole-file codes is measured by the `streaming` benchmark (docs/streaming.md).
    - 48 kHz model (1 s segments, 1% overlap, per-segment scale): `push` and `flush` return a
      list of (codes [K, T], scale [1]) per completed segment, exactly the pairs of
      `model.encode` of the whole signal (batch dimension dropped). A segment comes out once its
      last sample is in; the audio after the next segment's start is kept.

    Memory: one call's activations and the held audio, whatever the signal's length.
    """

    def __init__(self, model, bandwidth: tp.Optional[float] = None, exact: bool = True,
                 chunk_seconds: float = EXACT_CHUNK_SECONDS):
        if bandwidth is not None and bandwidth not in model.target_bandwidths:
            raise ValueError(f"This model doesn't support the bandwidth {bandwidth}. "
                             f"Select one of {model.target_bandwidths}.")
        self.model, self.bandwidth = model, bandwidth if bandwidth is not None else model.bandwidth
        self.exact = exact
        self.segmented = model.segment_length is not None
        if not self.segmented and (model.normalize or not model.encoder.causal):
            raise ValueError("streaming needs a causal model without segments, or one with segments (48 kHz)")
        self.step = CALL_ALIGN * model.hop_length
        # exact: a whole number of aligned steps (1 s -> 25,600 samples at 24 kHz), so that the
        # calls of a steady stream are `chunk` long and a frame waits at most 2 chunks
        self.chunk = -(-max(1, int(chunk_seconds * model.sample_rate)) // self.step) * self.step if exact else 1
        self.max_call = int(MAX_CALL_SECONDS * model.sample_rate)
        self.held: tp.List[torch.Tensor] = []
        self.held_samples = 0
        self.samples_in = 0
        self.offset = 0  # segmented: where the next segment starts, in the signal
        self.net = None if self.segmented else SEANetStream(model.encoder)
        # exact: the first call before the end waits until the signal is long enough that the
        # whole-file call runs every convolution on oneDNN; from then on every call does too.
        self.min_split = self.net.min_long_input() if exact and self.net is not None else 0
        self.split = False  # a call before the end has been made (short calls padded from then on)
        self.ended = False

    @property
    def latency_samples(self) -> int:
        """Worst-case samples between a frame's last sample arriving and its codes coming out
        (what the encoder holds): 2 chunks - 1 when exact, 0 otherwise (after the first 7 frames);
        for segmented models one segment."""
        if self.segmented:
            return self.model.segment_length
        return 2 * self.chunk - 1 if self.exact else 0

    def _check(self, audio: torch.Tensor) -> None:
        if self.ended:
            raise RuntimeError("this StreamingEncoder has been flushed; make a new one for the next signal")
        if not isinstance(audio, torch.Tensor) or audio.dim() != 2:
            got = tuple(audio.shape) if isinstance(audio, torch.Tensor) else repr(audio)
            raise ValueError(f"push audio [C, n], got {got}")
        if audio.shape[0] != self.model.channels:
            raise ValueError(f"the model takes {self.model.channels} channel(s), got {audio.shape[0]}; "
                             "use encodec_fast.convert_audio")
        if not audio.is_floating_point():
            raise TypeError(f"expected floating-point audio, got {audio.dtype}")
        if not torch.isfinite(audio).all():
            raise ValueError("audio contains NaN or infinite samples")

    def _take(self, n: int) -> torch.Tensor:
        """The first n held samples [C, n], removed from the hold."""
        joined = self._join()
        out, rest = joined[:, :n], joined[:, n:]
        self.held = [rest.clone()] if rest.shape[-1] else []  # a copy: a view keeps the whole piece
        self.held_samples = rest.shape[-1]
        return out

    def _aligned(self, n: int) -> int:
        """Exact mode: n rounded down to a multiple of CALL_ALIGN frames of audio (when that leaves
        some), so that every layer's piece of a call holds a multiple of 64 values: element-wise
        ops (the ELUs) then compute every value with their vector code, none with the scalar code
        that handles a tensor's last few values and gives other last bits."""
        return n - n % self.step if self.exact and n >= self.step else n

    def _encode(self, x: torch.Tensor, last: bool) -> torch.Tensor:
        if self.exact and not last and x.shape[-1] and not self.split:  # the first call that splits the signal
            self.net.pad_short_calls()
            self.split = True
        with torch.no_grad():
            param = next(self.model.parameters())
            with self.model._precision_scope(param.device):  # the model's precision mode, as `encode`
                emb = self.net(x[None].to(device=param.device, dtype=param.dtype), last=last)
            _check_range(self.model, emb, "encoder", self.samples_in)
            return _codes_of(self.model, emb, self.bandwidth)

    def push(self, audio: torch.Tensor):
        """audio [C, n] (the next n samples; n may be 0) -> codes [K, t] of the frames now
        complete (24 kHz), or a list of (codes [K, T], scale) per segment now complete."""
        self._check(audio)
        if audio.shape[-1]:
            self.held.append(audio)
            self.held_samples += audio.shape[-1]
            self.samples_in += audio.shape[-1]
        if self.segmented:
            return self._segments(final=False)
        keep = self.chunk if self.exact else 0
        parts = []
        while (self.held_samples >= 2 * self.chunk and self.samples_in >= self.min_split) or (
                not self.exact and self.held_samples):
            # calls of at most MAX_CALL_SECONDS: a big push does not make big activations
            n = self._aligned(min(self.held_samples - keep, max(self.chunk, self.max_call)))
            parts.append(self._encode(self._take(n), False))
        if not parts:
            return self._encode(audio[:, :0], False)
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def flush(self):
        """End of the signal -> the remaining codes (same types as `push`)."""
        if self.ended:
            raise RuntimeError("this StreamingEncoder has been flushed already")
        if self.samples_in == 0:
            raise ValueError("cannot encode empty audio (0 samples)")
        self.ended = True
        if self.segmented:
            return self._segments(final=True)
        parts = []
        while self.held_samples > max(self.chunk, self.max_call) + self.chunk and self.samples_in >= self.min_split:
            parts.append(self._encode(self._take(self._aligned(max(self.chunk, self.max_call))), False))
        rest = self._take(self.held_samples) if self.held_samples else torch.zeros(
            self.model.channels, 0, device=next(self.model.parameters()).device)
        parts.append(self._encode(rest, True))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def _segments(self, final: bool) -> tp.List[tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor]]]:
        """Encode every segment whose last sample has arrived (all the rest when `final`): the
        segments of one length go through `model.encode_segments` together (stacked on CUDA)."""
        model = self.model
        seg, stride = model.segment_length, model.segment_stride
        if not self.held_samples:
            return []
        joined = self._join()
        base = self.samples_in - self.held_samples  # signal position of the first held sample
        starts = []
        while self.offset < self.samples_in and (base + joined.shape[-1] >= self.offset + seg or final):
            starts.append(self.offset)
            self.offset += stride
        views = [joined[:, a - base:a - base + seg] for a in starts]
        out: tp.List[tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor]]] = []
        param = next(model.parameters())
        saved = model.bandwidth
        try:
            model.bandwidth = self.bandwidth
            for n in sorted({v.shape[-1] for v in views}, reverse=True):  # the last segments may be shorter
                same = [v[None].to(device=param.device, dtype=param.dtype) for v in views if v.shape[-1] == n]
                out += [(codes[0], None if scale is None else scale[0])
                        for codes, scale in model.encode_segments(same)]
        finally:
            model.bandwidth = saved
        drop = min(self.offset - base, joined.shape[-1])
        self.held = [joined[:, drop:].clone()] if drop < joined.shape[-1] else []  # a copy: a view keeps the piece
        self.held_samples = joined.shape[-1] - drop
        return out

    def _join(self) -> torch.Tensor:
        """The held audio as one tensor [C, n] (kept as the only held piece)."""
        joined = torch.cat(self.held, dim=-1) if len(self.held) > 1 else self.held[0]
        self.held = [joined]
        return joined


class StreamingDecoder:
    """Decode codes pushed in pieces: the concatenated output equals `model.decode` of all the
    codes (within 1e-5 relative on CPU: the convolutions run on other lengths), trimmed to
    `length` samples when given.

    - 24 kHz model: `push(codes [K, t])` returns the audio [C, n] that is final so far. The
      decoder is causal: after its first 7 frames (the reflect padding at the start reads them)
      each frame gives its 320 samples at once, so `latency_samples` is 0 past the start.
    - 48 kHz model: `push(codes [K, T], scale)` takes one segment (as `StreamingEncoder` gives
      them) and returns the samples no later segment overlaps; `latency_samples` is the
      overlap (1% of a segment), on top of the segment itself.
    `flush()` returns the rest.
    """

    def __init__(self, model, length: tp.Optional[int] = None):
        self.model = model
        self.segmented = model.segment_length is not None
        if not self.segmented and not model.decoder.causal:
            raise ValueError("streaming needs a causal decoder, or a model with segments (48 kHz)")
        self.length = length
        self.samples_out = 0
        self.net = None if self.segmented else SEANetStream(model.decoder)
        self.codebooks: tp.Optional[int] = None
        # segmented: the overlap-add state from `done` on
        self.weight: tp.Optional[torch.Tensor] = None
        self.acc: tp.Optional[torch.Tensor] = None
        self.wsum: tp.Optional[torch.Tensor] = None
        self.segments = 0
        self.ended = False

    @property
    def latency_samples(self) -> int:
        if self.segmented:
            return self.model.segment_length - self.model.segment_stride
        return 0

    def _check(self, codes: torch.Tensor) -> None:
        if self.ended:
            raise RuntimeError("this StreamingDecoder has been flushed; make a new one for the next signal")
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
            got = tuple(codes.shape) if isinstance(codes, torch.Tensor) else repr(codes)
            raise ValueError(f"push codes [K, t], got {got}")
        if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"codes must be integers, got {codes.dtype}")
        if not 1 <= codes.shape[0] <= self.model.quantizer.n_q:
            raise ValueError(f"{codes.shape[0]} codebooks given, the model has {self.model.quantizer.n_q}")
        if self.codebooks is not None and codes.shape[0] != self.codebooks:
            raise ValueError(f"{codes.shape[0]} codebooks given after {self.codebooks}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.model.quantizer.bins):
            raise ValueError(f"codes must be in [0, {self.model.quantizer.bins})")
        self.codebooks = codes.shape[0]

    def _decode(self, emb: torch.Tensor, last: bool = False) -> torch.Tensor:
        """The decoder's stream on embeddings [1, D, t] in the model's precision mode (as `decode`)
        -> audio [C, n] in the embeddings' dtype."""
        with self.model._precision_scope(emb.device):
            audio = self.net(emb, last=last)[0]
        _check_range(self.model, audio, "decoder", self.samples_out)
        return audio.to(emb.dtype)

    def _out(self, audio: torch.Tensor) -> torch.Tensor:
        if self.length is not None:
            audio = audio[:, :max(0, self.length - self.samples_out)]
        self.samples_out += audio.shape[-1]
        return audio

    def push(self, codes: torch.Tensor, scale: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        """codes [K, t] (24 kHz: any t; 48 kHz: one segment, with its scale) -> final audio [C, n]."""
        if self.segmented:
            return self.push_segments([(codes, scale)])
        self._check(codes)
        if scale is not None:
            raise ValueError("this model has no segment scales")
        codes = codes.to(device=next(self.model.parameters()).device, dtype=torch.long)
        with torch.no_grad():
            emb = self.model.quantizer.decode(codes[:, None])
            return self._out(self._decode(emb))

    def push_segments(self, segments: tp.Sequence[tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor]]]) -> torch.Tensor:
        """Several consecutive segments (48 kHz), each (codes [K, T], scale), decoded together
        (`model._decode_frames` stacks segments of one shape) -> the final audio [C, n]; the same
        samples as pushing them one by one."""
        if not self.segmented:
            raise ValueError("push_segments is for models with segments (48 kHz); push codes [K, t]")
        device = next(self.model.parameters()).device
        frames = []
        for codes, scale in segments:
            self._check(codes)
            if self.model.normalize and scale is None:
                raise ValueError("each segment of this model comes with its scale")
            frames.append((codes.to(device=device, dtype=torch.long)[None],
                           None if scale is None else scale.reshape(1, 1).to(device)))
        if not frames:
            return self._out(torch.zeros(self.model.channels, 0, device=device))
        with torch.no_grad():
            decoded = self.model._decode_frames(frames)
        parts = [self._overlap_add(frame[0]) for frame in decoded]
        return self._out(torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0])

    def _overlap_add(self, frame: torch.Tensor) -> torch.Tensor:
        """Add one decoded segment [C, n] (`model._linear_overlap_add`, incrementally) -> the samples
        before the next segment's start."""
        n = frame.shape[-1]
        stride = self.model.segment_stride
        if self.weight is None:  # sized from the first segment, as the whole-file call
            t = torch.linspace(0, 1, n + 2, device=frame.device, dtype=frame.dtype)[1:-1]
            self.weight = 0.5 - (t - 0.5).abs()
            self.acc = frame.new_zeros(frame.shape[0], 0)
            self.wsum = frame.new_zeros(0)
        if n > self.weight.shape[-1]:
            raise ValueError(f"segment of {n} samples after one of {self.weight.shape[-1]}")
        grow = n - self.acc.shape[-1]  # the state starts at this segment's offset
        if grow > 0:
            self.acc = torch.cat([self.acc, frame.new_zeros(frame.shape[0], grow)], dim=-1)
            self.wsum = torch.cat([self.wsum, frame.new_zeros(grow)])
        self.acc[:, :n] += self.weight[:n] * frame
        self.wsum[:n] += self.weight[:n]
        self.segments += 1
        ready = min(stride, self.acc.shape[-1])
        return self._release(ready)

    def _release(self, n: int) -> torch.Tensor:
        if n and not bool(self.wsum[:n].min() > 0):
            raise ValueError("overlap-add left a gap: segments too short for the stride")
        out = self.acc[:, :n] / self.wsum[:n]
        self.acc, self.wsum = self.acc[:, n:].clone(), self.wsum[n:].clone()
        return out

    def flush(self) -> torch.Tensor:
        """End of the codes -> the remaining audio [C, n]."""
        if self.ended:
            raise RuntimeError("this StreamingDecoder has been flushed already")
        self.ended = True
        device = next(self.model.parameters()).device
        with torch.no_grad():
            if not self.segmented:
                if self.codebooks is None:
                    raise ValueError("no codes to decode")
                out = self._decode(torch.zeros(1, self.model.quantizer.dimension, 0, device=device), last=True)
                return self._out(out)
            if self.acc is None:
                raise ValueError("no segments to decode")
            return self._out(self._release(self.acc.shape[-1]))
