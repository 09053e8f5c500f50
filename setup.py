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
    # The small model's weights (encodec_fast/checkpoints/, 7 MB), trained by `encodec-fast train`.
    package_data={"encodec_fast": ["checkpoints/*.th"]},
    install_requires=[
        # No upper cap: no measured breakage needs one. Tested (CI) with torch 2.11.0 (the GPU
        # image's), 2.14.1 (what pip resolves on our capped build machines) and 2.15.0 (the newest),
        # see constraints/. The lower bound 2.4 is the one the project started with; nothing below
        # 2.11 has been tested.
        "torch>=2.4",
        # No cap here: only triton 3.4-3.6's interpreter breaks with numpy >= 2.4 (the tests run the
        # kernels in it; constraints/gpu-image.txt pins numpy there). Compiled GPU kernels do not care.
        "numpy",
        # Audio I/O (torchaudio >= 2.9 routes load/save through TorchCodec); 0.12 is the first release
        # that bundles a libsndfile with mp3.
        "soundfile>=0.12",
        # Parquet shards of `encodec-fast tokenize` (bound kept from when they were written; tested
        # with what pip resolves today).
        "pyarrow>=14",
        # Progress bars of `encodec-fast train` and the benchmarks (pure Python, no pin needed).
        "tqdm>=4.60",
        # No torchaudio: its `import` loads a C++ library tied to particular torch builds (2.11.1
        # fails with torch 2.11-2.12, 2.11.0 with 2.15); resampling and spectrograms are ours
        # (encodec_fast.dsp), compared with torchaudio's in the tests.
    ],
    extras_require={
        # Upstream's encodec 0.1.1 is the tests' oracle; it imports torchaudio, which pip resolves to
        # 2.11.1 (torch >= 2.11: imports with torch 2.13-2.15) unless a constraints file says
        # otherwise (constraints/gpu-image.txt: 2.11.0 with torch 2.11). The tests run the Triton
        # kernels in Triton's interpreter (CPU); torch's Linux wheels bring triton, named here for
        # other builds. duckdb and datasets: the tests read tokenize's shards with them;
        # transformers: the tokenize benchmark compares with its EncodecModel (a smoke run is a
        # test); ray: the tests run `--engine ray` on a local instance; matplotlib: `train report`;
        # tensorboard: the trainer's scalars are also written for TensorBoard where it is installed.
        # ruff: the lint gate (`ruff check .`, configured in pyproject.toml), run by CI before the tests;
        # pytest-xdist: the tests run in parallel workers (`-n auto`).
        "test": ["pytest>=8", "pytest-benchmark>=4", "pytest-xdist>=3", "encodec==0.1.1", "torchaudio>=2.4",
                 "duckdb>=1.0", "datasets>=2.14", "transformers>=4.40", "ray[data]>=2.9", "matplotlib>=3.5",
                 "tensorboard>=2.14", "triton>=3.2; sys_platform == 'linux'", "ruff>=0.6"],
        # the `coder` benchmark compares the coder with constriction's (speed only: other bytes); the
        # suite's quality benchmark adds PESQ and STOI when pesq / pystoi are installed; the
        # `quantizer` benchmark adds vector-quantize-pytorch's ResidualVQ as a peer, the `rvq` one FAISS.
        "bench": ["constriction>=0.4", "faiss-cpu>=1.7.4", "pesq>=0.0.4", "pystoi>=0.4",
                  "vector-quantize-pytorch>=1.14"],
        # `encodec-fast train report` (plots) and TensorBoard logs without the test extra.
        "train": ["matplotlib>=3.5", "tensorboard>=2.14"],
        # --engine ray without the test extra.
        "ray": ["ray[data]>=2.9"],
    },
    ext_modules=[arith],
    entry_points={"console_scripts": ["encodec-fast=encodec_fast.cli:main"]},
)
