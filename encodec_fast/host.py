"""Copies between the host and a GPU that do not make the host wait for the work queued before
them: from pinned memory to the device, and from the device to pinned memory behind an event."""

import typing as tp

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device`; to CUDA from pinned memory, without waiting for the work
    queued before it (a copy from pageable memory waits for the whole stream)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def to_host_later(t: torch.Tensor) -> tp.Tuple[torch.Tensor, tp.Optional[torch.cuda.Event]]:
    """(t's values on the host, an event recorded after the copy or None): on CUDA a pinned copy
    queued behind the work that makes t, complete once the event is; elsewhere t itself. Read
    the host tensor after `wait(event)`."""
    if not t.is_cuda:
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(t.device))
    return host, event


def wait(event: tp.Optional[torch.cuda.Event]) -> None:
    """Until `to_host_later`'s copy is done (at once when it already is: no synchronisation)."""
    if event is not None and not event.query():
        event.synchronize()
