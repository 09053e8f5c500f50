"""`coder`: arithmetic-coder throughput on CPU, ours (C++, and the Python reference) against upstream
encodec 0.1.1's Python coder and constriction's range coder, on the same distributions.

Distributions: rows of N = 1024 (EnCodec's codebooks), softmax of scaled noise (about 5 bits per
symbol), symbols drawn from them. Microseconds per symbol, every round, for
  - ours: CDF construction (upstream's arithmetic, vectorised) + coding, one call (the headline);
  - ours (C++, CDFs given): coding only; ours (C++, CDF construction only);
  - upstream: `build_stable_quantized_cdf` + `ArithmeticCoder.push` per symbol (and
    `ArithmeticDecoder.pull`), on the first rows only (it is slow);
  - constriction's `RangeEncoder` with `Categorical(perfect=False)` given the same quantized
    distributions: other bytes (it cannot write `.ecdc` files), here as the speed reference.
Every stream is checked: ours equal upstream's on the shared rows, every decode gives the symbols.
"""

import io
import time
import typing as tp

import numpy as np
import torch

from bench.core import Context, benchmark, upstream_missing


def _seconds(fn: tp.Callable[[], tp.Any]) -> tp.Tuple[float, tp.Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


@benchmark("coder", "Arithmetic coder (C++) vs upstream's Python coder and constriction", priority=55)
def run(ctx: Context) -> None:
    from encodec_fast import entropy, ops
    from encodec_fast.ops import arith
    T, N = ctx.pick(500, 5000, 20000), 1024
    U = min(ctx.pick(100, 500, 1000), T)
    params = {"alphabet": N, "symbols": T, "device": "cpu"}
    missing = upstream_missing() or (None if arith.cpp_available() else "the C++ coder is not built")
    if missing:
        ctx.na(params, "ours", "time_per_symbol", "us", missing)
        return
    from encodec.quantization import ac as upstream
    try:
        import constriction
    except ImportError:
        constriction = None

    g = torch.Generator().manual_seed(0)
    pdfs = torch.softmax(3.0 * torch.randn(T, N, generator=g), -1)
    symbols = torch.multinomial(pdfs, 1, generator=g).view(-1)
    cdfs = entropy.build_cdfs(pdfs)
    ranges = torch.diff(cdfs, dim=-1, prepend=torch.zeros(T, 1, dtype=torch.int64))
    quantized_probs = (ranges.double() / ranges.sum(-1, keepdim=True)).numpy()
    times: tp.Dict[tp.Tuple[str, str], tp.List[float]] = {}

    def timed(impl: str, op: str, count: int, fn: tp.Callable[[], tp.Any]) -> tp.Any:
        seconds, out = _seconds(fn)
        times.setdefault((impl, op), []).append(1e6 * seconds / count)
        return out

    def up_encode() -> bytes:
        fo = io.BytesIO()
        coder = upstream.ArithmeticCoder(fo)
        for row, sym in zip(pdfs[:U], symbols[:U].tolist()):
            coder.push(sym, upstream.build_stable_quantized_cdf(row, 24, check=False))
        coder.flush()
        return fo.getvalue()

    for _ in range(ctx.pick(1, 3, 5)):  # rounds: every coder once per round
        data = timed("ours", "encode", T, lambda: entropy.encode_symbols(pdfs, symbols))
        got = timed("ours", "decode", T, lambda: entropy.decode_symbols(pdfs, data))
        assert torch.equal(got, symbols)
        given = "ours (C++, CDFs given)"
        assert timed(given, "encode", T, lambda: entropy.encode_symbols(cdfs, symbols)) == data
        assert torch.equal(timed(given, "decode", T, lambda: entropy.decode_symbols(cdfs, data)), symbols)
        timed("ours (C++, CDF construction only)", "cdf", T, lambda: entropy.build_cdfs(pdfs))
        up_data = timed("upstream", "encode", U, up_encode)
        dec = upstream.ArithmeticDecoder(io.BytesIO(up_data))
        up_syms = timed("upstream", "decode", U, lambda: [
            dec.pull(upstream.build_stable_quantized_cdf(row, 24, check=False)) for row in pdfs[:U]])
        assert up_syms == symbols[:U].tolist()
        if entropy.encode_symbols(pdfs[:U], symbols[:U]) != up_data:
            raise RuntimeError(f"our coder's bytes differ from upstream's on {U} symbols")
        reference = "ours (Python reference)"
        with ops.use_backend("torch"):  # the Python reference coder
            py_data = timed(reference, "encode", U, lambda: entropy.encode_symbols(pdfs[:U], symbols[:U]))
            py_syms = timed(reference, "decode", U, lambda: entropy.decode_symbols(pdfs[:U], py_data))
        assert py_data == up_data and torch.equal(py_syms, symbols[:U])
        if constriction is not None:
            model = constriction.stream.model.Categorical(perfect=False)
            sym32 = symbols.numpy().astype(np.int32)

            def c_encode() -> np.ndarray:
                enc = constriction.stream.queue.RangeEncoder()
                enc.encode(sym32, model, quantized_probs)
                return enc.get_compressed()
            comp = timed("constriction", "encode", T, c_encode)
            c_syms = timed("constriction", "decode", T,
                           lambda: constriction.stream.queue.RangeDecoder(comp).decode(model, quantized_probs))
            assert (c_syms == sym32).all()
    if constriction is None:
        for op in ("encode", "decode"):
            ctx.na({**params, "op": op}, "constriction", "time_per_symbol", "us",
                   "constriction is not installed (pip install -e .[bench])")
    for (impl, op), reps in times.items():
        note = (f"first {U} symbols" if impl in ("upstream", "ours (Python reference)") else f"{T} symbols")
        ctx.record({**params, "op": op}, impl, "time_per_symbol", "us", reps, headline=op != "cdf", note=note)
