"""Every benchmark of the suite; importing this package registers them (bench.core.REGISTRY)."""

from bench.benchmarks import codec, long_file, quality, roofline, scripts, streaming  # noqa: F401
