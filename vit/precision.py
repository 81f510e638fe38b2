"""Numeric precision for training and evaluation, chosen for the hardware. Plain PyTorch.

``precision: auto`` (the default) resolves on the device that trains, once per run:

- CUDA with native bf16 (``torch.cuda.is_bf16_supported()``: Ampere and newer) -> ``bf16`` autocast;
- CUDA without it -> ``fp16`` autocast with a GradScaler;
- a CPU whose oneDNN runs bf16 natively (AVX512-BF16 or AMX, see :func:`cpu_native_bf16`) -> ``bf16``;
- any other CPU -> ``fp32``.

Emulated bf16 is far slower than fp32: on a 2-core AMD EPYC with AVX2 only, a ViT Ti/4 training step ran
at 2.0 img/s in bf16 against 48 img/s in fp32 (docs/BENCHMARKS.md). An explicit ``bf16`` there still runs,
with a warning that says so.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

Precision = Literal["fp32", "bf16", "fp16"]
PrecisionChoice = Literal["auto", "fp32", "bf16", "fp16"]
CHOICES: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")

# Measured on a 2-core AMD EPYC (AVX2, no AVX-512): ViT Ti/4 @ 32 px train step, bf16 autocast vs fp32.
EMULATED_BF16_SLOWDOWN = 24


class SlowPrecisionWarning(UserWarning):
    """The requested precision is emulated on this device: training runs, much slower than it could."""


@dataclass(frozen=True)
class Hardware:
    """What the precision choice depends on, probed on the device that trains (:func:`probe`)."""

    device_type: str  # "cpu" | "cuda" | ...
    native_bf16: bool
    capability: str  # "AVX2", "AVX512", "sm_90", ... for messages and run metadata

    def describe(self) -> str:
        return f"{self.device_type} {self.capability}, {'native' if self.native_bf16 else 'no native'} bf16"


def cpu_native_bf16() -> bool:
    """True when oneDNN runs bf16 matmuls natively on this CPU: it may use an ISA with bf16
    (``_is_mkldnn_bf16_supported``, which honours ``ONEDNN_MAX_CPU_ISA``) and the CPU has AVX512-BF16 or AMX
    (AVX-512 without them emulates bf16, slower than fp32)."""
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def probe(device: str | torch.device = "cpu") -> Hardware:
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return Hardware("cuda", torch.cuda.is_bf16_supported(including_emulation=False), f"sm_{major}{minor}")
    if device.type == "cpu":
        return Hardware("cpu", cpu_native_bf16(), torch.backends.cpu.get_cpu_capability())
    return Hardware(device.type, False, device.type)


def resolve_precision(requested: PrecisionChoice, hardware: Hardware) -> Precision:
    """The precision to train with: ``auto`` chosen for ``hardware`` (see the module docstring), an explicit
    choice as given. fp16 outside CUDA is an error; bf16 without native support warns and runs."""
    if requested not in CHOICES:
        raise ValueError(f"precision must be one of {', '.join(CHOICES)}, got {requested!r}")
    if requested == "auto":
        if hardware.native_bf16:
            return "bf16"
        return "fp16" if hardware.device_type == "cuda" else "fp32"
    if requested == "fp16" and hardware.device_type != "cuda":
        raise ValueError(f"precision 'fp16' needs a CUDA device (it relies on a GradScaler), got device "
                         f"{hardware.device_type!r}; use 'auto' (or 'bf16' where the CPU has native bf16)")
    if requested == "bf16" and not hardware.native_bf16:
        warnings.warn(f"precision 'bf16' is emulated on this device ({hardware.describe()}): about "
                      f"{EMULATED_BF16_SLOWDOWN}x slower than fp32 for a ViT training step on such a CPU; "
                      "'auto' would choose fp32", SlowPrecisionWarning, stacklevel=2)
    return requested


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
