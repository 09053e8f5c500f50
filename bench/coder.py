"""Arithmetic-coder throughput on CPU: ours (C++, and the Python reference) vs upstream encodec
0.1.1's Python coder and vs constriction's range coder, on the same distributions, in one run.

    python -m bench.coder [--symbols 20000] [--upstream-symbols 1000] [--rounds 3] [--out bench/results]

Distributions: T rows of N = 1024 (EnCodec's codebooks), softmax of scaled noise (about 5 bits
per symbol), symbols drawn from them. Reported: microseconds per symbol and symbols per second,
medians over interleaved rounds, for
  - ours from pdfs: CDF construction (upstream's arithmetic, vectorised) + coding, one call;
  - ours from CDFs: coding only, CDFs built beforehand;
  - upstream: `build_stable_quantized_cdf` + `ArithmeticCoder.push` per symbol (and
    `ArithmeticDecoder.pull`), on the first --upstream-symbols rows (it is slow);
  - constriction 0.5 `RangeEncoder` with `Categorical(perfect=False)`, given the same quantized
    distributions (the CDF's ranges as probabilities); it writes other bytes, so it cannot write
    `.ecdc` files, and is here as the speed reference.
Every byte stream is checked: ours equal upstream's on the shared rows, every decode round-trips.
"""

import argparse
import io
import os
import statistics
import sys
import time
import typing as tp
from pathlib import Path

import numpy as np
import torch

from bench.report import machine, save
from encodec_fast import entropy
from encodec_fast.ops import arith

ROOT = Path(__file__).resolve().parent.parent


def timed(fn: tp.Callable[[], tp.Any]) -> tp.Tuple[float, tp.Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--symbols", type=int, default=20000)
    parser.add_argument("--upstream-symbols", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if not arith.cpp_available():
        print(f"the C++ coder is not built: {arith._extension()}", file=sys.stderr)
        return 2
    report, md = measure(args)
    print(md)
    save(args.out, "coder", report, md)
    return 0


def measure(args) -> tp.Tuple[tp.Dict[str, tp.Any], str]:
    """The timings (every round in report['all_runs'], seconds per symbol) and the markdown."""
    from encodec.quantization import ac as upstream
    try:
        import constriction
    except ImportError:
        constriction = None

    T, N, U = args.symbols, 1024, min(args.upstream_symbols, args.symbols)
    g = torch.Generator().manual_seed(0)
    pdfs = torch.softmax(3.0 * torch.randn(T, N, generator=g), -1)
    symbols = torch.multinomial(pdfs, 1, generator=g).view(-1)
    cdfs = entropy.build_cdfs(pdfs)
    ranges = torch.diff(cdfs, dim=-1, prepend=torch.zeros(T, 1, dtype=torch.int64))
    quantized_probs = (ranges.double() / ranges.sum(-1, keepdim=True)).numpy()
    bits = float(-(torch.log2(pdfs[torch.arange(T), symbols])).mean())

    times: tp.Dict[str, tp.List[float]] = {}
    checks: tp.List[str] = []

    def record(name: str, seconds: float, count: int) -> None:
        times.setdefault(name, []).append(seconds / count)

    for rnd in range(args.rounds):
        s, data = timed(lambda: entropy.encode_symbols(pdfs, symbols))
        record("ours (C++) encode, from pdfs", s, T)
        s, got = timed(lambda: entropy.decode_symbols(pdfs, data))
        record("ours (C++) decode, from pdfs", s, T)
        assert torch.equal(got, symbols)
        s, data_c = timed(lambda: entropy.encode_symbols(cdfs, symbols))
        record("ours (C++) encode, from CDFs", s, T)
        s, got = timed(lambda: entropy.decode_symbols(cdfs, data))
        record("ours (C++) decode, from CDFs", s, T)
        assert data_c == data and torch.equal(got, symbols)
        s, built = timed(lambda: entropy.build_cdfs(pdfs))
        record("ours (C++) CDF construction only (allocates and writes [T, 1024] int64)", s, T)

        def up_encode():
            fo = io.BytesIO()
            coder = upstream.ArithmeticCoder(fo)
            for row, sym in zip(pdfs[:U], symbols[:U].tolist()):
                coder.push(sym, upstream.build_stable_quantized_cdf(row, 24, check=False))
            coder.flush()
            return fo.getvalue()
        s, up_data = timed(up_encode)
        record("upstream encode (Python)", s, U)

        def up_decode():
            dec = upstream.ArithmeticDecoder(io.BytesIO(up_data))
            return [dec.pull(upstream.build_stable_quantized_cdf(row, 24, check=False)) for row in pdfs[:U]]
        s, up_syms = timed(up_decode)
        record("upstream decode (Python)", s, U)
        assert up_syms == symbols[:U].tolist()
        ours_prefix = entropy.encode_symbols(pdfs[:U], symbols[:U])
        if rnd == 0:
            checks.append(f"ours == upstream bytes on {U} symbols: {ours_prefix == up_data}")
            assert ours_prefix == up_data
        os.environ["ENCODEC_FAST_CODER"] = "python"
        try:
            s, py_data = timed(lambda: entropy.encode_symbols(pdfs[:U], symbols[:U]))
            record("ours, Python reference, encode", s, U)
            s, py_syms = timed(lambda: entropy.decode_symbols(pdfs[:U], py_data))
            record("ours, Python reference, decode", s, U)
        finally:
            del os.environ["ENCODEC_FAST_CODER"]
        assert py_data == up_data and torch.equal(py_syms, symbols[:U])
        if constriction is not None:
            model = constriction.stream.model.Categorical(perfect=False)
            sym32 = symbols.numpy().astype(np.int32)

            def c_encode():
                enc = constriction.stream.queue.RangeEncoder()
                enc.encode(sym32, model, quantized_probs)
                return enc.get_compressed()
            s, comp = timed(c_encode)
            record("constriction encode (same quantized distributions)", s, T)
            s, c_syms = timed(lambda: constriction.stream.queue.RangeDecoder(comp).decode(model, quantized_probs))
            record("constriction decode (same quantized distributions)", s, T)
            assert (c_syms == sym32).all()
            if rnd == 0:
                checks.append(f"constriction bytes: {comp.nbytes}, ours: {len(data)}")
        if rnd == 0:
            checks.append(f"ours: {len(data)} bytes for {T} symbols = {8 * len(data) / T:.3f} bits/symbol "
                          f"(information: {bits:.3f})")

    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {
        "encode vs upstream (CDF construction included)":
            med["upstream encode (Python)"] / med["ours (C++) encode, from pdfs"],
        "decode vs upstream (CDF construction included)":
            med["upstream decode (Python)"] / med["ours (C++) decode, from pdfs"],
    }
    if constriction is not None:
        ratios["encode vs constriction (ours with CDF construction)"] = (
            med["constriction encode (same quantized distributions)"] / med["ours (C++) encode, from pdfs"])
        ratios["decode vs constriction (ours with CDF construction)"] = (
            med["constriction decode (same quantized distributions)"] / med["ours (C++) decode, from pdfs"])
    report = {**machine(), "symbols": T, "alphabet": N, "upstream_symbols": U, "rounds": args.rounds,
              "us_per_symbol": {k: 1e6 * v for k, v in med.items()}, "ratios": ratios, "checks": checks,
              "all_runs": times}
    lines = [f"# Arithmetic coder throughput ({report['date'][:10]})", "",
             f"CPU: {report['cpu']}, {report['torch_threads']} torch threads; torch "
             f"{torch.__version__}; {T} symbols, alphabet {N} (upstream and the Python reference: first {U}); "
             f"medians of {args.rounds} interleaved rounds. `python -m bench.coder`", "",
             "| coder | µs / symbol | symbols / s |", "|---|---|---|"]
    lines += [f"| {k} | {1e6 * v:.3f} | {1 / v:,.0f} |" for k, v in med.items()]
    lines += ["", "| ratio | × |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in ratios.items()]
    lines += [""] + [f"- {c}" for c in checks]
    md = "\n".join(lines) + "\n"
    return report, md


if __name__ == "__main__":
    sys.exit(main())
