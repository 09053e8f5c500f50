"""SEANet encoder and decoder (EnCodec's convolutional + LSTM auto-encoder).

The module tree (`model.N...`) is upstream's, so checkpoints load unchanged. `forward` runs the
same operations in the same order; it only skips copies: an ELU whose input is not needed again
runs in place, the residual sum accumulates into the shortcut's output, and padding is written
once. With autograd recording, everything runs out of place.
"""

import typing as tp

import numpy as np
import torch
from torch import nn

from .. import ops
from .conv import SConv1d, SConvTranspose1d, _raw_weight, elu
from .groups import Groups, RaggedRows
from .lstm import SLSTM


class SEANetResnetBlock(nn.Module):
    """y = shortcut(x) + conv_b(ELU(conv_a(ELU(x)))); conv_a has kernel 3, conv_b kernel 1."""

    def __init__(self, dim: int, kernel_sizes: tp.Sequence[int] = (3, 1), dilations: tp.Sequence[int] = (1, 1),
                 norm: str = "weight_norm", causal: bool = False, pad_mode: str = "reflect",
                 compress: int = 2, true_skip: bool = True):
        super().__init__()
        if len(kernel_sizes) != len(dilations):
            raise ValueError("Number of kernel sizes should match number of dilations")
        hidden = dim // compress
        block: tp.List[nn.Module] = []
        for i, (kernel_size, dilation) in enumerate(zip(kernel_sizes, dilations)):
            in_chs = dim if i == 0 else hidden
            out_chs = dim if i == len(kernel_sizes) - 1 else hidden
            block += [nn.ELU(alpha=1.0),
                      SConv1d(in_chs, out_chs, kernel_size=kernel_size, dilation=dilation,
                              norm=norm, causal=causal, pad_mode=pad_mode)]
        self.block = nn.Sequential(*block)
        self.shortcut: nn.Module = nn.Identity() if true_skip else SConv1d(
            dim, dim, kernel_size=1, norm=norm, causal=causal, pad_mode=pad_mode)

    def _fusable(self, convs: tp.List[SConv1d]) -> bool:
        """One kernel for the whole block (`ops.residual_block`): a stride-1 convolution then a
        kernel-1 one, the shortcut the identity or a kernel-1 convolution, no norm layer anywhere
        (weight norm folds into the weights)."""
        shortcut = self.shortcut
        plain = isinstance(shortcut, nn.Identity) or (isinstance(shortcut, SConv1d) and shortcut.kernel_size == 1
                                                      and shortcut.stride == 1
                                                      and isinstance(shortcut.conv.norm, nn.Identity))
        return (plain and len(convs) == 2 and convs[1].kernel_size == 1 and convs[0].stride == 1
                and all(isinstance(c.conv.norm, nn.Identity) for c in convs))

    def convs(self) -> tp.List[SConv1d]:
        """The block's convolutions, first to last (the shortcut not included)."""
        return [m for m in self.block if isinstance(m, SConv1d)]

    def _fused_args(self, length: int, convs: tp.List[SConv1d]) -> tuple:
        """The block's arguments of `ops.residual_block` after x (weights, dilation, padding for an
        input of `length`, shortcut)."""
        first, second = convs[0].conv.conv, convs[1].conv.conv
        skip = self.shortcut.conv.conv if isinstance(self.shortcut, SConv1d) else None
        return (first.weight, first.bias, second.weight, second.bias, convs[0].dilation, convs[0].paddings(length),
                convs[0].pad_mode, None if skip is None else skip.weight, None if skip is None else skip.bias)

    def downsampled(self, x: torch.Tensor, down: SConv1d, groups: tp.Optional[Groups] = None
                    ) -> tp.Optional[torch.Tensor]:
        """down(ELU(self(x))) in one kernel (`ops.residual_block_down`: the block's output never
        written) where the block fuses, `down` has no norm layer nor dilation and
        `ops.block_down_backend` says so; None elsewhere (the caller runs the two apart)."""
        convs = self.convs()
        if (groups is not None and not groups.uniform(x)) or not self._fusable(convs) or down.dilation != 1 \
                or not isinstance(down.conv.norm, nn.Identity):
            return None
        conv = down.conv.conv
        if ops.block_down_backend(x, _raw_weight(convs[0].conv.conv), _raw_weight(convs[1].conv.conv),
                                  _raw_weight(conv), down.stride) != "triton":
            return None
        return ops.residual_block_down(x, *self._fused_args(x.shape[-1], convs), conv.weight, conv.bias, down.stride,
                                       down.paddings(x.shape[-1]), down.pad_mode)

    def upsampled(self, x: torch.Tensor, up: SConvTranspose1d, elu_first: bool) -> tp.Optional[torch.Tensor]:
        """self(up(x), ELU on x first where elu_first) in one kernel (`ops.up_residual_block`: the
        upsampled signal never written) where the block fuses, `up` has no norm layer and
        `ops.up_block_backend` says so; None elsewhere (the caller runs the two apart)."""
        convs = self.convs()
        convtr = up.convtr.convtr
        stride = convtr.stride[0]
        if not self._fusable(convs) or not isinstance(up.convtr.norm, nn.Identity) or ops.up_block_backend(
                x, _raw_weight(convtr), _raw_weight(convs[0].conv.conv), _raw_weight(convs[1].conv.conv),
                stride) != "triton":
            return None
        start, length = up.kept(x.shape[-1])
        return ops.up_residual_block(x, convtr.weight, convtr.bias, stride, start, length, elu_first,
                                     *self._fused_args(length, convs))

    def forward(self, x: torch.Tensor, groups: tp.Optional[Groups] = None, elu_out: bool = False) -> torch.Tensor:
        """x + block(x) (or the shortcut's); `elu_out` (without groups or with ragged rows): its ELU
        (the next layer's, when nothing else reads the block's output)."""
        if elu_out and groups is not None and not isinstance(groups, RaggedRows):
            raise ValueError("elu_out is for calls without groups or with ragged rows")
        h = x
        convs = self.convs()
        last = len(convs) - 1
        if (groups is None or groups.uniform(x)) and self._fusable(convs) and ops.block_backend(
                x, _raw_weight(convs[0].conv.conv), _raw_weight(convs[1].conv.conv)) == "triton":
            y = ops.residual_block(x, *self._fused_args(x.shape[-1], convs))
            return elu(y, True) if elu_out else y
        if (groups is None or groups.uniform(x)) and any(
                ops.conv_backend(x, _raw_weight(c.conv.conv), "conv1d", c.stride) == "triton" for c in convs):
            # Kernels (each conv where `auto` takes ours): the shortcut first, then the block, its
            # last conv adding the shortcut. Each conv's output is read only by the next conv's
            # ELU: each applies it on its output (once per element, in the kernel's epilogue)
            # instead of the next one on its input (once per tap and output-channel block).
            skip = self.shortcut(x) if isinstance(self.shortcut, SConv1d) else x
            for i, conv in enumerate(convs):
                h = conv(h, elu_first=i == 0, residual=skip if i == last else None, elu_out=i < last or elu_out)
            return h
        for i, conv in enumerate(convs):
            if isinstance(groups, RaggedRows):
                # every row in one call per conv: as above, each output's ELU in its conv
                h = conv(h, groups, elu_first=i == 0, elu_inplace=i > 0, elu_out=i < last)
            elif i == 0 or groups is None or groups.uniform(h):
                # x itself is needed by the shortcut: only later ELUs may run in place.
                h = conv(h, groups, elu_first=True, elu_inplace=i > 0)
            else:
                h = conv(groups.elu_(h), groups)
        skip = self.shortcut(x, groups) if isinstance(self.shortcut, SConv1d) else x
        if torch.is_grad_enabled() or skip is x:
            y = skip + h
        else:
            y = skip.add_(h)
        return elu(y, True) if elu_out else y


def elu_plan(layers: tp.Sequence[nn.Module]) -> tp.List[tp.Tuple[tp.Optional[nn.Module], bool]]:
    """A SEANet layer list as (layer, elu) steps, each `nn.ELU` folded into a neighbour: for a
    convolution, `elu` means ELU on its input; for an `SLSTM`, ELU on its output; (None, True)
    is an ELU that has no neighbour to fold into. Other layers come with False."""
    plan: tp.List[tp.Tuple[tp.Optional[nn.Module], bool]] = []
    pending_elu = False
    i = 0
    while i < len(layers):
        layer = layers[i]
        i += 1
        if isinstance(layer, nn.ELU):
            if pending_elu:
                plan.append((None, True))
            pending_elu = True
            continue
        if isinstance(layer, (SConv1d, SConvTranspose1d)):
            plan.append((layer, pending_elu))
        else:
            if pending_elu:
                plan.append((None, True))
            then_elu = isinstance(layer, SLSTM) and i < len(layers) and isinstance(layers[i], nn.ELU)
            plan.append((layer, then_elu))
            i += then_elu
        pending_elu = False
    if pending_elu:
        plan.append((None, True))
    return plan


def run_layers(layers: tp.Sequence[nn.Module], x: torch.Tensor, groups: tp.Optional[Groups] = None) -> torch.Tensor:
    """Run a SEANet layer list as `nn.Sequential` would, folding each `nn.ELU` into its neighbour
    (`elu_plan`).

    An ELU before a convolution runs on that convolution's input (in place: nothing else reads
    it); an ELU after the LSTM runs inside `SLSTM`, on the LSTM's own memory layout. A residual
    block and the ELU + convolution after it (the encoder's downsampling) run as one kernel where
    `SEANetResnetBlock.downsampled` takes them, and a transposed convolution and the block after it
    (the decoder's upsampling) where `SEANetResnetBlock.upsampled` does.
    """
    plan = elu_plan(layers)
    skip_next = elu_done = False
    for i, (layer, with_elu) in enumerate(plan):
        if skip_next:  # a downsampling convolution run with the block before it
            skip_next = False
            continue
        if elu_done:  # the layer before applied this layer's ELU to its own output
            with_elu, elu_done = False, False
        after = plan[i + 1][0] if i + 1 < len(plan) else None
        if isinstance(layer, SEANetResnetBlock) and isinstance(after, SConv1d) and plan[i + 1][1]:
            y = layer.downsampled(x, after, groups)
            if y is not None:
                x, skip_next = y, True
                if groups is not None:
                    groups = groups.map_lengths(after.output_length)
                continue
        if isinstance(layer, SConvTranspose1d) and isinstance(after, SEANetResnetBlock) and groups is None:
            y = after.upsampled(x, layer, with_elu)
            if y is not None:
                x, skip_next = y, True
                continue
        if layer is None:
            x = elu(x, True) if groups is None else groups.elu_(x)
        elif isinstance(layer, SConv1d):
            x = layer(x, groups, elu_first=with_elu, elu_inplace=True)
            if groups is not None:
                groups = groups.map_lengths(layer.output_length)
        elif isinstance(layer, SConvTranspose1d):
            if groups is not None:
                raise NotImplementedError("grouped batches are for the encoder only")
            x = layer(x, elu_first=with_elu, elu_inplace=True)
        elif isinstance(layer, SLSTM):
            x = layer(x, groups, elu=with_elu)
        elif isinstance(layer, SEANetResnetBlock):
            # a convolution after it with an ELU first: the block applies it to its output (its
            # last convolution's epilogue on the Triton backend; nothing else reads the output)
            elu_done = (groups is None or isinstance(groups, RaggedRows)) and isinstance(
                after, (SConv1d, SConvTranspose1d)) and plan[i + 1][1]
            x = layer(x, groups, elu_out=elu_done)
        else:
            x = layer(x)
    return x


class SEANetEncoder(nn.Module):
    """SEANet encoder: [B, channels, T] -> [B, dimension, ceil(T / hop_length)]."""

    def __init__(self, channels: int = 1, dimension: int = 128, n_filters: int = 32, n_residual_layers: int = 1,
                 ratios: tp.Sequence[int] = (8, 5, 4, 2), norm: str = "weight_norm", kernel_size: int = 7,
                 last_kernel_size: int = 7, residual_kernel_size: int = 3, dilation_base: int = 2,
                 causal: bool = False, pad_mode: str = "reflect", true_skip: bool = False, compress: int = 2,
                 lstm: int = 2):
        super().__init__()
        self.channels = channels
        self.dimension = dimension
        self.n_filters = n_filters
        self.ratios = list(reversed(ratios))
        self.n_residual_layers = n_residual_layers
        self.hop_length = int(np.prod(self.ratios))
        self.causal = causal
        self.norm = norm

        mult = 1
        model: tp.List[nn.Module] = [
            SConv1d(channels, mult * n_filters, kernel_size, norm=norm, causal=causal, pad_mode=pad_mode)]
        for ratio in self.ratios:
            for j in range(n_residual_layers):
                model += [SEANetResnetBlock(mult * n_filters, kernel_sizes=[residual_kernel_size, 1],
                                            dilations=[dilation_base ** j, 1], norm=norm, causal=causal,
                                            pad_mode=pad_mode, compress=compress, true_skip=true_skip)]
            model += [nn.ELU(alpha=1.0),
                      SConv1d(mult * n_filters, mult * n_filters * 2, kernel_size=ratio * 2, stride=ratio,
                              norm=norm, causal=causal, pad_mode=pad_mode)]
            mult *= 2
        if lstm:
            model += [SLSTM(mult * n_filters, num_layers=lstm)]
        model += [nn.ELU(alpha=1.0),
                  SConv1d(mult * n_filters, dimension, last_kernel_size, norm=norm, causal=causal,
                          pad_mode=pad_mode)]
        self.model = nn.Sequential(*model)

    def forward(self, x: torch.Tensor, groups: tp.Optional[Groups] = None) -> torch.Tensor:
        """`groups` (rows sharing a valid length) lets one call encode what upstream runs in
        several calls, with the same bits; see `encodec_fast.modules.groups`."""
        if groups is not None and torch.is_grad_enabled():
            raise RuntimeError("grouped encoding is for inference (no autograd)")
        return run_layers(self.model, x, groups)


class SEANetDecoder(nn.Module):
    """SEANet decoder: [B, dimension, T] -> [B, channels, T * hop_length]."""

    def __init__(self, channels: int = 1, dimension: int = 128, n_filters: int = 32, n_residual_layers: int = 1,
                 ratios: tp.Sequence[int] = (8, 5, 4, 2), norm: str = "weight_norm", kernel_size: int = 7,
                 last_kernel_size: int = 7, residual_kernel_size: int = 3, dilation_base: int = 2,
                 causal: bool = False, pad_mode: str = "reflect", true_skip: bool = False, compress: int = 2,
                 lstm: int = 2, trim_right_ratio: float = 1.0, final_activation: tp.Optional[str] = None):
        super().__init__()
        self.dimension = dimension
        self.channels = channels
        self.n_filters = n_filters
        self.ratios = list(ratios)
        self.n_residual_layers = n_residual_layers
        self.hop_length = int(np.prod(self.ratios))
        self.causal = causal
        self.norm = norm

        mult = int(2 ** len(self.ratios))
        model: tp.List[nn.Module] = [
            SConv1d(dimension, mult * n_filters, kernel_size, norm=norm, causal=causal, pad_mode=pad_mode)]
        if lstm:
            model += [SLSTM(mult * n_filters, num_layers=lstm)]
        for ratio in self.ratios:
            model += [nn.ELU(alpha=1.0),
                      SConvTranspose1d(mult * n_filters, mult * n_filters // 2, kernel_size=ratio * 2,
                                       stride=ratio, norm=norm, causal=causal, trim_right_ratio=trim_right_ratio)]
            for j in range(n_residual_layers):
                model += [SEANetResnetBlock(mult * n_filters // 2, kernel_sizes=[residual_kernel_size, 1],
                                            dilations=[dilation_base ** j, 1], norm=norm, causal=causal,
                                            pad_mode=pad_mode, compress=compress, true_skip=true_skip)]
            mult //= 2
        model += [nn.ELU(alpha=1.0),
                  SConv1d(n_filters, channels, last_kernel_size, norm=norm, causal=causal, pad_mode=pad_mode)]
        if final_activation is not None:
            model += [getattr(nn, final_activation)()]
        self.model = nn.Sequential(*model)

    @property
    def head_size(self) -> int:
        """Layers up to and including the LSTM: the part that runs at the frame rate."""
        for i, layer in enumerate(self.model):
            if isinstance(layer, SLSTM):
                return i + 1
        return 1

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        """[B, dimension, T] -> [B, mult * n_filters, T]: the frame-rate layers (conv, LSTM).

        Small activations and a recurrent loop whose cost hardly grows with the batch: run it on
        as many segments at once as possible."""
        return run_layers(list(self.model)[:self.head_size], z)

    def forward_tail(self, h: torch.Tensor) -> torch.Tensor:
        """The output of `forward_head` -> audio [B, channels, T * hop_length]: the upsampling
        layers, whose activations are large (on CPU, few segments at a time keep them in cache)."""
        return run_layers(list(self.model)[self.head_size:], h)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return run_layers(self.model, z)
