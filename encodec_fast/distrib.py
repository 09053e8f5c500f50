"""torch.distributed helpers that are no-ops when not running distributed."""

import typing as tp

import torch


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def is_distributed() -> bool:
    return world_size() > 1


def broadcast_tensors(tensors: tp.Iterable[torch.Tensor], src: int = 0) -> None:
    """Broadcast the floating-point tensors from rank `src` (e.g. codebook buffers after init)."""
    if not is_distributed():
        return
    tensors = [t for t in tensors if t.is_floating_point() or t.is_complex()]
    handles = [torch.distributed.broadcast(t.data, src=src, async_op=True) for t in tensors]
    for h in handles:
        h.wait()


def sync_buffer(buffers: tp.Iterable[torch.Tensor], average: bool = True) -> None:
    """Average (or broadcast from rank 0) floating-point buffers across workers."""
    if not is_distributed():
        return
    buffers = [b for b in buffers if b.is_floating_point()]
    if average:
        handles = [torch.distributed.all_reduce(b.data, async_op=True) for b in buffers]
    else:
        handles = [torch.distributed.broadcast(b.data, src=0, async_op=True) for b in buffers]
    for h in handles:
        h.wait()
    if average:
        for b in buffers:
            b.data /= world_size()


def average_metrics(metrics: tp.Dict[str, float], count: float = 1.0) -> tp.Dict[str, float]:
    """Average named floats across workers, each worker's values weighted by `count` (its batch
    size, say); the values themselves when not distributed."""
    if not is_distributed() or not metrics:
        return dict(metrics)
    keys = list(metrics)
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([float(metrics[k]) * count for k in keys] + [float(count)], device=device,
                          dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    values = (tensor[:-1] / tensor[-1]).cpu().tolist()
    return dict(zip(keys, values))


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` across workers in place (nothing when not distributed)."""
    if is_distributed():
        torch.distributed.all_reduce(tensor)
    return tensor


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every worker's `tensor` [N, ...] along dim 0 in rank order (same N on every
    worker): the rows one process would hold with the combined batch."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def average_gradients(params: tp.Iterable[torch.nn.Parameter]) -> None:
    """Replace every gradient by its mean across workers, in one flat all-reduce (a parameter
    without a gradient on one worker counts as zero there, on all workers alike)."""
    if not is_distributed():
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    torch.distributed.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n
