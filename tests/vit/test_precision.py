"""Precision chosen for the hardware (vit.precision) and the speed figures fit reports (vit.perf): each
branch of the choice, the real CPU probe with oneDNN's ISA capped (as on a CPU without bf16), the
peak-FLOP/s probe and its per-machine cache, MFU and the data-wait share of a data-starved run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.vit.test_loop import Recorder, TensorData, data_config, tiny_model
from vit import train_flops
from vit.checkpoint import load_checkpoint
from vit.data import train_loader
from vit.loop import TrainConfig, fit
from vit.perf import measure_peak, peak_flops, table_peak
from vit.precision import Hardware, SlowPrecisionWarning, probe, resolve_precision

CPU_BF16 = Hardware("cpu", native_bf16=True, capability="AVX512")
CPU_PLAIN = Hardware("cpu", native_bf16=False, capability="AVX2")
GPU_BF16 = Hardware("cuda", native_bf16=True, capability="sm_90")
GPU_OLD = Hardware("cuda", native_bf16=False, capability="sm_75")


@pytest.mark.parametrize(("hardware", "expected"), [(CPU_BF16, "bf16"), (CPU_PLAIN, "fp32"), (GPU_BF16, "bf16"), (GPU_OLD, "fp16")])
def test_auto_chooses_for_the_hardware(hardware, expected):
    assert resolve_precision("auto", hardware) == expected


def test_explicit_choices_are_kept_and_emulated_bf16_warns_with_the_slowdown():
    assert resolve_precision("fp32", CPU_BF16) == "fp32"
    assert resolve_precision("bf16", CPU_BF16) == "bf16"
    with pytest.warns(SlowPrecisionWarning, match=r"emulated.*AVX2.*24x slower.*'auto' would choose fp32"):
        assert resolve_precision("bf16", CPU_PLAIN) == "bf16"
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        resolve_precision("fp16", CPU_BF16)
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16, got 'fp8'"):
        resolve_precision("fp8", CPU_BF16)


PROBE = "import json; from vit.precision import probe, resolve_precision; h = probe('cpu'); " \
        "print(json.dumps([h.native_bf16, h.capability, resolve_precision('auto', h)]))"


def probed(**caps: str) -> list:
    """The probe in a fresh process with oneDNN's and ATen's ISA capped as given (else uncapped)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**env, **caps}, capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[2])
    return json.loads(out.stdout)


def test_the_cpu_probe_follows_the_isa_onednn_may_use():
    """The real probe, no mocks: with oneDNN capped at AVX2 (what a CPU without AVX-512 offers) bf16 is
    not native and auto is fp32; uncapped, bf16 is native exactly when the CPU has AVX512-BF16 or AMX
    (read from /proc/cpuinfo, independently of torch)."""
    assert probed(ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2") == [False, "AVX2", "fp32"]
    flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split())
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    native_bf16, _, auto = probed()
    assert (native_bf16, auto) == (native, "bf16" if native else "fp32")


def test_fit_records_the_resolved_precision_in_its_checkpoints(tmp_path):
    fit(tiny_model(), TensorData(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)), 8), None,
        TrainConfig(total_steps=2, log_every=1), report=Recorder(), checkpoint_dir=tmp_path)
    state = load_checkpoint(tmp_path / "step-000002")
    assert state["train_config"]["precision"] == "auto"
    assert state["precision"] == resolve_precision("auto", probe("cpu"))


def test_peak_probe_measures_once_per_machine_then_reads_its_cache(tmp_path):
    cache = tmp_path / "peak.json"
    measured = peak_flops("cpu", "fp32", cache=cache)
    assert 1e8 < measured < 1e14  # FLOP/s of a CPU
    (key, value), = json.loads(cache.read_text()).items()
    assert value == measured and "fp32" in key and f"{torch.get_num_threads()} threads" in key
    cache.write_text(json.dumps({key: 123.0}))  # a second call on this machine reads the cache
    assert peak_flops("cpu", "fp32", cache=cache) == 123.0
    assert 0.2 < measure_peak(torch.device("cpu"), "fp32") / measured < 5  # the same order, measured again


def test_known_gpus_come_from_the_table():
    assert table_peak("NVIDIA H100 PCIe", "bf16") == 756e12
    assert table_peak("NVIDIA H100 80GB HBM3 SXM", "bf16") == 989e12
    assert table_peak("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert table_peak("Some Future GPU", "bf16") is None and table_peak("Tesla T4", "bf16") is None


def test_mfu_is_model_flops_per_second_over_the_peak():
    report = Recorder()
    model = tiny_model()
    fit(model, TensorData(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)), 8), None,
        TrainConfig(total_steps=4, log_every=2, precision="fp32"), report=report, peak_flops=1e11)
    for _, metrics, _ in report.calls:
        assert metrics["perf/images_per_sec"] == metrics["train/images_per_sec"] > 0
        assert metrics["perf/mfu"] == pytest.approx(metrics["perf/images_per_sec"] * train_flops(model.config) / 1e11)


def test_a_data_starved_run_shows_a_high_data_wait(cifar):
    """No loader workers and heavy augmentation (RandAugment on 224 px crops of real shards) feeding a
    model that costs almost nothing: most of the window is spent waiting for batches. The same model on
    batches already in memory hardly waits."""
    starved = Recorder()
    heavy = data_config(image_size=224, randaugment=True, randaugment_num_ops=3, batch_size=8)
    model = dict(image_size=224, patch_size=56, embed_dim=16, depth=1, num_heads=1)
    fit(tiny_model(**model), train_loader(cifar, heavy, rank=0, world_size=1), None,
        TrainConfig(total_steps=6, log_every=3, precision="fp32"), report=starved)
    fed = Recorder()
    fit(tiny_model(embed_dim=96, depth=4, num_heads=3), TensorData(torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)), 32),
        None, TrainConfig(total_steps=6, log_every=3, precision="fp32"), report=fed)
    starved_wait = [m["perf/data_wait_fraction"] for _, m, _ in starved.calls]
    fed_wait = [m["perf/data_wait_fraction"] for _, m, _ in fed.calls]
    assert min(starved_wait) > 0.6, starved_wait
    assert max(fed_wait) < 0.2, fed_wait
