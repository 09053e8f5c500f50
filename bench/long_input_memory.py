"""Peak memory and time of encoding one long input: whole-file `encode` vs `encode_long`.

    python bench/long_input_memory.py [--seconds 600] [--chunk 60] [--modes stream,whole]

Each mode runs in its own process (24 kHz model, random weights, 6 kbps, random audio) and
reports its maximum RSS before and after encoding. Checks nothing about codes (the tests do).
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(mode: str, seconds: float, chunk: float) -> None:
    import torch
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import make_model_pair
    from encodec_fast.streaming import encode_long
    _, model = make_model_pair("encodec_24khz", seed=1)
    model.set_target_bandwidth(6.0)
    x = torch.randn(1, 1, int(24000 * seconds), generator=torch.Generator().manual_seed(0)).mul_(0.1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    frames = encode_long(model, x, chunk_seconds=chunk) if mode == "stream" else model.encode(x)
    wall = time.perf_counter() - t0
    print(json.dumps({"mode": mode, "seconds": seconds, "chunk": chunk, "wall_s": wall, "frames": frames[0][0].shape[-1],
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_before_encode_mb": before}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--chunk", type=float, default=60.0)
    parser.add_argument("--modes", default="stream,whole")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.seconds, args.chunk)
        return 0
    for mode in args.modes.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--seconds", str(args.seconds),
                              "--chunk", str(args.chunk)], capture_output=True, text=True,
                             env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            return 1
        print(out.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
