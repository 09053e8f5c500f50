"""Convolutions with EnCodec's padding rules and state-dict layout.

`SConv1d` / `SConvTranspose1d` keep upstream's module tree (`conv.conv.*`, `conv.norm.*`,
`convtr.convtr.*`) so that checkpoints load as they are. Weight norm keeps the old
`weight_g` / `weight_v` parameters; for inference the effective weight is computed once with the
same op upstream runs before every call (`torch._weight_norm`) and cached until a parameter
changes.

Padding (k kernel, s stride, d dilation, L input length, all dims [B, C, T]):
- total fixed padding P = (k - 1) * d - (s - 1); extra right padding E = ceil(L / s) * s - L,
  so a conv always yields ceil(L / s) frames;
- causal: (P, E) on the left/right; non-causal: (P - P // 2, P // 2 + E);
- reflect padding everywhere, with upstream's rule for inputs shorter than the padding.

Every forward takes `groups`: rows of the batch that share a valid length (see `Groups`), which
lets batches of segments or of clips of different lengths run through one convolution while
each row is padded exactly as if it ran alone.
"""

import math
import typing as tp

import torch
from torch import nn

from .. import ops
from ..ops.conv import elu, pad1d  # noqa: F401  (pad1d re-exported: upstream's modules.conv has it)
from .groups import Groups, RaggedRows

CONV_NORMALIZATIONS = frozenset(["none", "weight_norm", "time_group_norm"])


def reflect_pad_into(dst: torch.Tensor, src: torch.Tensor, left: int, right: int) -> None:
    """Write `pad1d(src, (left, right), 'reflect')` into `dst[..., :left + L + right]`.

    Same values as `pad1d` (it is a copy), without its intermediate tensors.
    """
    length = src.shape[-1]
    if length <= max(left, right):
        dst[..., : left + length + right].copy_(pad1d(src, (left, right), "reflect"))
        return
    dst[..., left : left + length].copy_(src)
    if left:
        dst[..., :left].copy_(src[..., 1 : left + 1].flip(-1))
    if right:
        dst[..., left + length : left + length + right].copy_(src[..., length - 1 - right : length - 1].flip(-1))


def unpad1d(x: torch.Tensor, paddings: tp.Tuple[int, int]):
    """Remove `paddings` (left, right) from the last dim."""
    left, right = paddings
    if left < 0 or right < 0 or left + right > x.shape[-1]:
        raise ValueError(f"cannot remove padding {paddings} from length {x.shape[-1]}")
    return x[..., left : x.shape[-1] - right]


class _WeightNormMixin:
    """Old-style weight norm (`weight_g`, `weight_v`, norm over all dims but 0).

    Training (autograd recording and a parameter requiring grad) recomputes the weight on every
    call, so gradients flow as in upstream. Otherwise the folded weight is cached and reused until
    a parameter is modified in place (version counter), moved or re-created.
    """

    def _init_weight_norm(self):
        weight = self._parameters.pop("weight")
        self.weight_g = nn.Parameter(torch.norm_except_dim(weight.data, 2, 0))
        self.weight_v = nn.Parameter(weight.data.clone())
        self._folded: tp.Optional[torch.Tensor] = None
        self._folded_key: tp.Any = None

    def folded_weight(self) -> torch.Tensor:
        g, v = self.weight_g, self.weight_v
        if torch.is_grad_enabled() and (g.requires_grad or v.requires_grad):
            return torch._weight_norm(v, g, 0)
        key = (g._version, v._version, g.data_ptr(), v.data_ptr(), g.dtype, v.dtype, g.device)
        if self._folded_key != key:
            with torch.inference_mode(False), torch.no_grad():
                self._folded = torch._weight_norm(v, g, 0)
            self._folded_key = key
        assert self._folded is not None
        return self._folded

    def __getattr__(self, name):
        if name == "weight" and "weight_v" in self.__dict__.get("_parameters", {}):
            return self.folded_weight()
        return super().__getattr__(name)


class WNConv1d(_WeightNormMixin, nn.Conv1d):
    """`nn.Conv1d` with weight norm; `state_dict` holds `bias`, `weight_g`, `weight_v`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_weight_norm()


class WNConvTranspose1d(_WeightNormMixin, nn.ConvTranspose1d):
    """`nn.ConvTranspose1d` with weight norm (g has shape [in, 1, 1], as upstream)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_weight_norm()


def _norm_module(channels: int, causal: bool, norm: str) -> nn.Module:
    if norm not in CONV_NORMALIZATIONS:
        raise ValueError(f"unsupported norm {norm!r}; one of {sorted(CONV_NORMALIZATIONS)}")
    if norm == "time_group_norm":
        if causal:
            raise ValueError("GroupNorm doesn't support causal evaluation.")
        return nn.GroupNorm(1, channels)
    return nn.Identity()


class NormConv1d(nn.Module):
    """Conv1d (optionally weight-normed) followed by its norm module (Identity or GroupNorm)."""

    def __init__(self, *args, causal: bool = False, norm: str = "none", **kwargs):
        super().__init__()
        conv_cls = WNConv1d if norm == "weight_norm" else nn.Conv1d
        self.conv = conv_cls(*args, **kwargs)
        self.norm = _norm_module(self.conv.out_channels, causal, norm)
        self.norm_type = norm

    def forward(self, x):
        return self.norm(self.conv(x))


class NormConvTranspose1d(nn.Module):
    """ConvTranspose1d (optionally weight-normed) followed by its norm module."""

    def __init__(self, *args, causal: bool = False, norm: str = "none", **kwargs):
        super().__init__()
        conv_cls = WNConvTranspose1d if norm == "weight_norm" else nn.ConvTranspose1d
        self.convtr = conv_cls(*args, **kwargs)
        self.norm = _norm_module(self.convtr.out_channels, causal, norm)
        self.norm_type = norm

    def forward(self, x):
        return self.norm(self.convtr(x))


def _raw_weight(conv: nn.Module) -> torch.Tensor:
    """The parameter that decides device and autograd (without computing a weight-normed weight)."""
    return conv._parameters["weight_v"] if "weight_v" in conv._parameters else conv.weight


class SConv1d(nn.Module):
    """Conv1d with EnCodec's causal / non-causal reflect padding and normalization.

    forward(x[B, C_in, T]) -> [B, C_out, ceil(T / stride)]
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True, causal: bool = False,
                 norm: str = "none", pad_mode: str = "reflect"):
        super().__init__()
        self.conv = NormConv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation,
                               groups=groups, bias=bias, causal=causal, norm=norm)
        self.causal = causal
        self.pad_mode = pad_mode
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.padding_total = (kernel_size - 1) * dilation - (stride - 1)

    def paddings(self, length: int) -> tp.Tuple[int, int]:
        """(left, right) padding for an input of `length` samples, extra padding included."""
        p, s = self.padding_total, self.stride
        extra = math.ceil(length / s) * s - length
        if self.causal:
            return p, extra
        return p - p // 2, p // 2 + extra

    def output_length(self, length):
        """ceil(length / stride), for a number or a tensor of lengths."""
        return -(-length // self.stride)

    def _ragged(self, x: torch.Tensor, rows: RaggedRows, elu_first: bool, elu_inplace: bool,
                elu_out: bool = False) -> torch.Tensor:
        """Every row padded by one gather (`RaggedRows.padded`), then one convolution (ours where
        `auto` takes it, ELU fused, and the output's ELU where `elu_out`) over the whole batch; a
        row's outputs past ceil(L / stride) are not valid."""
        conv = self.conv.conv
        if self.stride == 1 and self.padding_total == 0:
            buf, own = x, False
        else:
            left, fixed_right = self.paddings(0)  # each row adds its own extra right padding
            width = (self.output_length(x.shape[-1]) - 1) * self.stride + (self.kernel_size - 1) * self.dilation + 1
            buf, own = rows.padded(x, left, fixed_right, self.stride, width, self.pad_mode), True
        if ops.conv_backend(buf, _raw_weight(conv), "conv1d", self.stride) == "triton":
            # no padding left to add (the mode only names the kernel's variant: the same launches as
            # a batch of equal lengths)
            plain = isinstance(self.conv.norm, nn.Identity)
            y = self.conv.norm(ops.conv1d(buf, conv.weight, conv.bias, self.stride, self.dilation, (0, 0),
                                          self.pad_mode, elu=elu_first, elu_out=elu_out and plain))
            return elu(y, True) if elu_out and not plain else y
        if elu_first:
            buf = elu(buf, own or elu_inplace)
        y = self.conv(buf)
        return elu(y, True) if elu_out else y

    def forward(self, x: torch.Tensor, groups: tp.Optional[Groups] = None, elu_first: bool = False,
                elu_inplace: bool = False, residual: tp.Optional[torch.Tensor] = None,
                elu_out: bool = False) -> torch.Tensor:
        """Optionally apply ELU to the input (upstream's preceding `nn.ELU`), pad, convolve, norm,
        and add `residual` to the result; `elu_out`: then ELU (the next layer's, for a result that
        nothing else reads).

        `elu_inplace` says the caller does not need `x` afterwards. On the Triton backend the ELU,
        padding, convolution, residual sum and output ELU are one kernel (`encodec_fast.ops.conv1d`).
        """
        uniform = groups is None or groups.uniform(x)
        conv = self.conv.conv
        if uniform and ops.conv_backend(x, _raw_weight(conv), "conv1d", self.stride) == "triton":
            if isinstance(self.conv.norm, nn.Identity):  # residual and ELU fused
                return ops.conv1d(x, conv.weight, conv.bias, self.stride, self.dilation, self.paddings(x.shape[-1]),
                                  self.pad_mode, elu=elu_first, residual=residual, elu_out=elu_out)
            y = self.conv.norm(ops.conv1d(x, conv.weight, conv.bias, self.stride, self.dilation,
                                          self.paddings(x.shape[-1]), self.pad_mode, elu=elu_first))
            y = y if residual is None else y + residual
            return elu(y, True) if elu_out else y
        if isinstance(groups, RaggedRows) and residual is None:
            return self._ragged(x, groups, elu_first, elu_inplace, elu_out)
        if elu_out:
            return elu(self.forward(x, groups, elu_first, elu_inplace, residual), True)
        if residual is not None:
            return residual + self.forward(x, groups, elu_first, elu_inplace)
        if self.stride == 1 and self.padding_total == 0:
            # No padding at all (kernel 1): padding rows never reach valid outputs.
            if elu_first:
                x = elu(x, elu_inplace) if uniform else groups.elu_(x if elu_inplace else x.clone())
            return self.conv(x)
        if uniform:
            if elu_first:
                x = elu(x, elu_inplace)
            x = pad1d(x, self.paddings(x.shape[-1]), mode=self.pad_mode)
            return self.conv(x)
        if self.conv.conv.in_channels < 16:
            # Measured on CPU (oneDNN): with 1-2 input channels a batch of 1 is computed
            # differently from larger batches; run such (cheap) convolutions group by group.
            outs = [self.forward(groups.slab(x, g), None, elu_first, False) for g in groups]
            out = outs[0].new_zeros(x.shape[0], outs[0].shape[1], max(o.shape[-1] for o in outs))
            for g, o in zip(groups, outs):
                out[g.start:g.stop, :, : o.shape[-1]] = o
            return out
        out_len = max(self.output_length(g.length) for g in groups)
        width = (out_len - 1) * self.stride + (self.kernel_size - 1) * self.dilation + 1
        buf = x.new_zeros(x.shape[0], x.shape[1], width)
        for g in groups:
            slab = groups.slab(x, g, elu_first)
            left, right = self.paddings(g.length)
            if self.pad_mode == "reflect":
                reflect_pad_into(buf[g.start:g.stop], slab, left, right)
            else:
                buf[g.start:g.stop, :, : left + g.length + right].copy_(pad1d(slab, (left, right), self.pad_mode))
        return self.conv(buf)


class SConvTranspose1d(nn.Module):
    """ConvTranspose1d followed by norm, then trimming of the fixed padding (k - s).

    forward(x[B, C_in, T]) -> [B, C_out, T * stride]
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 causal: bool = False, norm: str = "none", trim_right_ratio: float = 1.0):
        super().__init__()
        self.convtr = NormConvTranspose1d(in_channels, out_channels, kernel_size, stride,
                                          causal=causal, norm=norm)
        self.causal = causal
        self.trim_right_ratio = trim_right_ratio
        if not (causal or trim_right_ratio == 1.0):
            raise ValueError("`trim_right_ratio` != 1.0 only makes sense for causal convolutions")
        if not 0.0 <= trim_right_ratio <= 1.0:
            raise ValueError("trim_right_ratio must be in [0, 1]")
        total = kernel_size - stride
        if causal:
            right = math.ceil(total * trim_right_ratio)
            self.trim = (total - right, right)
        else:
            self.trim = (total - total // 2, total // 2)

    def kept(self, length: int) -> tp.Tuple[int, int]:
        """(start, length) of the full transposed convolution's output of an input of `length`
        frames that the trimming keeps."""
        convtr = self.convtr.convtr
        full = (length - 1) * convtr.stride[0] + convtr.kernel_size[0]
        return self.trim[0], full - sum(self.trim)

    def forward(self, x: torch.Tensor, elu_first: bool = False, elu_inplace: bool = False):
        convtr = self.convtr.convtr
        if ops.conv_backend(x, _raw_weight(convtr), "conv_transpose1d", convtr.stride[0]) == "triton":
            stride = convtr.stride[0]
            if isinstance(self.convtr.norm, nn.Identity):  # trim inside the kernel
                start, length = self.kept(x.shape[-1])
                return ops.conv_transpose1d(x, convtr.weight, convtr.bias, stride, start=start, length=length,
                                            elu=elu_first)
            # A norm sees the whole output: trim after it, as upstream.
            y = ops.conv_transpose1d(x, convtr.weight, convtr.bias, stride, elu=elu_first)
            return unpad1d(self.convtr.norm(y), self.trim)
        if elu_first:
            x = elu(x, elu_inplace)
        return unpad1d(self.convtr(x), self.trim)
