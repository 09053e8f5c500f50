"""`quantizer`: the quantizer's training step, ours against upstream `encodec`'s `core_vq` and
`vector-quantize-pytorch`'s `ResidualVQ` (when installed), interleaved in one process with the same
threads, weights and inputs.

Latents of a 24 kHz batch (75 frames per second, D=128, 1024 codes), 6 kbps (8 stages) and 24 kbps
(32 stages); forward (assignment, EMA update, straight-through output, commitment loss) and the
backward of a loss on the output. k-means init is off and the codebooks are set from the data, so
every step does the same work. On CPU: ours (every stage in one autograd node, the torch twins of
the GPU launches, scatter statistics: the default), ours stage by stage (upstream's graph of
per-stage operations), and ours with upstream's one-hot statistics (ENCODEC_FAST_VQ_STATS=onehot).
On CUDA: ours (every stage in one launch with the
certified search, statistics in a fixed order: the default there) and ours on the torch path
(cuBLAS search, one-hot statistics, stage by stage). vector-quantize-pytorch is configured as close
as it allows (EMA 0.99, dead-code threshold 2, commitment weight 1, no k-means): its own
implementation, not the same numbers.
"""

import copy
import os
import warnings

import torch

from bench.core import Context, benchmark, upstream_missing


def _step(quantizer, x: torch.Tensor, kbps: float) -> None:
    xin = x.clone().requires_grad_(True)
    res = quantizer(xin, 75, kbps)
    (res.quantized.pow(2).mean() + res.penalty.sum()).backward()


def _ours(x: torch.Tensor, n_q: int, gen: torch.Generator):
    from encodec_fast.quantization import ResidualVectorQuantizer
    torch.manual_seed(0)
    ours = ResidualVectorQuantizer(dimension=128, n_q=n_q, bins=1024, kmeans_init=False).train()
    with torch.no_grad():  # codebooks from the data (with replacement: fewer frames than codes)
        flat = x.transpose(1, 2).reshape(-1, 128)
        for layer in ours.vq.layers:
            idx = torch.randint(0, flat.shape[0], (1024,), generator=gen)
            layer._codebook.embed.copy_(flat[idx] * 0.5)
            layer._codebook.embed_avg.copy_(layer._codebook.embed)
            layer._codebook.cluster_size.fill_(1.0)
            flat = flat * 0.7
    return ours


def _vector_quantize_pytorch(n_q: int, device: str):
    """vector-quantize-pytorch's ResidualVQ and its training step on x [B, D, T], or the reason it cannot run."""
    try:
        from vector_quantize_pytorch import ResidualVQ
    except Exception as err:  # not installed (pip install vector-quantize-pytorch)
        return f"vector-quantize-pytorch is not installed ({type(err).__name__})"
    model = ResidualVQ(dim=128, num_quantizers=n_q, codebook_size=1024, decay=0.99, kmeans_init=False,
                       threshold_ema_dead_code=2, commitment_weight=1.0).to(device).train()

    def step(x: torch.Tensor) -> None:
        xin = x.transpose(1, 2).contiguous().requires_grad_(True)
        quantized, _, loss = model(xin)
        (quantized.pow(2).mean() + loss.sum()).backward()
    return step


@benchmark("quantizer", "Quantizer training step (forward + backward + EMA) vs upstream's core_vq and "
           "vector-quantize-pytorch", priority=60)
def run(ctx: Context) -> None:
    from encodec_fast import ops
    from encodec_fast.quantization import core_vq
    warnings.simplefilter("ignore")  # upstream's issue-25 warning on every training forward
    device = ctx.device
    cuda = device == "cuda"
    batch, seconds = ctx.pick(1, 8, 8), ctx.pick(0.2, 1.0, 1.0)
    if cuda:
        batch = ctx.pick(2, 64, 64)
    frames = int(75 * seconds)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 128, frames, generator=gen).to(device)
    missing = upstream_missing()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for kbps, n_q in ((6.0, 8), (24.0, 32)):
        ctx.check_time(f"{kbps:g} kbps")
        params = {"kbps": kbps, "stages": n_q, "frames": batch * frames, "batch": batch,
                  "device": torch.cuda.get_device_name() if cuda else "cpu"}
        ours = _ours(x.cpu(), n_q, gen).to(device)
        impls = {}
        if cuda:
            def fused(model=copy.deepcopy(ours)) -> None:
                _step(model, x, kbps)

            def torch_path(model=copy.deepcopy(ours)) -> None:
                with ops.use_backend("torch"):
                    _step(model, x, kbps)
            impls["ours"], impls["ours (torch path)"] = fused, torch_path
        else:
            for impl, method, fused in (("ours", "scatter", True), ("ours (stage by stage)", "scatter", False),
                                        ("ours (onehot)", "onehot", True)):
                def step(model=copy.deepcopy(ours), method=method, fused=fused) -> None:
                    os.environ["ENCODEC_FAST_VQ_STATS"] = method
                    saved, core_vq.FUSED_CPU_TRAINING = core_vq.FUSED_CPU_TRAINING, fused
                    try:
                        with ops.use_backend("torch"):
                            _step(model, x, kbps)
                    finally:
                        os.environ.pop("ENCODEC_FAST_VQ_STATS", None)
                        core_vq.FUSED_CPU_TRAINING = saved
                impls[impl] = step
        if missing:
            ctx.na(params, "upstream", "time", "ms", missing)
        else:
            from encodec.quantization import ResidualVectorQuantizer as Upstream
            up = Upstream(dimension=128, n_q=n_q, bins=1024, kmeans_init=False).to(device).train()
            up.load_state_dict(ours.state_dict())
            impls["upstream"] = lambda up=up: _step(up, x, kbps)
        vqp = _vector_quantize_pytorch(n_q, device)
        if isinstance(vqp, str):
            ctx.na(params, "vector-quantize-pytorch", "time", "ms", vqp)
        else:
            impls["vector-quantize-pytorch"] = lambda vqp=vqp: vqp(x)
        headline = ("ours", "upstream")
        for impl, rec in ctx.timed(params, impls, unit="ms", scale=1e3, sync=sync,
                                   reps=ctx.pick(1, 10, 20) if cuda else None).items():
            rec["headline"] = impl in headline
