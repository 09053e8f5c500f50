"""`lm`: LM-mode `.ecdc` compress and decompress, ours against upstream encodec 0.1.1, on CPU.

The model and its LM with random weights (the official ones need a download; the LM's heads scaled so
that its distributions are peaked, like a trained LM's), the same weights on both sides, a synthetic
voice-like signal. Upstream runs twice: with the process's default thread count (as its command runs)
and with one thread (the only setting where its LM files come out the same on every machine). Ours
always runs the LM on one thread. Checked: our payload equals upstream's one-thread file, and each side
decodes the other's.
"""

import importlib
import time
import typing as tp

import torch

import encodec_fast
from bench.core import Context, benchmark, upstream_missing
from encodec_fast.lm import lm_threads


def measure(model: str, seconds: float, bandwidth: float, rounds: int) -> tp.Tuple[tp.Dict[str, tp.List[float]], bool]:
    """({run name: seconds of every round}, whether our payload equals upstream's one-thread file)."""
    from encodec_fast.testing import lm_pair, make_model_pair, make_signal
    upc = importlib.import_module("encodec.compress")

    name = f"encodec_{model}"
    up, ours = make_model_pair(name, seed=1)
    up_lm, our_lm = lm_pair(32, 262, seed=5) if model == "24khz" else lm_pair(16, 525, seed=6)
    up.get_lm_model = lambda: up_lm
    ours.get_lm_model = lambda *a, **k: our_lm
    upc.MODELS[name] = lambda: up
    up.set_target_bandwidth(bandwidth)
    ours.set_target_bandwidth(bandwidth)
    wav = make_signal(ours.sample_rate, int(ours.sample_rate * seconds), ours.channels, seed=3)
    default_threads = torch.get_num_threads()
    times: tp.Dict[str, tp.List[float]] = {}

    def _record(run: str, fn: tp.Callable[[], tp.Any]) -> tp.Any:
        t0 = time.perf_counter()
        out = fn()
        times.setdefault(run, []).append(time.perf_counter() - t0)
        return out

    up_default = f"({default_threads} threads, default)"
    for rnd in range(rounds):  # interleaved: this VM's speed drifts between runs
        order = ("ours", "upstream") if rnd % 2 == 0 else ("upstream", "ours")
        for who in order:
            if who == "ours":
                ours_file = _record("ours compress", lambda: encodec_fast.compress(ours, wav, use_lm=True))
                _record("ours decompress", lambda: encodec_fast.decompress(ours_file, model=ours))
            else:
                up_file = _record(f"upstream compress {up_default}", lambda: upc.compress(up, wav, use_lm=True))
                _record(f"upstream decompress {up_default}", lambda: upc.decompress(up_file))
                with lm_threads(1):
                    up_file1 = _record("upstream compress (1 thread)", lambda: upc.compress(up, wav, use_lm=True))
                    _record("upstream decompress (1 thread)", lambda: upc.decompress(up_file1))
    with lm_threads(1):
        same_bytes = encodec_fast.compress(ours, wav, use_lm=True, checksum=False) == up_file1
        up_reads_ours, _ = upc.decompress(ours_file)
    ours_reads_up, _ = encodec_fast.decompress(up_file1, model=ours)
    return times, bool(same_bytes and up_reads_ours.shape == ours_reads_up.shape)


@benchmark("lm", "LM-mode .ecdc compress and decompress (vs upstream)", priority=50)
def run(ctx: Context) -> None:
    params = {"model": "24khz", "seconds": ctx.pick(0.5, 5.0, 10.0), "kbps": 6.0, "device": "cpu"}
    missing = upstream_missing()
    if missing:  # both sides are built from upstream's modules
        for op in ("compress", "decompress"):
            for impl in ("ours", "upstream"):
                ctx.na({**params, "op": op}, impl, "time", "s", missing)
        return
    times, same = measure("24khz", params["seconds"], params["kbps"], ctx.pick(1, 2, 3))
    for run_name, reps in times.items():
        op = run_name.split()[1]
        impl = ("ours" if run_name.startswith("ours") else "upstream (1 thread)" if "1 thread" in run_name
                else "upstream")
        ctx.record({**params, "op": op}, impl, "time", "s", reps, audio_seconds=params["seconds"], headline=True,
                   note="random model and LM weights; ours runs the LM on 1 thread, upstream on the process's "
                        f"threads (its command) or 1; our payload equals upstream's 1-thread file: {same}")
    if not same:
        raise RuntimeError("LM coding: our file differs from upstream's one-thread file")
