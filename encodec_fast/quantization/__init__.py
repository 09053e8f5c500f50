"""Residual vector quantization."""

from .core_vq import EuclideanCodebook, ResidualVectorQuantization, VectorQuantization  # noqa: F401
from .vq import QuantizedResult, ResidualVectorQuantizer  # noqa: F401
