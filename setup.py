from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
version = {}
for line in (here / "encodec_fast" / "__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

setup(
    name="encodec_fast",
    version=version["__version__"],
    description="Fast, drop-in compatible EnCodec (neural audio codec)",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["encodec_fast", "encodec_fast.modules", "encodec_fast.ops", "encodec_fast.quantization",
              "encodec_fast.train", "encodec_fast.kernels"],
    package_dir={"encodec_fast.kernels": "kernels"},
    install_requires=[
        # Kept compatible with torch 2.11 / torchaudio 2.11 / triton 3.6 (the GPU image's versions).
        "torch>=2.4,<2.12",
        "torchaudio>=2.4,<2.12",
        # triton 3.6's interpreter breaks with numpy >= 2.4.
        "numpy<2.4",
        "soundfile>=0.12",
    ],
    extras_require={
        # The tests run the Triton kernels in Triton's interpreter (CPU); torch's Linux wheels
        # bring triton already, this names it for other builds.
        "test": ["pytest>=8", "pytest-benchmark>=4", "encodec==0.1.1",
                 "triton>=3.2,<3.7; sys_platform == 'linux'"],
    },
    entry_points={"console_scripts": ["encodec-fast=encodec_fast.cli:main"]},
)
