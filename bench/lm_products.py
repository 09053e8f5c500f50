"""What bounds LM-mode coding on CPU while keeping upstream's bits: the LM's one-row products.

    python bench/lm_products.py [--frames 200]

Prints, for the 24 kHz LM's shapes at 6 kbps (5 layers of dim 200, 8 heads of 1024):
- the time per frame of all one-row products (what the decoder must run per frame), on 1 and
  2 threads, and whether 2 threads give the same bits;
- one-row products of many frames as one `torch.baddbmm` (the encoder's way): time per row and
  bit equality with separate `F.linear` calls;
- which other LM operations give the same bits on 2 threads as on 1 (attention does not).
"""

import argparse
import time

import torch
from torch.nn import functional as F

SHAPES = [(400, 200), (200, 200), (200, 200), (800, 200), (200, 800)] * 5 + [(1024, 200)] * 8


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=200)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(o, i, generator=g) * 0.05, torch.randn(o, generator=g)) for o, i in SHAPES]
    xs = {200: torch.randn(1, 200, generator=g), 800: torch.randn(1, 800, generator=g)}
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results[threads] = [F.linear(xs[w.shape[1]], w, b) for w, b in weights]
        t0 = time.perf_counter()
        for _ in range(args.frames):
            for w, b in weights:
                F.linear(xs[w.shape[1]], w, b)
        print(f"one-row products of one frame ({len(SHAPES)} calls, ~16 MB of weights), {threads} thread(s): "
              f"{(time.perf_counter() - t0) / args.frames * 1e3:.2f} ms")
    print("2 threads give the same bits:", all(torch.equal(a, b) for a, b in zip(results[1], results[2])))
    torch.set_num_threads(1)
    T = 150
    for out_f, in_f in sorted(set(SHAPES)):
        w, b = torch.randn(out_f, in_f, generator=g) * 0.05, torch.randn(out_f, generator=g)
        x = torch.randn(T, 1, in_f, generator=g)
        t0 = time.perf_counter()
        ref = torch.stack([F.linear(r, w, b) for r in x])
        t1 = time.perf_counter()
        got = torch.baddbmm(b.expand(T, 1, out_f), x, w.t().expand(T, in_f, out_f))
        t2 = time.perf_counter()
        print(f"[{out_f}, {in_f}] x {T} frames: separate F.linear {(t1 - t0) / T * 1e6:.1f} us/row, baddbmm "
              f"{(t2 - t1) / T * 1e6:.1f} us/row, same bits: {torch.equal(ref, got)}")
    q, k = torch.randn(1, 8, 1, 25, generator=g), torch.randn(263, 1, 200, generator=g)
    k = k.view(263, 8, 25).transpose(0, 1).view(1, 8, 263, 25)
    h = torch.randn(256, 1, 800, generator=g)
    ops = {"attention (SDPA)": lambda: F.scaled_dot_product_attention(q, k, k, torch.zeros(1, 1, 1, 263)),
           "layer_norm": lambda: F.layer_norm(h, (800,)), "gelu": lambda: F.gelu(h),
           "softmax": lambda: torch.softmax(h, 1)}
    for name, op in ops.items():
        torch.set_num_threads(1)
        a = op()
        torch.set_num_threads(2)
        print(f"{name}: same bits on 2 threads as on 1: {torch.equal(a, op())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
