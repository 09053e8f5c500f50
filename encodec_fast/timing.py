"""Where the time goes: named stages timed across a job, on CPU and on CUDA, nested.

    timer = StageTimer()
    with timer.active():                  # code below it reports into this timer
        with stage("encoder"):            # in the model; a no-op when no timer is active
            ...
            with stage("lstm"):
                ...
    timer.seconds()                       # {"encoder": self time, "lstm": ...}

A stage's figure is its *own* time: the time of the stages nested in it is taken out of it, so the
figures add up to the time of the outermost stages (a GPU-timed stage nested in a host-timed one
is not taken out of it: they overlap). On CPU a stage is wall-clock time (perf_counter, or the
timer's `clock`). A stage whose `device` is a CUDA device is timed by two CUDA events on the current stream:
the time the GPU spent between them, without a synchronization (the events are read when they have
completed, or at `seconds()`), so that timing does not change what it measures. A timer is used by
one thread at a time; another thread (the tokenizer's writer) keeps its own.
"""

import contextlib
import contextvars
import time
import typing as tp

import torch

_ACTIVE: "contextvars.ContextVar[tp.Optional[StageTimer]]" = contextvars.ContextVar("encodec_fast_timer", default=None)


class _Record:
    __slots__ = ("name", "parent", "begin", "end", "seconds", "children", "cuda")

    def __init__(self, name: str, parent: tp.Optional["_Record"], begin: tp.Any, cuda: bool):
        self.name, self.parent, self.begin, self.cuda = name, parent, begin, cuda
        self.end: tp.Any = None
        self.seconds: tp.Optional[float] = None  # inclusive, once known
        self.children: tp.List[_Record] = []


class StageTimer:
    """Accumulates the own time of named stages (see the module docstring)."""

    def __init__(self, clock: tp.Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock  # host stages' clock (seconds)
        self._own: tp.Dict[str, float] = {}
        self._counts: tp.Dict[str, int] = {}
        self._stack: tp.List[_Record] = []
        self._pending: tp.List[_Record] = []  # finished outermost records with CUDA events not read yet
        self.gpu: tp.Set[str] = set()          # stages timed on the GPU (CUDA events)
        self.loop_seconds = 0.0                # the timed job's wall time, where its owner sets it

    @contextlib.contextmanager
    def active(self) -> tp.Iterator["StageTimer"]:
        """Make this timer the one `stage` reports to, in this thread (and context)."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    @contextlib.contextmanager
    def stage(self, name: str, device: tp.Optional[torch.device] = None) -> tp.Iterator[None]:
        cuda = device is not None and device.type == "cuda"
        if cuda:
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
            self.gpu.add(name)
        else:
            begin = self._clock()
        rec = _Record(name, self._stack[-1] if self._stack else None, begin, cuda)
        if rec.parent is not None:
            rec.parent.children.append(rec)
        self._stack.append(rec)
        try:
            yield
        finally:
            self._stack.pop()
            if cuda:
                rec.end = torch.cuda.Event(enable_timing=True)
                rec.end.record()
            else:
                rec.seconds = self._clock() - rec.begin
            if rec.parent is None:
                self._pending.append(rec)
                self._collect(block=False)

    def add(self, name: str, seconds: float) -> None:
        """Time measured elsewhere (another thread's, say), counted as an outermost stage."""
        self._own[name] = self._own.get(name, 0.0) + seconds
        self._counts[name] = self._counts.get(name, 0) + 1

    def _collect(self, block: bool) -> None:
        keep = []
        for rec in self._pending:
            if _resolve(rec, block):
                self._account(rec)
            else:
                keep.append(rec)
        self._pending = keep

    def _account(self, rec: _Record) -> None:
        assert rec.seconds is not None
        # a GPU stage inside a host stage runs beside it, not in its place: only a clock's own nested
        # stages are taken out
        own = rec.seconds - sum(tp.cast(float, c.seconds) for c in rec.children if c.cuda == rec.cuda)
        self._own[rec.name] = self._own.get(rec.name, 0.0) + max(own, 0.0)
        self._counts[rec.name] = self._counts.get(rec.name, 0) + 1
        for child in rec.children:
            self._account(child)

    def seconds(self) -> tp.Dict[str, float]:
        """{stage: own seconds} so far, in the order the stages were first seen (waits for the GPU
        to finish the stages it has not)."""
        self._collect(block=True)
        return dict(self._own)

    def counts(self) -> tp.Dict[str, int]:
        self._collect(block=True)
        return dict(self._counts)


def _resolve(rec: _Record, block: bool) -> bool:
    """Fill in rec's (and its children's) inclusive seconds; False while a CUDA event is pending."""
    if rec.seconds is None:
        if not block and not rec.end.query():
            return False
        rec.end.synchronize()
        rec.seconds = rec.begin.elapsed_time(rec.end) / 1e3
    return all(_resolve(child, block) for child in rec.children)


def stage(name: str, device: tp.Optional[torch.device] = None) -> tp.ContextManager[None]:
    """Time the block as stage `name` in the active timer (a no-op without one). `device`: where its
    work runs (CUDA: timed with events on the current stream; else wall-clock)."""
    if _compiling():  # inside torch.compile's trace: stages are host-side bookkeeping, not graph ops
        return contextlib.nullcontext()
    if device is not None and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return contextlib.nullcontext()  # inside a CUDA graph's capture: events there would not time a replay
    timer = _ACTIVE.get()
    if timer is None:
        return contextlib.nullcontext()
    return timer.stage(name, device)


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling()


def current() -> tp.Optional[StageTimer]:
    return _ACTIVE.get()
