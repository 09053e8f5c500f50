"""`python -m encodec_fast.train` = `encodec-fast train` (the form torchrun takes: `-m encodec_fast.train`)."""

from .command import main

if __name__ == "__main__":
    raise SystemExit(main())
