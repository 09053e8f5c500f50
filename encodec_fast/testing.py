"""Test fixtures shared by the tests and the benchmarks: test signals (never silence), random models with
data-like codebooks, and pairs of upstream's and our models (or LMs) with the same weights.

The pairs need upstream `encodec` 0.1.1 (the test extra); the rest needs only this package.
"""

import math
import traceback
import typing as tp
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import encodec_fast


def make_signal(sample_rate: int, num_samples: int, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """A speech/music-like test signal [C, T]: gliding harmonic tones with vibrato and syllable-like
    envelopes, a few chords and filtered noise bursts, peak about 0.6."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / sample_rate
    out = np.zeros((channels, num_samples))
    for c in range(channels):
        f0 = rng.uniform(90, 220) * (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.2, 1.5) * t))
        f0 *= 1 + 0.01 * np.sin(2 * np.pi * 5.5 * t)
        phase = 2 * np.pi * np.cumsum(f0) / sample_rate
        voice = sum(
            np.sin(h * phase + rng.uniform(0, 6)) / h**1.2 for h in range(1, 12) if h * f0.max() < sample_rate / 2
        )
        envelope = np.clip(np.sin(2 * np.pi * rng.uniform(2, 5) * t + rng.uniform(0, 6)), 0, None) ** 0.5
        chord = sum(np.sin(2 * np.pi * f * t) for f in rng.choice([220, 277.2, 329.6, 440, 554.4], 3))
        noise = np.convolve(rng.standard_normal(num_samples), np.ones(8) / 8)[:num_samples]
        bursts = (rng.uniform(size=num_samples) < 0.0005).astype(float)
        bursts = np.convolve(bursts, np.hanning(401))[:num_samples]
        out[c] = 0.35 * voice * envelope + 0.08 * chord + 0.15 * noise * np.clip(bursts, 0, 1)
    peak = np.abs(out).max()
    out = out / peak * 0.6 if peak > 0 else out
    return torch.from_numpy(out.astype(np.float32))


def voice(sample_rate: int, seconds: float, seed: int = 0) -> torch.Tensor:
    """A cheap voice-like signal [1, n] (harmonics with vibrato, a syllable envelope, light noise), in
    torch only: fast enough for hours of audio. Different per seed."""
    t = torch.arange(int(sample_rate * seconds)) / sample_rate
    f0 = (140 + 15 * seed) * (1 + 0.2 * torch.sin(2 * math.pi * 0.7 * t))
    phase = 2 * math.pi * torch.cumsum(f0, 0) / sample_rate
    voiced = sum(torch.sin(h * phase) / h for h in range(1, 10))
    envelope = torch.sin(2 * math.pi * 3 * t).clamp(min=0).sqrt()
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    return (0.3 * voiced * envelope + noise)[None]


def voice_batch(sample_rate: int, seconds: float, channels: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """[batch, channels, n] of `voice`, never zeros, different per item and channel."""
    n = max(1, int(round(sample_rate * seconds)))
    rows = [torch.cat([voice(sample_rate, n / sample_rate, seed=seed + 7 * b + c) for c in range(channels)])
            for b in range(batch)]
    return torch.stack(rows)[..., :n]


#: aten ops whose result the host needs before it can go on; on CUDA each one waits for the device:
#: a value read (`item()`, `bool()`, `int()`), a comparison returning a Python bool, an output
#: whose shape depends on the values.
SYNCING_OPS = frozenset({"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "nonzero_static", "masked_select",
                         "_unique", "_unique2", "unique_dim", "unique_consecutive", "bincount", "repeat_interleave"})
#: Tensor methods that read values without an aten op on CPU (on CUDA they copy to the host first), and
#: `cpu()`: a no-op on CPU tensors, a copy the host waits for on CUDA ones (not `to(device)`: on CPU it
#: cannot tell a copy to the host from one to a device that is the CPU here; encodec_fast.host's copies
#: into pinned memory do not wait). Not `numpy()`: it refuses CUDA tensors, so a call to it is on a
#: CPU-only path.
SYNCING_METHODS = frozenset({"tolist", "cpu"})

_PACKAGE = Path(encodec_fast.__file__).parent
#: Where this package's code lies: the package, and its kernels (beside it in a source checkout).
_SOURCES = (str(_PACKAGE), str(_PACKAGE.parent / "kernels"))


class HostReads:
    """A context in which every read of tensor values by the host is recorded in `reads` as (op,
    where: the innermost calls in this package): the aten ops of `SYNCING_OPS` and the methods of
    `SYNCING_METHODS`. On CPU too, so that a test without a GPU finds what would make the host wait
    for a GPU. `repeat_interleave` counts only without `output_size`. Reads made with a frame whose
    file path contains one of `ignore` on the stack are left out (e.g. "torch/optim": the
    optimizers' step counters are host tensors on CUDA too)."""

    def __init__(self, ignore: tp.Sequence[str] = ()):
        self.reads: list = []
        self.ignore = tuple(ignore)
        self._modes: list = []

    def _record(self, name: str) -> None:
        stack = traceback.extract_stack()[:-2]
        if any(part in f.filename for f in stack for part in self.ignore):
            return
        ours = [f"{Path(f.filename).name}:{f.lineno}" for f in stack
                if f.filename.startswith(_SOURCES) and f.filename != __file__]
        self.reads.append((name, " < ".join(reversed(ours[-3:]))))

    def __enter__(self) -> "HostReads":
        record = self._record

        class Methods(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if getattr(func, "__name__", "") in SYNCING_METHODS:
                    record(func.__name__)
                return func(*args, **(kwargs or {}))

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = func.__name__.split(".")[0]
                if name in SYNCING_OPS and not (name == "repeat_interleave" and kwargs.get("output_size") is not None):
                    record(name)
                return func(*args, **kwargs)

        self._modes = [Methods(), Ops()]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []


def set_data_like_codebooks(model, seed: int = 0) -> None:
    """Give an upstream model codebooks drawn from its own encoder's latents on test signals:
    each stage's codebook is a scaled random sample of the residuals the earlier stages leave
    (k-means-like spread; never zeros, which would make every code 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x = torch.stack(
            [make_signal(model.sample_rate, model.sample_rate, model.channels, seed=seed + i) for i in range(4)]
        )
        emb = model.encoder(x).transpose(1, 2).reshape(-1, model.quantizer.dimension)
        residual = emb
        for layer in model.quantizer.vq.layers:
            cb = layer._codebook
            k = cb.embed.shape[0]
            idx = torch.randint(0, residual.shape[0], (k,), generator=gen)
            scale = 0.6 + 0.8 * torch.rand(k, 1, generator=gen)
            jitter = 0.05 * residual.std() * torch.randn(k, residual.shape[1], generator=gen)
            embed = residual[idx] * scale + jitter
            cb.embed.copy_(embed)
            cb.embed_avg.copy_(embed)
            cb.cluster_size.copy_(torch.rand(k, generator=gen) * 10 + 1)
            cb.inited.fill_(1.0)
            residual = residual - cb.decode(cb.encode(residual))


def randomize_norms(model) -> None:
    """Random (not freshly initialised) GroupNorm / LayerNorm affine parameters, so that they are
    exercised; draws from torch's global generator."""
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith("norm.weight"):
                value.copy_(1 + 0.1 * torch.randn_like(value))
            elif key.endswith("norm.bias"):
                value.copy_(0.1 * torch.randn_like(value))


def make_model_pair(name: str, seed: int = 0):
    """(upstream model, our model), same weights; named as the official model so that
    `.ecdc` files can be written. Needs upstream `encodec` 0.1.1."""
    encodec = _upstream()
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        up = getattr(encodec.EncodecModel, f"encodec_model_{name.split('_')[1]}")(pretrained=False)
    randomize_norms(up)
    set_data_like_codebooks(up, seed)
    up.name = name
    ours = getattr(encodec_fast.EncodecModel, f"encodec_model_{name.split('_')[1]}")(pretrained=False)
    ours.load_state_dict(up.state_dict(), strict=True)
    ours.name = name
    return up.eval(), ours.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / max(float(b.norm()), 1e-20))


def lengths_for(sample_rate: int) -> list:
    """1 sample, shorter than a hop, not a multiple of the hop, and longer clips."""
    return [1, 5, 319, 320, 321, 7 * 320 + 13, math.ceil(0.37 * sample_rate)]


def lm_pair(n_q: int, past: int, seed: int):
    """(upstream LM, our LM) with the same random weights; the heads scaled up so that the
    distributions are peaked, as a trained LM's (files then compress, and coding is exercised
    over the whole range from near-certain to flat). Needs upstream `encodec` 0.1.1."""
    encodec = _upstream()
    torch.manual_seed(seed)
    up = encodec.model.LMModel(n_q, 1024, num_layers=5, dim=200, past_context=past).eval()
    with torch.no_grad():
        for lin in up.linears:
            lin.weight.mul_(6.0)
    ours = encodec_fast.LMModel(n_q, 1024, num_layers=5, dim=200, past_context=past).eval()
    ours.load_state_dict(up.state_dict(), strict=True)
    return up, ours


def _upstream():
    """Upstream `encodec` 0.1.1, the oracle (`pip install encodec==0.1.1`, in the test extra)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import encodec
    return encodec


def near_tie_books(K: int, D: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """[K, D] codewords: an eighth of them in pairs a few ulps apart, two one ulp apart, and a few
    large ones."""
    g = torch.Generator().manual_seed(seed)
    books = torch.randn(K, D, generator=g) * scale
    twins = K // 8
    books[K - 3 - twins:K - 3] = books[2:2 + twins] * (1 + 2.0 ** -22 * torch.randn(twins, 1, generator=g))
    books[1] = torch.nextafter(books[0], books[0] * 2)  # distances one ulp apart
    books[-3:] *= 1000.0  # a few large codewords make max |c| useless as a bound
    return books


def adversarial_rows(books: torch.Tensor, N: int, seed: int) -> torch.Tensor:
    """[N, D]: rows near codewords and near midpoints of codeword pairs (near-ties), noise, zero
    rows, tiny (subnormal) and large rows."""
    g = torch.Generator().manual_seed(seed + 1)
    K, D = books.shape
    i = torch.randint(0, K, (N,), generator=g)
    j = torch.randint(0, K, (N,), generator=g)
    rows = torch.randn(N, D, generator=g)
    kind = torch.arange(N) % 8
    rows[kind == 0] = books[i[kind == 0]]
    mid = (books[i] + books[j]) / 2
    rows[kind == 1] = mid[kind == 1] + 1e-6 * rows[kind == 1]
    rows[kind == 2] = books[i[kind == 2]] + 1e-3 * rows[kind == 2]
    rows[kind == 3] = 0.0
    rows[kind == 4] = rows[kind == 4] * 1e-40
    rows[kind == 5] = rows[kind == 5] * 1e15
    rows[kind == 6] = (books[0] + books[1]) / 2
    return rows
