"""Entry point of the suite's child processes (memory is measured per process):

    python -m bench.child codec IMPL,IMPL,... MODEL STATE CASES ALLOCATOR
    python -m bench.child long_file IMPL MODEL STATE SECONDS DEVICE
    python -m bench.child tokenize IMPL CORPUS WORK CHECKPOINT DEVICE WORKERS HF_BATCH
"""

import sys

from bench.benchmarks import codec, long_file, tokenize

CHILDREN = {"codec": codec.child, "long_file": long_file.child, "tokenize": tokenize.child}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in CHILDREN:
        sys.exit(f"usage: python -m bench.child {{{','.join(CHILDREN)}}} ARGS...")
    CHILDREN[sys.argv[1]](*sys.argv[2:])
