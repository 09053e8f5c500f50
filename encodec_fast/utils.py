"""Upstream-compatible names (`encodec.utils`)."""

from .audio import convert_audio, save_audio  # noqa: F401
from .model import _linear_overlap_add  # noqa: F401
