"""CUDA graphs for batched encoding: the encoder and the codebook search of one batch shape,
captured once and replayed.

A batch of clips of different lengths runs as one call per op (`RaggedRows`): every shape comes
from the batch tensor and the clips' lengths are a device tensor, so one capture serves every
batch of that shape (length bucket x rows), whatever its clips' lengths. Replaying skips the
host's per-launch work (several hundred kernel launches per batch for the 24 kHz model), which
matters most for short clips and small batches.

What a capture needs, and how it is met: the kernels are launched once before capturing (cuDNN
plans, Triton compilation and autotuning happen then, on a side stream as CUDA requires); no op
in the path reads a tensor's value on the host (the certified codebook search decides its
rescoring on the device); the stage timers stand aside during capture (`encodec_fast.timing`); in
fp16 the capture also computes whether the latents are all finite, a flag that `replay` returns
unread (`EncodecModel.encode_batch_async` reads it and redoes a batch that overflowed in exact,
without the graph).
A graph is bound to the model's weights, bandwidth, precision mode and the ops' backend and kernel
settings: any of those changing, or the weights being moved, makes a new capture (the key holds
them).
"""

import collections
import typing as tp

import torch

from . import timing
from .modules.groups import RaggedRows

#: The time breakdown's stage of a replay (the stages inside a capture are not timed).
REPLAY_STAGE = "encoder + RVQ search (CUDA graph)"


class _Captured:
    def __init__(self, graph: "torch.cuda.CUDAGraph", x: torch.Tensor, lengths: torch.Tensor, codes: torch.Tensor,
                 finite: tp.Optional[torch.Tensor]):
        self.graph, self.x, self.lengths, self.codes = graph, x, lengths, codes
        #: fp16 captures: whether the replay's latents were all finite (a device flag), else None.
        self.finite = finite


class EncoderGraphs:
    """`model._encode_rows_unchecked(x, RaggedRows(lengths), mode)` from CUDA graphs, one per key
    (shape, dtype, device, bandwidth, precision, weights' version); at most `max_graphs` kept, the
    least recently used dropped (its memory pool freed with it)."""

    def __init__(self, model: tp.Any, max_graphs: int = 8, warmup: int = 2):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.model, self.max_graphs, self.warmup = model, max_graphs, warmup
        self.graphs: "collections.OrderedDict[tp.Any, _Captured]" = collections.OrderedDict()
        self.captures = self.replays = 0

    def _key(self, x: torch.Tensor) -> tp.Tuple[tp.Any, ...]:
        from .ops.backend import requested_backend
        from .ops.conv import conv_kernel, conv_precision
        weights = tuple((p.data_ptr(), p._version) for p in self.model.parameters())
        kernels = (requested_backend(), conv_kernel(), conv_precision())  # which kernels the capture holds
        return (tuple(x.shape), x.dtype, x.device, self.model.bandwidth, self.model.precision, kernels, weights)

    def replay(self, x: torch.Tensor, lengths: torch.Tensor) -> tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor]]:
        """x [N, C, T] on CUDA, lengths [N] int64 -> (codes [N, K, T'], in fp16 whether the latents
        were all finite, else None), tensors of their own. Nothing here waits for the device but
        a shape's first capture; the caller reads the flag and redoes a batch that overflowed in
        exact (`EncodecModel.encode_batch_async`)."""
        if not x.is_cuda:
            raise ValueError("CUDA graphs need a CUDA batch")
        key = self._key(x)
        captured = self.graphs.get(key)
        if captured is None:
            captured = self._capture(x, lengths)
            self.graphs[key] = captured
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        captured.x.copy_(x)
        captured.lengths.copy_(lengths.to(captured.lengths.device, torch.long))
        with timing.stage(REPLAY_STAGE, x.device):
            captured.graph.replay()
        self.replays += 1
        # copies queued after the replay: the next replay cannot overwrite them first
        return captured.codes.clone(), None if captured.finite is None else captured.finite.clone()

    def _capture(self, x: torch.Tensor, lengths: torch.Tensor) -> _Captured:
        static_x = x.clone()
        static_lengths = lengths.to(x.device, torch.long).clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.model._encode_rows(static_x, RaggedRows(static_lengths))
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        model, rows, mode = self.model, RaggedRows(static_lengths), self.model._mode()
        with torch.no_grad(), torch.cuda.graph(graph):
            # `_encode_rows` without reading its overflow check (a host synchronisation): the flag
            # is computed on the device and read after each replay
            codes, finite = model._encode_rows_unchecked(static_x, rows, mode)
        self.captures += 1
        return _Captured(graph, static_x, static_lengths, codes, finite)
