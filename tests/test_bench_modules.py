"""Benchmark modules and tools beyond what the smoke suite shows: the GPU benchmark's stages in Triton's
interpreter, the launch-configuration sweep, tokenize with every peer, the training-corpus tool and the
training step on a tiny model. Their numbers are not checked: speed is measured, not asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import core

pytestmark = pytest.mark.slow  # end-to-end runs (CI: the readme environment only)

ROOT = Path(__file__).resolve().parent.parent
interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the kernels in Triton's interpreter (set when no GPU is present)")


@interpreter
def test_kernels_benchmark_stages_in_the_interpreter(tmp_path):
    """Every stage of the `kernels` benchmark runs at tiny sizes on CPU and records torch and Triton side by
    side; the kernels' results agree with the PyTorch paths (RVQ: ties only; convolutions within tolerance)."""
    from bench.benchmarks import kernels
    ctx = core.Context(suite="smoke", device="cpu", workdir=tmp_path, benchmark="kernels")
    kernels.run(ctx)
    assert kernels.SIZES is kernels.FULL_SIZES  # the tiny sizes do not leak out of the run
    by_stage = {}
    for r in ctx.records:
        by_stage.setdefault(r["params"]["stage"], []).append(r)
    assert set(by_stage) == set(kernels.STAGES)
    rvq = [r for r in by_stage["rvq"] if r["implementation"] == "triton"]
    assert {r["params"]["op"] for r in rvq} == {"rvq_encode", "rvq_decode"}
    assert all(r["non_ties"] == 0 for r in rvq if r["params"]["op"] == "rvq_encode")
    for stage in ("conv", "block", "conv2d"):
        # bf16: up to three layers' roundings in a row (2.2e-2 measured for the decoder's last level)
        limit = {"bf16": 5e-2, "fp16": 1e-2}
        assert all(r["rel_err"] < limit.get(r["params"]["precision"], 1e-5) for r in by_stage[stage]), stage
    modes = len(kernels.CONV_MODES)
    assert {r["params"]["precision"] for r in by_stage["conv"]} == {"exact", "tf32", "fp16", "bf16"}
    # torch and triton, each precision mode, each kernel family
    assert len(by_stage["conv"]) == 2 * modes * 2 * len(kernels.CONV_LAYERS)
    assert all(r["predicted_ms_h200"] > 0 for r in by_stage["conv"])
    # residual blocks: torch and triton, each mode, per-convolution kernels of each family and the fused block
    # and the block + downsampling levels: torch and triton, each mode, apart and fused
    assert len(by_stage["block"]) == (2 * modes * 3 * len(kernels.BLOCK_LAYERS)
                                      + 2 * modes * 2 * (len(kernels.STAGE_LAYERS) + len(kernels.UP_STAGE_LAYERS)))
    fused = [r for r in by_stage["block"] if r["params"]["family"] == "fused"]
    blocks = [r for r in fused if r["params"]["op"].startswith("block: ")]
    assert blocks and all(7 * r["bytes"] == r["torch_bytes"] for r in blocks)  # 2C against 12C + 4H per position
    stages = [r for r in fused if r["params"]["op"].startswith(("block+down: ", "up+block: "))]
    assert len(stages) == 2 * modes * (len(kernels.STAGE_LAYERS) + len(kernels.UP_STAGE_LAYERS))
    assert all(r["bytes"] < r["torch_bytes"] for r in stages)
    assert {r["implementation"] for r in by_stage["model"]} == {"torch", "triton"}
    assert all(r["median"] > 0 for r in ctx.records)


@interpreter
def test_rvq_benchmark_gpu_part_in_the_interpreter(tmp_path):
    """The `rvq` benchmark's GPU part runs in the interpreter: every implementation timed or n/a with a
    reason, ours exact's codes equal to ours ieee's, each record with its roofline prediction."""
    from bench.benchmarks import rvq as bench_rvq
    from encodec_fast.ops import rvq
    ctx = core.Context(suite="smoke", device="cpu", workdir=tmp_path, benchmark="rvq")
    bench_rvq.time_kernels(ctx, device="cpu")
    timed = [r for r in ctx.records if r["metric"] == "time"]
    names = {r["implementation"] for r in timed}
    assert {"ours exact", "ours exact, one launch per stage", "ours ieee", "ours tf32", "torch exact", "torch tf32",
            "torch.compile exact"} <= names
    for r in timed:
        if r["implementation"] == "torch.compile exact":
            assert "smoke" in r["na"]
            continue
        assert r["frames_equal_to_ieee"] == 1.0 and r["predicted_ms_h200"] > 0, r
    assert {r["params"]["lowp"] for r in ctx.records if r["metric"] == "rescored_rows"} == set(rvq.LOW_PRECISION)


@interpreter
def test_gpu_sweep_smoke_run(tmp_path):
    """python -m tools.gpu_sweep --smoke: forced configurations give the reference's codes (ties only)."""
    proc = subprocess.run([sys.executable, "-m", "tools.gpu_sweep", "--smoke", "--only", "rvq_encode,vq_assign",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(next(tmp_path.glob("gpu_sweep_*_smoke.json")).read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"rvq_encode", "vq_assign"}
    assert all("error" not in r and r["non_ties"] == 0 for r in rows)
    assert len({json.dumps(r["config"], sort_keys=True) for r in rows if r["kernel"] == "rvq_encode"}) == 3


def test_tokenize_with_every_peer(tmp_path):
    """A few clips through ours, upstream's loop and transformers (weights converted to its layout), one
    process each; our codes equal upstream's."""
    from bench.benchmarks import tokenize
    report = tokenize.measure(4, tmp_path / "corpus", tmp_path / "work", "cpu", 1, hf_batch=8, smoke=True, skip={},
                              at_once=False)
    results = report["results"]
    assert set(results) == {"ours", "upstream", "transformers"}
    assert all("error" not in r for r in results.values()), results
    assert results["ours"]["codes_equal_upstream"] == 1.0
    assert 0 < results["transformers"]["codes_equal_upstream"] <= 1.0
    # ours also says where its time went and how fast its reading process delivered audio
    assert results["ours"]["seconds_by_stage"]["encoder convolutions"] > 0
    assert results["ours"]["reading"]["processes"] == 1 and results["ours"]["reading"]["audio_seconds"] > 0


def test_training_corpus_tool_and_training_step(tmp_path):
    """python -m tools.make_train_corpus (a few clips) writes train and held-out audio; the training step
    of the tiny model runs ours and the step on upstream's modules."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    corpus = tmp_path / "corpus"
    proc = subprocess.run([sys.executable, "-m", "tools.make_train_corpus", str(corpus), "--speech-clips", "2",
                           "--music-clips", "1", "--heldout-clips", "1", "--allow-no-speech"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list((corpus / "train" / "music").glob("*.wav")) and list((corpus / "heldout" / "music").glob("*.wav"))
    from bench.benchmarks import train_step
    rows = train_step.measure("tiny", batches=[1, 2], seconds=0.3, reps=2, bandwidths=[1.5], device="cpu")
    assert {r["implementation"] for r in rows} == {"ours exact", "torch exact", "upstream",
                                                   "ours exact, NCHW discriminator"}
    assert {r["batch"] for r in rows} == {1, 2}
    for r in rows:
        assert r["median_ms"] > 0 and len(r["times_ms"]) == 2 and r["samples_per_s"] > 0
        if r["implementation"] == "upstream":
            assert r["parts_ms"] == {}  # upstream's step has no stages
            continue
        # every part of the step measured, and the parts (own times) are at most the step
        assert set(r["parts_ms"]) == set(train_step.PARTS), r
        assert all(v >= 0 for v in r["parts_ms"].values())
        assert sum(r["parts_ms"].values()) <= 1.05 * r["max_ms"]
        assert r["parts_ms"]["generator"] > 0 and r["parts_ms"]["discriminator"] > 0


def test_dispatch_table_from_a_kernels_run(tmp_path, capsys):
    """tools/dispatch_table.py turns the kernels benchmark's conv records into CONV_MS entries: per
    layer and mode the chosen family's (cuDNN ms, ours ms), keyed as `ops.dispatch` keys them."""
    import ast

    from tools import dispatch_table

    def rec(name, mode, family, impl, ms):
        return {"benchmark": "kernels", "metric": "time", "implementation": impl, "median": ms,
                "params": {"stage": "conv", "op": f"conv: {name}", "precision": mode, "family": family}}
    records = []
    for name, mode, direct, gemm, cudnn in (("enc first conv", "bf16", 3.0, 2.0, 2.5),
                                            ("dec up s2", "exact", 8.0, 9.0, 13.0)):
        records += [rec(name, mode, fam, "torch", cudnn) for fam in ("direct", "gemm")]
        records += [rec(name, mode, "direct", "triton", direct), rec(name, mode, "gemm", "triton", gemm)]
    records.append({**rec("enc res k3", "tf32", "gemm", "triton", 1.0), "na": "failed"})  # n/a: left out
    # the fused levels (block stage, family fused) are keyed as `ops.conv` asks; the per-conv rows there are not
    for family, ms in (("gemm", 4.0), ("fused", 3.0)):
        for impl, t in (("torch", 5.0), ("triton", ms)):
            records.append({**rec("", "bf16", family, impl, t), "params": {
                "stage": "block", "op": "block+down: enc stage 0", "precision": "bf16", "family": family}})
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"records": records, "context": {"device": "GPU X"}}))
    assert dispatch_table.main([str(path), "--family", "best", "--out", str(tmp_path / "t.md")]) == 0
    text = capsys.readouterr().out
    assert "| enc first conv | bf16 | gemm | 2.500 | 2.000 | 1.25x |" in text
    block = text.split("```python")[1].split("```")[0]
    table = ast.literal_eval(block[block.index("{"):block.rindex("}") + 1])
    assert table == {("conv1d", 1, 32, 7, 1): {"bf16": (2.5, 2.0)},
                     ("conv_transpose1d", 64, 32, 4, 2): {"exact": (13.0, 8.0)},
                     ("residual_block_down", 32, 64, 4, 2): {"bf16": (5.0, 3.0)}}
    assert "(gemm)" in block and "(direct)" in block
    assert dispatch_table.main([str(path), "--family", "gemm"]) == 0
    assert "(13.000, 9.000)" in capsys.readouterr().out
    path.write_text(json.dumps({"records": []}))
    assert dispatch_table.main([str(path)]) == 1


def test_codec_benchmark_ragged_case_runs_on_cpu(tmp_path, monkeypatch, pair_24):
    """The codec benchmark's CUDA-only ragged case (`encode_batch` on clips of different lengths, per mode;
    batched, from CUDA graphs where there is a GPU, clip by clip), run on CPU at tiny sizes: every variant
    timed, and the share of codes equal to each clip alone recorded (100% here: CPU batches per clip)."""
    from bench.benchmarks import codec
    from encodec_fast.precision import MODES
    monkeypatch.setattr(codec, "RAGGED_CLIPS", 3)
    monkeypatch.setattr(codec, "RAGGED_SECONDS", (0.02, 0.1))
    _, ours = pair_24
    ctx = core.Context(suite="smoke", device="cpu", workdir=tmp_path, benchmark="codec")
    codec._ragged(ctx, ours, "random")
    times = [r for r in ctx.records if r["metric"] == "time"]
    timed = {r["implementation"] for r in times if r["params"]["op"] == "encode_batch"}
    assert timed == {f"ours {m}{s}" for m in MODES for s in ("", ", CUDA graphs", ", clip by clip")}
    decoded = {r["implementation"] for r in times if r["params"]["op"] == "decode_batch"}
    assert decoded == {f"ours {m}{s}" for m in MODES for s in ("", ", clip by clip")}
    assert all(not r.get("na") for r in ctx.records)
    equal = [r for r in ctx.records if r["metric"] == "codes_equal_clip_alone"]
    assert len(equal) == 2 * len(MODES) and all(r["median"] == 100.0 for r in equal)
    assert ours.precision == "exact" and ours._cuda_graphs is None


def test_rvq_benchmark_faiss_peer(tmp_path):
    """`faiss exact` (one IndexFlatL2 per stage): timed with its codes' agreement where FAISS is installed,
    n/a with the reason where it is not; its GPU variant n/a with the reason on a CPU-only FAISS."""
    import importlib.util

    from bench.benchmarks import rvq as bench_rvq
    from bench.benchmarks.kernels import make_books, make_latents
    from encodec_fast.ops import rvq
    ctx = core.Context(suite="smoke", device="cpu", workdir=tmp_path, benchmark="rvq")
    books = make_books(4, 64, 16, seed=3, device="cpu")
    x = make_latents(books, 2, 30, seed=3)
    exact = rvq.rvq_encode(x, list(books), [b.pow(2).sum(-1)[None] for b in books]).view(4, -1)
    bench_rvq._faiss(ctx, {"case": "cpu"}, books, x, exact, gpu=False)
    bench_rvq._faiss(ctx, {"case": "gpu"}, books, x, exact, gpu=True)
    cpu, gpu = (next(r for r in ctx.records if r["params"]["case"] == c) for c in ("cpu", "gpu"))
    assert cpu["implementation"] == gpu["implementation"] == "faiss exact"
    if importlib.util.find_spec("faiss") is None:
        assert "FAISS not available" in cpu["na"]
    else:
        assert not cpu.get("na") and cpu["frames_equal_to_exact"] >= 0.95
    assert "FAISS not available" in gpu["na"]
