"""Named precision modes for the codec's encoder and decoder, each with its like-for-like torch setting.

| mode | our Triton convolutions | torch on CUDA (cuDNN convolutions and LSTM, cuBLAS) | dtypes |
|---|---|---|---|
| `exact` (default) | fp32 products (`ieee`) | TF32 off (`fp32_precision = "ieee"`) | fp32 |
| `tf32` | TF32 tensor cores (`tf32`) | TF32 on (`"tf32"`: torch's default for cuDNN convs and LSTMs) | fp32 |
| `bf16` | bf16 inputs, fp32 accumulation | `torch.autocast(dtype=torch.bfloat16)` | bf16 activations |
| `fp16` | fp16 inputs, fp32 accumulation | `torch.autocast(dtype=torch.float16)` | fp16 activations |

`exact` is what the CPU computes: torch's GPU default is not (its cuDNN convolutions and LSTMs run
in TF32 unless told otherwise), so on CUDA the mode sets torch's flags for the duration of the call
and restores them after. The codebook search is the same in every mode (fp32, or the certified
tensor-core search whose codes are the fp32 search's): the latents are cast to fp32 before it, so
`bf16` and `fp16` change the codes only through the encoder's arithmetic. On CPU `tf32` equals
`exact` (CPUs have no TF32) and `bf16` / `fp16` run under CPU autocast.

`bf16` and `fp16` cost the same on tensor cores; fp16 keeps 3 more mantissa bits (10 against 7) and
so far more of the codes (docs/gpu.md: on the shipped small model at 6 kbps, 96-97% of exact's codes
against 81-85% for bf16), but its range ends at 65504. The model checks what an fp16 encoder or
decoder call produced (`overflowed`) and redoes a call that overflowed in `exact`, with a warning.

    model.set_precision("bf16")            # encode / decode / encode_batch run in bf16 from now on
    with encodec_fast.precision.scope("tf32", "cuda"):
        ...                                # any torch code: TF32 for cuDNN / cuBLAS, our kernels in tf32

The mode reaches the convolution ops through `current()`; $ENCODEC_FAST_CONV_PRECISION, when set,
still picks our kernels' dot precision (ieee, tf32x3, tf32) whatever the mode.
"""

import contextlib
import contextvars
import functools
import typing as tp
import warnings

import torch

MODES = ("exact", "tf32", "bf16", "fp16")
DEFAULT = "exact"
#: The modes that run under autocast, and in which dtype.
AUTOCAST: tp.Dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}

_mode: contextvars.ContextVar[tp.Optional[str]] = contextvars.ContextVar("encodec_fast_precision", default=None)

#: torch's fp32 math switches for CUDA that a mode sets: (module path, attribute).
_TORCH_LEAVES = (("cudnn", "conv"), ("cudnn", "rnn"), ("cuda", "matmul"))


def check(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown precision mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def current() -> tp.Optional[str]:
    """The mode of the innermost `scope`, or None outside every scope."""
    return _mode.get()


def _leaf(group: str, name: str):
    return getattr(getattr(torch.backends, group), name)


@functools.lru_cache(maxsize=None)
def _has_fp32_precision() -> bool:
    """torch >= 2.9 has the per-leaf `fp32_precision` switches; older releases the `allow_tf32` flags."""
    try:
        return all(isinstance(_leaf(g, n).fp32_precision, str) for g, n in _TORCH_LEAVES)
    except (AttributeError, RuntimeError):
        return False


def torch_settings(mode: str) -> tp.Dict[str, str]:
    """What `torch_precision(mode)` sets, by name (for benchmark records)."""
    value = "tf32" if check(mode) == "tf32" else "ieee"
    out = {f"{g}.{n}.fp32_precision": value for g, n in _TORCH_LEAVES}
    if mode in AUTOCAST:
        out["autocast"] = str(AUTOCAST[mode]).replace("torch.", "")
    return out


@contextlib.contextmanager
def torch_precision(mode: str) -> tp.Iterator[None]:
    """torch's fp32 math on CUDA in `mode` inside the block: cuDNN convolutions, cuDNN RNNs and
    cuBLAS matrix products with TF32 on (`tf32`) or off (`exact`, and what stays fp32 under `bf16`
    and `fp16`), each leaf set explicitly (never the deprecated global flags), restored after."""
    value = "tf32" if check(mode) == "tf32" else "ieee"
    if _has_fp32_precision():
        leaves = [_leaf(g, n) for g, n in _TORCH_LEAVES]
        saved = [leaf.fp32_precision for leaf in leaves]
        try:
            for leaf in leaves:
                leaf.fp32_precision = value
            yield
        finally:
            for leaf, old in zip(leaves, saved):
                leaf.fp32_precision = old
        return
    saved_flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = value == "tf32"
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved_flags


@contextlib.contextmanager
def declare(mode: str) -> tp.Iterator[None]:
    """Our ops compute in `mode` inside the block (`current()`), and nothing else changes: torch's
    switches and autocast are the caller's (the trainer autocasts the models, not the losses)."""
    token = _mode.set(check(mode))
    try:
        yield
    finally:
        _mode.reset(token)


@contextlib.contextmanager
def scope(mode: str, device: tp.Union[str, torch.device] = "cuda") -> tp.Iterator[None]:
    """Run the block in `mode` for tensors on `device`: our ops read the mode (`current()`); on
    CUDA torch's TF32 switches follow it; `bf16` and `fp16` add `torch.autocast(device type, dtype)`."""
    device = torch.device(device)
    with declare(mode), contextlib.ExitStack() as stack:
        if device.type == "cuda":
            stack.enter_context(torch_precision(mode))
        if mode in AUTOCAST:
            stack.enter_context(torch.autocast(device.type, dtype=AUTOCAST[mode]))
        yield


def finite_flag(mode: str, result: torch.Tensor) -> tp.Optional[torch.Tensor]:
    """In fp16 (the one mode whose narrow range can leave values that are not finite: bf16 has
    fp32's exponent), whether `result` is all finite, as a 0-d bool tensor on its device, not read
    (no synchronisation); None in the other modes."""
    return torch.isfinite(result).all() if mode == "fp16" else None


def overflowed(mode: str, result: torch.Tensor) -> bool:
    """Whether a call in `mode` left `result` with a value that is not finite where that can come
    from the mode's narrow range (`finite_flag`, read: one device-to-host synchronisation in fp16,
    nothing in the other modes)."""
    flag = finite_flag(mode, result)
    return flag is not None and not bool(flag)


def overflow_warning(what: str) -> None:
    warnings.warn(f"fp16 overflowed in the {what} on this input (values past 65504); this call was redone "
                  f"in exact fp32 (set_precision('bf16') has fp32's range)", RuntimeWarning, stacklevel=3)

