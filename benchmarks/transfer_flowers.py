"""The paper's claim at toy scale: does pre-training (on CIFAR-10) help fine-tuning on Flowers-17, and does
a higher fine-tuning resolution help? Fine-tunes (a) from the pre-trained model with the paper's recipe
(zero-initialised head, position embeddings resampled in 2D, SGD momentum 0.9) and (b) from scratch, with the
same number of steps, at two or more resolutions; each arm takes the best of a small learning-rate grid on
the validation split and is scored on the test split. Target: pre-trained >= scratch + 10 points at the best
resolution.

    python -m benchmarks.transfer_flowers --pretrained models:/vit-pretrained/1 \
        --tracking-uri sqlite:///benchmarks/.work/pretrain_cifar10/mlflow.db
    python -m benchmarks.transfer_flowers --smoke   # a random "pre-trained" model, a few steps: checks the script
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.corpora import flowers17_shards
from benchmarks.machine import header
from vit import VisionTransformer, decode_variant, gflops
from vit.data import DataConfig, eval_loader, train_loader
from vit.finetune import paper_finetune_optim, prepare_finetune_model
from vit.loop import TrainConfig, evaluate, fit
from vit.optim import OptimConfig

REPO = Path(__file__).resolve().parents[1]


def finetune_arm(model, shards: Path, data: DataConfig, steps: int, optim: OptimConfig, precision: str) -> dict:
    train = train_loader(shards, data, rank=0, world_size=1)
    val = eval_loader(shards, data, rank=0, world_size=1, split="val")
    start = time.monotonic()
    fit(model, train, None, TrainConfig(total_steps=steps, log_every=max(steps // 5, 1), precision=precision, optim=optim),
        report=lambda *a, **k: None)
    seconds = time.monotonic() - start
    return {"val_top1": evaluate(model, val, precision=precision)["top1"], "seconds": seconds, "model": model}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", help="a registered pre-trained model (benchmarks/pretrain_cifar10.py makes one)")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{REPO / 'benchmarks/.work/pretrain_cifar10/mlflow.db'}")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 where the CPU/GPU does it natively, else fp32")
    parser.add_argument("--finetune-lrs", type=float, nargs="+", default=[0.01, 0.03])
    parser.add_argument("--scratch-lrs", type=float, nargs="+", default=[5e-4, 1e-3])
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / ".work" / "transfer_flowers")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    print(header(args.precision), flush=True)
    if args.smoke:
        args.steps, args.image_sizes, args.finetune_lrs, args.scratch_lrs = 4, [32, 48], [0.01], [1e-3]
    args.workdir.mkdir(parents=True, exist_ok=True)
    shards = flowers17_shards(args.workdir / "shards", max_size=max(args.image_sizes) + 16)
    num_classes = len(json.loads((shards / "dataset.json").read_text())["class_names"])
    if args.smoke:
        source_config = decode_variant("Ti/4", image_size=32, num_classes=10, embed_dim=48, depth=2, num_heads=3)
        source_state, mean, std = VisionTransformer(source_config).state_dict(), (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    else:
        if not args.pretrained:
            parser.error("--pretrained is required (run benchmarks/pretrain_cifar10.py first), or use --smoke")
        from workflows.tracking import load_plain_model

        plain = load_plain_model(args.tracking_uri, args.pretrained)
        source_config, source_state = plain.config, plain.state_dict
        mean, std = tuple(plain.preprocessing["mean"]), tuple(plain.preprocessing["std"])

    rows = []
    for size in args.image_sizes:
        data = DataConfig(batch_size=args.batch_size, num_workers=1, image_size=size, crop_scale=(0.35, 1.0),
                          crop_pct=1.0, mean=mean, std=std)
        target = source_config.replace(image_size=size, num_classes=num_classes)
        test = eval_loader(shards, data, rank=0, world_size=1, split="test")
        for arm, lrs in (("pre-trained", args.finetune_lrs), ("scratch", args.scratch_lrs)):
            trials = []
            for lr in lrs:
                torch.manual_seed(0)
                if arm == "pre-trained":
                    model = prepare_finetune_model(source_state, source_config, image_size=size, num_classes=num_classes)
                    optim = paper_finetune_optim(lr, warmup_steps=max(args.steps // 10, 1))
                else:
                    model = VisionTransformer(target)
                    optim = OptimConfig(optimizer="adamw", lr=lr, weight_decay=0.05, warmup_steps=max(args.steps // 10, 1))
                trials.append({"lr": lr, **finetune_arm(model, shards, data, args.steps, optim, args.precision)})
            best = max(trials, key=lambda t: t["val_top1"])
            top1 = evaluate(best["model"], test, precision=args.precision)["top1"]
            row = {"image_size": size, "arm": arm, "lr": best["lr"], "val_top1": round(best["val_top1"], 4),
                   "test_top1": round(top1, 4), "gflops": round(gflops(target), 3), "seconds": round(best["seconds"], 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    best_size = max(args.image_sizes, key=lambda s: next(r["test_top1"] for r in rows if r["image_size"] == s and r["arm"] == "pre-trained"))
    pre = next(r["test_top1"] for r in rows if r["image_size"] == best_size and r["arm"] == "pre-trained")
    scratch = next(r["test_top1"] for r in rows if r["image_size"] == best_size and r["arm"] == "scratch")
    summary = {"rows": rows, "best_resolution": best_size, "pretrained_minus_scratch_points": round(100 * (pre - scratch), 1),
               "steps": args.steps, "batch_size": args.batch_size}
    (args.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"best resolution {best_size} px: pre-trained {pre:.1%} vs scratch {scratch:.1%} "
          f"({100 * (pre - scratch):+.1f} points; target >= +10)")


if __name__ == "__main__":
    main()
