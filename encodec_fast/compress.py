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
from .model import FACTORIES, MODEL_CONFIGS, EncodecModel, EncodedFrame

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


LM_CHUNK_FRAMES = 256  # frames per LM call when encoding: bounded memory for any length


def _lm_encode_segment(lm: LMModel, codes: torch.Tensor) -> bytes:
    """codes [K, T] -> the arithmetic-coded bytes of one segment: the LM predicts frame t from
    frames < t (a fresh LM state per segment, frame -1 fed as zeros), one CDF per code. Frames go
    through the LM in chunks (bit-identical to the decoder's steps: `LMStream.run_inputs`) and
    into one streaming encoder, so memory does not grow with the segment's length."""
    K, T = codes.shape
    inputs = LMStream.inputs_of(codes[None])
    stream, encoder = LMStream(lm), entropy.SymbolEncoder()
    for start in range(0, T, LM_CHUNK_FRAMES):
        end = min(T, start + LM_CHUNK_FRAMES)
        probabilities = stream.run_inputs(inputs[..., start:end])  # [c, 1, card, K]
        pdfs = probabilities[:, 0].transpose(1, 2).reshape(-1, lm.card)
        encoder.push(pdfs, codes[:, start:end].t().reshape(-1))
    return encoder.finish()


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


def compress_to_file(model: EncodecModel, wav: torch.Tensor, fo: tp.IO[bytes], use_lm: bool = True,
                     checksum: bool = True) -> None:
    """Compress `wav` [C, T] (at `model.sample_rate`, `model.channels`) into the file object `fo`.

    `use_lm` defaults to True as upstream's. `checksum` (LM files only): add the "crc" header key
    (see the module docstring); False writes exactly upstream's bytes.
    """
    if not isinstance(wav, torch.Tensor) or wav.dim() != 2:
        raise ValueError(f"Only single waveform can be encoded: expected [C, T], got "
                         f"{tuple(wav.shape) if isinstance(wav, torch.Tensor) else type(wav).__name__}")
    if model.name not in MODELS:
        raise ValueError(f"The provided model {model.name} is not supported (the .ecdc header must name one of "
                         f"{sorted(MODELS)}; give models built from your own checkpoints that name).")
    if not torch.isfinite(wav).all():
        raise ValueError("audio contains NaN or infinite samples")
    lm = model.get_lm_model().cpu() if use_lm else None
    frames = model.encode(wav[None])
    metadata = {"m": model.name, "al": wav.shape[-1], "nc": frames[0][0].shape[1], "lm": use_lm}
    if use_lm and checksum:
        metadata["crc"] = codes_crc([codes[0] for codes, _ in frames])
    ecdc.write_ecdc_header(fo, metadata)
    if lm is not None:
        with lm_threads(1):
            payloads = [_lm_encode_segment(lm, codes[0].cpu()) for codes, _ in frames]
    else:
        payloads = [ecdc.pack_codes(codes[0].cpu().numpy(), model.bits_per_codebook) for codes, _ in frames]
    for (_, scale), payload in zip(frames, payloads):
        if scale is not None:
            fo.write(struct.pack("!f", scale.cpu().item()))
        fo.write(payload)
    fo.flush()


def compress(model: EncodecModel, wav: torch.Tensor, use_lm: bool = False, checksum: bool = True) -> bytes:
    """Compress `wav` [C, T] to `.ecdc` bytes (`checksum`: see `compress_to_file`)."""
    fo = io.BytesIO()
    compress_to_file(model, wav, fo, use_lm=use_lm, checksum=checksum)
    return fo.getvalue()


def _check_metadata(meta: tp.Dict[str, tp.Any]) -> tp.Tuple[str, int, int, bool]:
    for key in ("m", "al", "nc", "lm"):
        if key not in meta:
            raise EcdcFormatError(f"corrupt .ecdc header: key {key!r} missing")
    name, length, codebooks, use_lm = meta["m"], meta["al"], meta["nc"], meta["lm"]
    if name not in MODELS:
        raise EcdcFormatError(f"The audio was compressed with an unsupported model {name!r}.")
    if type(length) is not int or length < 1:
        raise EcdcFormatError(f"corrupt .ecdc header: audio length {length!r}")
    if type(codebooks) is not int or codebooks < 1:
        raise EcdcFormatError(f"corrupt .ecdc header: number of codebooks {codebooks!r}")
    if not isinstance(use_lm, bool):
        raise EcdcFormatError(f"corrupt .ecdc header: lm flag {use_lm!r}")
    return name, length, codebooks, use_lm


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


def decompress_from_file(fo: tp.IO[bytes], device: tp.Union[str, torch.device] = "cpu",
                         model: tp.Optional[EncodecModel] = None) -> tp.Tuple[torch.Tensor, int]:
    """Decode a `.ecdc` stream -> (wav [C, T], sample_rate).

    `model`: decode with this model (e.g. one built from your own checkpoint) instead of the
    official weights named in the header. Corrupt or truncated data raises ValueError or EOFError.
    """
    meta = ecdc.read_ecdc_header(fo)
    name, length, codebooks, use_lm = _check_metadata(meta)
    crc = meta.get("crc")
    if crc is not None and (type(crc) is not int or not 0 <= crc < 2 ** 32):
        raise EcdcFormatError(f"corrupt .ecdc header: crc {crc!r}")
    payload = fo.read()
    model = model if model is not None else _pretrained(name, device)
    _check_model(model, name, codebooks)
    lm = model.get_lm_model().cpu() if use_lm else None
    device = next(model.parameters()).device
    bits = model.bits_per_codebook
    scale_size = 4 if model.normalize else 0

    if lm is not None:
        # At least this many codes (segments overlap), in at most this many segments:
        symbols = codebooks * -(-length * model.frame_rate // model.sample_rate)
        _check_lm_payload_size(symbols, lm.card, len(payload), -(-length // (model.segment_stride or length)))
    frames: tp.List[EncodedFrame] = []
    pos = 0
    crc_of_codes = 0
    for seg_length in _segment_lengths(model, length):
        # Frames per segment, in integers: ceil(L * frame_rate / sample_rate).
        num_frames = -(-seg_length * model.frame_rate // model.sample_rate)
        size = scale_size + (0 if lm is not None else ecdc.packed_size(codebooks * num_frames, bits))
        if pos + size > len(payload):
            raise EOFError(f"truncated .ecdc file: the header announces {length} samples, the data ends "
                           f"after {len(frames)} segment(s)")
        scale = None
        if scale_size:
            (value,) = struct.unpack("!f", payload[pos:pos + 4])
            if not (np.isfinite(value) and value > 0):
                raise EcdcFormatError(f"corrupt .ecdc file: segment scale {value}")
            scale = torch.tensor([[value]], device=device)
        if lm is None:
            codes = torch.from_numpy(ecdc.unpack_codes(payload[pos + scale_size:pos + size], codebooks, num_frames,
                                                       bits))
            pos += size
        else:
            with lm_threads(1):
                try:
                    codes, pos = _lm_decode_segment(lm, payload, pos + scale_size, codebooks, num_frames)
                except entropy.CorruptStreamError as exc:
                    raise EcdcFormatError(f"corrupt LM-coded .ecdc data in segment {len(frames)}: {exc}") from None
        if crc is not None:
            crc_of_codes = codes_crc([codes], crc_of_codes)
        frames.append((codes[None].to(device), scale))
    if crc is not None and crc_of_codes != crc:
        raise EcdcFormatError("the decoded codes do not match the file's checksum: the data is corrupt, or the LM "
                              "ran with other weights or numerics than the encoder's")
    with torch.no_grad():
        wav = model.decode(frames)
    return wav[0, :, :length], model.sample_rate


def decompress(compressed: bytes, device: tp.Union[str, torch.device] = "cpu",
               model: tp.Optional[EncodecModel] = None) -> tp.Tuple[torch.Tensor, int]:
    """Decode `.ecdc` bytes -> (wav [C, T], sample_rate). See `decompress_from_file`."""
    if not isinstance(compressed, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes, got {type(compressed).__name__}")
    return decompress_from_file(io.BytesIO(bytes(compressed)), device=device, model=model)
