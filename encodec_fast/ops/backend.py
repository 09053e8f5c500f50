"""Which implementation an op runs: the PyTorch reference or a Triton kernel.

Default (`auto`): the kernel for CUDA tensors when Triton is importable, the reference
otherwise. `ENCODEC_FAST_BACKEND=torch|triton|auto` or the `use_backend` context manager force
one; forcing `triton` on CPU tensors needs Triton's interpreter (`TRITON_INTERPRET=1`, set
before `triton` is first imported), which is how the tests run the kernels without a GPU.
"""

import contextlib
import contextvars
import functools
import os
import typing as tp

import torch

BACKENDS = ("auto", "torch", "triton")
_override: contextvars.ContextVar[tp.Optional[str]] = contextvars.ContextVar("encodec_fast_backend", default=None)
_any_device: contextvars.ContextVar[bool] = contextvars.ContextVar("encodec_fast_kernels_any_device", default=False)


class BackendError(RuntimeError):
    """The requested backend cannot run these tensors here."""


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def env_choice(name: str, choices: tp.Sequence[str], default: str) -> str:
    """$name lower-cased, checked against `choices` (empty or unset: `default`)."""
    value = os.environ.get(name, default).strip().lower() or default
    if value not in choices:
        raise ValueError(f"{name}={value!r}; choose one of {', '.join(choices)}")
    return value


def requested_backend() -> str:
    """The backend asked for: the innermost `use_backend`, else $ENCODEC_FAST_BACKEND, else auto."""
    forced = _override.get()
    if forced is not None:
        return forced
    return _check(os.environ.get("ENCODEC_FAST_BACKEND", "auto").strip().lower() or "auto")


@contextlib.contextmanager
def use_backend(name: str) -> tp.Iterator[None]:
    """Force `name` ('torch', 'triton' or 'auto') for the ops called inside the block."""
    token = _override.set(_check(name))
    try:
        yield
    finally:
        _override.reset(token)


@contextlib.contextmanager
def kernels_on_any_device() -> tp.Iterator[None]:
    """Inside the block, ops take the Triton kernels for tensors on any device (CPU, meta) unless the
    torch backend is forced. Only for recording launch configurations without a GPU
    (`tools/compile_gpu.py` runs the models this way under a stand-in driver that launches nothing)."""
    token = _any_device.set(True)
    try:
        yield
    finally:
        _any_device.reset(token)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def select(*tensors: torch.Tensor) -> str:
    """'torch' or 'triton' for an op on `tensors` (raises BackendError if triton is forced but
    cannot run them)."""
    want = requested_backend()
    if want == "torch":
        return "torch"
    if _any_device.get():
        return "triton"
    on_cuda = all(t.is_cuda for t in tensors)
    if want == "auto":
        return "triton" if on_cuda and triton_available() and not interpreting() else "torch"
    if not triton_available():
        raise BackendError("ENCODEC_FAST_BACKEND=triton, but triton cannot be imported; "
                           "install triton or use the torch backend")
    if not on_cuda and not interpreting():
        raise BackendError("the triton backend runs CPU tensors only under Triton's interpreter: "
                           "set TRITON_INTERPRET=1 before importing triton, or use the torch backend")
    return "triton"
