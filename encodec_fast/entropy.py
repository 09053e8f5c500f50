"""Entropy coding of symbols with EnCodec's arithmetic coder (the C++ extension, or the Python
reference when it is not built): bytes identical to upstream encodec 0.1.1's coder.

    data = encode_symbols(pdfs, symbols)          # pdfs [T, N] float, symbols [T]
    symbols = decode_symbols(pdfs, data)          # the same pdfs -> the same symbols
    dec = SymbolDecoder(data)                     # streaming: one distribution at a time
    s = dec.pull(pdf)                             # pdf [N] -> int (None at the end of the data)
    enc = SymbolEncoder()                         # streaming: rows in pieces, bounded memory
    enc.push(pdfs, symbols); data = enc.finish()  # the bytes of one encode_symbols of all rows

Each distribution is quantized with upstream's `build_stable_quantized_cdf` arithmetic
(`build_cdfs`, vectorised over [T, N]); integer tables are taken as quantized CDFs as they are.
Decoding needs bit-identical pdfs: build them on the CPU in float32 from the same numbers.
"""

import typing as tp

from .ops.arith import (
    MIN_RANGE,
    ROUNDOFF,
    TOTAL_RANGE_BITS,
    CorruptStreamError,
    Decoder,
    Encoder,
    build_cdfs,
    coder_backend,
    cpp_available,
    decode,
    encode,
)

SymbolDecoder = Decoder
SymbolEncoder = Encoder


def encode_symbols(pdfs, symbols, total_range_bits: int = TOTAL_RANGE_BITS, roundoff: float = ROUNDOFF,
                   min_range: int = MIN_RANGE) -> bytes:
    """pdfs [T, N] (or quantized CDFs, int64), symbols [T] -> bytes (upstream's coder, flushed)."""
    return encode(pdfs, symbols, total_range_bits, roundoff, min_range)


def decode_symbols(pdfs, data: tp.Union[bytes, bytearray, memoryview], offset: int = 0,
                   total_range_bits: int = TOTAL_RANGE_BITS, roundoff: float = ROUNDOFF,
                   min_range: int = MIN_RANGE, return_offset: bool = False):
    """The T symbols coded in `data` from byte `offset` with pdfs [T, N] -> LongTensor [T]
    (and the offset just after them if `return_offset`). EOFError if the data ends first,
    CorruptStreamError (a ValueError) if no encoder could have written it with these pdfs."""
    symbols, end = decode(pdfs, data, offset, total_range_bits, roundoff, min_range)
    return (symbols, end) if return_offset else symbols


__all__ = ["MIN_RANGE", "TOTAL_RANGE_BITS", "CorruptStreamError", "SymbolDecoder", "SymbolEncoder", "build_cdfs",
           "coder_backend", "cpp_available", "decode_symbols", "encode_symbols"]
