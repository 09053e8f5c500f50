"""The implementations the suite compares, built from one state dict: ours (`encodec_fast`),
upstream `encodec` 0.1.1 and Hugging Face `transformers`' EncodecModel.

    codecs = build_all("24khz", state, impls=("ours", "upstream", "transformers"))
    enc = codecs["ours"].encode(x, 6.0); audio = codecs["ours"].decode(enc)

A peer that is not installed, or cannot load the model, comes back as `Unavailable(reason)`.
Model names: '24khz', '48khz' (official architectures) and 'small' (the shipped small codec's).
"""

import contextlib
import functools
import math
import typing as tp
import warnings

import torch

from encodec_fast import precision

from .core import EnvSetting

IMPLS = ("ours", "upstream", "transformers")
MODELS = {"24khz": "encodec_24khz", "48khz": "encodec_48khz", "small": "encodec_24khz_small"}


class Unavailable(Exception):
    """This implementation cannot run here (not installed, or cannot do the job)."""


def ours_model(model: str, state: tp.Optional[tp.Dict[str, torch.Tensor]] = None):
    """Our model of that architecture, with `state` loaded (strict)."""
    from encodec_fast.model import FACTORIES
    net = FACTORIES[MODELS[model]](pretrained=False)
    if state is not None:
        net.load_state_dict(state, strict=True)
    return net.eval()


def random_state(model: str, seed: int = 0) -> tp.Dict[str, torch.Tensor]:
    """Random weights (torch seed), random GroupNorm affines, data-like codebooks. Made once per
    process for each (model, seed) (about 1 s: the codebooks come from running the encoder);
    every call returns its own copy and leaves torch's generator where making it leaves it."""
    state, rng = _random_state(model, seed)
    torch.set_rng_state(rng)
    return {k: v.clone() for k, v in state.items()}


@functools.lru_cache(maxsize=None)
def _random_state(model: str, seed: int) -> tp.Tuple[tp.Dict[str, torch.Tensor], torch.Tensor]:
    from encodec_fast.testing import randomize_norms, set_data_like_codebooks
    torch.manual_seed(seed)
    net = ours_model(model)
    randomize_norms(net)
    set_data_like_codebooks(net, seed)
    return {k: v.clone() for k, v in net.state_dict().items()}, torch.get_rng_state()


class Codec:
    """One implementation's model behind one interface. `encode(x [B, C, n], kbps)` returns what
    `decode` takes; `codes(enc)` the codes [B, K, frames] (segments concatenated)."""

    def __init__(self, impl: str, net: torch.nn.Module, sample_rate: int, channels: int,
                 mode: tp.Optional[str] = None, backend: str = "auto", conv_kernel: tp.Optional[str] = None):
        self.impl, self.net, self.sample_rate, self.channels = impl, net, sample_rate, channels
        #: ours only: the precision mode (`encodec_fast.precision`), ops backend and convolution
        #: kernel family of every call (None: the model's own mode, $ENCODEC_FAST_CONV_KERNEL's
        #: family; backend "torch": the PyTorch path, cuDNN / cuBLAS on CUDA).
        self.mode, self.backend, self.conv_kernel = mode, backend, conv_kernel

    def _calls(self):
        """The context of a call: for ours, its precision mode, ops backend and kernel family."""
        if self.impl != "ours":
            return contextlib.nullcontext()
        from encodec_fast import ops
        if self.mode is not None:
            self.net.set_precision(self.mode)
        stack = contextlib.ExitStack()
        if self.conv_kernel is not None:
            stack.enter_context(EnvSetting("ENCODEC_FAST_CONV_KERNEL", self.conv_kernel))
        stack.enter_context(ops.use_backend(self.backend))
        return stack

    def encode(self, x: torch.Tensor, kbps: float) -> tp.Any:
        with torch.no_grad():
            if self.impl == "transformers":
                out = self.net.encode(x, bandwidth=float(kbps))
                return out.audio_codes, out.audio_scales, x.shape[-1]
            self.net.set_target_bandwidth(kbps)
            with self._calls():
                return self.net.encode(x)

    def decode(self, enc: tp.Any) -> torch.Tensor:
        with torch.no_grad():
            if self.impl == "transformers":
                codes, scales, n = enc
                return self.net.decode(codes, scales)[0][..., :n]
            with self._calls():
                return self.net.decode(enc)

    def codes(self, enc: tp.Any) -> torch.Tensor:
        if self.impl == "transformers":
            return torch.cat(list(enc[0]), dim=-1)
        return torch.cat([codes for codes, _ in enc], dim=-1)

    def random_codes(self, batch: int, seconds: float, kbps: float, seed: int = 0) -> tp.Any:
        """What `encode` would return for that much audio, with random codes (decode cost does not
        depend on the values): for memory runs that must not encode first."""
        gen = torch.Generator().manual_seed(seed)
        n = int(self.sample_rate * seconds)
        frame_rate = math.ceil(self.sample_rate / 320)
        k = max(1, int(kbps * 1000 // (frame_rate * 10)))
        segment = n if self.sample_rate != 48_000 else self.sample_rate
        stride = n if self.sample_rate != 48_000 else int(0.99 * self.sample_rate)
        pieces = []
        for start in range(0, n, stride):
            # transformers pads the last chunk of the 48 kHz model to a whole second
            length = segment if self.impl == "transformers" else min(segment, n - start)
            frames = math.ceil(length / 320)
            codes = torch.randint(0, 1024, (batch, k, frames), generator=gen)
            scale = torch.rand(batch, 1, generator=gen) + 0.5 if self.sample_rate == 48_000 else None
            pieces.append((codes, scale))
        if self.impl == "transformers":
            codes = torch.stack([c for c, _ in pieces])
            scales = [s for _, s in pieces]
            return codes, scales if self.sample_rate == 48_000 else [None], n
        return pieces


def import_transformers():
    """transformers, with its EnCodec model's code loaded, such that it does not take this repository's
    kernels/ folder for PyPI's `kernels`. transformers probes for that package (find_spec, then its
    metadata, else an import) when it loads any model's code, and caches the answer. From the repository's
    root (`python -m bench`, the tests) the probe finds our folder; where PyPI's `kernels` is installed
    (transformers 5.x requires it) the folder steps aside for it (kernels/__init__.py), but where it is not
    (a GPU image with transformers 5.17 and no `kernels`) the probe's import fails and so does
    `from transformers import EncodecModel`. So the root leaves sys.path while that import runs."""
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    saved = list(sys.path)
    sys.path[:] = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != root]
    try:
        import transformers
        from transformers import EncodecModel  # noqa: F401  (loads modeling_utils: the probe runs now)
    finally:
        sys.path[:] = saved
    return transformers


def transformers_config(model: str):
    transformers = import_transformers()
    if model == "48khz":
        return transformers.EncodecConfig(sampling_rate=48000, audio_channels=2, normalize=True, chunk_length_s=1.0,
                                          overlap=0.01, use_causal_conv=False, norm_type="time_group_norm",
                                          target_bandwidths=[3.0, 6.0, 12.0, 24.0])
    if model == "small":
        return transformers.EncodecConfig(num_filters=8, hidden_size=16, num_lstm_layers=1)
    return transformers.EncodecConfig()


def to_transformers(state: tp.Dict[str, torch.Tensor]) -> tp.Dict[str, torch.Tensor]:
    """upstream/ours state dict -> transformers' EncodecModel names (weight norm as parametrizations)."""
    renames = [("encoder.model.", "encoder.layers."), ("decoder.model.", "decoder.layers."),
               (".conv.conv.", ".conv."), (".convtr.convtr.", ".conv."), (".conv.norm.", ".norm."),
               (".convtr.norm.", ".norm."), ("quantizer.vq.layers.", "quantizer.layers."),
               ("._codebook.", ".codebook."), (".weight_g", ".parametrizations.weight.original0"),
               (".weight_v", ".parametrizations.weight.original1")]
    out = {}
    for key, value in state.items():
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    return out


def build(impl: str, model: str, state: tp.Dict[str, torch.Tensor], device: str = "cpu") -> Codec:
    """One implementation of `model` with `state` loaded strictly, on `device`; raises
    Unavailable with the reason when it cannot."""
    if impl == "ours":
        net = ours_model(model, state)
    elif impl == "upstream":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import encodec
        except Exception as err:  # not installed, or its torchaudio cannot load
            raise Unavailable(f"encodec 0.1.1 cannot be imported ({type(err).__name__}: {err})"[:200]) from err
        if model == "small":
            from encodec_fast.model import MODEL_CONFIGS
            arch = MODEL_CONFIGS[MODELS[model]]["arch"]
            kw = dict(n_filters=arch["n_filters"], dimension=arch["dimension"], lstm=arch["lstm"], causal=True,
                      norm="weight_norm")
            net = encodec.EncodecModel(
                encodec.modules.SEANetEncoder(**kw), encodec.modules.SEANetDecoder(**kw),
                encodec.quantization.ResidualVectorQuantizer(dimension=arch["dimension"], n_q=32, bins=1024),
                target_bandwidths=[1.5, 3.0, 6.0, 12.0, 24.0], sample_rate=24000, channels=1)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                net = getattr(encodec.EncodecModel, f"encodec_model_{model}")(pretrained=False)
        net.load_state_dict(state, strict=True)
        net.eval()
    elif impl == "transformers":
        try:  # transformers imports the model's code lazily: a missing need shows up at the model, not before
            EncodecModel = import_transformers().EncodecModel
        except Exception as err:
            raise Unavailable(f"transformers cannot be imported ({type(err).__name__}: {err})"[:200]) from err
        net = EncodecModel(transformers_config(model))
        converted = to_transformers(state)
        if not set(converted) <= set(net.state_dict()):  # older transformers: weight_g / weight_v names
            converted = {k.replace(".parametrizations.weight.original0", ".weight_g")
                         .replace(".parametrizations.weight.original1", ".weight_v"): v for k, v in converted.items()}
        net.load_state_dict(converted, strict=True)
        net.eval()
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    net = net.to(device)
    sample_rate = 48_000 if model == "48khz" else 24_000
    return Codec(impl, net, sample_rate, 2 if model == "48khz" else 1)


#: The precision modes the GPU codec benchmark runs ours, the torch path and torch.compile in.
MODES = precision.MODES


def gpu_variants(ours: "Codec", compile_mode: str = "max-autotune",
                 modes: tp.Optional[tp.Sequence[str]] = None) -> tp.Dict[str, "Codec"]:
    """Ours in each precision mode (`ours <mode>`: our kernels where `auto` takes them), the same
    model on the PyTorch path in the same mode (`torch <mode>`: cuDNN / cuBLAS with the mode's TF32
    switches, autocast for bf16), and that path with the encoder and decoder under
    `torch.compile(mode=compile_mode)` (`torch.compile <mode>`, compiled on first use; in `modes`
    only, every mode when None). Also `ours gemm <mode>` for tf32, bf16 and fp16 (the modes the
    implicit-GEMM family is built for): every convolution on our gemm kernels, the residual blocks
    and their resampling neighbours fused (`ENCODEC_FAST_BACKEND=triton ENCODEC_FAST_CONV_KERNEL=gemm`),
    what `auto` would take once measured faster."""
    import copy
    out: tp.Dict[str, Codec] = {}
    compiled = copy.deepcopy(ours.net)
    compiled.encoder.forward = torch.compile(compiled.encoder.forward, mode=compile_mode)
    compiled.decoder.forward_head = torch.compile(compiled.decoder.forward_head, mode=compile_mode)
    compiled.decoder.forward_tail = torch.compile(compiled.decoder.forward_tail, mode=compile_mode)
    for mode in MODES:
        out[f"ours {mode}"] = Codec("ours", ours.net, ours.sample_rate, ours.channels, mode, "auto")
        out[f"torch {mode}"] = Codec("ours", ours.net, ours.sample_rate, ours.channels, mode, "torch")
        if modes is None or mode in modes:
            out[f"torch.compile {mode}"] = Codec("ours", compiled, ours.sample_rate, ours.channels, mode, "torch")
    for mode in GEMM_MODES:
        out[f"ours gemm {mode}"] = Codec("ours", ours.net, ours.sample_rate, ours.channels, mode, "triton", "gemm")
    return out


#: The precision modes `gpu_variants` runs the implicit-GEMM family in (tensor cores).
GEMM_MODES = ("tf32", "bf16", "fp16")


def build_all(model: str, state: tp.Dict[str, torch.Tensor], impls: tp.Sequence[str] = IMPLS,
              device: str = "cpu") -> tp.Dict[str, tp.Union[Codec, Unavailable]]:
    out: tp.Dict[str, tp.Union[Codec, Unavailable]] = {}
    for impl in impls:
        try:
            out[impl] = build(impl, model, state, device)
        except Unavailable as err:
            out[impl] = err
    return out


def load_state(model: str, checkpoint: tp.Optional[str], seed: int = 0) -> tp.Tuple[tp.Dict[str, torch.Tensor], str]:
    """(state dict, where it came from): --checkpoint PATH, else the packaged weights (small), else
    the official weights when already on this machine (torch hub cache or ENCODEC_FAST_REPOSITORY:
    the suite never downloads), else random weights."""
    import os
    from pathlib import Path

    from encodec_fast import pretrained
    if checkpoint:
        return pretrained.load_state_dict_file(checkpoint), f"checkpoint {checkpoint}"
    name = MODELS[model]
    if name in pretrained.PACKAGED:
        return pretrained.get_checkpoint(name), "packaged weights"
    file_name = pretrained.CHECKPOINTS[name]
    places = [Path(torch.hub.get_dir()) / "checkpoints" / file_name]
    if os.environ.get("ENCODEC_FAST_REPOSITORY"):
        places.insert(0, Path(os.environ["ENCODEC_FAST_REPOSITORY"]) / file_name)
    for path in places:
        if path.is_file():
            return pretrained.load_state_dict_file(path), f"official weights ({path})"
    return random_state(model, seed), f"random weights (seed {seed}, data-like codebooks)"
