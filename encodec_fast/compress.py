"""Compress audio to `.ecdc` bytes and back (upstream's `encodec.compress` API).

Files without the LM are byte-identical to upstream's for the same model and input, and each side
reads the other's. LM-coded files (`use_lm=True`): the same payload bytes as upstream's for the
same LM weights (the LM runs on the CPU in float32 on one thread, as upstream's own tests run it:
see `lm.lm_threads`), plus, unless `checksum=False`, one extra header key `"crc"` (CRC-32 of the
codes), which upstream's reader ignores and ours checks: a decode whose LM probabilities differ
from the encoder's then raises instead of returning wrong audio. With `checksum=False` the whole
file is byte-identical to upstream's.
"""

import io
import math
import struct
import typing as tp
import zlib

import numpy as np
import torch

from . import ecdc, entropy
from .ecdc import EcdcFormatError
from .lm import LMModel, LMStream, lm_threads
from .model import FACTORIES, MODEL_CONFIGS, EncodecModel

MODELS: tp.Dict[str, tp.Callable[..., EncodecModel]] = FACTORIES

_pretrained_cache: tp.Dict[tp.Tuple[str, str], EncodecModel] = {}


def _pretrained(name: str, device: tp.Union[str, torch.device]) -> EncodecModel:
    """Official model `name` on `device`, loaded once per process."""
    key = (name, str(torch.device(device)))
    if key not in _pretrained_cache:
        _pretrained_cache[key] = MODELS[name]().to(device)
    return _pretrained_cache[key]


def codes_crc(frames: tp.Sequence[torch.Tensor], crc: int = 0) -> int:
    """CRC-32 of the codes of every segment ([K, T] each, as little-endian int16, in order)."""
    for codes in frames:
        crc = zlib.crc32(np.ascontiguousarray(codes.cpu().numpy().astype("<i2")).tobytes(), crc)
    return crc


class _SegmentCRC:
    """`codes_crc` of one segment's codes [K, T] given in pieces [K, t_i]: the CRC runs codebook
    by codebook (row-major [K, T]), so the pieces are held, as int16 (1.8 MB per hour and
    codebook pair at 75 frames/s), until the segment ends."""

    def __init__(self):
        self.pieces: tp.List[np.ndarray] = []

    def add(self, codes: torch.Tensor) -> None:
        self.pieces.append(np.ascontiguousarray(codes.cpu().numpy().astype("<i2")))

    def value(self, crc: int) -> int:
        for k in range(self.pieces[0].shape[0] if self.pieces else 0):
            for piece in self.pieces:
                crc = zlib.crc32(piece[k].tobytes(), crc)
        self.pieces = []
        return crc


LM_CHUNK_FRAMES = 256  # frames per LM call when encoding: bounded memory for any length


def _lm_encode_segment(lm: LMModel, codes: torch.Tensor) -> bytes:
    """codes [K, T] -> the arithmetic-coded bytes of one segment: the LM predicts frame t from
    frames < t (a fresh LM state per segment, frame -1 fed as zeros), one CDF per code
    (`_LMSegmentEncoder` given the whole segment at once)."""
    coder = _LMSegmentEncoder(lm)
    coder.push(codes)
    return coder.finish()


def _lm_decode_segment(lm: LMModel, data: bytes, offset: int, K: int, T: int) -> tp.Tuple[torch.Tensor, int]:
    """The [K, T] codes coded in `data` from `offset` -> (codes, offset after the segment).
    Memory grows with the frames actually decoded, not with the T the header claims."""
    stream = LMStream(lm)
    decoder = entropy.SymbolDecoder(data, offset)
    frames: tp.List[torch.Tensor] = []
    inputs = torch.zeros(1, K, 1, dtype=torch.long)
    for _ in range(T):
        try:
            codes = decoder.pull(stream.step(inputs)[0, :, :, 0].t())
        except EOFError:
            raise EOFError("The stream ended sooner than expected (truncated LM-coded .ecdc data).") from None
        frames.append(codes)
        inputs = 1 + codes.view(1, K, 1)
    return (torch.stack(frames, dim=1) if frames else torch.empty(K, 0, dtype=torch.long)), decoder.offset


def _check_lm_payload_size(symbols: int, card: int, payload_bytes: int, segments: int) -> None:
    """An LM-coded payload cannot hold more symbols than its bits allow: each symbol's interval
    is at most 2**24 - (card - 1) * min_range wide, so it costs at least -log2 of that fraction
    of the range (1.8e-4 bits for 1024 codes). A header announcing far more audio (twice the
    bound, plus 64 bits of slack per segment) is corrupt; without this check the decoder would run
    the LM for as long as near-certain predictions keep the stream from ending."""
    fraction = 1 - (card - 1) * entropy.MIN_RANGE / 2 ** entropy.TOTAL_RANGE_BITS
    if fraction <= 0:
        return
    min_bits = -math.log2(fraction)
    if symbols * min_bits / 2 > 8 * payload_bytes + 64 * segments:
        raise EcdcFormatError(f"corrupt .ecdc header: {symbols} LM-coded codes announced, {payload_bytes} bytes of "
                              f"data can hold at most {int(2 * (8 * payload_bytes + 64 * segments) / min_bits)}")


class _LMSegmentEncoder:
    """`_lm_encode_segment` of one segment's codes given in pieces [K, t_i]: the same frames go
    through the LM in the same chunks of LM_CHUNK_FRAMES from the segment's start, so the bytes are
    those of the whole segment at once; memory holds fewer than LM_CHUNK_FRAMES frames."""

    def __init__(self, lm: LMModel):
        self.lm, self.stream, self.encoder = lm, LMStream(lm), entropy.SymbolEncoder()
        self.pending: tp.List[torch.Tensor] = []
        self.pending_frames = 0
        self.last: tp.Optional[torch.Tensor] = None  # the frame before the pending ones [K, 1]

    def push(self, codes: torch.Tensor) -> None:
        if codes.shape[-1]:
            self.pending.append(codes.cpu())
            self.pending_frames += codes.shape[-1]
        while self.pending_frames >= LM_CHUNK_FRAMES:
            self._run(LM_CHUNK_FRAMES)

    def finish(self) -> bytes:
        if self.pending_frames:
            self._run(self.pending_frames)
        return self.encoder.finish()

    def _run(self, n: int) -> None:
        joined = torch.cat(self.pending, dim=-1) if len(self.pending) > 1 else self.pending[0]
        codes, rest = joined[:, :n], joined[:, n:]
        self.pending, self.pending_frames = ([rest] if rest.shape[-1] else []), rest.shape[-1]
        first = torch.zeros(codes.shape[0], 1, dtype=torch.long) if self.last is None else 1 + self.last
        inputs = torch.cat([first, 1 + codes[:, :-1]], dim=-1)[None]
        self.last = codes[:, -1:]
        probabilities = self.stream.run_inputs(inputs)  # [c, 1, card, K]
        pdfs = probabilities[:, 0].transpose(1, 2).reshape(-1, self.lm.card)
        self.encoder.push(pdfs, codes.t().reshape(-1))


AUDIO_BLOCK_SECONDS = 10.0


def _check_model_name(model: EncodecModel) -> None:
    if model.name not in MODELS:
        raise ValueError(f"The provided model {model.name} is not supported (the .ecdc header must name one of "
                         f"{sorted(MODELS)}; give models built from your own checkpoints that name).")


def compress_iter(model: EncodecModel, chunks: tp.Iterable[torch.Tensor], length: tp.Optional[int] = None,
                  use_lm: bool = False, checksum: bool = True) -> tp.Iterator[bytes]:
    """Compress one signal given as consecutive chunks [C, n_i] (at `model.sample_rate`, with
    `model.channels`) -> the pieces of its `.ecdc` bytes, the same bytes as `compress` of the whole
    signal (byte-identical to upstream's without the LM).

    Memory: one encoder call's activations (`streaming.StreamingEncoder`), whatever the length.
    The header states the length: with `length` given (and no LM checksum, which covers every
    code) the header comes first and the payload follows as it is made; otherwise the payload
    (a few MB per hour) is held until the end. A signal that does not have `length` samples
    raises ValueError at its end, after the pieces yielded so far (write to a temporary file).
    """
    from .streaming import StreamingEncoder
    _check_model_name(model)
    if length is not None and (type(length) is not int or length < 1):
        raise ValueError(f"length must be a positive int, got {length!r}")
    lm = model.get_lm_model().cpu() if use_lm else None
    encoder = StreamingEncoder(model)
    codebooks = model.num_codebooks
    header_first = length is not None and not (use_lm and checksum)
    held: tp.List[bytes] = []
    crc = 0
    if header_first:
        head = io.BytesIO()
        ecdc.write_ecdc_header(head, {"m": model.name, "al": length, "nc": codebooks, "lm": use_lm})
        yield head.getvalue()

    def emit(piece: bytes) -> tp.Iterator[bytes]:
        if not piece:
            return
        if header_first:
            yield piece
        else:
            held.append(piece)

    segmented = model.segment_length is not None
    packer = ecdc.CodePacker(model.bits_per_codebook)
    lm_coder = _LMSegmentEncoder(lm) if lm is not None and not segmented else None
    segment_crc = _SegmentCRC()

    def codes_out(out) -> tp.Iterator[bytes]:
        nonlocal crc
        if segmented:
            for codes, scale in out:
                codes = codes.cpu()
                if use_lm and checksum:
                    crc = codes_crc([codes], crc)
                piece = b"" if scale is None else struct.pack("!f", scale.cpu().item())
                if lm is not None:
                    with lm_threads(1):
                        piece += _lm_encode_segment(lm, codes)
                else:
                    piece += ecdc.pack_codes(codes.numpy(), model.bits_per_codebook)
                yield from emit(piece)
            return
        codes = out.cpu()
        if use_lm and checksum:
            segment_crc.add(codes)
        if lm_coder is not None:
            with lm_threads(1):
                lm_coder.push(codes)
        else:
            yield from emit(packer.push(codes.numpy()))

    total = 0
    for chunk in chunks:
        encoder._check(chunk)
        total += chunk.shape[-1]
        if length is not None and total > length:
            raise ValueError(f"the audio holds more than the {length} samples announced")
        yield from codes_out(encoder.push(chunk))
    if length is not None and total != length:
        raise ValueError(f"the audio ended after {total} of the {length} samples announced")
    yield from codes_out(encoder.flush())
    if not segmented:
        if lm_coder is not None:
            with lm_threads(1):
                yield from emit(lm_coder.finish())
        else:
            yield from emit(packer.finish())
    if not header_first:
        metadata = {"m": model.name, "al": total, "nc": codebooks, "lm": use_lm}
        if use_lm and checksum:
            metadata["crc"] = crc if segmented else segment_crc.value(0)
        head = io.BytesIO()
        ecdc.write_ecdc_header(head, metadata)
        yield head.getvalue()
        yield from held


def _chunks_of(wav: torch.Tensor, sample_rate: int) -> tp.Iterator[torch.Tensor]:
    step = max(1, int(AUDIO_BLOCK_SECONDS * sample_rate))
    for a in range(0, wav.shape[-1], step):
        yield wav[:, a:a + step]


def _check_wav(model: EncodecModel, wav: tp.Any) -> None:
    if not isinstance(wav, torch.Tensor) or wav.dim() != 2:
        raise ValueError(f"Only single waveform can be encoded: expected [C, T], got "
                         f"{tuple(wav.shape) if isinstance(wav, torch.Tensor) else type(wav).__name__}")
    _check_model_name(model)
    model._check_audio(wav, batched=False)
    if not torch.isfinite(wav).all():
        raise ValueError("audio contains NaN or infinite samples")


def compress_to_file(model: EncodecModel, wav: torch.Tensor, fo: tp.IO[bytes], use_lm: bool = True,
                     checksum: bool = True) -> None:
    """Compress `wav` [C, T] (at `model.sample_rate`, `model.channels`) into the file object `fo`.

    `use_lm` defaults to True as upstream's. `checksum` (LM files only): add the "crc" header key
    (see the module docstring); False writes exactly upstream's bytes. Runs through the streaming
    encoder (`compress_iter`): memory does not grow with the length beyond `wav` itself.
    """
    _check_wav(model, wav)
    for piece in compress_iter(model, _chunks_of(wav, model.sample_rate), wav.shape[-1], use_lm=use_lm,
                               checksum=checksum):
        fo.write(piece)
    fo.flush()


def compress(model: EncodecModel, wav: torch.Tensor, use_lm: bool = False, checksum: bool = True) -> bytes:
    """Compress `wav` [C, T] to `.ecdc` bytes (`checksum`: see `compress_to_file`)."""
    fo = io.BytesIO()
    compress_to_file(model, wav, fo, use_lm=use_lm, checksum=checksum)
    return fo.getvalue()


def _check_metadata(meta: tp.Dict[str, tp.Any]) -> tp.Tuple[str, int, int, bool]:
    """Every header field's type and range; EcdcFormatError (a ValueError) for any other value."""
    for key in ("m", "al", "nc", "lm"):
        if key not in meta:
            raise EcdcFormatError(f"corrupt .ecdc header: key {key!r} missing")
    name, length, codebooks, use_lm = meta["m"], meta["al"], meta["nc"], meta["lm"]
    if type(name) is not str:
        raise EcdcFormatError(f"corrupt .ecdc header: model name {name!r} is not a string")
    if name not in MODELS:
        raise EcdcFormatError(f"The audio was compressed with an unsupported model {name!r}.")
    if type(length) is not int or not 1 <= length <= MAX_AUDIO_SAMPLES:
        raise EcdcFormatError(f"corrupt .ecdc header: audio length {length!r}")
    if type(codebooks) is not int or not 1 <= codebooks <= 1024:
        raise EcdcFormatError(f"corrupt .ecdc header: number of codebooks {codebooks!r}")
    if type(use_lm) is not bool:
        raise EcdcFormatError(f"corrupt .ecdc header: lm flag {use_lm!r}")
    crc = meta.get("crc")
    if crc is not None and (type(crc) is not int or not 0 <= crc < 2 ** 32):
        raise EcdcFormatError(f"corrupt .ecdc header: crc {crc!r}")
    return name, length, codebooks, use_lm


#: Longest audio a header may announce: a week at 48 kHz (more is a corrupt header, not a file).
MAX_AUDIO_SAMPLES = 48_000 * 3600 * 24 * 7


def _check_model(model: EncodecModel, name: str, codebooks: int) -> None:
    cfg = MODEL_CONFIGS[name]
    if (model.sample_rate, model.channels, model.segment) != (cfg["sample_rate"], cfg["channels"], cfg["segment"]):
        raise ValueError(f"the file was made by {name} ({cfg['sample_rate']} Hz, {cfg['channels']} channel(s)); "
                         f"the model given decodes {model.sample_rate} Hz, {model.channels} channel(s)")
    if codebooks > model.quantizer.n_q:
        raise EcdcFormatError(f"corrupt .ecdc header: {codebooks} codebooks, {name} has {model.quantizer.n_q}")


def _segment_lengths(model: EncodecModel, length: int) -> tp.Iterator[int]:
    seg = model.segment_length or length
    stride = model.segment_stride or length
    for offset in range(0, length, stride):
        yield min(length - offset, seg)


#: Frames per decoder call when decompressing the 24 kHz model (2 s; measured on a 2-minute file,
#: 2 CPU cores: peak RSS 1.04 GB with 2 s calls, 1.35 GB with 5 s, 2.9 GB with 20 s, at the same
#: speed); files under two blocks decode in one call (the same bits as `model.decode`).
DECODE_BLOCK_FRAMES = 150
#: Segments (48 kHz) decoded together when reading a file: stacked into one decoder call on CUDA;
#: on CPU the frame-rate layers run on them together, the rest segment by segment.
SEGMENTS_PER_DECODE = 16


class DecompressIter:
    """The audio of one `.ecdc` stream in consecutive chunks [C, n] (`decompress_iter`).

    The header is read and checked when this object is made (ValueError / EOFError then);
    `sample_rate`, `channels`, `length` (samples per channel), `model_name` and `use_lm` describe
    the audio. Iterating decodes the payload as it is read (files without the LM: a block at a
    time; LM-coded files: the payload, a few MB per hour, is read first) through
    `streaming.StreamingDecoder`: memory does not grow with the length. Corrupt data raises
    midway (ValueError / EOFError), and a checksum mismatch (LM files) after the last chunk:
    write to a temporary file and keep it only when the iteration ends normally.
    """

    def __init__(self, fo: tp.IO[bytes], device: tp.Union[str, torch.device] = "cpu",
                 model: tp.Optional[EncodecModel] = None):
        self.fo = fo
        meta = ecdc.read_ecdc_header(fo)
        self.model_name, self.length, self.codebooks, self.use_lm = _check_metadata(meta)
        self.crc = meta.get("crc")
        self.model = model if model is not None else _pretrained(self.model_name, device)
        _check_model(self.model, self.model_name, self.codebooks)
        self.sample_rate, self.channels = self.model.sample_rate, self.model.channels
        self._used = False

    def __iter__(self) -> tp.Iterator[torch.Tensor]:
        if self._used:
            raise RuntimeError("a DecompressIter can be iterated once")
        self._used = True
        from .streaming import StreamingDecoder
        model, length, K = self.model, self.length, self.codebooks
        lm = model.get_lm_model().cpu() if self.use_lm else None
        device = next(model.parameters()).device
        bits = model.bits_per_codebook
        decoder = StreamingDecoder(model, length=length)
        segmented = model.segment_length is not None
        payload = b""
        pos = 0
        if lm is not None:
            payload = self.fo.read()
            symbols = K * -(-length * model.frame_rate // model.sample_rate)
            _check_lm_payload_size(symbols, lm.card, len(payload), -(-length // (model.segment_stride or length)))
        crc = 0
        pending: tp.List[tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor]]] = []
        for index, seg_length in enumerate(_segment_lengths(model, length)):
            num_frames = -(-seg_length * model.frame_rate // model.sample_rate)
            scale = None
            if model.normalize:
                if lm is not None:
                    raw = payload[pos:pos + 4]
                    pos += 4
                else:
                    raw = self.fo.read(4)
                if len(raw) < 4:
                    raise EOFError(f"truncated .ecdc file: the header announces {length} samples, the data ends "
                                   f"after {index} segment(s)")
                (value,) = struct.unpack("!f", raw)
                if not (np.isfinite(value) and value > 0):
                    raise EcdcFormatError(f"corrupt .ecdc file: segment scale {value}")
                scale = torch.tensor([value], device=device)
            if lm is not None:
                blocks, pos = self._lm_blocks(lm, payload, pos, K, num_frames, index)
            else:
                blocks = self._plain_blocks(K, num_frames, bits, index)
            segment_crc = _SegmentCRC()
            if segmented:  # whole segments, decoded SEGMENTS_PER_DECODE at a time
                codes = torch.cat(list(blocks), dim=-1)
                if self.crc is not None:
                    segment_crc.add(codes)
                pending.append((codes, scale))
                if len(pending) == SEGMENTS_PER_DECODE:
                    yield from self._nonempty(decoder.push_segments(pending))
                    pending = []
            else:
                for codes in blocks:
                    if self.crc is not None:
                        segment_crc.add(codes)
                    yield from self._nonempty(decoder.push(codes))
            crc = segment_crc.value(crc)
        if pending:
            yield from self._nonempty(decoder.push_segments(pending))
        tail = decoder.flush()
        if self.crc is not None and crc != self.crc:
            raise EcdcFormatError("the decoded codes do not match the file's checksum: the data is corrupt, or the LM "
                                  "ran with other weights or numerics than the encoder's")
        if tail.shape[-1]:
            yield tail

    @staticmethod
    def _nonempty(audio: torch.Tensor) -> tp.Iterator[torch.Tensor]:
        if audio.shape[-1]:
            yield audio

    def _plain_blocks(self, K: int, num_frames: int, bits: int, index: int) -> tp.Iterator[torch.Tensor]:
        """The [K, t] codes of one segment, read DECODE_BLOCK_FRAMES at a time (the last block
        merged into its predecessor when shorter)."""
        size = ecdc.packed_size(K * num_frames, bits)
        unpacker = ecdc.CodeUnpacker(K, bits)
        frames_done, read = 0, 0
        pending: tp.List[np.ndarray] = []
        pending_frames = 0
        while frames_done < num_frames:
            want = min(size - read, max(1, DECODE_BLOCK_FRAMES * K * bits // 8))
            data = self.fo.read(want)
            if len(data) < want:
                raise EOFError(f"truncated .ecdc file: the header announces {self.length} samples, the data ends "
                               f"in segment {index}")
            read += len(data)
            codes = unpacker.push(data)
            codes = codes[:, :num_frames - frames_done - pending_frames]
            if codes.shape[-1]:
                pending.append(codes)
                pending_frames += codes.shape[-1]
            if read == size or pending_frames >= 2 * DECODE_BLOCK_FRAMES:
                if read < size:  # keep one block back so that the last call is long
                    out = np.concatenate(pending, axis=-1)
                    n = pending_frames - DECODE_BLOCK_FRAMES
                    pending, pending_frames = [out[:, n:]], pending_frames - n
                    frames_done += n
                    yield torch.from_numpy(out[:, :n].copy())
                else:
                    out = np.concatenate(pending, axis=-1)
                    frames_done += out.shape[-1]
                    pending, pending_frames = [], 0
                    yield torch.from_numpy(out)
        if frames_done != num_frames:
            raise EOFError(f"truncated .ecdc payload in segment {index}")

    def _lm_blocks(self, lm: LMModel, payload: bytes, pos: int, K: int, num_frames: int, index: int):
        """The [K, t] codes of one LM-coded segment, decoded frame by frame and handed out in
        blocks; -> (the blocks, the offset after the segment) with the blocks decoded up front."""
        with lm_threads(1):
            try:
                codes, end = _lm_decode_segment(lm, payload, pos, K, num_frames)
            except entropy.CorruptStreamError as exc:
                raise EcdcFormatError(f"corrupt LM-coded .ecdc data in segment {index}: {exc}") from None
        n = codes.shape[-1]
        bounds = [(a, min(a + DECODE_BLOCK_FRAMES, n)) for a in range(0, n, DECODE_BLOCK_FRAMES)]
        if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < DECODE_BLOCK_FRAMES:
            bounds[-2:] = [(bounds[-2][0], n)]
        return [codes[:, a:b] for a, b in bounds], end


def decompress_iter(fo: tp.IO[bytes], device: tp.Union[str, torch.device] = "cpu",
                    model: tp.Optional[EncodecModel] = None) -> DecompressIter:
    """Decode a `.ecdc` stream chunk by chunk: an iterable of audio [C, n] with `sample_rate`,
    `channels` and `length` attributes (see `DecompressIter`)."""
    return DecompressIter(fo, device=device, model=model)


def decompress_from_file(fo: tp.IO[bytes], device: tp.Union[str, torch.device] = "cpu",
                         model: tp.Optional[EncodecModel] = None) -> tp.Tuple[torch.Tensor, int]:
    """Decode a `.ecdc` stream -> (wav [C, T], sample_rate).

    `model`: decode with this model (e.g. one built from your own checkpoint) instead of the
    official weights named in the header. Corrupt or truncated data raises ValueError or EOFError.
    """
    stream = decompress_iter(fo, device=device, model=model)
    chunks = list(stream)
    wav = torch.cat(chunks, dim=-1) if len(chunks) > 1 else chunks[0]
    return wav, stream.sample_rate


def decompress(compressed: bytes, device: tp.Union[str, torch.device] = "cpu",
               model: tp.Optional[EncodecModel] = None) -> tp.Tuple[torch.Tensor, int]:
    """Decode `.ecdc` bytes -> (wav [C, T], sample_rate). See `decompress_from_file`."""
    if not isinstance(compressed, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes, got {type(compressed).__name__}")
    return decompress_from_file(io.BytesIO(bytes(compressed)), device=device, model=model)
