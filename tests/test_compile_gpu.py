"""tools/compile_gpu.py, the ahead-of-time compile check for real GPUs: capture covers every kernel
and scenario, a compile of real launches works without a GPU, and the judge can fail.

The full check of the default launches (sm_80 and sm_90, the GPU image's triton) runs as its own
step of .ci/run; here it runs on the cheap kernels only, in subprocesses (this process runs Triton's
interpreter, the check compiles real GPU code)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # compiles GPU code (CI: readme environment; gpu and newest run tools/compile_gpu.py)

ROOT = Path(__file__).resolve().parent.parent


def run_check(*args, cache=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if cache is not None:
        env["ENCODEC_FAST_COMPILE_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "tools.compile_gpu", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=1200)


@pytest.fixture(scope="module")
def listing():
    proc = run_check("--list")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_capture_covers_every_kernel_and_scenario(listing):
    for kernel in ("_conv1d_kernel", "_conv_transpose1d_kernel", "_conv2d_leaky_relu_kernel", "_rvq_encode_kernel",
                   "_vq_assign_kernel", "_rvq_decode_kernel", "_scaled_copy_kernel", "_segment_sums_kernel",
                   "_rvq_train_kernel", "_rvq_train_backward_kernel", "_conv1d_gemm_kernel",
                   "_conv_transpose1d_gemm_kernel", "_conv2d_input_grad_gemm_kernel",
                   "_conv2d_weight_grad_gemm_kernel", "_leaky_relu_grad_kernel"):
        assert kernel in listing, kernel
    for scenario in ("24k encoder 10s x64 fp32 ieee", "48k decoder 1s x1 bfloat16", "24k decoder 10s x1 float16",
                     "msstftd n_fft=2048", "spectrogram n_fft=512 backward", "rvq train stage N=1 stats=True",
                     "rvq train all stages N=4800 n_q=32 detach=False", "rvq train backward N=4800",
                     "rvq decode N=48000", "24k encoder 10s x64 fp32 gemm tf32",
                     "48k decoder 1s x1 bfloat16 gemm ieee"):
        assert scenario in listing, scenario
    for n_q in (1, 2, 4, 8, 16, 32):
        assert f"rvq encode N=48000 n_q={n_q} float32 ieee" in listing
        assert f"rvq encode N=48000 n_q={n_q} float32 exact/bf16x3" in listing  # the certified search, default
    heads = [line for line in listing.splitlines() if line.startswith("[")]
    # Captured once per architecture; the default set is all judged (no "default"-only role), and
    # the autotuning lists add configurations of every tunable kernel.
    assert all("sm_80" in line and "sm_90" in line for line in heads if "_conv1d_kernel" in line)
    assert not any(" default" in line.split("(", 1)[1] for line in heads)
    for kernel in ("_conv1d_kernel", "_conv_transpose1d_kernel", "_conv2d_leaky_relu_kernel", "_rvq_encode_kernel",
                   "_vq_assign_kernel"):
        assert any(kernel in line and "sm_90 listed" in line for line in heads), kernel
    assert "[autotune list]" in listing


def test_compile_and_judge_real_launches(tmp_path):
    out = tmp_path / "results"
    proc = run_check("--only", "rvq_decode|scaled_copy", "--archs", "90", "--out", out, cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 problems" in proc.stdout
    data = json.loads(next(out.glob("compile_gpu_*.json")).read_text())
    assert data["launches"] and all(x["results"]["90"]["ok"] for x in data["launches"])
    assert all(x["results"]["90"]["regs"] > 0 for x in data["launches"])
    # each launch's roofline per scenario: the decode of 48,000 frames x 32 stages reads its codes (int64)
    # and the 32 codebooks, writes [48000, 128] fp32 frames, adds 32 codewords per value (CUDA cores)
    decode = [x["roofline"] for x in data["launches"] if x["kernel"] == "_rvq_decode_kernel"]
    got = [r for roof in decode for label, r in roof.items() if label == "rvq decode N=48000 n_q=32 float32"]
    assert len(got) == 1 and got[0]["calls"] == 1 and got[0]["products"] == "fp32", decode
    assert got[0]["mbytes"] * 1e6 == 8 * 32 * 48000 + 4 * 32 * 1024 * 128 + 4 * 48000 * 128
    assert got[0]["gflop"] * 1e9 == 48000 * 128 * 32 and got[0]["bound"] == "memory"
    assert 0 < got[0]["predicted_ms_h200"] < got[0]["predicted_ms_h100"]
    assert "Roofline per launch configuration" in next(out.glob("compile_gpu_*.md")).read_text()
    # A second run takes every result from the cache; a budget below zero fails every launch.
    again = run_check("--only", "rvq_decode", "--archs", "90", "--budget", "-1", cache=tmp_path / "cache")
    assert again.returncode == 1 and "0 fresh" in again.stdout and "spill stores > budget -1 B" in again.stdout


def test_roofline_per_scenario_counts_each_scenario_once():
    """Captured on two architectures, each scenario's launches are counted once; the models' rows say
    the audio seconds per second their floor allows, and the certified search runs 3 bf16 passes."""
    proc = run_check("--roofline", "--archs", "80,90")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {cells[0]: cells[1:] for cells in (
        [c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines() if line.startswith("| "))}
    # 24 kHz encoder: first conv, 4 levels of (3 block convs + downsampling), last conv; the LSTM is torch's
    assert rows["24k encoder 10s x64 fp32 ieee"][1] == "18"
    assert float(rows["24k encoder 10s x64 bfloat16 gemm ieee"][-1].replace(",", "")) > 30000
    search = rows["rvq encode N=48000 n_q=32 float32 exact/bf16x3"]
    assert float(search[2]) == pytest.approx(2 * 48000 * 1024 * 128 * 32 / 1e9, rel=1e-2)
    assert float(search[4]) == pytest.approx(1e3 * 3 * 2 * 48000 * 1024 * 128 * 32 / 989.4e12, rel=1e-2)


def test_certified_search_compiles_to_tensor_core_instructions(tmp_path):
    """The default RVQ search's launches: wgmma (64-row tile) or mma.sync (16-row tile) in their PTX
    for sm_90, recorded as `mma` per launch and architecture."""
    out = tmp_path / "results"
    proc = run_check("--only", "certified SPLIT SPLIT_BF16 fp32/bf16/i32", "--archs", "90", "--listed-archs", "none",
                     "--out", out,
                     cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(next(out.glob("compile_gpu_*.json")).read_text())
    results = {x["configuration"]: x["results"]["90"] for x in data["launches"]}
    assert len(results) == 2 and all(r["mma"] > 0 for r in results.values()), results
    assert any(r["wgmma"] > 0 for c, r in results.items() if c.startswith("N64")), results


def test_judge_fails_a_tensor_core_launch_without_tensor_core_instructions():
    code = """if True:
        from tools import compile_gpu as cg
        def launch(precision, half=False):
            return cg.Launch("m", "k", {"PRECISION": "constexpr", "HALF_DOT": "constexpr"},
                             {(0,): precision, (1,): half}, {}, {"num_warps": 4, "num_stages": 2},
                             ("PRECISION", "HALF_DOT"), ["label"], {90: "judged"})
        ok = {"ok": True, "shared": 0, "spill_st": 0, "spill_ld": 0, "stack": 0}
        launches = [launch("tf32"), launch("ieee"), launch("ieee", True), launch("bf16x3")]
        results = {(0, 90): {**ok, "mma": 0}, (1, 90): {**ok, "mma": 0}, (2, 90): {**ok, "mma": 0},
                   (3, 90): {**ok, "mma": 24}}
        for line in cg.verdicts(launches, results, [90], 512):
            print(line)
        print(cg.ptx_counts("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {..};\\n"
                            "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {..};\\n"
                            "fma.rn.f32 %f1, %f2, %f3, %f4;\\nld.global.v4.b32 {..};"))
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    failed = [line for line in lines if "meant for tensor cores" in line]
    assert len(failed) == 2 and "[0]" in failed[0] and "[2]" in failed[1]  # tf32 and the half dot, not ieee
    assert "'mma': 2" in lines[-1] and "'wgmma': 1" in lines[-1] and "'fma_f32': 1" in lines[-1]


def test_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "tools.compile_gpu", "--list"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode != 0 and "unset TRITON_INTERPRET" in proc.stderr


def test_gemm_convolutions_and_fused_blocks_compile_to_wgmma(tmp_path):
    """The implicit-GEMM family's launches for the 24 kHz model's first level in bf16 (the fused
    residual block, the stride-2 downsampling convolution, both in one kernel, and the decoder's
    last upsampling with its block in one kernel): wgmma in their sm_90 PTX, no spills."""
    out = tmp_path / "results"
    proc = run_check("--only", r"residual_block.*BLOCK_C32 .*bf16|conv1d_gemm.*K4 T128 CO64 CI32 .*bf16"
                     r"|block_down.*BLOCK_C32 .*bf16|up_block.*BLOCK_C32 .*bf16",
                     "--archs", "90", "--listed-archs", "none", "--out", out, cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(next(out.glob("compile_gpu_*.json")).read_text())
    kernels = {x["kernel"] for x in data["launches"]}
    assert {"_residual_block_kernel", "_conv1d_gemm_kernel", "_block_down_kernel", "_up_block_kernel"} <= kernels
    for x in data["launches"]:
        r = x["results"]["90"]
        assert r["wgmma"] > 0 and r["spill_st"] == 0, (x["configuration"], r)
