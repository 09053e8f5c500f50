"""Fast ops: for each, a PyTorch reference and the dispatch to its kernel (see `backend`).

Model code calls these functions only, never `encodec_fast.kernels` directly.
"""

from .backend import BackendError, requested_backend, select, triton_available, use_backend
from .conv import (
    block_backend,
    block_down_backend,
    conv1d,
    conv2d_leaky_relu,
    conv_backend,
    conv_transpose1d,
    residual_block,
    residual_block_down,
    up_block_backend,
    up_residual_block,
)
from .rvq import check_codes_dtype, code_agreement, nearest_code, rvq_decode, rvq_encode, vq_assign
from .stft import spectrogram, spectrogram_view

__all__ = ["BackendError", "requested_backend", "select", "triton_available", "use_backend",
           "block_backend", "block_down_backend", "conv1d", "conv2d_leaky_relu", "conv_backend", "conv_transpose1d",
           "residual_block", "residual_block_down", "up_block_backend", "up_residual_block",
           "check_codes_dtype", "code_agreement", "nearest_code", "rvq_decode", "rvq_encode", "vq_assign",
           "spectrogram", "spectrogram_view"]
