"""Fuzz the C++ arithmetic coder for a fixed time: random byte strings and random distributions
into the decoder (only symbols, EOFError or CorruptStreamError may come out), random
encode/decode round trips (must be exact), and the Python reference on the same data (must
agree). Used by tools/asan_coder.sh under AddressSanitizer.

    python -m tools.fuzz_coder [--seconds 60] [--so path/to/_arith.so]
"""

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch

from encodec_fast import entropy
from encodec_fast.ops import arith


def load_extension(path: Path):
    spec = importlib.util.spec_from_file_location("_arith", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--so", type=Path, help="a build of the extension to test (default: the installed one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.so is not None:
        ext = load_extension(args.so)
        arith._extension = lambda: ext  # noqa: E731  (the dispatch asks this function)
    import os
    os.environ["ENCODEC_FAST_CODER"] = "cpp"
    rng = np.random.default_rng(args.seed)
    counts = {"random data: decoded": 0, "random data: corrupt": 0, "random data: eof": 0, "round trips": 0,
              "reference agreed": 0, "rejected inputs": 0}
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        N = int(rng.choice([1, 2, 3, 7, 64, 1024, 4096]))
        T = int(rng.integers(0, 200))
        sharp = float(rng.choice([0.01, 1.0, 10.0, 40.0]))
        p = torch.softmax(torch.from_numpy(rng.standard_normal((T, N)).astype(np.float32)) * sharp, -1)
        blob = rng.integers(0, 256, int(rng.integers(0, 100)), dtype=np.uint8).tobytes()
        offset = int(rng.integers(0, len(blob) + 1))
        try:
            got = entropy.decode_symbols(p, blob, offset=offset)
            assert got.shape == (T,) and (T == 0 or (0 <= int(got.min()) and int(got.max()) < N))
            counts["random data: decoded"] += 1
        except entropy.CorruptStreamError:
            counts["random data: corrupt"] += 1
        except EOFError:
            counts["random data: eof"] += 1
        symbols = torch.from_numpy(rng.integers(0, N, T))
        try:
            data = entropy.encode_symbols(p, symbols)
        except ValueError:  # a CDF over 2**24 (upstream fails there too)
            counts["rejected inputs"] += 1
            continue
        assert torch.equal(entropy.decode_symbols(p, data), symbols)
        counts["round trips"] += 1
        if T <= 40 and N <= 1024:
            os.environ["ENCODEC_FAST_CODER"] = "python"
            try:
                assert entropy.encode_symbols(p, symbols) == data
            finally:
                os.environ["ENCODEC_FAST_CODER"] = "cpp"
            counts["reference agreed"] += 1
        # bad arguments must raise, not crash
        for bad in (lambda: entropy.encode_symbols(p * float("nan"), symbols) if T else None,
                    lambda: entropy.decode_symbols(p.to(torch.int64) * 10 ** 12, data) if T else None):
            try:
                bad()
            except (ValueError, EOFError):
                counts["rejected inputs"] += 1
    print(f"{args.seconds:g} s of fuzzing ({'extension ' + str(args.so) if args.so else 'installed extension'}):")
    for k, v in counts.items():
        print(f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
