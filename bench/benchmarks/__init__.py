"""Every benchmark of the suite, one module each; importing this package registers them (bench.core.REGISTRY)."""

from bench.benchmarks import (  # noqa: F401
    codec,
    coder,
    kernels,
    lm,
    long_file,
    ops,
    quality,
    quantizer,
    roofline,
    rvq,
    stream_command,
    streaming,
    tokenize,
    train_step,
)
