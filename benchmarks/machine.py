"""The header every benchmark prints first: which machine a figure comes from (CPU model and ISA, bf16
support, threads, GPU) and the precision ``auto`` resolves to there, so figures compare across machines."""

from __future__ import annotations

import os
import platform

import torch

from vit.perf import cpu_model
from vit.precision import probe, resolve_precision


def header(requested: str | None = None, device: str = "cpu") -> str:
    cpu = probe("cpu")
    lines = [f"machine: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; "
             f"CPU capability {cpu.capability}, {'native' if cpu.native_bf16 else 'no native'} bf16; "
             f"torch {torch.__version__}, Python {platform.python_version()}"]
    if torch.cuda.is_available():
        gpu = probe("cuda")
        lines.append(f"GPU: {torch.cuda.get_device_name(0)} ({gpu.capability}), "
                     f"{'native' if gpu.native_bf16 else 'no native'} bf16")
    if requested is not None:
        lines.append(f"precision: {requested} -> {resolve_precision(requested, probe(device))} on {device}")
    return "\n".join(lines)
