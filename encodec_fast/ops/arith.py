"""EnCodec's arithmetic coder: the Python reference and the dispatch to the C++ extension
(`kernels/arith/arith.cpp`, built by setup.py as `encodec_fast.kernels._arith`).

Quantized CDF of a pdf p[N] (upstream's `build_stable_quantized_cdf`), in float32 on the CPU:
    q[i]      = floor(p[i] / roundoff) * roundoff               (skipped when roundoff is 0)
    ranges[i] = floor(float32(2^B - min_range * N) * q[i]) + min_range
    cdf       = cumsum(ranges)                                  (int64)
with B = total_range_bits (24). On CUDA torch divides by a scalar as a multiplication by its
reciprocal, which moves some floors: CDFs are therefore always built from CPU float32 values.

Coder (upstream's `ArithmeticCoder` / `ArithmeticDecoder`): the state [low, high] widens by
doubling until high - low + 1 >= 2^B; a symbol with cdf interval [lo, hi) narrows it to
[low + ceil(lo d / 2^B), low + floor((hi - 1) d / 2^B)], d the width; the common leading bits of
low and high are emitted, first bit into bit 0 of byte 0. The encoder ends by emitting all
pending bits of low; the decoder reads exactly the bytes the encoder wrote, so several streams
can follow each other in one buffer.

The C++ coder writes the same bytes (tests check both against upstream's) about a thousand
times faster. `ENCODEC_FAST_CODER=python|cpp|auto` (or `ENCODEC_FAST_BACKEND=torch`, or
`ops.use_backend("torch")`) picks one; `auto` takes the extension when it is built and warns once
when it is not.
"""

import functools
import typing as tp
import warnings

import numpy as np
import torch

from .backend import env_choice, requested_backend

TOTAL_RANGE_BITS = 24
ROUNDOFF = 1e-8
MIN_RANGE = 2
MAX_PENDING_BITS = 61  # upstream asserts it after every symbol
CDF_TOO_LARGE = ("the quantized CDF exceeds 2**total_range_bits at this symbol (the probabilities sum past 1): no "
                 "decoder could read the stream back (upstream's coder fails here or writes such a stream); refusing")

Table = tp.Union[torch.Tensor, np.ndarray]


class CorruptStreamError(ValueError):
    """The data cannot have been written by the encoder with these distributions."""


# -- CDFs ------------------------------------------------------------------------------------------

def _check_params(n: int, total_range_bits: int, min_range: int) -> None:
    if not 1 <= total_range_bits <= 30:
        raise ValueError(f"total_range_bits must be in [1, 30], got {total_range_bits}")
    if n < 1:
        raise ValueError("the alphabet must have at least one symbol")
    if min_range < 2:
        raise ValueError("min_range must be at least 2")
    if min_range * n > 2 ** total_range_bits:
        raise ValueError("min_range * alphabet size exceeds 2**total_range_bits: reduce min_range")


def _pdfs_f32(pdfs: Table) -> torch.Tensor:
    t = torch.as_tensor(pdfs).detach().cpu()
    if t.is_complex() or not t.is_floating_point():
        raise TypeError(f"probabilities must be a floating-point array, got {t.dtype}")
    return t.to(torch.float32)


def build_cdfs_torch(pdfs: Table, total_range_bits: int = TOTAL_RANGE_BITS, roundoff: float = ROUNDOFF,
                     min_range: int = MIN_RANGE) -> torch.Tensor:
    """Reference: pdfs [..., N] -> quantized CDFs [..., N] int64 (see the module docstring)."""
    p = _pdfs_f32(pdfs)
    n = p.shape[-1]
    _check_params(n, total_range_bits, min_range)
    if not bool(((p >= 0) & (p <= 1)).all()):
        raise ValueError("probabilities must lie in [0, 1] (found a value outside, or NaN)")
    if roundoff:
        p = (p / roundoff).floor() * roundoff
    total = 2 ** total_range_bits
    scale = (1 - min_range * n / total) * total
    return ((scale * p).floor().long() + min_range).cumsum(-1)


# -- the Python reference coder --------------------------------------------------------------------

def _pack_bits(bits: tp.List[int]) -> bytes:
    return np.packbits(np.asarray(bits, dtype=np.uint8), bitorder="little").tobytes()


class PythonEncoder:
    """Reference encoder: `push(lo, hi)` the cdf interval [lo, hi) of each symbol, then `finish()`."""

    def __init__(self, total_range_bits: int = TOTAL_RANGE_BITS):
        self.range_bits = total_range_bits
        self.low, self.high, self.max_bit = 0, 0, -1
        self.bits: tp.List[int] = []

    def push(self, lo: int, hi: int) -> None:
        if hi <= lo:
            raise ValueError("empty symbol interval in the CDF")
        if hi > 1 << self.range_bits:  # the interval would reach past the range: undecodable
            raise ValueError(CDF_TOO_LARGE)
        while self.high - self.low + 1 < (1 << self.range_bits):
            self.low, self.high, self.max_bit = 2 * self.low, 2 * self.high + 1, self.max_bit + 1
        width = self.high - self.low + 1
        first = -((-lo * width) >> self.range_bits)       # ceil(lo * width / 2^B)
        last = ((hi - 1) * width) >> self.range_bits      # floor((hi - 1) * width / 2^B)
        if last < first:
            raise ValueError("symbol interval vanished (CDF gap smaller than its minimum range)")
        self.low, self.high = self.low + first, self.low + last
        if self.high >> (self.max_bit + 1):
            raise ValueError(CDF_TOO_LARGE)
        while self.max_bit >= 0 and (self.low >> self.max_bit) == (self.high >> self.max_bit):
            bit = self.low >> self.max_bit
            self.bits.append(bit)
            self.low -= bit << self.max_bit
            self.high -= bit << self.max_bit
            self.max_bit -= 1
        if self.max_bit > MAX_PENDING_BITS:
            raise ValueError("arithmetic coder overflow (more than 61 pending bits), as upstream")

    def finish(self) -> bytes:
        self.bits.extend((self.low >> i) & 1 for i in range(self.max_bit, -1, -1))
        self.max_bit = -1
        return _pack_bits(self.bits)


class PythonDecoder:
    """Reference decoder over `data` from byte `offset`: `pull_cdf(cdf)` -> symbol, or None when
    the data ends first; `offset` is the position after the bytes read so far."""

    def __init__(self, data: bytes, offset: int = 0, total_range_bits: int = TOTAL_RANGE_BITS):
        self.data, self.range_bits = (data if isinstance(data, bytes) else bytes(data)), total_range_bits
        if not 0 <= offset <= len(self.data):
            raise ValueError("offset outside the data")
        self.bit = 8 * offset
        self.low = self.high = self.current = 0
        self.max_bit = -1

    @property
    def offset(self) -> int:
        return (self.bit + 7) // 8

    def pull_cdf(self, cdf: tp.Sequence[int]) -> tp.Optional[int]:
        while self.high - self.low + 1 < (1 << self.range_bits):
            if self.bit >= 8 * len(self.data):
                return None
            b = (self.data[self.bit // 8] >> (self.bit % 8)) & 1
            self.bit += 1
            self.low, self.high = 2 * self.low, 2 * self.high + 1
            self.current, self.max_bit = 2 * self.current + b, self.max_bit + 1
        width = self.high - self.low + 1

        def interval(s: int) -> tp.Tuple[int, int]:
            lo = cdf[s - 1] if s else 0
            return (self.low - ((-lo * width) >> self.range_bits),
                    self.low + (((cdf[s] - 1) * width) >> self.range_bits))
        a, b = 0, len(cdf) - 1  # binary search for the interval holding `current`
        while a <= b:
            mid = (a + b) // 2
            first, last = interval(mid)
            if self.current < first:
                b = mid - 1
            elif self.current > last:
                a = mid + 1
            else:
                break
        else:
            raise CorruptStreamError(f"corrupt arithmetic-coded stream: no symbol matches the data at byte "
                                     f"{self.offset} (or the distributions differ from the encoder's)")
        self.low, self.high = first, last
        if cdf[mid] > 1 << self.range_bits or self.high >> (self.max_bit + 1):
            raise CorruptStreamError("corrupt arithmetic-coded stream: a state the encoder refuses")
        while self.max_bit >= 0 and (self.low >> self.max_bit) == (self.high >> self.max_bit):
            drop = (self.low >> self.max_bit) << self.max_bit
            self.low, self.high, self.current = self.low - drop, self.high - drop, self.current - drop
            self.max_bit -= 1
        if self.max_bit > MAX_PENDING_BITS:
            raise CorruptStreamError("corrupt arithmetic-coded stream: more pending bits than any encoder leaves")
        return mid


# -- dispatch --------------------------------------------------------------------------------------

CODERS = ("auto", "cpp", "python")


@functools.lru_cache(maxsize=None)
def _extension() -> tp.Any:
    try:
        from ..kernels import _arith
    except ImportError as exc:
        return exc
    return _arith


def cpp_available() -> bool:
    return not isinstance(_extension(), Exception)


_warned = False


def coder_backend() -> str:
    """'cpp' or 'python': $ENCODEC_FAST_CODER, else the torch backend forces 'python', else the
    extension when it is built (a warning, once, when it is not)."""
    global _warned
    choice = env_choice("ENCODEC_FAST_CODER", CODERS, "auto")
    if choice == "python" or (choice == "auto" and requested_backend() == "torch"):
        return "python"
    if cpp_available():
        return "cpp"
    if choice == "cpp":
        raise ImportError(f"ENCODEC_FAST_CODER=cpp, but the C++ coder is not built: {_extension()}")
    if not _warned:
        _warned = True
        warnings.warn(f"encodec_fast's C++ arithmetic coder is not built ({_extension()}); using the Python "
                      "reference coder, which writes the same bytes about 1000x slower. Reinstall with a C++ "
                      "compiler available to build it.", RuntimeWarning, stacklevel=3)
    return "python"


def _roundoff_for_cpp(roundoff: float) -> bool:
    return roundoff == 0 or 1e-9 <= roundoff <= 1


def _table(table: Table) -> tp.Tuple[np.ndarray, bool]:
    """[T, N] pdfs (float -> float32) or cdfs (int -> int64), C-contiguous, and whether pdfs."""
    t = torch.as_tensor(table).detach().cpu()
    if t.dim() != 2:
        raise ValueError(f"expected a [T, N] table of distributions, got shape {tuple(t.shape)}")
    if t.is_floating_point():
        return t.to(torch.float32).contiguous().numpy(), True
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"unsupported table dtype {t.dtype}")
    return t.to(torch.int64).contiguous().numpy(), False


def build_cdfs(pdfs: Table, total_range_bits: int = TOTAL_RANGE_BITS, roundoff: float = ROUNDOFF,
               min_range: int = MIN_RANGE) -> torch.Tensor:
    """pdfs [..., N] -> quantized CDFs [..., N] int64, on the C++ path when it runs."""
    p = _pdfs_f32(pdfs)
    if coder_backend() != "cpp" or not _roundoff_for_cpp(roundoff) or p.dim() == 0:
        return build_cdfs_torch(p, total_range_bits, roundoff, min_range)
    p = p.contiguous()
    out = torch.empty(p.shape, dtype=torch.int64)
    _extension().build_cdfs(p.view(-1, p.shape[-1]).numpy(), out.view(-1, p.shape[-1]).numpy(), p.shape[-1],
                            total_range_bits, roundoff, min_range)
    return out


class Encoder:
    """Streaming encoder (C++ or the Python reference): `push(table, symbols)` any number of
    times ([T, N] pdfs or int64 quantized CDFs, one symbol per row), then `finish()` -> the bytes,
    the same as one `encode` of all rows. A failed push leaves the encoder unusable."""

    def __init__(self, total_range_bits: int = TOTAL_RANGE_BITS, roundoff: float = ROUNDOFF,
                 min_range: int = MIN_RANGE):
        self.range_bits, self.roundoff, self.min_range = total_range_bits, roundoff, min_range
        self._cpp = coder_backend() == "cpp" and _roundoff_for_cpp(roundoff)
        self._state: tp.Any = _extension().encoder_new(total_range_bits) if self._cpp \
            else PythonEncoder(total_range_bits)
        self._closed: tp.Optional[str] = None

    def push(self, table: Table, symbols: Table) -> None:
        if self._closed:
            raise RuntimeError(self._closed)
        arr, is_pdf = _table(table)
        T, N = arr.shape
        syms = torch.as_tensor(symbols).detach().cpu().to(torch.int64).reshape(-1).contiguous().numpy()
        _check_params(N, self.range_bits, self.min_range)
        if syms.shape[0] != T:
            raise ValueError(f"{syms.shape[0]} symbols for {T} distributions")
        if T and (syms.min() < 0 or syms.max() >= N):
            raise ValueError(f"symbols must lie in [0, {N})")
        try:
            if self._cpp:
                _extension().encoder_push(self._state, arr, syms, N, self.roundoff, self.min_range, is_pdf)
                return
            cdfs = build_cdfs_torch(arr, self.range_bits, self.roundoff, self.min_range).tolist() if is_pdf \
                else arr.tolist()
            for cdf, s in zip(cdfs, syms.tolist()):
                self._state.push(cdf[s - 1] if s else 0, cdf[s])
        except ValueError:
            self._closed = "the encoder failed on an earlier symbol"
            raise

    def finish(self) -> bytes:
        if self._closed:
            raise RuntimeError(self._closed)
        self._closed = "the encoder has finished its stream"
        return _extension().encoder_finish(self._state) if self._cpp else self._state.finish()


def encode(table: Table, symbols: Table, total_range_bits: int = TOTAL_RANGE_BITS, roundoff: float = ROUNDOFF,
           min_range: int = MIN_RANGE) -> bytes:
    """One symbol per row of `table` ([T, N] pdfs, or int64 quantized CDFs) -> the coded bytes."""
    enc = Encoder(total_range_bits, roundoff, min_range)
    enc.push(table, symbols)
    return enc.finish()


class Decoder:
    """Streaming decoder over `data` from byte `offset` (C++ or the Python reference).

    `pull(table)`: table [N] (one distribution) -> the symbol, or None when the data ends
    (upstream's contract); table [T, N] -> LongTensor [T], EOFError when the data ends first.
    Pdfs (float) are quantized as the encoder did; int tables are taken as quantized CDFs.
    `offset`: the position just after the bytes read so far (after the last symbol of a stream,
    where the next stream starts). A stream no encoder could have written with these
    distributions raises CorruptStreamError (a ValueError).
    """

    def __init__(self, data: tp.Union[bytes, bytearray, memoryview], offset: int = 0,
                 total_range_bits: int = TOTAL_RANGE_BITS, roundoff: float = ROUNDOFF, min_range: int = MIN_RANGE):
        self.range_bits, self.roundoff, self.min_range = total_range_bits, roundoff, min_range
        self._cpp = coder_backend() == "cpp" and _roundoff_for_cpp(roundoff)
        data = data if isinstance(data, bytes) else bytes(data)  # no copy per segment of a long file
        if self._cpp:
            self._state = _extension().decoder_new(data, offset, total_range_bits)
        else:
            self._state = PythonDecoder(data, offset, total_range_bits)

    @property
    def offset(self) -> int:
        return _extension().decoder_offset(self._state) if self._cpp else self._state.offset

    def _pull_rows(self, table: Table) -> torch.Tensor:
        arr, is_pdf = _table(table)
        T, N = arr.shape
        out = np.empty(T, dtype=np.int64)
        if self._cpp:  # checks its arguments as _check_params does
            ext = _extension()
            try:
                done = ext.decoder_pull(self._state, arr, N, out, self.roundoff, self.min_range, is_pdf)
            except ext.CorruptStream as exc:
                raise CorruptStreamError(str(exc)) from None
        else:
            _check_params(N, self.range_bits, self.min_range)
            cdfs = build_cdfs_torch(arr, self.range_bits, self.roundoff, self.min_range).tolist() if is_pdf \
                else arr.tolist()
            done = 0
            for cdf in cdfs:
                s = self._state.pull_cdf(cdf)
                if s is None:
                    break
                out[done] = s
                done += 1
        return torch.from_numpy(out[:done])

    def pull(self, table: Table) -> tp.Union[int, None, torch.Tensor]:
        t = torch.as_tensor(table)
        if t.dim() == 1:
            got = self._pull_rows(t[None])
            return int(got[0]) if len(got) else None
        got = self._pull_rows(t)
        if len(got) < t.shape[0]:
            raise EOFError(f"the coded stream ended after {len(got)} of {t.shape[0]} symbols")
        return got


def decode(table: Table, data: tp.Union[bytes, bytearray, memoryview], offset: int = 0,
           total_range_bits: int = TOTAL_RANGE_BITS, roundoff: float = ROUNDOFF,
           min_range: int = MIN_RANGE) -> tp.Tuple[torch.Tensor, int]:
    """One symbol per row of `table` from `data` at `offset` -> (symbols [T] int64, end offset)."""
    dec = Decoder(data, offset, total_range_bits, roundoff, min_range)
    t = torch.as_tensor(table)
    symbols = dec.pull(t.reshape(-1, t.shape[-1]))
    return symbols, dec.offset


__all__ = ["CorruptStreamError", "Decoder", "Encoder", "PythonDecoder", "PythonEncoder", "build_cdfs",
           "build_cdfs_torch",
           "coder_backend", "cpp_available", "decode", "encode"]
