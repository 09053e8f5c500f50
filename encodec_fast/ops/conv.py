"""Convolution ops (SEANet's and the discriminator's): PyTorch references and the dispatch to
`kernels/conv.py`.

- `conv1d`: optional ELU on the input, EnCodec's padding (reflect with upstream's rule for short
  inputs, or zeros), Conv1d, optional residual added to the output;
- `conv_transpose1d`: optional ELU, ConvTranspose1d, keep `[start, start + length)` of the output
  (upstream's trimming);
- `conv2d_leaky_relu`: Conv2d + bias + LeakyReLU for the MS-STFT discriminator (kernel forward,
  torch backward; in `auto` mode cuDNN runs until the kernel is measured faster).

The 1-d kernels run inference only (no backward): with autograd recording through the input or the
weight, the reference runs. Their fp32 products are exact (`ENCODEC_FAST_CONV_PRECISION=ieee`,
the default) but sum in another order than cuDNN or oneDNN, so outputs match the reference to
about 1e-6 relative, not bit for bit; `tf32x3` and `tf32` are opt-in. Half inputs multiply in
their own dtype with fp32 accumulation.
"""

import collections
import os
import typing as tp
import weakref

import torch
from torch.nn import functional as F

from .. import precision
from . import dispatch
from .backend import env_choice, requested_backend, select

PRECISIONS = ("ieee", "tf32x3", "tf32")
KERNEL_PAD_MODES = ("reflect", "zero", "constant")


KERNELS = ("direct", "gemm")


def conv_kernel() -> str:
    """Which Triton kernel family runs the 1-d convolutions: $ENCODEC_FAST_CONV_KERNEL, 'direct'
    (the default: [C_out, positions] tiles on CUDA cores or mma.sync, the one measured on a GPU) or
    'gemm' (implicit GEMM with the positions as M, channels-last output, sized for Hopper's wgmma;
    not measured on a GPU yet)."""
    return env_choice("ENCODEC_FAST_CONV_KERNEL", KERNELS, "direct")


def conv_precision() -> str:
    """Our kernels' fp32 dot precision: $ENCODEC_FAST_CONV_PRECISION when set, else the precision
    mode's (`encodec_fast.precision`: 'tf32' in the tf32 mode, 'ieee' otherwise)."""
    if os.environ.get("ENCODEC_FAST_CONV_PRECISION", "").strip():
        return env_choice("ENCODEC_FAST_CONV_PRECISION", PRECISIONS, "ieee")
    return "tf32" if precision.current() == "tf32" else "ieee"


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


def conv2d_leaky_relu_torch(x: torch.Tensor, weight: torch.Tensor, bias: tp.Optional[torch.Tensor],
                            stride: tp.Tuple[int, int] = (1, 1), dilation: tp.Tuple[int, int] = (1, 1),
                            padding: tp.Tuple[int, int] = (0, 0),
                            negative_slope: tp.Optional[float] = 0.2) -> torch.Tensor:
    """[B, C_in, H, W] -> [B, C_out, H', W']: leaky_relu(conv2d(x) + bias) (no activation if the
    slope is None), zero padding."""
    y = F.conv2d(x, weight, bias, stride, padding, dilation)
    return y if negative_slope is None else F.leaky_relu(y, negative_slope)


# -- dispatch --------------------------------------------------------------------------------------

_ARRANGED: "collections.OrderedDict[tp.Any, tp.Tuple[weakref.ref, torch.Tensor, int]]" = collections.OrderedDict()


#: Weight arrangements for the kernels: PyTorch's layout permuted to [taps, C_out, C_in] (the direct
#: kernels) or [taps, C_in, C_out] (the implicit-GEMM kernels, `_kio`).
_PERMUTATIONS = {"conv": (2, 0, 1), "transposed": (2, 1, 0), "conv_kio": (2, 1, 0), "transposed_kio": (2, 0, 1)}


def _arranged(weight: torch.Tensor, layout: str, dtype: torch.dtype) -> torch.Tensor:
    """The weight pre-packed for a kernel, contiguous in `dtype`, cached while the weight is unchanged.

    layout: 'conv' ([C_out, C_in, K] -> [K, C_out, C_in]), 'transposed' ([C_in, C_out, K] -> [K,
    C_out, C_in]), 'conv_kio' / 'transposed_kio' (-> [K, C_in, C_out]), 'conv2d' ([C_out, C_in,
    KH, KW] -> [KH * KW, C_out, C_in], tap kh * KW + kw) or 'conv2d_kio' (-> [KH * KW, C_in, C_out]).
    An entry holds a weak reference to its weight and is used only for that very tensor at the same
    version: a new tensor that happens to reuse a freed one's memory is never served the old
    arrangement."""
    key = (weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()), weight.dtype, weight.device, layout, dtype)
    hit = _ARRANGED.get(key)
    if hit is not None and hit[0]() is weight and hit[2] == weight._version:
        _ARRANGED.move_to_end(key)
        return hit[1]
    with torch.no_grad():
        if layout == "conv2d":
            w = weight.permute(2, 3, 0, 1).reshape(-1, weight.shape[0], weight.shape[1])
        elif layout == "conv2d_kio":
            w = weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[1], weight.shape[0])
        else:
            w = weight.permute(*_PERMUTATIONS[layout])
        w = w.to(dtype).contiguous()
    _ARRANGED[key] = (weakref.ref(weight), w, weight._version)
    for stale in [k for k, v in _ARRANGED.items() if v[0]() is None]:
        del _ARRANGED[stale]
    while len(_ARRANGED) > 512:
        _ARRANGED.popitem(last=False)
    return w


def _kernels():
    from ..kernels import conv as k
    return k


def conv_backend(x: torch.Tensor, weight: torch.Tensor, op: str = "conv1d", stride: int = 1) -> str:
    """'triton', 'torch' or 'cudnn' for a convolution of x by weight: the torch path when autograd
    records (the kernels have no backward); in `auto` mode on CUDA, our kernel only where it was
    measured faster than cuDNN in the same precision mode (`ops.dispatch`), else 'cudnn' (the torch
    path in that mode's precision, `_cudnn`)."""
    return _measured_backend(x, (weight,), lambda: auto_choice(op, tuple(weight.shape), stride, _compute_dtype(x)))


def _measured_backend(x: torch.Tensor, weights: tp.Sequence[torch.Tensor], measured: tp.Callable[[], str]) -> str:
    """The dispatch rule of our 1-d convolution ops: 'torch' while autograd records through x or a
    weight, else `select`'s choice, except that `auto` on CUDA asks `measured()` ('triton' or 'cudnn')."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights)):
        return "torch"
    choice = select(x, *weights)
    if choice == "triton" and requested_backend() == "auto" and x.is_cuda:
        return measured()
    return choice


def _measured_choice(op: str, C_in: int, C_out: int, K: int, stride: int, dtype: torch.dtype, family: str) -> str:
    """'triton' where `ops.dispatch` measured our kernel family faster than cuDNN for this layer in
    the mode it would run in (dtype, `conv_precision()`), else 'cudnn'."""
    mode = dispatch.mode_of(dtype, conv_precision())
    return "triton" if dispatch.kernel_measured_faster(op, C_in, C_out, K, stride, mode, family) else "cudnn"


def auto_choice(op: str, weight_shape: tp.Tuple[int, ...], stride: int, dtype: torch.dtype) -> str:
    """`auto` on CUDA for a convolution (`_measured_choice` with the current kernel family).
    weight_shape is PyTorch's: [C_out, C_in, K] (conv1d) or [C_in, C_out, K] (conv_transpose1d)."""
    C_in, C_out = (weight_shape[0], weight_shape[1]) if op == "conv_transpose1d" else (weight_shape[1], weight_shape[0])
    return _measured_choice(op, C_in, C_out, weight_shape[-1], stride, dtype, conv_kernel())


def _cudnn(fn: tp.Callable[[], torch.Tensor]) -> torch.Tensor:
    """A torch convolution taken by `auto` dispatch instead of our kernel: in the precision mode of
    the surrounding scope (whose torch flags are already set), or outside every scope in the mode
    our kernel would have run (exact fp32: cuDNN with TF32 off; tf32: on)."""
    if precision.current() is not None:
        return fn()
    with precision.torch_precision("tf32" if conv_precision() == "tf32" else "exact"):
        return fn()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype torch's own conv would compute in here (autocast's, inside an autocast block)."""
    device = x.device.type
    try:
        enabled = torch.is_autocast_enabled(device)
    except RuntimeError:  # a device type without autocast (meta tensors, when launches are recorded)
        return x.dtype
    return torch.get_autocast_dtype(device) if enabled else x.dtype


def conv1d(x: torch.Tensor, weight: torch.Tensor, bias: tp.Optional[torch.Tensor], stride: int = 1,
           dilation: int = 1, paddings: tp.Tuple[int, int] = (0, 0), pad_mode: str = "reflect",
           elu: bool = False, residual: tp.Optional[torch.Tensor] = None, elu_out: bool = False) -> torch.Tensor:
    """ELU -> pad -> Conv1d (+ residual) (-> ELU where `elu_out`), fused into one kernel on the
    Triton backend.

    x [B, C_in, L], weight [C_out, C_in, K], bias [C_out] or None, paddings (left, right),
    residual [B, C_out, T] or None -> [B, C_out, T], T = (left + L + right - (K-1)*dilation - 1) // stride + 1.
    `elu_out` gives the ELU of the result: for a convolution whose only reader applies ELU to its
    input (the same values as that reader's own ELU; the kernel computes it once per element).
    """
    if x.dim() != 3 or weight.dim() != 3 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"conv1d: input {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    backend = conv_backend(x, weight, "conv1d", stride)
    if backend == "cudnn":
        y = _cudnn(lambda: conv1d_torch(x, weight, bias, stride, dilation, paddings, pad_mode, elu, residual))
        return _elu_after(y, elu_out)
    if backend != "triton" or pad_mode not in KERNEL_PAD_MODES:
        return _elu_after(conv1d_torch(x, weight, bias, stride, dilation, paddings, pad_mode, elu, residual), elu_out)
    left, right = paddings
    if left < 0 or right < 0:
        raise ValueError(f"negative padding {paddings}")
    T = (left + x.shape[-1] + right - (weight.shape[-1] - 1) * dilation - 1) // stride + 1
    if residual is not None and tuple(residual.shape) != (x.shape[0], weight.shape[0], T):
        raise ValueError(f"residual {tuple(residual.shape)} does not fit the output {(x.shape[0], weight.shape[0], T)}")
    dtype = _compute_dtype(x)
    x = x.to(dtype)
    if conv_kernel() == "gemm":
        return _kernels().conv1d_gemm(x, _arranged(weight, "conv_kio", dtype), bias, stride, dilation, left, right,
                                      pad_mode == "reflect", elu, residual, conv_precision(), dtype, elu_out)
    return _kernels().conv1d(x, _arranged(weight, "conv", dtype), bias, stride, dilation, left, right,
                             pad_mode == "reflect", elu, residual, conv_precision(), dtype, elu_out)


def elu(x: torch.Tensor, inplace: bool) -> torch.Tensor:
    """ELU(alpha=1) as `nn.ELU`; in place only when the caller owns `x` and autograd is off."""
    if inplace and not torch.is_grad_enabled():
        return F.elu_(x)
    return F.elu(x)


def _elu_after(y: torch.Tensor, elu_out: bool) -> torch.Tensor:
    """y, or its ELU (in place: y is the caller's own new tensor)."""
    return elu(y, True) if elu_out else y


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
    backend = conv_backend(x, weight, "conv_transpose1d", stride)
    if backend == "cudnn":
        return _cudnn(lambda: conv_transpose1d_torch(x, weight, bias, stride, start, length, elu))
    if backend != "triton":
        return conv_transpose1d_torch(x, weight, bias, stride, start, length, elu)
    dtype = _compute_dtype(x)
    x = x.to(dtype)
    if conv_kernel() == "gemm":
        return _kernels().conv_transpose1d_gemm(x, _arranged(weight, "transposed_kio", dtype), bias, stride, start,
                                                length, elu, conv_precision(), dtype)
    return _kernels().conv_transpose1d(x, _arranged(weight, "transposed", dtype), bias, stride, start, length, elu,
                                       conv_precision(), dtype)


def residual_block_torch(x: torch.Tensor, w1: torch.Tensor, b1: tp.Optional[torch.Tensor], w2: torch.Tensor,
                         b2: tp.Optional[torch.Tensor], dilation: int, paddings: tp.Tuple[int, int],
                         pad_mode: str = "reflect", ws: tp.Optional[torch.Tensor] = None,
                         bs: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    """shortcut(x) + conv1d(ELU(conv1d(pad(ELU(x)), w1, b1)), w2, b2): SEANet's residual block (w1
    [H, C, K] "same"-padded by `paddings`, w2 [C, H, 1]); the shortcut is x itself (ws None) or
    conv1d(x, ws [C, C, 1], bs), upstream's `true_skip=False`."""
    hidden = conv1d_torch(x, w1, b1, 1, dilation, paddings, pad_mode, elu=True)
    skip = x if ws is None else conv1d_torch(x, ws, bs)
    return skip + conv1d_torch(hidden, w2, b2, elu=True)


#: Channels of the largest residual block the fused kernel takes (all of them in one tile): at 128,
#: every mode spilled 2-32 KB per thread on sm_80 (tools/compile_gpu.py, triton 3.9).
FUSED_BLOCK_MAX_CHANNELS = 64


def _check_block(x_shape: tp.Sequence[int], w1: torch.Tensor, w2: torch.Tensor, ws: tp.Optional[torch.Tensor],
                 dilation: int, paddings: tp.Tuple[int, int]) -> None:
    """ValueError unless the weights make a residual block of an input of x_shape ([B, C, L]) whose
    padding keeps the length."""
    C = x_shape[1] if len(x_shape) == 3 else -1
    if (len(x_shape) != 3 or w1.dim() != 3 or tuple(w2.shape) != (C, w1.shape[0], 1) or w1.shape[1] != C
            or (ws is not None and tuple(ws.shape) != (C, C, 1))):
        raise ValueError(f"residual block: input {tuple(x_shape)} does not fit weights {tuple(w1.shape)}, "
                         f"{tuple(w2.shape)}" + ("" if ws is None else f", {tuple(ws.shape)}"))
    left, right = paddings
    if left < 0 or right < 0 or left + right != (w1.shape[-1] - 1) * dilation:
        raise ValueError(f"residual block: paddings {paddings} do not keep the length (kernel {w1.shape[-1]}, "
                         f"dilation {dilation})")


def _block_kernel_weights(w1: torch.Tensor, b1: tp.Optional[torch.Tensor], w2: torch.Tensor,
                          b2: tp.Optional[torch.Tensor], ws: tp.Optional[torch.Tensor], bs: tp.Optional[torch.Tensor],
                          dtype: torch.dtype) -> tuple:
    """A residual block's weights as the fused kernels take them: w1 [K, C, H], b1, w2 [H, C], b2,
    the shortcut's ws [C, C] or None, bs (pre-packed once per weight, `_arranged`)."""
    return (_arranged(w1, "conv_kio", dtype), b1, _arranged(w2, "conv_kio", dtype)[0], b2,
            None if ws is None else _arranged(ws, "conv_kio", dtype)[0], bs)


def block_backend(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> str:
    """'triton' where `residual_block` runs the fused kernel: the gemm kernel family
    (`conv_kernel()`), at most FUSED_BLOCK_MAX_CHANNELS channels, and the rule of `conv_backend`
    (no measurement of the fused block yet: `auto` on CUDA keeps the unfused path)."""
    if conv_kernel() != "gemm" or x.shape[1] > FUSED_BLOCK_MAX_CHANNELS:
        return "torch"
    return _measured_backend(x, (w1, w2), lambda: _measured_choice(
        "residual_block", w1.shape[1], w1.shape[0], w1.shape[-1], 1, _compute_dtype(x), "gemm"))


def residual_block(x: torch.Tensor, w1: torch.Tensor, b1: tp.Optional[torch.Tensor], w2: torch.Tensor,
                   b2: tp.Optional[torch.Tensor], dilation: int, paddings: tp.Tuple[int, int],
                   pad_mode: str = "reflect", ws: tp.Optional[torch.Tensor] = None,
                   bs: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    """SEANet's residual block, `residual_block_torch`, in one kernel where `block_backend` says so
    (x's tile and its halo on chip, the hidden activations never written): x [B, C, L], w1 [H, C,
    K], w2 [C, H, 1], shortcut ws [C, C, 1] or None -> [B, C, L] (channels-last memory from the kernel)."""
    _check_block(x.shape, w1, w2, ws, dilation, paddings)
    left, right = paddings
    if block_backend(x, w1, w2) != "triton" or pad_mode not in KERNEL_PAD_MODES:
        return residual_block_torch(x, w1, b1, w2, b2, dilation, paddings, pad_mode, ws, bs)
    dtype = _compute_dtype(x)
    x = x.to(dtype)
    return _kernels().residual_block(x, *_block_kernel_weights(w1, b1, w2, b2, ws, bs, dtype), dilation, left, right,
                                     pad_mode == "reflect", conv_precision(), dtype)


class _Conv2dLeakyReLU(torch.autograd.Function):
    """Forward: the fused kernel of the family `conv_kernel()` names. Backward: the activation's
    derivative from the saved output (its sign is the pre-activation's for a slope >= 0, so the
    pre-activation is never stored), then the convolution's gradients: with the `gemm` family, our
    kernels (the derivative applied in one elementwise pass, then the implicit-GEMM input gradient
    and the weight and bias gradients summed per chunk of positions, the chunks added in a fixed
    order: deterministic); with `direct`, torch's."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, dilation, padding, slope, dtype, x_scale=1.0):
        KH, KW = weight.shape[-2:]
        family, dot = conv_kernel(), conv_precision()
        if family == "gemm":
            y = _kernels().conv2d_gemm(x.to(dtype), _arranged(weight, "conv2d_kio", dtype), KH, KW, bias, stride,
                                       dilation, padding, slope, dot, dtype, x_scale)
        else:
            y = _kernels().conv2d_leaky_relu((x * x_scale if x_scale != 1.0 else x).to(dtype),
                                             _arranged(weight, "conv2d", dtype), KH, KW, bias, stride,
                                             dilation, padding, slope, dot, dtype)
        ctx.save_for_backward(x, weight, y)
        ctx.conf = (stride, dilation, padding, slope, None if bias is None else bias.dtype, family, dot, dtype,
                    x_scale)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, y = ctx.saved_tensors
        stride, dilation, padding, slope, bias_dtype, family, dot, dtype, x_scale = ctx.conf
        if family == "gemm":
            return _conv2d_gemm_backward(ctx, grad, x, weight, y)
        g = grad if slope is None else torch.where(y > 0, grad, grad * slope)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, weight.to(g.dtype), g, stride, padding, dilation)
            grad_x = (grad_x * x_scale if x_scale != 1.0 else grad_x).to(x.dtype)
        if ctx.needs_input_grad[1]:
            xs = x * x_scale if x_scale != 1.0 else x
            grad_w = torch.nn.grad.conv2d_weight(xs.to(g.dtype), weight.shape, g, stride, padding,
                                                 dilation).to(weight.dtype)
        if bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = g.sum((0, 2, 3), dtype=torch.float32).to(bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _conv2d_gemm_backward(ctx, grad, x, weight, y):
    stride, dilation, padding, slope, bias_dtype, _, dot, dtype, x_scale = ctx.conf
    KH, KW = weight.shape[-2:]
    k = _kernels()
    grad = grad.to(dtype)
    if slope is not None:  # through the LeakyReLU once, for both products
        grad = k.leaky_relu_grad(grad, y, slope)
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = k.conv2d_input_grad_gemm(grad, _arranged(weight, "conv2d", dtype), x.shape, KH, KW, stride,
                                          dilation, padding, dot, x.dtype, x_scale, k.frames_fastest(x))
    want_b = bias_dtype is not None and ctx.needs_input_grad[2]
    if ctx.needs_input_grad[1] or want_b:
        taps, bias = k.conv2d_weight_grad_gemm(grad, x.to(dtype), KH, KW, stride, dilation, padding, want_b, dot,
                                               x_scale)
        if ctx.needs_input_grad[1]:
            grad_w = taps.view(KH, KW, *taps.shape[1:]).permute(2, 3, 0, 1).to(weight.dtype)
        if want_b:
            grad_b = bias.to(bias_dtype)
    return grad_x, grad_w, grad_b, None, None, None, None, None, None


def conv2d_backend(x: torch.Tensor, weight: torch.Tensor) -> str:
    """'triton' only where asked for: in `auto` mode cuDNN runs, because the fused kernel has not
    been measured faster on a GPU yet (the `kernels` benchmark times both)."""
    if requested_backend() != "triton":
        return "torch"
    return select(x, weight)


def conv2d_leaky_relu(x: torch.Tensor, weight: torch.Tensor, bias: tp.Optional[torch.Tensor],
                      stride: tp.Tuple[int, int] = (1, 1), dilation: tp.Tuple[int, int] = (1, 1),
                      padding: tp.Tuple[int, int] = (0, 0), negative_slope: tp.Optional[float] = 0.2,
                      input_scale: float = 1.0) -> torch.Tensor:
    """Conv2d (zero padding, groups 1) + bias + LeakyReLU, one kernel on the Triton backend, with
    autograd (the backward runs torch's convolution gradients).

    x [B, C_in, H, W], weight [C_out, C_in, KH, KW], pairs for stride/dilation/padding ->
    [B, C_out, H', W']. negative_slope None: no activation (the discriminator's last conv);
    a negative slope runs the reference. input_scale: the input is taken as x * input_scale (the
    spectrogram's normalisation, which the gemm kernels fold into their products: the first conv
    reads the STFT's real view directly, `ops.spectrogram_view`).
    """
    if x.dim() != 4 or weight.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"conv2d: input {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    stride, dilation, padding = (tuple(int(v) for v in p) for p in (stride, dilation, padding))
    if min(stride + dilation) < 1 or min(padding) < 0:
        raise ValueError(f"conv2d: bad stride {stride}, dilation {dilation} or padding {padding}")
    if conv2d_backend(x, weight) != "triton" or (negative_slope is not None and negative_slope < 0):
        return conv2d_leaky_relu_torch(x * input_scale if input_scale != 1.0 else x, weight, bias, stride, dilation,
                                       padding, negative_slope)
    dtype = _compute_dtype(x)
    return _Conv2dLeakyReLU.apply(x, weight, bias, stride, dilation, padding, negative_slope, dtype,
                                  float(input_scale))


def residual_block_down_torch(x: torch.Tensor, w1: torch.Tensor, b1: tp.Optional[torch.Tensor], w2: torch.Tensor,
                              b2: tp.Optional[torch.Tensor], dilation: int, paddings: tp.Tuple[int, int],
                              pad_mode: str, ws: tp.Optional[torch.Tensor], bs: tp.Optional[torch.Tensor],
                              wd: torch.Tensor, bd: tp.Optional[torch.Tensor], stride: int,
                              paddings_d: tp.Tuple[int, int], pad_mode_d: str) -> torch.Tensor:
    """`residual_block_torch` then ELU -> pad (paddings_d, pad_mode_d) -> conv1d(wd [C_out, C, KD],
    bd, stride): a SEANet encoder stage's residual block and its downsampling convolution."""
    y = residual_block_torch(x, w1, b1, w2, b2, dilation, paddings, pad_mode, ws, bs)
    return conv1d_torch(y, wd, bd, stride, 1, paddings_d, pad_mode_d, elu=True)


#: Output channels of the largest downsampling convolution fused with the residual block before it
#: (`residual_block_down`; its [64, C_out] accumulator tile stays in registers).
FUSED_DOWN_MAX_CHANNELS = 128


def block_down_backend(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, wd: torch.Tensor, stride: int) -> str:
    """'triton' where `residual_block_down` runs one kernel: where `block_backend` fuses the block,
    the downsampling has at most FUSED_DOWN_MAX_CHANNELS outputs and a kernel of at most twice its
    stride (each block row is then computed at most twice: SEANet's downsampling, not the decoder's
    last convolution, which would compute each row 7 times), and (`auto` on CUDA) the fused stage
    was measured faster (no measurement yet: the block and the convolution run apart there)."""
    if (conv_kernel() != "gemm" or x.shape[1] > FUSED_BLOCK_MAX_CHANNELS or wd.shape[0] > FUSED_DOWN_MAX_CHANNELS
            or wd.shape[-1] > 2 * stride):
        return "torch"
    return _measured_backend(x, (w1, w2, wd), lambda: _measured_choice(
        "residual_block_down", wd.shape[1], wd.shape[0], wd.shape[-1], stride, _compute_dtype(x), "gemm"))


def residual_block_down(x: torch.Tensor, w1: torch.Tensor, b1: tp.Optional[torch.Tensor], w2: torch.Tensor,
                        b2: tp.Optional[torch.Tensor], dilation: int, paddings: tp.Tuple[int, int], pad_mode: str,
                        ws: tp.Optional[torch.Tensor], bs: tp.Optional[torch.Tensor], wd: torch.Tensor,
                        bd: tp.Optional[torch.Tensor], stride: int, paddings_d: tp.Tuple[int, int],
                        pad_mode_d: str) -> torch.Tensor:
    """`residual_block_down_torch` in one kernel where `block_down_backend` says so (the block's
    output never written: each downsampling tap recomputes the block rows it reads on chip), else
    the fused block (where `block_backend` says so) and the convolution apart. x [B, C, L], the
    block's weights as `residual_block`, wd [C_out, C, KD] -> [B, C_out, T_out]."""
    _check_block(x.shape, w1, w2, ws, dilation, paddings)
    if wd.dim() != 3 or wd.shape[1] != x.shape[1]:
        raise ValueError(f"block + downsampling: input {tuple(x.shape)} does not fit the downsampling weight "
                         f"{tuple(wd.shape)}")
    left_d, right_d = paddings_d
    if left_d < 0 or right_d < 0:
        raise ValueError(f"negative padding {paddings_d}")
    if (block_down_backend(x, w1, w2, wd, stride) != "triton" or pad_mode not in KERNEL_PAD_MODES
            or pad_mode_d not in KERNEL_PAD_MODES):
        y = residual_block(x, w1, b1, w2, b2, dilation, paddings, pad_mode, ws, bs)
        return conv1d(y, wd, bd, stride, 1, paddings_d, pad_mode_d, elu=True)
    left, right = paddings
    dtype = _compute_dtype(x)
    x = x.to(dtype)
    return _kernels().residual_block_down(
        x, *_block_kernel_weights(w1, b1, w2, b2, ws, bs, dtype), dilation, left, right, pad_mode == "reflect",
        _arranged(wd, "conv_kio", dtype), bd, stride, left_d, right_d, pad_mode_d == "reflect", conv_precision(),
        dtype)


#: Input channels of the largest transposed convolution fused with the residual block after it
#: (`up_residual_block`: its [positions, C_in] input tile is read in steps of 32-64 channels).
FUSED_UP_MAX_IN_CHANNELS = 128


def up_residual_block_torch(x: torch.Tensor, wu: torch.Tensor, bu: tp.Optional[torch.Tensor], stride: int,
                            start: int, length: int, elu: bool, w1: torch.Tensor, b1: tp.Optional[torch.Tensor],
                            w2: torch.Tensor, b2: tp.Optional[torch.Tensor], dilation: int,
                            paddings: tp.Tuple[int, int], pad_mode: str, ws: tp.Optional[torch.Tensor],
                            bs: tp.Optional[torch.Tensor]) -> torch.Tensor:
    """`conv_transpose1d_torch` (ELU, wu [C_in, C, K_U], keep [start, start + length)) then
    `residual_block_torch`: a SEANet decoder level's upsampling and the residual block after it."""
    y = conv_transpose1d_torch(x, wu, bu, stride, start, length, elu)
    return residual_block_torch(y, w1, b1, w2, b2, dilation, paddings, pad_mode, ws, bs)


def up_block_backend(x: torch.Tensor, wu: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, stride: int) -> str:
    """'triton' where `up_residual_block` runs one kernel: where `block_backend` fuses the block (on
    the upsampled signal's channels), the upsampling has at most `FUSED_UP_MAX_IN_CHANNELS` inputs,
    and (`auto` on CUDA) the fused level was measured faster (no measurement yet: apart there)."""
    if conv_kernel() != "gemm" or wu.shape[1] > FUSED_BLOCK_MAX_CHANNELS or wu.shape[0] > FUSED_UP_MAX_IN_CHANNELS:
        return "torch"
    return _measured_backend(x, (wu, w1, w2), lambda: _measured_choice(
        "up_residual_block", wu.shape[0], wu.shape[1], wu.shape[-1], stride, _compute_dtype(x), "gemm"))


def up_residual_block(x: torch.Tensor, wu: torch.Tensor, bu: tp.Optional[torch.Tensor], stride: int, start: int,
                      length: int, elu: bool, w1: torch.Tensor, b1: tp.Optional[torch.Tensor], w2: torch.Tensor,
                      b2: tp.Optional[torch.Tensor], dilation: int, paddings: tp.Tuple[int, int], pad_mode: str,
                      ws: tp.Optional[torch.Tensor] = None, bs: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    """`up_residual_block_torch` in one kernel where `up_block_backend` says so (the upsampled signal
    never written: each of the block's taps recomputes the rows it reads on chip), else the
    transposed convolution and the block apart. x [B, C_in, L], wu [C_in, C, K_U] (PyTorch's
    layout), the block's weights as `residual_block` -> [B, C, length]."""
    if x.dim() != 3 or wu.dim() != 3 or x.shape[1] != wu.shape[0]:
        raise ValueError(f"upsampling + block: input {tuple(x.shape)} does not fit weight {tuple(wu.shape)}")
    full = (x.shape[-1] - 1) * stride + wu.shape[-1]
    if start < 0 or length < 0 or start + length > full:
        raise ValueError(f"cannot keep [{start}, {start + length}) of an output of {full} samples")
    _check_block((x.shape[0], wu.shape[1], length), w1, w2, ws, dilation, paddings)
    if up_block_backend(x, wu, w1, w2, stride) != "triton" or pad_mode not in KERNEL_PAD_MODES:
        y = conv_transpose1d(x, wu, bu, stride, start, length, elu)
        return residual_block(y, w1, b1, w2, b2, dilation, paddings, pad_mode, ws, bs)
    dtype = _compute_dtype(x)
    x = x.to(dtype)
    left, right = paddings
    return _kernels().up_residual_block(
        x, _arranged(wu, "transposed_kio", dtype), bu, stride, start, length, elu,
        *_block_kernel_weights(w1, b1, w2, b2, ws, bs, dtype), dilation, left, right, pad_mode == "reflect",
        conv_precision(), dtype)
