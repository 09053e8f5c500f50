from pathlib import Path

from setuptools import Extension, setup

here = Path(__file__).parent
version = {}
for line in (here / "encodec_fast" / "__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

# The arithmetic coder (C++, plain CPython API: no torch or pybind11 at build time). Optional: if
# it does not compile, the package still installs and the Python reference coder runs instead
# (encodec_fast.ops.arith warns once). -ffp-contract=off and no -ffast-math keep the CDF's float32
# arithmetic identical to torch's on CPU.
arith = Extension(
    "encodec_fast.kernels._arith",
    sources=["kernels/arith/arith.cpp"],
    extra_compile_args=["-O3", "-std=c++17", "-ffp-contract=off", "-fno-fast-math"],
    language="c++",
    optional=True,
)

setup(
    name="encodec_fast",
    version=version["__version__"],
    description="Fast, drop-in compatible EnCodec (neural audio codec)",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["encodec_fast", "encodec_fast.modules", "encodec_fast.ops", "encodec_fast.quantization",
              "encodec_fast.train", "encodec_fast.tokenize", "encodec_fast.kernels"],
    package_dir={"encodec_fast.kernels": "kernels"},
    install_requires=[
        # Kept compatible with torch 2.11 / torchaudio 2.11 / triton 3.6 (the GPU image's versions).
        "torch>=2.4,<2.12",
        "torchaudio>=2.4,<2.12",
        # triton 3.6's interpreter breaks with numpy >= 2.4.
        "numpy<2.4",
        "soundfile>=0.12",
        # Parquet shards of `encodec-fast tokenize`.
        "pyarrow>=14",
    ],
    extras_require={
        # The tests run the Triton kernels in Triton's interpreter (CPU); torch's Linux wheels
        # bring triton already, this names it for other builds.
        # duckdb and datasets: the tests read tokenize's shards with them; transformers: the
        # tokenize benchmark compares with its EncodecModel (a smoke run is a test); ray: the
        # tests run `--engine ray` on a local instance.
        "test": ["pytest>=8", "pytest-benchmark>=4", "encodec==0.1.1", "duckdb>=1.0", "datasets>=2.14",
                 "transformers>=4.40", "ray[data]>=2.9",
                 "triton>=3.2,<3.7; sys_platform == 'linux'"],
        # bench/coder.py compares the coder with constriction's (speed only: other bytes).
        "bench": ["constriction>=0.4"],
        # --engine ray without the test extra.
        "ray": ["ray[data]>=2.9"],
    },
    ext_modules=[arith],
    entry_points={"console_scripts": ["encodec-fast=encodec_fast.cli:main"]},
)
