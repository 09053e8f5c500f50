"""Where a low-precision encoder loses exact's codes: each source of rounding alone, emulated on CPU.

    python -m tools.precision_study [--clips 4] [--seconds 8] [--out DIR]

The shipped small model encodes held-out speech and music (the quality benchmark's clips) once in
fp32 (the reference codes) and once per variant below, and the codes at 6 and 24 kbps are compared
with the reference. A variant rounds chosen values to bf16, fp16 or tf32 and computes every product
in fp64 from the rounded operands (a tensor core's fp32 accumulation is closer to fp64 than to the
rounding studied here), so each source of error shows alone:

- products: a convolution's (and the LSTM's matrix products') input and weight, as tensor cores
  read them;
- activations: every value a layer writes (convolution outputs, ELU, residual sums, LSTM outputs),
  as a model under autocast stores them.

Every rounding on: what autocast computes (checked against torch's CPU autocast, the `autocast`
rows). The codebook search is fp32 throughout (the modes' rule). JSON and a markdown table land in
--out; the run of record is under bench/results/precision_study_cpu_*.
"""

import argparse
import json
import platform
import subprocess
import time
import typing as tp
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from encodec_fast.ops.rvq import _tf32


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(t.dtype)


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(t.dtype)


def _tf32_nearest(t: torch.Tensor) -> torch.Tensor:
    return _tf32(t, nearest=True).to(t.dtype)


ROUNDINGS: tp.Dict[tp.Optional[str], tp.Callable[[torch.Tensor], torch.Tensor]] = {
    "bf16": _bf16, "fp16": _fp16, "tf32": _tf32_nearest, None: lambda t: t}

#: name -> (products' operands, activations, the LSTM too): the rounding of each, None for none.
VARIANTS: tp.Dict[str, tp.Tuple[tp.Optional[str], tp.Optional[str], bool]] = {
    "fp64 products (no rounding)": (None, None, True),
    "bf16 everywhere (autocast's arithmetic)": ("bf16", "bf16", True),
    "bf16 everywhere but the LSTM": ("bf16", "bf16", False),
    "bf16 products, fp32 activations": ("bf16", None, True),
    "bf16 weights only": ("bf16 weights", None, True),
    "bf16 products' inputs only": ("bf16 inputs", None, True),
    "bf16 activations only": (None, "bf16", True),
    "fp16 everywhere (autocast's arithmetic)": ("fp16", "fp16", True),
    "fp16 products, fp32 activations": ("fp16", None, True),
    "tf32 products": ("tf32", None, True),
}

#: The ops whose outputs are activations a model under autocast stores in the low precision.
_ACTIVATION_OPS = ("elu", "elu_", "add", "add_", "__add__", "__iadd__")


class Rounding(TorchFunctionMode):
    """Runs torch code with the roundings of one variant: conv1d and the LSTM get products in fp64
    from rounded operands; activations are rounded where they are written."""

    def __init__(self, products: tp.Optional[str], activations: tp.Optional[str], lstm: bool = True):
        super().__init__()
        kind, _, which = (products or "").partition(" ")
        rnd = ROUNDINGS[kind or None]
        self.x = rnd if which in ("", "inputs") else ROUNDINGS[None]
        self.w = rnd if which in ("", "weights") else ROUNDINGS[None]
        self.out = ROUNDINGS[activations]
        self.lstm = lstm

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name == "conv1d":
            x, w, *rest = args
            bias = rest.pop(0) if rest else kwargs.pop("bias", None)
            bias = None if bias is None else self.out(bias).double()  # autocast casts the bias too
            y = func(self.x(x).double(), self.w(w).double(), bias, *rest, **kwargs)
            return self.out(y.to(x.dtype))
        if name == "lstm":
            return self._lstm(*args) if self.lstm else self._lstm(*args, exact=True)
        out = func(*args, **kwargs)
        if name in _ACTIVATION_OPS and isinstance(out, torch.Tensor) and out.is_floating_point():
            out.copy_(self.out(out))
        return out

    def _lstm(self, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first,
              exact: bool = False):
        """nn.LSTM's computation (torch's gate order i, f, g, o) with rounded products, state in fp64."""
        if not has_biases or bidirectional or batch_first or hx is None or len(hx) != 2:
            raise NotImplementedError("the study's LSTM: biases, one direction, [T, B, C] inputs")
        keep = ROUNDINGS[None]
        rx, rw, ro = (keep, keep, keep) if exact else (self.x, self.w, self.out)
        inp, hs, cs = x, [], []
        for layer in range(num_layers):
            w_ih, w_hh, b_ih, b_hh = params[4 * layer: 4 * layer + 4]
            h, c = hx[0][layer].double(), hx[1][layer].double()
            pre = rx(inp).double() @ rw(w_ih).double().T + (b_ih.double() + b_hh.double())
            w_hh = rw(w_hh).double().T
            outs = []
            for t in range(inp.shape[0]):
                i, f, g, o = (pre[t] + rx(h.to(x.dtype)).double() @ w_hh).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outs.append(ro(h.to(x.dtype)))
            inp = torch.stack(outs)
            hs.append(h.to(x.dtype))
            cs.append(c.to(x.dtype))
        return inp, torch.stack(hs), torch.stack(cs)


def _codes(net, latents: torch.Tensor, kbps: float) -> torch.Tensor:
    return net.quantizer.encode(latents.float(), net.frame_rate, kbps)


def study(count: int, seconds: float, variants: tp.Sequence[str] = tuple(VARIANTS),
          autocast: tp.Sequence[torch.dtype] = (torch.bfloat16, torch.float16), progress: bool = True
          ) -> tp.Dict[str, tp.Any]:
    """{"clips", "missing", "rows": [{variant, kind, kbps, codes_equal (%), latent_rel_err}]}."""
    from bench import peers
    from bench.benchmarks.quality import heldout_clips
    from encodec_fast import ops
    state, source = peers.load_state("small", None)
    net = peers.ours_model("small", state)
    clips, missing = heldout_clips(["speech", "music"], count, seconds)
    rows = []
    with torch.no_grad(), ops.use_backend("torch"):
        ref = {kind: [net.encoder(c[None]) for c in cl] for kind, cl in clips.items()}
        runs: tp.List[tp.Tuple[str, tp.Callable[[torch.Tensor], torch.Tensor]]] = []
        for dtype in autocast:
            def run_autocast(x, dtype=dtype):
                with torch.autocast("cpu", dtype=dtype):
                    return net.encoder(x).float()
            runs.append((f"torch CPU autocast {str(dtype).replace('torch.', '')}", run_autocast))
        for name in variants:
            def run_variant(x, name=name):
                with Rounding(*VARIANTS[name]):
                    return net.encoder(x)
            runs.append((name, run_variant))
        for name, run in runs:
            start = time.time()
            for kind, cl in clips.items():
                latents = [run(c[None]) for c in cl]
                err = max(float((z - r).norm() / r.norm()) for z, r in zip(latents, ref[kind]))
                for kbps in (6.0, 24.0):
                    pairs = [(_codes(net, z, kbps), _codes(net, r, kbps)) for z, r in zip(latents, ref[kind])]
                    equal = sum(int((a == b).sum()) for a, b in pairs) / sum(b.numel() for _, b in pairs)
                    rows.append({"variant": name, "kind": kind, "kbps": kbps, "codes_equal": 100 * equal,
                                 "latent_rel_err": err})
            if progress:
                print(f"{name}: {time.time() - start:.1f} s", flush=True)
    return {"weights": source, "clips": {k: len(v) for k, v in clips.items()}, "seconds": seconds,
            "missing": missing, "rows": rows}


def markdown(result: tp.Dict[str, tp.Any]) -> str:
    kinds = [k for k in ("speech", "music") if k in result["clips"]]
    head = " | ".join(f"{k} {kbps:g} kbps" for k in kinds for kbps in (6.0, 24.0))
    lines = [f"| variant | {head} | latent rel. error (max) |", "|---|" + "---|" * (2 * len(kinds) + 1)]
    by = {(r["variant"], r["kind"], r["kbps"]): r for r in result["rows"]}
    for name in dict.fromkeys(r["variant"] for r in result["rows"]):
        cells = " | ".join(f"{by[(name, k, kbps)]['codes_equal']:.1f}%" for k in kinds for kbps in (6.0, 24.0))
        err = max(by[(name, k, 6.0)]["latent_rel_err"] for k in kinds)
        lines.append(f"| {name} | {cells} | {err:.1e} |")
    return "\n".join(lines)


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=4, help="clips of each kind (default 4)")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of each clip (default 8)")
    parser.add_argument("--out", type=Path, help="folder for study.json and STUDY.md")
    args = parser.parse_args(argv)
    result = study(args.clips, args.seconds)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    result.update(date=time.strftime("%Y-%m-%d"), commit=commit, torch=torch.__version__,
                  cpu=platform.processor() or platform.machine(), command="python -m tools.precision_study "
                  f"--clips {args.clips} --seconds {args.seconds:g}")
    print(markdown(result))
    if args.out:
        write(result, args.out)


def write(result: tp.Dict[str, tp.Any], out: Path) -> None:
    """study.json and STUDY.md in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(result, indent=1))
    clips = " and ".join(f"{n} {kind}" for kind, n in result["clips"].items())
    missing = "".join(f" No {kind}: {why}." for kind, why in result["missing"].items())
    (out / "STUDY.md").write_text(
        f"# Low-precision encoder: which rounding moves the codes\n\n{result['date']}, commit {result['commit']}, "
        f"torch {result['torch']}, CPU ({result['cpu']}). `{result['command']}`: the shipped small model on "
        f"{clips} held-out clips of {result['seconds']:g} s each, one call per clip; the share of codes equal to "
        f"the fp32 encoder's.{missing}\n\n{markdown(result)}\n")


if __name__ == "__main__":
    main()
