"""Knowledge distillation at toy scale: does a teacher fine-tuned at a higher resolution help a student
fine-tuned on Flowers-17 at a lower one, for the same steps? (DeiT, Section 5: a stronger teacher's hard
labels help a ViT student.)

1. The teacher: the pre-trained model fine-tuned with the paper's recipe at ``--teacher-size`` (the higher
   resolution, which transfer_flowers.py found best), scored on the test split.
2. The students, from the same pre-trained model at ``--student-size``, the same steps, learning rate and
   seeds: without a teacher, and with each ``--kinds`` of distillation from it (the teacher sees each
   augmented batch at its own resolution). Each is scored on the test split.

Printed: every run, then each arm's mean test top-1 over the seeds and its difference to the students
without a teacher (the same seeds: a paired difference).

    python -m benchmarks.distill_flowers --pretrained models:/vit-pretrained/2 \
        --tracking-uri sqlite:///benchmarks/.work/pretrain_cifar10/mlflow.db
    python -m benchmarks.distill_flowers --pretrained-checkpoint \
        benchmarks/.work/recipes_cifar10/checkpoints/baseline/step-001532   # a recipe benchmark's model
    python -m benchmarks.distill_flowers --smoke   # a random "pre-trained" model, a few steps: checks the script
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.corpora import flowers17_shards
from benchmarks.machine import header
from vit import VisionTransformer, decode_variant
from vit.data import DataConfig, eval_loader, train_loader
from vit.distill import DistillConfig, Teacher
from vit.finetune import paper_finetune_optim, prepare_finetune_model
from vit.loop import TrainConfig, evaluate, fit

REPO = Path(__file__).resolve().parents[1]


def finetune(source_state, source_config, shards: Path, size: int, num_classes: int, args, *, seed: int,
             mean, std, teacher: Teacher | None = None, distill: DistillConfig | None = None) -> dict:
    """Fine-tune from the pre-trained weights at ``size``; the test split's top-1 and the seconds it took."""
    data = DataConfig(batch_size=args.batch_size, num_workers=1, image_size=size, crop_scale=(0.35, 1.0),
                      crop_pct=1.0, mean=mean, std=std, seed=seed)
    torch.manual_seed(seed)
    model = prepare_finetune_model(source_state, source_config, image_size=size, num_classes=num_classes)
    config = TrainConfig(total_steps=args.steps, log_every=max(args.steps // 5, 1), precision=args.precision, seed=seed,
                         optim=paper_finetune_optim(args.lr, warmup_steps=max(args.steps // 10, 1)), distill=distill)
    start = time.monotonic()
    fit(model, train_loader(shards, data, rank=0, world_size=1), None, config, report=lambda *a, **k: None,
        teacher=teacher)
    seconds = time.monotonic() - start
    test = evaluate(model, eval_loader(shards, data, rank=0, world_size=1, split="test"), precision=args.precision)
    return {"model": model, "test_top1": test["top1"], "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", help="a registered pre-trained model (benchmarks/pretrain_cifar10.py makes one)")
    parser.add_argument("--pretrained-checkpoint", type=Path,
                        help="instead of --pretrained: a training checkpoint folder of vit.loop.fit, e.g. "
                             "benchmarks/recipes_cifar10.py's (benchmarks/.work/recipes_cifar10/checkpoints/ARM/step-NNNNNN); "
                             "its raw weights, normalised with CIFAR-10's mean and std as that script trains")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{REPO / 'benchmarks/.work/pretrain_cifar10/mlflow.db'}")
    parser.add_argument("--teacher-size", type=int, default=64)
    parser.add_argument("--student-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.03, help="SGD lr of the teacher and every student")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kinds", nargs="+", default=["hard", "soft"], choices=["hard", "soft"])
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0, help="soft distillation's T")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / ".work" / "distill_flowers")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    print(header(args.precision), flush=True)
    if args.smoke:
        args.steps, args.seeds, args.teacher_size, args.student_size = 4, [0], 48, 32
    args.workdir.mkdir(parents=True, exist_ok=True)
    shards = flowers17_shards(args.workdir / "shards", max_size=max(args.teacher_size, args.student_size) + 16)
    num_classes = len(json.loads((shards / "dataset.json").read_text())["class_names"])
    if args.smoke:
        source_config = decode_variant("Ti/4", image_size=32, num_classes=10, embed_dim=48, depth=2, num_heads=3)
        source_state, mean, std = VisionTransformer(source_config).state_dict(), (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    elif args.pretrained_checkpoint:
        from benchmarks.recipes_cifar10 import CIFAR_MEAN, CIFAR_STD
        from vit.checkpoint import model_from_checkpoint

        source = model_from_checkpoint(args.pretrained_checkpoint)
        source_config, source_state, mean, std = source.config, source.state_dict(), CIFAR_MEAN, CIFAR_STD
    else:
        if not args.pretrained:
            parser.error("--pretrained (or --pretrained-checkpoint) is required (run benchmarks/pretrain_cifar10.py "
                         "first), or use --smoke")
        from workflows.tracking import load_plain_model

        plain = load_plain_model(args.tracking_uri, args.pretrained)
        source_config, source_state = plain.config, plain.state_dict
        mean, std = tuple(plain.preprocessing["mean"]), tuple(plain.preprocessing["std"])
    common = dict(mean=mean, std=std)

    taught = finetune(source_state, source_config, shards, args.teacher_size, num_classes, args, seed=args.seeds[0], **common)
    teacher = Teacher(taught["model"], image_size=(args.teacher_size, args.teacher_size))
    rows = [{"arm": f"teacher at {args.teacher_size} px", "seed": args.seeds[0],
             "test_top1": round(taught["test_top1"], 4), "seconds": round(taught["seconds"], 1)}]
    print(json.dumps(rows[-1]), flush=True)
    arms = [("no teacher", None)] + [
        (f"{kind} distillation", DistillConfig(teacher=f"teacher at {args.teacher_size} px", kind=kind, alpha=args.alpha,
                                               temperature=args.temperature if kind == "soft" else 1.0))
        for kind in args.kinds]
    for arm, distill in arms:
        for seed in args.seeds:
            result = finetune(source_state, source_config, shards, args.student_size, num_classes, args, seed=seed,
                              teacher=teacher if distill else None, distill=distill, **common)
            rows.append({"arm": f"student at {args.student_size} px, {arm}", "seed": seed,
                         "test_top1": round(result["test_top1"], 4), "seconds": round(result["seconds"], 1)})
            print(json.dumps(rows[-1]), flush=True)

    def scores(arm: str) -> list[float]:
        return [row["test_top1"] for row in rows if row["arm"] == f"student at {args.student_size} px, {arm}"]

    alone = scores("no teacher")
    summary = {"rows": rows, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seeds": args.seeds,
               "alpha": args.alpha, "temperature": args.temperature, "arms": {}}
    print(f"teacher ({args.teacher_size} px): {taught['test_top1']:.1%} test top-1")
    for arm, _ in arms:
        values = scores(arm)
        paired = [100 * (v - a) for v, a in zip(values, alone)]
        summary["arms"][arm] = {"mean_test_top1": round(statistics.mean(values), 4),
                                "points_vs_no_teacher": round(statistics.mean(paired), 2)}
        spread = f" (per seed {', '.join(f'{p:+.1f}' for p in paired)})" if arm != "no teacher" else ""
        print(f"student ({args.student_size} px), {arm}: {statistics.mean(values):.1%} mean over seeds {args.seeds}; "
              f"{statistics.mean(paired):+.1f} points vs no teacher{spread}")
    (args.workdir / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
