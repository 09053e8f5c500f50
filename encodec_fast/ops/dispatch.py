"""Which convolution runs on CUDA in `auto` mode: our kernel only where a GPU measurement showed it
faster than cuDNN in the same precision mode; cuDNN (the torch path) everywhere else, unmeasured
shapes and modes included. A user never gets a path measured slower by default;
`ENCODEC_FAST_BACKEND=triton` (or `ops.use_backend("triton")`) still runs our kernels everywhere.

The table holds the measurement itself (milliseconds on both sides), not a verdict, and names the
run that made it. Each entry is a SEANet layer of the 24 kHz model at batch 64 x 10 s, keyed by
(op, C_in, C_out, kernel size, stride); a layer of another model with the same key takes the same
choice. The fused gemm-family ops ask with keys of their own: ('residual_block', C, C / 2, 3, 1),
('residual_block_down', C, C_out, kernel, stride), ('up_residual_block', C_in, C, kernel, stride)
(`tools/dispatch_table.py` makes them from the `kernels` benchmark's fused rows; none measured yet).
Modes are `encodec_fast.precision`'s: 'exact' (fp32 products), 'tf32', 'bf16'; 'fp16' and
our opt-in 'tf32x3' have no entries.

The 'exact' entries' cuDNN side ran in TF32 (torch's default for cuDNN convolutions at the time):
where our fp32 kernel beat TF32 cuDNN it beats cuDNN without TF32 too, so those wins hold for
the exact mode; where it lost, the exact mode's cuDNN (TF32 off) was not timed, and cuDNN runs.
"""

import typing as tp

import torch

#: The run the table comes from (NVIDIA H200, torch 2.11.0, triton 3.6.0; the launch table of
#: commit e58eaf2, 32 output channels x 128 positions, 8 warps, 1 stage).
MEASUREMENT = "bench/results/gpu_h200_2026-11-30/gpu_2026-11-30_default.md"
MEASURED_ON = "NVIDIA H200"

#: The kernel family CONV_MS measured (`ops.conv.conv_kernel()`); the other family has no entries.
FAMILY = "direct"
#: (op, C_in, C_out, K, stride) -> {mode: (cuDNN ms, ours ms)}, from MEASUREMENT's table "Fused
#: convolutions" (its layer name in the comment).
CONV_MS: tp.Dict[tp.Tuple[str, int, int, int, int], tp.Dict[str, tp.Tuple[float, float]]] = {
    ("conv1d", 1, 32, 7, 1): {"exact": (3.711, 15.241), "bf16": (2.886, 3.090)},            # enc first conv
    ("conv1d", 32, 16, 3, 1): {"exact": (7.299, 13.004), "bf16": (5.689, 8.202)},           # enc res k3
    ("conv1d", 16, 32, 1, 1): {"exact": (5.833, 2.840), "bf16": (3.327, 0.991)},            # enc res k1 + skip
    ("conv1d", 32, 64, 4, 2): {"exact": (7.743, 14.593), "bf16": (6.164, 5.405)},           # enc down s2
    ("conv1d", 64, 128, 8, 4): {"exact": (9.426, 27.882), "bf16": (4.764, 11.329)},         # enc down s4
    ("conv1d", 128, 256, 10, 5): {"exact": (7.437, 28.486), "bf16": (2.377, 6.991)},        # enc down s5
    ("conv1d", 256, 512, 16, 8): {"exact": (8.188, 23.909), "bf16": (1.028, 6.852)},        # enc down s8
    ("conv1d", 512, 128, 7, 1): {"exact": (1.240, 4.102), "bf16": (0.286, 1.124)},          # enc last conv
    ("conv_transpose1d", 512, 256, 16, 8): {"exact": (6.182, 6.589), "bf16": (1.265, 2.708)},  # dec up s8
    ("conv_transpose1d", 256, 128, 10, 5): {"exact": (8.429, 9.097), "bf16": (1.953, 5.024)},  # dec up s5
    ("conv_transpose1d", 128, 64, 8, 4): {"exact": (12.584, 10.970), "bf16": (19.645, 8.692)},  # dec up s4
    ("conv_transpose1d", 64, 32, 4, 2): {"exact": (13.882, 8.567), "bf16": (4.911, 8.687)},  # dec up s2
    ("conv1d", 32, 1, 7, 1): {"exact": (10.563, 29.091), "bf16": (5.237, 18.323)},          # dec last conv
}


def mode_of(dtype: torch.dtype, dot: str) -> str:
    """The precision mode a kernel launch runs in: bf16 / fp16 inputs by dtype, fp32 by our dot
    precision ('ieee' -> 'exact', 'tf32', 'tf32x3')."""
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    return "exact" if dot == "ieee" else dot


def kernel_measured_faster(op: str, C_in: int, C_out: int, K: int, stride: int, mode: str,
                           family: str = FAMILY) -> bool:
    """True where CONV_MS holds this layer in this mode for this kernel family and our kernel took
    less time than cuDNN."""
    if family != FAMILY:
        return False
    entry = CONV_MS.get((op, C_in, C_out, K, stride), {}).get(mode)
    return entry is not None and entry[1] < entry[0]


def table() -> tp.List[tp.Dict[str, tp.Any]]:
    """CONV_MS as rows with the choice each makes (for `encodec-fast info` and the docs)."""
    rows = []
    for (op, c_in, c_out, k, s), modes in CONV_MS.items():
        for mode, (cudnn, ours) in modes.items():
            rows.append({"op": op, "C_in": c_in, "C_out": c_out, "K": k, "stride": s, "mode": mode,
                         "cudnn_ms": cudnn, "ours_ms": ours, "runs": "ours" if ours < cudnn else "cuDNN"})
    return rows
