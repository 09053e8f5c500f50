"""The `.ecdc` container: header, metadata and 10-bit code packing. Knows nothing of models.

Layout: b"ECDC", version byte 0, big-endian u32 metadata length, UTF-8 JSON metadata
(`{"m": model name, "al": audio length, "nc": codebooks, "lm": bool}`), then per segment an
optional big-endian float32 scale and the segment's payload, byte-aligned. Without the LM the
payload is each frame's codes (t-major, then codebook), `bits` bits each, least significant bit
first.
"""

import io
import json
import math
import struct
import typing as tp

import numpy as np

MAGIC = b"ECDC"
VERSION = 0
_HEADER = struct.Struct("!4sBI")
#: Largest metadata we accept when reading (real headers are ~60 bytes).
MAX_METADATA_BYTES = 1 << 16


class EcdcFormatError(ValueError):
    """The bytes are not a valid `.ecdc` stream."""


def read_exactly(fo: tp.IO[bytes], size: int, what: str = "data") -> bytes:
    """Read `size` bytes or raise EOFError naming what was being read."""
    chunks, remaining = [], size
    while remaining > 0:
        chunk = fo.read(remaining)
        if not chunk:
            raise EOFError(f"truncated .ecdc file: {remaining} of {size} bytes of {what} missing")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def write_ecdc_header(fo: tp.IO[bytes], metadata: tp.Any) -> None:
    """Header + metadata, byte for byte as upstream writes them (`json.dumps` defaults)."""
    meta = json.dumps(metadata).encode("utf-8")
    fo.write(_HEADER.pack(MAGIC, VERSION, len(meta)))
    fo.write(meta)


def read_ecdc_header(fo: tp.IO[bytes]) -> tp.Dict[str, tp.Any]:
    """Read and parse the header; raises EcdcFormatError (a ValueError) or EOFError."""
    head = fo.read(_HEADER.size)
    if len(head) < _HEADER.size:
        if len(head) == 0 or MAGIC.startswith(head[:4]):
            raise EOFError(f"truncated .ecdc file: header needs {_HEADER.size} bytes, got {len(head)}")
        raise EcdcFormatError("File is not in ECDC format.")
    magic, version, size = _HEADER.unpack(head)
    if magic != MAGIC:
        raise EcdcFormatError("File is not in ECDC format.")
    if version != VERSION:
        raise EcdcFormatError(f"Version not supported: .ecdc version {version} (this reader knows {VERSION})")
    if size > MAX_METADATA_BYTES:
        raise EcdcFormatError(f"corrupt .ecdc header: metadata length {size} is implausible")
    raw = read_exactly(fo, size, "metadata")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EcdcFormatError(f"corrupt .ecdc header: metadata is not JSON ({err})") from err
    if not isinstance(meta, dict):
        raise EcdcFormatError("corrupt .ecdc header: metadata is not a JSON object")
    return meta


def packed_size(num_values: int, bits: int) -> int:
    return math.ceil(num_values * bits / 8)


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """codes [K, T] (values < 2**bits) -> bytes, t-major, LSB first, last byte zero-padded."""
    codes = np.asarray(codes)
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"codes must be in [0, {1 << bits})")
    flat = codes.T.reshape(-1).astype(np.int64)
    bit_array = ((flat[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(bit_array.reshape(-1), bitorder="little").tobytes()


def unpack_codes(data: bytes, num_codebooks: int, num_frames: int, bits: int) -> np.ndarray:
    """Inverse of `pack_codes` -> codes [K, T] int64. `data` must hold the packed size."""
    n = num_codebooks * num_frames
    need = packed_size(n, bits)
    if len(data) < need:
        raise EOFError(f"truncated .ecdc payload: {need} bytes needed, {len(data)} present")
    bit_array = np.unpackbits(np.frombuffer(data, dtype=np.uint8, count=need), bitorder="little")[: n * bits]
    values = bit_array.reshape(n, bits).astype(np.int64) @ (1 << np.arange(bits, dtype=np.int64))
    return values.reshape(num_frames, num_codebooks).T.copy()


class CodePacker:
    """`pack_codes` of a [K, T] array given in consecutive pieces [K, t_i]: `push` returns the
    whole bytes completed so far, `finish` the last (zero-padded) byte; together, the bytes of
    `pack_codes` of the concatenation."""

    def __init__(self, bits: int):
        self.bits = bits
        self._rest = np.zeros(0, dtype=np.uint8)  # fewer than 8 bits not written yet

    def push(self, codes: np.ndarray) -> bytes:
        codes = np.asarray(codes)
        if codes.size and (codes.min() < 0 or codes.max() >= 1 << self.bits):
            raise ValueError(f"codes must be in [0, {1 << self.bits})")
        flat = codes.T.reshape(-1).astype(np.int64)
        bit_array = np.concatenate([self._rest,
                                    ((flat[:, None] >> np.arange(self.bits)) & 1).astype(np.uint8).reshape(-1)])
        whole = bit_array.shape[0] // 8 * 8
        self._rest = bit_array[whole:]
        return np.packbits(bit_array[:whole], bitorder="little").tobytes()

    def finish(self) -> bytes:
        out = np.packbits(self._rest, bitorder="little").tobytes()
        self._rest = np.zeros(0, dtype=np.uint8)
        return out


class CodeUnpacker:
    """The inverse of `CodePacker`: `push(bytes)` -> the codes [K, t] of the frames completed."""

    def __init__(self, num_codebooks: int, bits: int):
        self.k, self.bits = num_codebooks, bits
        self._rest = np.zeros(0, dtype=np.uint8)

    def push(self, data: bytes) -> np.ndarray:
        bit_array = np.concatenate([self._rest, np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")])
        per_frame = self.k * self.bits
        frames = bit_array.shape[0] // per_frame
        self._rest = bit_array[frames * per_frame:]
        values = bit_array[:frames * per_frame].reshape(-1, self.bits).astype(np.int64) @ (
            1 << np.arange(self.bits, dtype=np.int64))
        return values.reshape(frames, self.k).T.copy()


class BitPacker:
    """Push `bits`-bit values one at a time (upstream's API); `flush` writes the last byte."""

    def __init__(self, bits: int, fo: tp.IO[bytes]):
        self.bits, self.fo = bits, fo
        self._value = 0
        self._nbits = 0

    def push(self, value: int) -> None:
        self._value |= value << self._nbits
        self._nbits += self.bits
        out = bytearray()
        while self._nbits >= 8:
            out.append(self._value & 0xFF)
            self._value >>= 8
            self._nbits -= 8
        if out:
            self.fo.write(bytes(out))

    def flush(self) -> None:
        if self._nbits:
            self.fo.write(bytes([self._value]))
            self._value = 0
            self._nbits = 0
        self.fo.flush()


class BitUnpacker:
    """Pull `bits`-bit values one at a time; `pull` returns None at the end of the stream."""

    def __init__(self, bits: int, fo: tp.IO[bytes]):
        self.bits, self.fo = bits, fo
        self._mask = (1 << bits) - 1
        self._value = 0
        self._nbits = 0

    def pull(self) -> tp.Optional[int]:
        while self._nbits < self.bits:
            byte = self.fo.read(1)
            if not byte:
                return None
            self._value |= byte[0] << self._nbits
            self._nbits += 8
        out = self._value & self._mask
        self._value >>= self.bits
        self._nbits -= self.bits
        return out


def as_file(data: tp.Union[bytes, bytearray, memoryview]) -> io.BytesIO:
    return io.BytesIO(bytes(data))
