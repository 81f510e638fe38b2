"""How far training runs from what the hardware can do: the device's peak matmul FLOP/s for a precision.

Model FLOPs utilisation (MFU, PaLM appendix B) is the model's training FLOPs per second (``vit.flops``) over
this peak. On a CPU no table can know the peak (cores, clocks, ISA and the BLAS library vary), so it is
measured: a short square-matmul probe (about a second), cached per machine in
``~/.cache/vitflow/peak_flops.json`` under a key naming the CPU model, ISA, thread count and precision. On
CUDA, a table of dense peaks of known GPUs, with the probe as the fallback. Plain PyTorch.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from vit.precision import Precision

CACHE = Path(os.environ.get("VITFLOW_CACHE", Path.home() / ".cache" / "vitflow")) / "peak_flops.json"

# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' data sheets: bf16 = fp16 on these.
CUDA_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100 SXM": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), for cache keys and benchmark headers."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_key(device: torch.device, precision: Precision) -> str:
    if device.type == "cuda":
        return f"cuda|{torch.cuda.get_device_name(device)}|{precision}"
    return f"cpu|{cpu_model()}|{torch.backends.cpu.get_cpu_capability()}|{torch.get_num_threads()} threads|{precision}"


def table_peak(device_name: str, precision: Precision) -> float | None:
    """A known GPU's dense peak in FLOP/s for ``precision`` (the longest table name found in the device
    name wins, so "H100 PCIe" is not taken for "H100 SXM"), or None."""
    for name in sorted(CUDA_PEAK_TFLOPS, key=len, reverse=True):
        if all(word in device_name for word in name.split()) and precision in CUDA_PEAK_TFLOPS[name]:
            return CUDA_PEAK_TFLOPS[name][precision] * 1e12
    return None


def measure_peak(device: torch.device, precision: Precision, size: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of repeated (size x size) @ (size x size) matmuls in ``precision`` on ``device``: the best of
    a few timed rounds after a warm-up (2 size^3 FLOPs a product)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    if precision != "fp32":  # the dtype autocast would compute in
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        a, b = a.to(dtype), b.to(dtype)

    def run(count: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(count):
                a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    run(2)  # warm-up: kernels chosen, caches filled
    count = max(1, int(seconds / max(run(1), 1e-6)) // 3)
    best = min(run(count) for _ in range(3))
    return 2 * size**3 * count / best


def peak_flops(device: str | torch.device, precision: Precision, cache: Path | None = None) -> float:
    """The peak FLOP/s MFU is measured against on ``device`` in ``precision``: a known GPU's data-sheet
    figure, else the probe's, cached per machine (a second probe on the same machine reads the cache)."""
    device = torch.device(device)
    if device.type == "cuda":
        known = table_peak(torch.cuda.get_device_name(device), precision)
        if known is not None:
            return known
    cache = cache or CACHE
    key = _cache_key(device, precision)
    try:
        cached = json.loads(cache.read_text())
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached.get(key), (int, float)) and cached[key] > 0:
        return float(cached[key])
    measured = measure_peak(device, precision)
    cached[key] = measured
    try:  # another worker may write at the same time: write a whole file, then rename it into place
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = cache.with_name(f"{cache.name}.{os.getpid()}")
        staging.write_text(json.dumps(cached, indent=1, sort_keys=True))
        staging.replace(cache)
    except OSError:
        pass  # a read-only home: measure again next time
    return measured
