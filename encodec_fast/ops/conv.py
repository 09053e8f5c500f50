"""SEANet convolution ops: PyTorch references and the dispatch to `kernels/conv.py`.

- `conv1d`: optional ELU on the input, EnCodec's padding (reflect with upstream's rule for short
  inputs, or zeros), Conv1d, optional residual added to the output;
- `conv_transpose1d`: optional ELU, ConvTranspose1d, keep `[start, start + length)` of the output
  (upstream's trimming).

The kernels run inference only (no backward): with autograd recording through the input or the
weight, the reference runs. Their fp32 products are exact (`ENCODEC_FAST_CONV_PRECISION=ieee`,
the default) but sum in another order than cuDNN or oneDNN, so outputs match the reference to
about 1e-6 relative, not bit for bit; `tf32x3` and `tf32` are opt-in. Half inputs multiply in
their own dtype with fp32 accumulation.
"""

import collections
import typing as tp

import torch
from torch.nn import functional as F

from .backend import env_choice, select

PRECISIONS = ("ieee", "tf32x3", "tf32")
KERNEL_PAD_MODES = ("reflect", "zero", "constant")


def conv_precision() -> str:
    return env_choice("ENCODEC_FAST_CONV_PRECISION", PRECISIONS, "ieee")


# -- references ------------------------------------------------------------------------------------

def pad1d(x: torch.Tensor, paddings: tp.Tuple[int, int], mode: str = "zero", value: float = 0.0) -> torch.Tensor:
    """`F.pad` on the last dim that also reflect-pads inputs shorter than the padding.

    For reflect mode with `length <= max(left, right)`, zeros are first appended so that the
    reflection is defined, and removed afterwards (upstream's rule; the result has length
    left + length + right).
    """
    left, right = paddings
    if left < 0 or right < 0:
        raise ValueError(f"negative padding {paddings}")
    if mode != "reflect":
        return F.pad(x, paddings, "constant" if mode == "zero" else mode, value)
    length = x.shape[-1]
    extra = max(left, right) - length + 1 if length <= max(left, right) else 0
    if extra:
        x = F.pad(x, (0, extra))
    padded = F.pad(x, paddings, "reflect")
    return padded[..., : padded.shape[-1] - extra]


def conv1d_torch(x: torch.Tensor, weight: torch.Tensor, bias: tp.Optional[torch.Tensor], stride: int = 1,
                 dilation: int = 1, paddings: tp.Tuple[int, int] = (0, 0), pad_mode: str = "reflect",
                 elu: bool = False, residual: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, C_in, L] -> [B, C_out, T]: conv1d(pad(ELU(x))) (+ residual)."""
    if elu:
        x = F.elu(x)
    y = F.conv1d(pad1d(x, paddings, pad_mode), weight, bias, stride, dilation=dilation)
    return y if residual is None else y + residual


def conv_transpose1d_torch(x: torch.Tensor, weight: torch.Tensor, bias: tp.Optional[torch.Tensor], stride: int,
                           start: int = 0, length: tp.Optional[int] = None, elu: bool = False) -> torch.Tensor:
    """[B, C_in, L] -> [B, C_out, length]: conv_transpose1d(ELU(x))[..., start:start + length]."""
    if elu:
        x = F.elu(x)
    y = F.conv_transpose1d(x, weight, bias, stride)
    return y[..., start:] if length is None else y[..., start:start + length]


# -- dispatch --------------------------------------------------------------------------------------

_ARRANGED: "collections.OrderedDict[tp.Any, torch.Tensor]" = collections.OrderedDict()


def _arranged(weight: torch.Tensor, transposed: bool, dtype: torch.dtype) -> torch.Tensor:
    """The weight as [K, C_out, C_in] contiguous in `dtype`, cached while the weight is unchanged."""
    key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, weight.device, transposed, dtype)
    hit = _ARRANGED.get(key)
    if hit is not None:
        _ARRANGED.move_to_end(key)
        return hit
    with torch.no_grad():
        w = weight.permute(2, 1, 0) if transposed else weight.permute(2, 0, 1)  # -> [K, C_out, C_in]
        w = w.to(dtype).contiguous()
    _ARRANGED[key] = w
    while len(_ARRANGED) > 512:
        _ARRANGED.popitem(last=False)
    return w


def _kernels():
    from ..kernels import conv as k
    return k


def conv_backend(x: torch.Tensor, weight: torch.Tensor) -> str:
    """'triton' or 'torch' for a convolution of x by weight (the kernels have no backward)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return "torch"
    return select(x, weight)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype torch's own conv would compute in here (autocast's, inside an autocast block)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def conv1d(x: torch.Tensor, weight: torch.Tensor, bias: tp.Optional[torch.Tensor], stride: int = 1,
           dilation: int = 1, paddings: tp.Tuple[int, int] = (0, 0), pad_mode: str = "reflect",
           elu: bool = False, residual: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    """ELU -> pad -> Conv1d (+ residual), fused into one kernel on the Triton backend.

    x [B, C_in, L], weight [C_out, C_in, K], bias [C_out] or None, paddings (left, right),
    residual [B, C_out, T] or None -> [B, C_out, T], T = (left + L + right - (K-1)*dilation - 1) // stride + 1.
    """
    if x.dim() != 3 or weight.dim() != 3 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"conv1d: input {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    if conv_backend(x, weight) != "triton" or pad_mode not in KERNEL_PAD_MODES:
        return conv1d_torch(x, weight, bias, stride, dilation, paddings, pad_mode, elu, residual)
    left, right = paddings
    if left < 0 or right < 0:
        raise ValueError(f"negative padding {paddings}")
    T = (left + x.shape[-1] + right - (weight.shape[-1] - 1) * dilation - 1) // stride + 1
    if residual is not None and tuple(residual.shape) != (x.shape[0], weight.shape[0], T):
        raise ValueError(f"residual {tuple(residual.shape)} does not fit the output {(x.shape[0], weight.shape[0], T)}")
    dtype = _compute_dtype(x)
    x = x.to(dtype)
    return _kernels().conv1d(x, _arranged(weight, False, dtype), bias, stride, dilation, left, right,
                             pad_mode == "reflect", elu, residual, conv_precision(), dtype)


def conv_transpose1d(x: torch.Tensor, weight: torch.Tensor, bias: tp.Optional[torch.Tensor], stride: int,
                     start: int = 0, length: tp.Optional[int] = None, elu: bool = False) -> torch.Tensor:
    """ELU -> ConvTranspose1d -> keep [start, start + length), in one kernel on the Triton backend.

    x [B, C_in, L], weight [C_in, C_out, K] (PyTorch's layout) -> [B, C_out, length]; the full
    output has (L - 1) * stride + K samples, and `length` defaults to what follows `start`.
    """
    if x.dim() != 3 or weight.dim() != 3 or x.shape[1] != weight.shape[0]:
        raise ValueError(f"conv_transpose1d: input {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    full = (x.shape[-1] - 1) * stride + weight.shape[-1]
    length = full - start if length is None else length
    if start < 0 or length < 0 or start + length > full:
        raise ValueError(f"cannot keep [{start}, {start + length}) of an output of {full} samples")
    if conv_backend(x, weight) != "triton":
        return conv_transpose1d_torch(x, weight, bias, stride, start, length, elu)
    dtype = _compute_dtype(x)
    x = x.to(dtype)
    return _kernels().conv_transpose1d(x, _arranged(weight, True, dtype), bias, stride, start, length, elu,
                                       conv_precision(), dtype)
