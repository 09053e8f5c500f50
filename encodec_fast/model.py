"""EnCodec models: a drop-in for `encodec.EncodecModel`, with faster inference.

Codes are bit-identical to upstream's for the same weights and input: every operation whose
CPU result depends on the shape of the call (elementwise tails, the LSTM, small matrix products,
long reductions) runs on exactly the tensors upstream would give it; only shape-independent
operations (convolutions, GroupNorm) are batched across segments or clips. See
`encodec_fast.modules.groups`.
"""

import functools
import math
import typing as tp
from pathlib import Path

import torch
from torch import nn

from . import host, ops, timing
from . import modules as m
from . import precision as precision_modes
from . import quantization as qt
from .lm import LMModel
from .modules.groups import Group, Groups, RaggedRows
from .pretrained import CHECKPOINTS, CheckpointError, get_checkpoint, load_state_dict_file

EncodedFrame = tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor]]
PathLike = tp.Union[str, Path]

#: Audio samples (per channel, summed over the batch) that one encoder or decoder call processes
#: at most when a model cuts its input into segments, by device type. On CPU, stacking segments
#: buys little and large activations cost page faults (see `encodec_fast.cpu`); on GPUs it is
#: what keeps the device busy.
SEGMENT_BATCH_SAMPLES = {"cpu": 48_000, "cuda": 64 * 48_000}


#: Rows (segments x batch) that go through the decoder's frame-rate layers (first conv, LSTM) in
#: one call, on any device.
HEAD_BATCH_ROWS = 256


#: Stack segments / clips into one encoder call on CPU too. Off by default: on CPU it buys little,
#: and running each segment or clip as its own call makes codes equal to upstream's by
#: construction. With it on, convolutions run batched (see `encodec_fast.modules.groups`).
BATCH_ON_CPU = False


#: Devices on which `encode_batch` runs clips of different lengths through each op in one call,
#: the rows' lengths on the device (`RaggedRows`: a launch per layer, not per clip; CUDA graphs
#: can capture it). Elsewhere the shape-sensitive ops run clip by clip (`Groups`), which keeps
#: upstream's bits on CPU.
ONE_CALL_DEVICES = frozenset({"cuda"})

#: With one call per batch, its width is rounded up to a length bucket (`bucket_length`): 2^(1/4)
#: steps of whole frames, at most 19% padding, so that batches repeat a few shapes (cuDNN plans,
#: autotuned kernels and CUDA graphs are per shape). 0 turns buckets off.
BUCKET_STEPS_PER_OCTAVE = 4


def bucket_length(length: int, hop: int, steps_per_octave: int = BUCKET_STEPS_PER_OCTAVE) -> int:
    """The smallest bucket holding `length` samples: hop x ceil(2^(k / steps)) for the least k."""
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    frames = -(-length // hop)
    if steps_per_octave <= 0:
        return length
    k = 0
    while math.ceil(2 ** (k / steps_per_octave) - 1e-9) < frames:
        k += 1
    return hop * math.ceil(2 ** (k / steps_per_octave) - 1e-9)


def _segment_budget(device: torch.device) -> int:
    return SEGMENT_BATCH_SAMPLES.get(device.type, SEGMENT_BATCH_SAMPLES["cpu"])


def _stack(device: torch.device) -> bool:
    return device.type != "cpu" or BATCH_ON_CPU


def length_batches(lengths: tp.Sequence[int], budget: int, equal_only: bool = False) -> tp.List[tp.List[int]]:
    """Indices of `lengths`, longest first, cut into consecutive batches whose padded size
    (count x longest) stays within `budget`; an item longer than the budget goes alone.
    `equal_only`: only items of equal length share a batch."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: tp.List[tp.List[int]] = []
    start = 0
    while start < len(order):
        longest = lengths[order[start]]
        stop = start + 1
        while (stop < len(order) and (stop + 1 - start) * longest <= budget
               and (not equal_only or lengths[order[stop]] == longest)):
            stop += 1
        batches.append(order[start:stop])
        start = stop
    return batches


class _Pending:
    """Work queued on the device and the device flags that say whether it went right, read later:
    on CUDA each flag is copied to pinned host memory behind an event, so `_settle()` waits for the
    call that made it only, not for work queued after it."""

    def __init__(self) -> None:
        self._checks: tp.List[tp.Tuple[int, torch.Tensor, tp.Any, tp.Callable[[torch.Tensor], None]]] = []

    def _later(self, flag: tp.Optional[torch.Tensor], on_read: tp.Callable[[torch.Tensor], None],
               first: bool = False) -> None:
        """on_read(flag's value on the host) at `_settle()`, `first` ones before the others (each
        group in the order queued); flag None: nothing to read."""
        if flag is None:
            return
        values, event = host.to_host_later(flag)
        self._checks.append((0 if first else 1, values, event, on_read))

    def _settle(self) -> None:
        checks, self._checks = sorted(self._checks, key=lambda c: c[0]), []
        for _, flag, event, on_read in checks:
            host.wait(event)
            with torch.no_grad():
                on_read(flag)


def _redo_if_overflowed(what: str, redo: tp.Callable[[], None]) -> tp.Callable[[torch.Tensor], None]:
    def on_read(finite: torch.Tensor) -> None:
        if not bool(finite):
            precision_modes.overflow_warning(what)
            redo()
    return on_read


class PendingFrames(_Pending):
    """`EncodecModel.encode_batch_async`'s result: per clip its frames, whose codes the device may
    still be computing, and the fp16 overflow checks not read yet. `result()` reads each check
    (on CUDA from a pinned copy, waiting for that encoder call only, not for work queued after it),
    redoes in exact each call whose fp16 encoder overflowed (with `encode_batch`'s warning) and
    returns the frames, as `encode_batch` gives them."""

    def __init__(self, frames: tp.List[tp.List[tp.Optional[EncodedFrame]]]):
        super().__init__()
        self._frames = frames

    def watch(self, finite: tp.Optional[torch.Tensor], redo: tp.Callable[[], None]) -> None:
        """finite: a call's device flag (`precision.finite_flag`; None: nothing to check); redo: that
        call again in exact, its frames stored."""
        self._later(finite, _redo_if_overflowed("encoder", redo))

    def result(self) -> tp.List[tp.List[EncodedFrame]]:
        self._settle()
        return tp.cast(tp.List[tp.List[EncodedFrame]], self._frames)


class PendingAudio(_Pending):
    """`EncodecModel.decode_batch_async`'s result: per clip its audio, which the device may still be
    computing, and the checks not read yet: whether every clip's codes were in the codebooks' range
    (out-of-range codes were clamped so that the device never indexes past a codebook) and, in fp16,
    whether each decoder call stayed finite. `result()` reads them (waiting for each call only),
    raises IndexError naming the first clip whose codes were out of range, redoes in exact each
    call that overflowed (with `decode_batch`'s warning) and returns the audio, as `decode_batch`
    gives it."""

    def __init__(self, audio: tp.List[tp.Optional[torch.Tensor]]):
        super().__init__()
        self._audio = audio

    def watch_codes(self, in_range: torch.Tensor, clips: tp.Sequence[int], bins: int) -> None:
        """in_range: a bool device tensor [len(clips)], whether clip clips[j]'s codes were in [0, bins)."""
        def on_read(flags: torch.Tensor) -> None:
            for ok, clip in zip(flags.tolist(), clips):
                if not ok:
                    raise IndexError(f"clip {clip}: codes out of range [0, {bins})")
        self._later(in_range, on_read, first=True)

    def watch(self, finite: tp.Optional[torch.Tensor], redo: tp.Callable[[], None]) -> None:
        """finite: a decoder call's device flag (None: nothing to check); redo: that call in exact,
        its audio stored."""
        self._later(finite, _redo_if_overflowed("decoder", redo))

    def result(self) -> tp.List[torch.Tensor]:
        self._settle()
        return tp.cast(tp.List[torch.Tensor], self._audio)


class EncodecModel(nn.Module):
    """EnCodec on raw waveforms [B, C, T].

    Args:
        encoder, decoder, quantizer: the SEANet encoder/decoder and the residual quantizer.
        target_bandwidths: supported bandwidths in kbps.
        sample_rate, channels: of the audio the model takes.
        normalize: divide each segment by its RMS (the scale is returned with the codes).
        segment: segment duration in seconds for overlap-add, or None for one pass.
        overlap: overlap between segments, as a fraction of the segment.
        name: model name written in `.ecdc` files.
    """

    def __init__(self, encoder: m.SEANetEncoder, decoder: m.SEANetDecoder, quantizer: qt.ResidualVectorQuantizer,
                 target_bandwidths: tp.List[float], sample_rate: int, channels: int, normalize: bool = False,
                 segment: tp.Optional[float] = None, overlap: float = 0.01, name: str = "unset"):
        super().__init__()
        self.bandwidth: tp.Optional[float] = None
        self.target_bandwidths = target_bandwidths
        self.encoder = encoder
        self.quantizer = quantizer
        self.decoder = decoder
        self.sample_rate = sample_rate
        self.channels = channels
        self.normalize = normalize
        self.segment = segment
        self.overlap = overlap
        self.frame_rate = math.ceil(self.sample_rate / encoder.hop_length)
        self.name = name
        #: Where `get_lm_model()` takes the LM from when not told (None: the official weights).
        self.lm_checkpoint: tp.Optional[PathLike] = None
        self.lm_repository: tp.Optional[PathLike] = None
        #: The precision mode of encode / decode (`encodec_fast.precision`; `set_precision`).
        self.precision = precision_modes.DEFAULT
        self._cuda_graphs: tp.Any = None  # encodec_fast.graphs.EncoderGraphs, see use_cuda_graphs
        self.bits_per_codebook = int(math.log2(self.quantizer.bins))
        if 2 ** self.bits_per_codebook != self.quantizer.bins:
            raise ValueError("quantizer bins must be a power of 2.")

    # -- properties ----------------------------------------------------------------------------
    @property
    def segment_length(self) -> tp.Optional[int]:
        return None if self.segment is None else int(self.segment * self.sample_rate)

    @property
    def segment_stride(self) -> tp.Optional[int]:
        length = self.segment_length
        return None if length is None else max(1, int((1 - self.overlap) * length))

    @property
    def hop_length(self) -> int:
        return self.encoder.hop_length

    def set_target_bandwidth(self, bandwidth: float):
        if bandwidth not in self.target_bandwidths:
            raise ValueError(f"This model doesn't support the bandwidth {bandwidth}. "
                             f"Select one of {self.target_bandwidths}.")
        self.bandwidth = bandwidth

    def set_precision(self, mode: str) -> "EncodecModel":
        """The precision mode of `encode`, `decode` and `encode_batch`: 'exact' (fp32 products
        everywhere, the default; on CUDA torch's TF32 switches are turned off for the call), 'tf32'
        (TF32 tensor cores for the convolutions and the LSTM), 'bf16' or 'fp16' (the encoder and
        decoder under bf16 / fp16 autocast; fp16 keeps more of exact's codes, and a call that
        overflows fp16's range is redone in exact, with a warning). The codebook search runs in fp32
        in every mode (see `encodec_fast.precision`). Returns the model."""
        self.precision = precision_modes.check(mode)
        return self

    def _mode(self) -> str:
        return getattr(self, "precision", precision_modes.DEFAULT)

    def _precision_scope(self, device: torch.device):
        return precision_modes.scope(self._mode(), device)

    @property
    def num_codebooks(self) -> int:
        """Codebooks used at the current target bandwidth."""
        return self.quantizer.get_num_quantizers_for_bandwidth(self.frame_rate, self.bandwidth)

    # -- encoding ------------------------------------------------------------------------------
    def _check_audio(self, x: torch.Tensor, batched: bool) -> None:
        want = "[B, C, T]" if batched else "[C, T]"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor {want}, got {type(x).__name__}")
        if x.dim() != (3 if batched else 2):
            raise ValueError(f"expected audio of shape {want}, got {tuple(x.shape)}")
        if x.shape[-2] != self.channels:
            raise ValueError(f"{self.name if self.name != 'unset' else 'this model'} takes {self.channels} "
                             f"channel(s), got {x.shape[-2]}; use encodec_fast.convert_audio")
        if x.shape[-1] == 0:
            raise ValueError("cannot encode empty audio (0 samples)")
        if not x.is_floating_point():
            raise TypeError(f"expected floating-point audio, got {x.dtype}")

    def _segments(self, length: int) -> tp.List[tp.Tuple[int, int]]:
        """(offset, length) of each segment of an input of `length` samples."""
        seg, stride = self.segment_length, self.segment_stride
        if seg is None or stride is None:
            return [(0, length)]
        return [(offset, min(seg, length - offset)) for offset in range(0, length, stride)]

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        """Upstream's per-segment volume, on the segment exactly as upstream slices it: [B, 1, 1]."""
        mono = x.mean(dim=1, keepdim=True)
        return 1e-8 + mono.pow(2).mean(dim=2, keepdim=True).sqrt()

    def _latents(self, x: torch.Tensor, groups: tp.Union[None, Groups, RaggedRows], mode: str) -> torch.Tensor:
        """The encoder in precision `mode`, its latents in the codebooks' dtype (fp32: the search runs
        in it whatever autocast left the latents in)."""
        with precision_modes.scope(mode, x.device), timing.stage("encoder convolutions", x.device):
            emb = self.encoder(x, groups)
        return emb.to(self.quantizer.vq.layers[0]._codebook.embed.dtype)

    def _encode_rows(self, x: torch.Tensor, groups: tp.Union[None, Groups, RaggedRows],
                     mode: tp.Optional[str] = None) -> torch.Tensor:
        """Encoder + quantizer on a stacked batch -> codes [N, K, T] (zeros past a group's frames),
        in `mode` (default: the model's); an fp16 encoder call that overflowed is redone in exact
        (`precision.overflowed`)."""
        mode = self._mode() if mode is None else mode
        emb = self._latents(x, groups, mode)
        if precision_modes.overflowed(mode, emb):
            precision_modes.overflow_warning("encoder")
            emb = self._latents(x, groups, "exact")
        return self._search(emb, groups)

    def _encode_rows_unchecked(self, x: torch.Tensor, groups: tp.Union[None, Groups, RaggedRows],
                               mode: str) -> tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor]]:
        """`_encode_rows` in `mode` without reading its overflow check: (codes, the latents' finite
        flag on the device in fp16 (`precision.finite_flag`), else None). Nothing here waits for
        the device; the caller reads the flag and redoes the call in exact if it is false."""
        emb = self._latents(x, groups, mode)
        return self._search(emb, groups), precision_modes.finite_flag(mode, emb)

    def _search(self, emb: torch.Tensor, groups: tp.Union[None, Groups, RaggedRows]) -> torch.Tensor:
        """The codebook search on the latents of a stacked batch -> codes [N, K, T].

        With `Groups` the search runs per group on that group's valid frames only: a matrix
        product's bits can depend on its number of rows. With `RaggedRows` it runs once on every
        frame (the kernels' codes do not depend on the rows around them) and the frames past each
        row's end are zeroed on the device.
        """
        with timing.stage("RVQ search", emb.device):
            if groups is None:
                return self.quantizer.encode(emb, self.frame_rate, self.bandwidth).transpose(0, 1)
            if isinstance(groups, RaggedRows):
                codes = self.quantizer.encode(emb, self.frame_rate, self.bandwidth).transpose(0, 1)
                frames = -(-groups.lengths // self.hop_length)
                return codes.masked_fill_(~RaggedRows(frames).valid(codes.shape[-1])[:, None, :], 0)
            codes = torch.zeros(emb.shape[0], self.num_codebooks, emb.shape[-1], dtype=torch.long,
                                device=emb.device)
            for g in groups:
                frames = math.ceil(g.length / self.hop_length)
                part = self.quantizer.encode(emb[g.start:g.stop, :, :frames], self.frame_rate, self.bandwidth)
                codes[g.start:g.stop, :, :frames] = part.transpose(0, 1)
            return codes

    def use_cuda_graphs(self, enabled: bool = True, max_graphs: int = 8) -> "EncodecModel":
        """Replay `encode_batch`'s batches on CUDA from captured graphs (`encodec_fast.graphs`): one
        capture per batch shape (length bucket x rows), bandwidth and precision mode, at most
        `max_graphs` kept (least recently used dropped). The codes are those of the same batch run
        without graphs (the same kernels, replayed)."""
        from .graphs import EncoderGraphs
        self._cuda_graphs = EncoderGraphs(self, max_graphs) if enabled else None
        return self

    def encode(self, x: torch.Tensor) -> tp.List[EncodedFrame]:
        """x [B, C, T] -> list of (codes [B, K, T_i] int64, scale [B, 1] or None), one per segment.

        The segments of a 48 kHz input go through the encoder together (in batches bounded by
        `SEGMENT_BATCH_SAMPLES`), with the same codes as upstream's one-by-one loop.
        """
        self._check_audio(x, batched=True)
        with torch.no_grad():
            segments = self._segments(x.shape[-1])
            if len(segments) == 1 and not self.normalize:
                return [(self._encode_rows(x, None), None)]
            out: tp.List[tp.Optional[EncodedFrame]] = [None] * len(segments)
            by_length: tp.Dict[int, tp.List[int]] = {}
            for i, (_, n) in enumerate(segments):
                by_length.setdefault(n, []).append(i)
            for n, indices in by_length.items():
                views = [x[:, :, segments[i][0]:segments[i][0] + n] for i in indices]
                for i, frame in zip(indices, self.encode_segments(views)):
                    out[i] = frame
            return tp.cast(tp.List[EncodedFrame], out)

    def encode_segments(self, views: tp.Sequence[torch.Tensor]) -> tp.List[EncodedFrame]:
        """Segments of equal length, each [B, C, n] (n <= segment_length), -> their (codes [B, K, T],
        scale [B, 1] or None) as `encode` computes those segments of a longer input: stacked into
        calls of at most `SEGMENT_BATCH_SAMPLES` on CUDA (or with BATCH_ON_CPU), one call per
        segment on CPU. `encode` and the streaming encoder (`streaming.StreamingEncoder`) use it."""
        if not views:
            return []
        for v in views:
            self._check_audio(v, batched=True)
        B, n = views[0].shape[0], views[0].shape[-1]
        if any(v.shape != views[0].shape for v in views):
            raise ValueError(f"segments of one call must have one shape, got {sorted({tuple(v.shape) for v in views})}")
        out: tp.List[EncodedFrame] = []
        per_call = max(1, _segment_budget(views[0].device) // (B * n)) if _stack(views[0].device) else 1
        with torch.no_grad():
            for c in range(0, len(views), per_call):
                chunk = views[c:c + per_call]
                scales = [self._scale(v) if self.normalize else None for v in chunk]
                batch = torch.cat(list(chunk)) if len(chunk) > 1 else chunk[0]
                if self.normalize:
                    batch = batch / torch.cat(scales)  # type: ignore[arg-type]
                groups = Groups.by_rows(B, [n] * len(chunk)) if len(chunk) > 1 else None
                codes = self._encode_rows(batch, groups)
                for j, scale in enumerate(scales):
                    out.append((codes[j * B:(j + 1) * B], None if scale is None else scale.view(-1, 1)))
        return out

    def encode_segment(self, x: torch.Tensor) -> EncodedFrame:
        """One segment x [B, C, n] (n <= segment_length) -> (codes [B, K, T], scale [B, 1] or None),
        as `encode` computes that segment of a longer input (streaming by segment)."""
        return self.encode_segments([x])[0]

    def encode_batch(self, wavs: tp.Sequence[torch.Tensor], max_batch_samples: int = 24_000 * 120
                     ) -> tp.List[tp.List[EncodedFrame]]:
        """Encode clips of different lengths [C, T_i] together; item i equals `encode(wavs[i][None])`.

        Why the codes are equal: the clips are stacked (zero-padded to a common length) and every
        convolution's padding is rebuilt for each clip from that clip's own samples, with its own
        extra padding at its own end, so each valid output reads exactly what it reads when the
        clip runs alone (the 24 kHz model is causal, and the right edge is reflected per clip, so
        the zeros after a short clip never reach its frames); convolutions give each batch row the
        same bits whatever the batch holds. The operations whose CPU results depend on the call's
        shape (ELU, LSTM, codebook search) run once per clip on that clip's own tensor.
        Models with GroupNorm (48 kHz) only stack segments of equal length, since the norm's
        statistics would otherwise see the padding.

        On the devices of `ONE_CALL_DEVICES` (CUDA) a batch is padded to its length bucket
        (`bucket_length`) and every op runs once for the whole batch with the clips' lengths on the
        device (`RaggedRows`: the padding rebuilt per clip by one gather); there a clip's codes are
        its codes alone up to the device's own shape-dependent roundings (cuDNN and cuBLAS choose
        algorithms by shape), and `use_cuda_graphs` replays each batch shape from a CUDA graph.

        `max_batch_samples` bounds the padded samples per encoder call. `encode_batch_async` is the
        same without waiting for the device.
        """
        return self.encode_batch_async(wavs, max_batch_samples).result()

    def encode_batch_async(self, wavs: tp.Sequence[torch.Tensor], max_batch_samples: int = 24_000 * 120
                           ) -> "PendingFrames":
        """`encode_batch`'s work queued on the device, nothing waited for: -> `PendingFrames`, whose
        `result()` gives what `encode_batch` returns. On CUDA the host neither reads a value from
        the device nor copies from pageable memory here (the clips' lengths go from pinned memory),
        so a caller can queue the next batch while this one runs (`encodec-fast tokenize` does). In
        fp16 each encoder call's overflow check is read by `result()`, which waits for that call
        only and redoes in exact the calls that overflowed, as `encode_batch` does."""
        for w in wavs:
            self._check_audio(w, batched=False)
        results: tp.List[tp.List[tp.Optional[EncodedFrame]]] = [
            [None] * len(self._segments(w.shape[-1])) for w in wavs]
        pending = PendingFrames(results)
        # (clip, segment index, offset, length) for every segment of every clip.
        items = [(i, s, off, n) for i, w in enumerate(wavs) for s, (off, n) in enumerate(self._segments(w.shape[-1]))]
        ragged = self.encoder.norm != "time_group_norm"
        device = wavs[0].device if wavs else torch.device("cpu")
        budget = max_batch_samples if _stack(device) else 0  # 0: one segment per call
        one_call = ragged and budget > 0 and device.type in ONE_CALL_DEVICES
        # with one call per batch, a batch's width is its longest clip's length bucket
        widths = [bucket_length(it[3], self.hop_length) if one_call else it[3] for it in items]

        def store(chunk, scales, codes: torch.Tensor) -> None:
            for row, (i, s, _, n) in enumerate(chunk):
                scale = scales[row]
                frames = math.ceil(n / self.hop_length)
                results[i][s] = (codes[row:row + 1, :, :frames].clone(), None if scale is None else scale.view(-1, 1))

        def store_exact(chunk, scales, batch: torch.Tensor, groups) -> None:  # a call that overflowed fp16, redone
            store(chunk, scales, self._encode_rows(batch, groups, "exact"))

        with torch.no_grad():
            for batch_items in length_batches(widths, budget, equal_only=not ragged):
                chunk = [items[k] for k in batch_items]
                width = widths[batch_items[0]]
                views = [wavs[i][None, :, off:off + n] for i, _, off, n in chunk]
                scales = [self._scale(v) if self.normalize else None for v in views]
                batch = views[0].new_zeros(len(chunk), self.channels, width)
                for row, v in enumerate(views):
                    batch[row, :, : v.shape[-1]] = v / scales[row] if self.normalize else v
                lengths = [n for _, _, _, n in chunk]
                groups: tp.Union[None, Groups, RaggedRows]
                if len(chunk) == 1 and lengths[0] == width:
                    groups = None
                elif one_call:
                    groups = RaggedRows(host.to_device(torch.tensor(lengths, dtype=torch.long), device))
                else:
                    groups = Groups([Group(row, row + 1, n) for row, n in enumerate(lengths)])
                if isinstance(groups, RaggedRows) and self._cuda_graphs is not None and batch.is_cuda:
                    codes, finite = self._cuda_graphs.replay(batch, groups.lengths)
                else:
                    codes, finite = self._encode_rows_unchecked(batch, groups, self._mode())
                store(chunk, scales, codes)
                pending.watch(finite, functools.partial(store_exact, chunk, scales, batch, groups))
        return pending

    # -- decoding ------------------------------------------------------------------------------
    def decode(self, encoded_frames: tp.List[EncodedFrame]) -> torch.Tensor:
        """Frames from `encode` -> audio [B, C, T']; T' may exceed the input length (see `forward`)."""
        if not encoded_frames:
            raise ValueError("no frames to decode")
        for codes, _ in encoded_frames:
            if codes.dim() != 3:
                raise ValueError(f"codes must be [B, K, T], got {tuple(codes.shape)}")
            if codes.shape[1] > self.quantizer.n_q:
                raise ValueError(f"{codes.shape[1]} codebooks given, the model has {self.quantizer.n_q}")
        if self.segment_length is None:
            if len(encoded_frames) != 1:
                raise ValueError(f"this model decodes exactly one frame, got {len(encoded_frames)}")
            return self._decode_frames(encoded_frames)[0]
        return _linear_overlap_add(self._decode_frames(encoded_frames), self.segment_stride or 1)

    def _stackable_decoder(self) -> bool:
        """Whether nothing after a clip reaches its samples: a causal decoder whose transposed
        convolutions trim only on the right (upstream's 24 kHz model), no GroupNorm, no segments."""
        return (self.segment_length is None and self.decoder.causal and self.decoder.norm != "time_group_norm"
                and all(mod.trim[0] == 0 for mod in self.decoder.modules() if isinstance(mod, m.SConvTranspose1d)))

    def _min_stacked_frames(self) -> int:
        """The fewest frames a clip needs to share a decoder call: a clip no longer than a
        convolution's padding is padded by upstream's rule for short inputs (zeros appended before
        reflecting), which would read past its end in a stacked batch."""
        need, upsampling = 1, 1
        for mod in self.decoder.modules():  # in the order the layers run
            if isinstance(mod, m.SConvTranspose1d):
                upsampling *= mod.convtr.convtr.stride[0]
            elif isinstance(mod, m.SConv1d) and mod.padding_total > 0:
                need = max(need, -(-(mod.padding_total + 1) // upsampling))
        return need

    def decode_batch(self, frames_per_clip: tp.Sequence[tp.List[EncodedFrame]],
                     max_batch_samples: int = 24_000 * 120) -> tp.List[torch.Tensor]:
        """Decode clips of different lengths together, the inverse of `encode_batch`: per clip its
        frames -> its audio [C, frames x hop_length], item i equal to `decode(frames_per_clip[i])[0]`
        up to rounding (on CPU the ELU's and the LSTM's roundings depend on the call's shape).

        On a stackable model (causal decoder, no segments: the 24 kHz model) the clips' codes are
        stacked, padded with code 0 to a common length (on CUDA their length bucket, as
        `encode_batch`), decoded in one call per op and cut back: the decoder is causal, so the
        padding after a clip never reaches its samples (clips shorter than `_min_stacked_frames`,
        7 frames for the 24 kHz model, decode alone). Other models decode clip by clip (each
        clip's segments together). `max_batch_samples` bounds the padded output samples per call.
        `decode_batch_async` is the same without waiting for the device.
        """
        return self.decode_batch_async(frames_per_clip, max_batch_samples).result()

    def decode_batch_async(self, frames_per_clip: tp.Sequence[tp.List[EncodedFrame]],
                           max_batch_samples: int = 24_000 * 120) -> "PendingAudio":
        """`decode_batch`'s work queued on the device, nothing waited for (on a stackable model):
        -> `PendingAudio`, whose `result()` gives what `decode_batch` returns. The codes' range is
        checked on the device (one flag per clip, read by `result()`, which raises IndexError for
        codes out of range) and, in fp16, each decoder call's overflow (redone in exact by
        `result()`). Models that decode clip by clip (48 kHz) decode here, with `decode`'s checks."""
        if not self._stackable_decoder():
            return PendingAudio([self.decode(list(frames))[0] for frames in frames_per_clip])
        clips: tp.List[tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor]]] = []
        for i, frames in enumerate(frames_per_clip):
            if len(frames) != 1:
                raise ValueError(f"clip {i}: this model decodes exactly one frame per clip, got {len(frames)}")
            codes, scale = frames[0]
            if codes.dim() != 3 or codes.shape[0] != 1:
                raise ValueError(f"clip {i}: codes must be [1, K, T], got {tuple(codes.shape)}")
            if codes.shape[1] > self.quantizer.n_q:
                raise ValueError(f"clip {i}: {codes.shape[1]} codebooks given, the model has {self.quantizer.n_q}")
            if codes.shape[-1] < 1:
                raise ValueError(f"clip {i}: no frames to decode")
            ops.check_codes_dtype(codes)
            clips.append((codes, scale))
        out: tp.List[tp.Optional[torch.Tensor]] = [None] * len(clips)
        pending = PendingAudio(out)
        if not clips:
            return pending
        device = clips[0][0].device
        one_call = device.type in ONE_CALL_DEVICES
        hop = self.hop_length
        bins = self.quantizer.bins
        mode = self._mode()
        # batches of clip indices, each decoded in one call; clips too short to stack alone
        batches: tp.List[tp.Tuple[tp.List[int], int]] = []
        by_books: tp.Dict[int, tp.List[int]] = {}
        shortest = self._min_stacked_frames()
        for i, (codes, _) in enumerate(clips):
            if codes.shape[-1] < shortest:
                batches.append(([i], codes.shape[-1]))
            else:
                by_books.setdefault(codes.shape[1], []).append(i)
        for indices in by_books.values():
            frames = [clips[i][0].shape[-1] for i in indices]
            widths = [bucket_length(t * hop, hop) // hop if one_call else t for t in frames]
            for batch in length_batches(widths, max(1, max_batch_samples // hop)):
                batches.append(([indices[k] for k in batch], widths[batch[0]]))

        def store(members: tp.List[int], audio: torch.Tensor) -> None:
            for row, i in enumerate(members):
                y = audio[row, :, :clips[i][0].shape[-1] * hop]
                scale = clips[i][1]
                out[i] = y * scale.view(-1, 1) if scale is not None else (y.clone() if len(members) > 1 else y)

        def redo_exact(members: tp.List[int], codes: torch.Tensor) -> None:
            store(members, self._decode_frames_unchecked([(codes, None)], "exact")[0][0])

        with torch.no_grad():
            for members, width in batches:
                first = clips[members[0]][0]
                if len(members) == 1 and first.shape[-1] == width:
                    codes = first.clone()
                else:
                    codes = first.new_zeros(len(members), first.shape[1], width)
                    for row, i in enumerate(members):
                        codes[row, :, :clips[i][0].shape[-1]] = clips[i][0][0]
                pending.watch_codes(((codes >= 0) & (codes < bins)).flatten(1).all(dim=1), members, bins)
                codes.clamp_(0, bins - 1)  # the device never reads past a codebook; result() raises
                audio, finite = self._decode_frames_unchecked([(codes, None)], mode)
                store(members, audio[0])
                pending.watch(finite, functools.partial(redo_exact, members, codes))
        return pending

    def _decode_frames(self, frames: tp.List[EncodedFrame]) -> tp.List[torch.Tensor]:
        """Decode each frame, frames of the same shape together, in the model's precision mode; a
        call in fp16 that overflowed is redone in exact (with a warning)."""
        mode = self._mode()
        audio, finite = self._decode_frames_unchecked(frames, mode, check_codes=True)
        if finite is not None and not bool(finite):
            precision_modes.overflow_warning("decoder")
            audio = self._decode_frames_unchecked(frames, "exact")[0]
        return audio

    def _decode_frames_unchecked(self, frames: tp.List[EncodedFrame], mode: str, check_codes: bool = False
                                 ) -> tp.Tuple[tp.List[torch.Tensor], tp.Optional[torch.Tensor]]:
        """`_decode_frames` in `mode` without reading anything from the device, unless `check_codes`
        (one read: whether the codes are in range; else the caller has made sure): (audio per
        frame, in fp16 a device flag whether every part of the decoder stayed finite, else None).

        The frame-rate part of the decoder (dequantisation, first conv, LSTM) runs on up to
        `HEAD_BATCH_ROWS` rows at once: its recurrent loop costs about the same for one segment
        as for many. The upsampling part runs on `SEGMENT_BATCH_SAMPLES` at a time.
        """
        out: tp.List[tp.Optional[torch.Tensor]] = [None] * len(frames)
        by_shape: tp.Dict[tp.Tuple[int, ...], tp.List[int]] = {}
        for i, (codes, _) in enumerate(frames):
            by_shape.setdefault(tuple(codes.shape), []).append(i)
        device = frames[0][0].device
        flags: tp.List[torch.Tensor] = []

        def watch(y: torch.Tensor) -> None:
            flag = precision_modes.finite_flag(mode, y)
            if flag is not None:
                flags.append(flag)

        for (B, K, T), indices in by_shape.items():
            per_head = max(1, HEAD_BATCH_ROWS // B)
            per_tail = max(1, _segment_budget(device) // (B * T * self.hop_length))
            for c in range(0, len(indices), per_head):
                chunk = indices[c:c + per_head]
                codes = torch.cat([frames[i][0] for i in chunk]) if len(chunk) > 1 else frames[chunk[0]][0]
                latents = self.quantizer.decode(codes.transpose(0, 1), in_range=not check_codes)
                with precision_modes.scope(mode, device):
                    hidden = self.decoder.forward_head(latents)
                watch(hidden)
                for t in range(0, len(chunk), per_tail):
                    with precision_modes.scope(mode, device):
                        audio = self.decoder.forward_tail(hidden[t * B:(t + per_tail) * B])
                    watch(audio)
                    audio = audio.to(latents.dtype)
                    for j, i in enumerate(chunk[t:t + per_tail]):
                        y = audio[j * B:(j + 1) * B]
                        scale = frames[i][1]
                        out[i] = y * scale.view(-1, 1, 1) if scale is not None else y
        finite = functools.reduce(torch.logical_and, flags) if flags else None
        return tp.cast(tp.List[torch.Tensor], out), finite

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))[:, :, : x.shape[-1]]

    # -- LM ------------------------------------------------------------------------------------
    def get_lm_model(self, repository: tp.Optional[PathLike] = None,
                     checkpoint: tp.Optional[PathLike] = None) -> LMModel:
        """The entropy-coding LM for this model, with the official weights (or `checkpoint`).

        Defaults: the attributes `lm_checkpoint` and `lm_repository` (the command sets them from
        --lm-checkpoint and --repository)."""
        checkpoint = checkpoint if checkpoint is not None else self.lm_checkpoint
        repository = repository if repository is not None else self.lm_repository
        device = next(self.parameters()).device
        lm = LMModel(self.quantizer.n_q, self.quantizer.bins, num_layers=5, dim=200,
                     past_context=int(3.5 * self.frame_rate)).to(device)
        if checkpoint is not None:
            state = load_state_dict_file(checkpoint)
        else:
            lm_name = LM_CHECKPOINTS.get(self.name)
            if lm_name is None:
                raise RuntimeError("No LM pre-trained for the current Encodec model.")
            state = get_checkpoint(lm_name, repository)
        _load_strict(lm, state, "LM checkpoint")
        return lm.eval()

    # -- construction --------------------------------------------------------------------------
    @staticmethod
    def _get_model(target_bandwidths: tp.List[float], sample_rate: int = 24_000, channels: int = 1,
                   causal: bool = True, model_norm: str = "weight_norm", audio_normalize: bool = False,
                   segment: tp.Optional[float] = None, name: str = "unset", n_filters: int = 32,
                   dimension: int = 128, lstm: int = 2, **quantizer_options) -> "EncodecModel":
        """Upstream's construction; `n_filters`, `dimension`, `lstm` size the SEANet (the official
        models use the defaults), `quantizer_options` go to `ResidualVectorQuantizer` (training)."""
        arch = dict(n_filters=n_filters, dimension=dimension, lstm=lstm, norm=model_norm, causal=causal)
        encoder = m.SEANetEncoder(channels=channels, **arch)
        decoder = m.SEANetDecoder(channels=channels, **arch)
        n_q = int(1000 * target_bandwidths[-1] // (math.ceil(sample_rate / encoder.hop_length) * 10))
        quantizer = qt.ResidualVectorQuantizer(dimension=encoder.dimension, n_q=n_q, bins=1024, **quantizer_options)
        return EncodecModel(encoder, decoder, quantizer, target_bandwidths, sample_rate, channels,
                            normalize=audio_normalize, segment=segment, name=name)

    @staticmethod
    def _build(name: str, pretrained: bool, repository: tp.Optional[PathLike],
               checkpoint: tp.Optional[PathLike]) -> "EncodecModel":
        cfg = MODEL_CONFIGS[name]
        if repository is not None and not pretrained:
            raise ValueError("repository= only applies to pretrained=True")
        loaded = pretrained or checkpoint is not None
        model = EncodecModel._get_model(cfg["target_bandwidths"], cfg["sample_rate"], cfg["channels"],
                                        causal=cfg["causal"], model_norm=cfg["norm"],
                                        audio_normalize=cfg["normalize"], segment=cfg["segment"],
                                        name=name if loaded else "unset", **cfg.get("arch", {}))
        if checkpoint is not None:
            _load_strict(model, load_state_dict_file(checkpoint), f"checkpoint {checkpoint}")
        elif pretrained:
            _load_strict(model, get_checkpoint(name, repository), CHECKPOINTS[name])
        return model.eval()

    @staticmethod
    def encodec_model_24khz(pretrained: bool = True, repository: tp.Optional[PathLike] = None,
                            checkpoint: tp.Optional[PathLike] = None) -> "EncodecModel":
        """The causal 24 kHz mono model (1.5, 3, 6, 12, 24 kbps).

        pretrained: load the official weights (hash checked; see `encodec_fast.pretrained`).
        repository: a folder holding the official file, for offline use.
        checkpoint: any compatible state dict file instead (e.g. your own training), no hash check.
        """
        return EncodecModel._build("encodec_24khz", pretrained, repository, checkpoint)

    @staticmethod
    def encodec_model_48khz(pretrained: bool = True, repository: tp.Optional[PathLike] = None,
                            checkpoint: tp.Optional[PathLike] = None) -> "EncodecModel":
        """The non-causal 48 kHz stereo model (3, 6, 12, 24 kbps), 1 s segments with 1% overlap."""
        return EncodecModel._build("encodec_48khz", pretrained, repository, checkpoint)

    @staticmethod
    def encodec_model_24khz_small(pretrained: bool = True, repository: tp.Optional[PathLike] = None,
                                  checkpoint: tp.Optional[PathLike] = None) -> "EncodecModel":
        """A small causal 24 kHz mono codec trained by this project's own trainer (1.5-24 kbps; 8
        filters, 16-dim latents, one LSTM layer). Its weights ship with the package: no download."""
        return EncodecModel._build("encodec_24khz_small", pretrained, repository, checkpoint)


MODEL_CONFIGS: tp.Dict[str, tp.Dict[str, tp.Any]] = {
    "encodec_24khz": dict(target_bandwidths=[1.5, 3.0, 6, 12.0, 24.0], sample_rate=24_000, channels=1,
                          causal=True, norm="weight_norm", normalize=False, segment=None),
    "encodec_48khz": dict(target_bandwidths=[3.0, 6.0, 12.0, 24.0], sample_rate=48_000, channels=2,
                          causal=False, norm="time_group_norm", normalize=True, segment=1.0),
    "encodec_24khz_small": dict(target_bandwidths=[1.5, 3.0, 6, 12.0, 24.0], sample_rate=24_000, channels=1,
                                causal=True, norm="weight_norm", normalize=False, segment=None,
                                arch=dict(n_filters=8, dimension=16, lstm=1)),
}

#: Model name -> the official entropy-coding LM trained for it (the small model has none).
LM_CHECKPOINTS = {"encodec_24khz": "encodec_lm_24khz", "encodec_48khz": "encodec_lm_48khz"}

#: Short names (the command's --model, the tokenizer's model=) -> model names.
SHORT_NAMES = {"24khz": "encodec_24khz", "48khz": "encodec_48khz", "small": "encodec_24khz_small"}

encodec_model_24khz = EncodecModel.encodec_model_24khz
encodec_model_48khz = EncodecModel.encodec_model_48khz
encodec_model_24khz_small = EncodecModel.encodec_model_24khz_small

#: Model name (as `.ecdc` headers write it) -> its factory.
FACTORIES: tp.Dict[str, tp.Callable[..., EncodecModel]] = {
    "encodec_24khz": encodec_model_24khz, "encodec_48khz": encodec_model_48khz,
    "encodec_24khz_small": encodec_model_24khz_small}


def _load_strict(module: nn.Module, state: tp.Dict[str, torch.Tensor], what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{what} does not fit {type(module).__name__}: {err}") from err


def _linear_overlap_add(frames: tp.List[torch.Tensor], stride: int) -> torch.Tensor:
    """Overlap-add with triangular weights (peak mid-frame), normalised by the summed weights.

    The weight triangle is sized from the first frame; a shorter last frame uses its start.
    """
    if not frames:
        raise ValueError("no frames")
    first = frames[0]
    total = stride * (len(frames) - 1) + frames[-1].shape[-1]
    t = torch.linspace(0, 1, first.shape[-1] + 2, device=first.device, dtype=first.dtype)[1:-1]
    weight = 0.5 - (t - 0.5).abs()
    sum_weight = torch.zeros(total, device=first.device, dtype=first.dtype)
    out = torch.zeros(*first.shape[:-1], total, device=first.device, dtype=first.dtype)
    offset = 0
    for frame in frames:
        n = frame.shape[-1]
        out[..., offset:offset + n] += weight[:n] * frame
        sum_weight[offset:offset + n] += weight[:n]
        offset += stride
    if not bool(sum_weight.min() > 0):
        raise ValueError("overlap-add left a gap: frames too short for the stride")
    return out / sum_weight
