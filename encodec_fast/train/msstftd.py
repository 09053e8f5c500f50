"""Multi-scale STFT discriminator (EnCodec's MS-STFTD), state-dict compatible with upstream's
`encodec.msstftd.MultiScaleSTFTDiscriminator`.

Each scale: complex STFT of the waveform (Hann window, no centering, normalised by the window's
L2 norm), real and imaginary parts as channels [B, 2C, frames, freq], then five Conv2d +
LeakyReLU(0.2) layers (the feature maps) and a final Conv2d (the logits). Each Conv2d + LeakyReLU
is one op (`ops.conv2d_leaky_relu`: cuDNN + LeakyReLU by default, the fused Triton kernel on the
triton backend). As upstream, the first
conv carries no weight norm and the others do (`weight_g`/`weight_v` keys).
"""

import typing as tp
import warnings

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.weight_norm import WeightNorm

from .. import dsp, ops
from ..ops.backend import env_choice
from ..ops.conv import conv2d_backend, conv_kernel

FeatureMaps = tp.List[torch.Tensor]

LAYOUTS = ("channels_last", "nchw")


def layout() -> str:
    """The CPU layout of the discriminator's activations: $ENCODEC_FAST_DISC_LAYOUT, 'channels_last'
    (the default: oneDNN's convolutions run about 2x faster forward, and a whole 24 kHz training
    step 1.28x faster on 2 cores; results within fp32 rounding of NCHW's) or 'nchw' (upstream's
    layout, upstream's bits)."""
    return env_choice("ENCODEC_FAST_DISC_LAYOUT", LAYOUTS, "channels_last")


def channels_last(z: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the spectrogram z goes channels-last before the first conv (of `weight`): on the torch
    path, fp32 (autocast's inputs included) on CPU only (fp64 has no oneDNN kernel, and CUDA's
    layouts are not measured), unless `layout()` says 'nchw'."""
    return (z.device.type == "cpu" and z.dtype == torch.float32 and layout() == "channels_last"
            and conv2d_backend(z, weight) == "torch")


def _padding_2d(kernel_size: tp.Tuple[int, int], dilation: tp.Tuple[int, int] = (1, 1)) -> tp.Tuple[int, int]:
    return ((kernel_size[0] - 1) * dilation[0]) // 2, ((kernel_size[1] - 1) * dilation[1]) // 2


class NormConv2d(nn.Module):
    """`nn.Conv2d`, optionally with (old-style) weight norm, under the key `conv` (upstream's tree)."""

    def __init__(self, *args, norm: str = "none", **kwargs):
        super().__init__()
        if norm not in ("none", "weight_norm"):
            raise ValueError(f"unsupported norm {norm!r} for the discriminator")
        conv = nn.Conv2d(*args, **kwargs)
        if norm == "weight_norm":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                conv = nn.utils.weight_norm(conv)
        self.conv = conv
        self.norm = nn.Identity()

    def weight(self) -> torch.Tensor:
        """The convolution's effective weight (recomputed from `weight_g`/`weight_v` under weight norm,
        as the module's own forward would)."""
        for hook in self.conv._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                return hook.compute_weight(self.conv)
        return self.conv.weight

    def _plain(self) -> bool:
        conv = self.conv
        return conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)

    def reads_any_layout(self, x: torch.Tensor, negative_slope: tp.Optional[float]) -> bool:
        """Whether this conv runs on the gemm kernels for x (any strides, an input scale folded in:
        the spectrogram's layout pass can be skipped)."""
        return (self._plain() and (negative_slope is None or negative_slope >= 0)
                and conv2d_backend(x, self.conv.weight) == "triton" and conv_kernel() == "gemm")

    def forward(self, x: torch.Tensor, negative_slope: tp.Optional[float] = None,
                input_scale: float = 1.0) -> torch.Tensor:
        """conv(x * input_scale), followed by LeakyReLU(negative_slope) unless it is None; one fused op."""
        conv = self.conv
        if not self._plain():
            y = conv(x * input_scale if input_scale != 1.0 else x)
            return y if negative_slope is None else F.leaky_relu(y, negative_slope)
        return ops.conv2d_leaky_relu(x, self.weight(), conv.bias, conv.stride, conv.dilation, conv.padding,
                                     negative_slope, input_scale)


class DiscriminatorSTFT(nn.Module):
    """One STFT scale: x [B, C, T] -> (logits [B, out, frames', freq'], feature maps)."""

    def __init__(self, filters: int, in_channels: int = 1, out_channels: int = 1, n_fft: int = 1024,
                 hop_length: int = 256, win_length: int = 1024, max_filters: int = 1024, filters_scale: int = 1,
                 kernel_size: tp.Tuple[int, int] = (3, 9), dilations: tp.Sequence[int] = (1, 2, 4),
                 stride: tp.Tuple[int, int] = (1, 2), normalized: bool = True, norm: str = "weight_norm",
                 activation: str = "LeakyReLU", activation_params: tp.Optional[dict] = None):
        super().__init__()
        if len(kernel_size) != 2 or len(stride) != 2:
            raise ValueError("kernel_size and stride are (frames, freq) pairs")
        self.filters, self.in_channels, self.out_channels = filters, in_channels, out_channels
        self.n_fft, self.hop_length, self.win_length = n_fft, hop_length, win_length
        self.normalized = normalized
        self.activation = getattr(nn, activation)(**(activation_params or {"negative_slope": 0.2}))
        self.spec_transform = dsp.Spectrogram(
            n_fft=n_fft, hop_length=hop_length, win_length=win_length, window_fn=torch.hann_window,
            normalized=normalized, center=False, power=None)
        channels = [min(filters_scale ** i * filters, max_filters) for i in range(len(dilations) + 2)]
        self.convs = nn.ModuleList([NormConv2d(2 * in_channels, filters, kernel_size=kernel_size,
                                               padding=_padding_2d(kernel_size))])
        for i, dilation in enumerate(dilations):
            self.convs.append(NormConv2d(channels[i], channels[i + 1], kernel_size=kernel_size, stride=stride,
                                         dilation=(dilation, 1), padding=_padding_2d(kernel_size, (dilation, 1)),
                                         norm=norm))
        square = (kernel_size[0], kernel_size[0])
        self.convs.append(NormConv2d(channels[len(dilations)], channels[-1], kernel_size=square,
                                     padding=_padding_2d(square), norm=norm))
        self.conv_post = NormConv2d(channels[-1], out_channels, kernel_size=square, padding=_padding_2d(square),
                                    norm=norm)

    def spectrogram(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, T] -> [B, 2C, frames, n_fft // 2 + 1]: real parts of every channel, then imaginary."""
        return ops.spectrogram(x, self.spec_transform.window, self.n_fft, self.hop_length, self.win_length,
                               self.normalized)

    def forward(self, x: torch.Tensor) -> tp.Tuple[torch.Tensor, FeatureMaps]:
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected audio [B, {self.in_channels}, T], got {tuple(x.shape)}")
        if x.shape[-1] < self.win_length:
            raise ValueError(f"audio of {x.shape[-1]} samples is shorter than the STFT window ({self.win_length})")
        fmap = []
        act = self.activation
        slope = act.negative_slope if isinstance(act, nn.LeakyReLU) else None
        layers = list(self.convs)
        if self.in_channels == 1 and slope is not None and layers[0].reads_any_layout(x, slope):
            # the fused front end: the first conv reads the STFT's real view, the normalisation
            # folded into its products (no layout pass, forward or backward)
            spec, scale = ops.spectrogram_view(x, self.spec_transform.window, self.n_fft, self.hop_length,
                                               self.win_length, self.normalized)
            z = layers.pop(0)(spec, slope, scale)
            fmap.append(z)
        else:
            z = self.spectrogram(x)
            if channels_last(z, layers[0].conv.weight):
                z = z.contiguous(memory_format=torch.channels_last)  # every layer after it keeps the layout
        for layer in layers:
            z = layer(z, slope) if slope is not None else act(layer(z))
            fmap.append(z)
        return self.conv_post(z), fmap


class MultiScaleSTFTDiscriminator(nn.Module):
    """STFT discriminators at several resolutions: x -> (list of logits, list of feature-map lists)."""

    def __init__(self, filters: int, in_channels: int = 1, out_channels: int = 1,
                 n_ffts: tp.Sequence[int] = (1024, 2048, 512), hop_lengths: tp.Sequence[int] = (256, 512, 128),
                 win_lengths: tp.Sequence[int] = (1024, 2048, 512), **kwargs):
        super().__init__()
        if not len(n_ffts) == len(hop_lengths) == len(win_lengths):
            raise ValueError("n_ffts, hop_lengths and win_lengths must have the same length")
        self.discriminators = nn.ModuleList([
            DiscriminatorSTFT(filters, in_channels=in_channels, out_channels=out_channels, n_fft=n,
                              win_length=w, hop_length=h, **kwargs)
            for n, h, w in zip(n_ffts, hop_lengths, win_lengths)])
        self.num_discriminators = len(self.discriminators)

    def forward(self, x: torch.Tensor) -> tp.Tuple[tp.List[torch.Tensor], tp.List[FeatureMaps]]:
        logits, fmaps = [], []
        for disc in self.discriminators:
            logit, fmap = disc(x)
            logits.append(logit)
            fmaps.append(fmap)
        return logits, fmaps
