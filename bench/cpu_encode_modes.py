"""Ways to spend a CPU's cores on many clips, with upstream's codes: one clip at a time on all
threads (what tokenize does), two clips at once on one thread each, and clips of similar length
stacked in one encoder call (`model.BATCH_ON_CPU`).

    python bench/cpu_encode_modes.py [--corpus DIR] [--clips 80]

The corpus defaults to bench/tokenize_corpus.py's (make it first); 24 kHz model, random weights,
6 kbps, allocator tuned as the command does. Prints seconds per mode and whether codes match the
first mode's, and how many codes one thread vs two changes.
"""

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("/tmp/encodec_fast_bench_corpus"))
    parser.add_argument("--clips", type=int, default=80)
    args = parser.parse_args()
    import encodec_fast.model as model_module
    from encodec_fast.cpu import tune_cpu_allocator
    from encodec_fast.tokenize.loading import load_item
    from encodec_fast.tokenize.sources import list_items
    from helpers import make_model_pair
    tune_cpu_allocator()
    _, model = make_model_pair("encodec_24khz", seed=1)
    model.set_target_bandwidth(6.0)
    items, _ = list_items([args.corpus])
    if not items:
        raise SystemExit(f"no audio in {args.corpus}: run bench/tokenize_corpus.py first")
    wavs = sorted((load_item(it, 24000, 1)[0] for it in items[: args.clips]), key=lambda w: -w.shape[-1])
    threads = torch.get_num_threads()

    def one(w):
        with torch.no_grad():
            return model.encode(w[None])[0][0]

    def stacked(flag):
        model_module.BATCH_ON_CPU = flag  # encode_batch cuts length-sorted batches of at most 120 s itself
        out = [f[0][0] for f in model.encode_batch(wavs, max_batch_samples=120 * 24000)]
        model_module.BATCH_ON_CPU = False
        return out

    def timed(name, fn, n_threads):
        torch.set_num_threads(n_threads)
        t0 = time.perf_counter()
        codes = fn()
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
        return codes

    ref = timed(f"clip by clip, {threads} threads", lambda: [one(w) for w in wavs], threads)
    single = timed("clip by clip, 1 thread", lambda: [one(w) for w in wavs], 1)
    with ThreadPoolExecutor(threads) as pool:
        concurrent = timed(f"{threads} clips at once, 1 thread each", lambda: list(pool.map(one, wavs)), 1)
    stack = timed(f"stacked batches, {threads} threads", lambda: stacked(True), threads)
    again = timed(f"clip by clip, {threads} threads (again)", lambda: stacked(False), threads)
    print("concurrent == 1 thread:", all(torch.equal(a, b) for a, b in zip(single, concurrent)))
    print("stacked == clip by clip:", all(torch.equal(a, b) for a, b in zip(ref, stack)),
          all(torch.equal(a, b) for a, b in zip(ref, again)))
    print(f"codes that differ between 1 and {threads} threads: {sum(int((a != b).sum()) for a, b in zip(ref, single))}"
          f" of {sum(a.numel() for a in ref)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
