"""GPU peaks and the roofline model the benchmarks and the compile check print next to their numbers.

A roofline is the least time a piece of work can take on a GPU: max(its products' FLOP at the dense
peak of the precision they run in, the bytes it must move at the memory bandwidth). It is a floor,
not a forecast: launch overhead, tails, caches and the instructions besides the products are not in it.
"""

import typing as tp

#: Dense peaks (TFLOP/s) and memory bandwidth (TB/s) from NVIDIA's data sheets, by device name.
PEAKS = {
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "hbm_tbs": 2.0},
    "H100": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "hbm_tbs": 3.35},
    "H200": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "hbm_tbs": 4.8},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "hbm_tbs": 2.0},
}
#: The GPUs every roofline is predicted for (SXM parts): the fields `predicted_ms_h100`, `predicted_ms_h200`.
PREDICTED_FOR = ("H100", "H200")

#: The dense peak each of the codec's precision modes multiplies at (fp16's dense peak is bf16's).
MODE_PEAK = {"exact": "fp32", "tf32": "tf32", "bf16": "bf16", "fp16": "bf16"}
#: A dot's precision (Triton's input_precision, and our split products) -> (tensor-core passes, the peak
#: each pass runs at). 'ieee' is fp32 on CUDA cores.
DOT_PASSES = {"ieee": (1, "fp32"), "tf32": (1, "tf32"), "tf32x3": (3, "tf32"), "bf16": (1, "bf16"),
              "bf16x3": (3, "bf16"), "bf16x3-triton": (3, "bf16")}


def peaks_for(name: str) -> tp.Optional[dict]:
    """The peaks of a device named `name` (torch.cuda.get_device_name()), or None if not listed."""
    for key in sorted(PEAKS, key=len, reverse=True):
        if key in name:
            return PEAKS[key]
    return None


def predicted_key(device_name: str) -> tp.Optional[str]:
    """The roofline field that predicts for a device named `device_name` ('predicted_ms_h100' for an
    H100 SXM, 'predicted_ms_h200' for an H200), or None for any other device."""
    if "H200" in device_name:
        return "predicted_ms_h200"
    if "H100" in device_name and "PCIe" not in device_name:
        return "predicted_ms_h100"
    return None


def _seconds(gpu: str, flop: float, nbytes: float, peak: str, passes: int) -> tp.Tuple[float, float]:
    """(compute, memory) seconds of the work on `gpu`: `flop` run `passes` times at the dense `peak`,
    `nbytes` at HBM bandwidth."""
    p = PEAKS[gpu]
    return passes * flop / (p[peak] * 1e12), nbytes / (p["hbm_tbs"] * 1e12)


def roofline(flop: float, nbytes: float, peak: str, passes: int = 1) -> tp.Dict[str, float]:
    """{'predicted_ms_h100', 'predicted_ms_h200'}: the slower of `flop` (counted once) run `passes`
    times at the dense `peak` ('fp32', 'tf32', 'bf16') and `nbytes` at HBM bandwidth, in ms."""
    return {f"predicted_ms_{gpu.lower()}": 1e3 * max(_seconds(gpu, flop, nbytes, peak, passes))
            for gpu in PREDICTED_FOR}


def bound(flop: float, nbytes: float, peak: str, passes: int = 1) -> str:
    """Which side of `roofline` is the larger on the H100: 'compute' or 'memory'."""
    compute, memory = _seconds("H100", flop, nbytes, peak, passes)
    return "compute" if compute >= memory else "memory"


def roofline_ms(flop: float, nbytes: float, mode: str) -> tp.Dict[str, float]:
    """A layer's roofline on H100 and H200 in one of the codec's precision modes (`MODE_PEAK`), in ms."""
    return roofline(flop, nbytes, MODE_PEAK[mode])
