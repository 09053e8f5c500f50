"""`ops`: the ops' PyTorch reference paths on CPU (what runs without a GPU), one op per record.

Shapes: one second of the 24 kHz model's activations at batch 4 (RVQ on 75 frames per item), the
discriminator front end at batch 4 x 1 s. The PyTorch backend is forced, autograd off.
"""

import typing as tp

import torch

from bench.core import Context, benchmark

B = 4  # batch


def _cases() -> tp.Iterator[tp.Tuple[tp.Dict[str, tp.Any], tp.Callable[[], tp.Any]]]:
    """(params, call) for every case, inputs made once per case (torch seed 0)."""
    from encodec_fast.ops import conv, rvq, stft
    torch.manual_seed(0)
    for n_q in (8, 32):
        books = torch.randn(n_q, 1024, 128)
        norms = [b.pow(2).sum(-1)[None] for b in books]
        x = torch.randn(B, 128, 75)
        yield ({"op": "rvq_encode", "n_q": n_q},
               lambda x=x, books=books, norms=norms: rvq.rvq_encode(x, list(books), norms))
    books = torch.randn(32, 1024, 128)
    codes = torch.randint(0, 1024, (32, B, 75))
    yield {"op": "rvq_decode", "n_q": 32}, lambda: rvq.rvq_decode(codes, list(books))
    embed, flat = torch.randn(1024, 128), torch.randn(B * 75, 128)
    yield {"op": "vq_assign_with_stats"}, lambda: rvq.vq_assign_torch(flat, embed, embed.pow(2).sum(-1), True)
    for c_in, c_out, k, stride, length in ((1, 32, 7, 1, 24000), (32, 16, 3, 1, 24000), (32, 64, 4, 2, 24000),
                                           (256, 512, 16, 8, 600)):
        x = torch.randn(B, c_in, length)
        w = torch.randn(c_out, c_in, k) / (c_in * k) ** 0.5
        p = k - stride
        yield ({"op": "conv1d_elu_pad", "C_in": c_in, "C_out": c_out, "K": k, "stride": stride, "L": length},
               lambda x=x, w=w, stride=stride, p=p: conv.conv1d_torch(x, w, None, stride, 1, (p - p // 2, p // 2),
                                                                      "reflect", True))
    for c_in, c_out, stride, length in ((512, 256, 8, 75), (64, 32, 2, 12000)):
        x = torch.randn(B, c_in, length)
        w = torch.randn(c_in, c_out, 2 * stride) / c_in ** 0.5
        yield ({"op": "conv_transpose1d_elu_trim", "C_in": c_in, "C_out": c_out, "stride": stride, "L": length},
               lambda x=x, w=w, stride=stride, length=length: conv.conv_transpose1d_torch(
                   x, w, None, stride, stride - stride // 2, (length - 1) * stride + stride, True))
    x = torch.randn(B, 1, 24000)
    for n_fft, hop in ((1024, 256), (2048, 512), (512, 128)):
        window = torch.hann_window(n_fft)
        yield ({"op": "spectrogram", "n_fft": n_fft, "hop": hop},
               lambda window=window, n_fft=n_fft, hop=hop: stft.spectrogram_torch(x, window, n_fft, hop, n_fft, True))


@benchmark("ops", "The ops' PyTorch reference paths", priority=80, devices=("cpu",))
def run(ctx: Context) -> None:
    from encodec_fast import ops
    with ops.use_backend("torch"), torch.no_grad():
        for params, call in _cases():
            ctx.timed({**params, "batch": B, "device": "cpu"}, {"torch": call}, unit="ms", scale=1e3,
                      reps=ctx.pick(2, 5, 10), note="the reference path (ENCODEC_FAST_BACKEND=torch)")
