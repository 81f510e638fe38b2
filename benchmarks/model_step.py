"""Training-step throughput of vitflow's ViT against timm's VisionTransformer, same configuration.

One step = forward + backward + AdamW step on random images. The two models are timed in alternating
rounds within one process, so drifts in machine load hit both; the figure per model is the median of its
rounds, and the ratio vitflow/timm is printed per configuration (target: >= 1.0).

    python benchmarks/model_step.py            # CPU: Ti/4 @ 32 px and S/16 @ 224 px, fp32 and bf16
    python benchmarks/model_step.py --quick    # fewer rounds, for a smoke check
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

from benchmarks.machine import header
from vit import VisionTransformer, decode_variant, train_flops


@dataclass(frozen=True)
class Case:
    variant: str
    image_size: int
    batch_size: int
    precision: str  # fp32 | bf16 | fp16
    device: str


def build_pair(case: Case) -> tuple[torch.nn.Module, torch.nn.Module]:
    config = decode_variant(case.variant, image_size=case.image_size, num_classes=1000)
    ours = VisionTransformer(config)
    theirs = TimmViT(
        img_size=case.image_size,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        num_classes=config.num_classes,
    )
    theirs.load_state_dict(ours.state_dict())  # same weights: same numerics, same work
    return ours.to(case.device), theirs.to(case.device)


def make_step(model: torch.nn.Module, case: Case):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(case.batch_size, 3, case.image_size, case.image_size, device=case.device)
    labels = torch.randint(0, 1000, (case.batch_size,), device=case.device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[case.precision]
    scaler = torch.amp.GradScaler(case.device, enabled=case.precision == "fp16")

    def step() -> None:
        with torch.autocast(case.device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def timed(step, steps: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_case(case: Case, rounds: int, steps: int) -> dict:
    torch.manual_seed(0)
    ours, theirs = build_pair(case)
    step_ours, step_theirs = make_step(ours, case), make_step(theirs, case)
    for step in (step_ours, step_theirs):  # warm-up: allocator, kernels, oneDNN primitives
        timed(step, 2, case.device)
    rates = {"vitflow": [], "timm": []}
    for round_index in range(rounds):
        order = [("vitflow", step_ours), ("timm", step_theirs)]
        if round_index % 2:
            order.reverse()
        for name, step in order:
            rates[name].append(steps * case.batch_size / timed(step, steps, case.device))
    ours_rate, theirs_rate = statistics.median(rates["vitflow"]), statistics.median(rates["timm"])
    config = decode_variant(case.variant, image_size=case.image_size, num_classes=1000)
    return {
        "case": case,
        "vitflow": ours_rate,
        "timm": theirs_rate,
        "ratio": ours_rate / theirs_rate,
        "tflops": ours_rate * train_flops(config) / 1e12,
    }


def cases(device: str) -> list[Case]:
    if device == "cuda":
        return [
            Case("Ti/4", 32, 512, "bf16", device),
            Case("B/16", 224, 128, "bf16", device),
            Case("B/16", 224, 64, "fp32", device),
            Case("L/16", 224, 32, "bf16", device),
        ]
    return [
        Case("Ti/4", 32, 128, "fp32", device),
        Case("Ti/4", 32, 128, "bf16", device),
        Case("S/16", 224, 16, "fp32", device),
        Case("S/16", 224, 16, "bf16", device),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per model per round")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 step: a smoke check, not a measurement")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--variant", default=None, help="run only this variant's cases, e.g. Ti/4")
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                        help="run only this precision's cases (emulated bf16 on a CPU without it takes long)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 1
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(header("auto"))
    print(f"rounds={args.rounds}, steps/round={args.steps}")
    print(f"{'device':6} {'variant':6} {'px':>4} {'batch':>5} {'prec':5} {'vitflow img/s':>13} {'timm img/s':>10} {'ratio':>6} {'TFLOP/s':>8}")
    for device in devices:
        for case in cases(device):
            if (args.variant and case.variant != args.variant) or (args.precision and case.precision != args.precision):
                continue
            r = run_case(case, args.rounds, args.steps)
            print(
                f"{device:6} {case.variant:6} {case.image_size:>4} {case.batch_size:>5} {case.precision:5} "
                f"{r['vitflow']:>13.1f} {r['timm']:>10.1f} {r['ratio']:>6.3f} {r['tflops']:>8.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
