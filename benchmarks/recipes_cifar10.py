"""The named recipes on CIFAR-10 from scratch: the same model, the same epochs, the same learning-rate
schedule; each arm differs only in what its recipe sets (augmentation, regularisation, weight decay,
clipping, EMA). Arms: the baseline (benchmarks/pretrain_cifar10.py's settings: crop, flip, label smoothing
0.1, AdamW wd 0.05) and each recipe of `vitflow recipe list`.

Every arm keeps a weight EMA and is evaluated twice, raw and averaged: the recipe's own EMA where it sets
one (deit), else an observer with decay 0.999 and TensorFlow's warm-up. An EMA only watches: it is updated
after the optimiser step, consumes no random numbers and never feeds back, so the raw weights train exactly
as without it, and one run gives both "the arm" and "the arm + EMA" (the issue's "vs + EMA" column).

Each recipe's settings are resolved exactly as a spec's `pretrain: {recipe: NAME, ...}` section resolves
them (``workflows.configs.PretrainSettings``), with the benchmark's budget over them: the model size, batch
size, epochs, and the learning rate and its schedule (the recipes' own lrs are for batches of 1024-4096;
one schedule for all keeps the comparison about what the recipes add). Training is ``vit.loop.fit`` in this
process (no Ray: the comparison is of recipes, and the stage's start-up costs would be the same in every arm).

Printed: per arm, validation top-1 after every epoch, the test split's top-1 at the end (the raw weights,
and the EMA's where one is kept), the seconds it took; a markdown table at the end, for docs/RESULTS.md.
Each arm is checkpointed after every epoch (the last checkpoint kept), so ``--resume`` can take a long
arm across interruptions; a resumed arm trains exactly as an uninterrupted one would (``vit.loop.fit``'s
exact resume), and its minutes are the sum of its runs'.

    python -m benchmarks.recipes_cifar10 --epochs 10                  # about 50 minutes an arm on 2 Zen 4 cores
    python -m benchmarks.recipes_cifar10 --arms baseline deit --epochs 10
    python -m benchmarks.recipes_cifar10 --arms paper --epochs 10 --resume  # go on where a stopped run left off
    python -m benchmarks.recipes_cifar10 --smoke                      # a tiny model, 1 epoch of a subset
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from benchmarks.corpora import cifar10_shards
from benchmarks.machine import header
from vit import VisionTransformer
from vit.checkpoint import model_from_checkpoint
from vit.data import eval_loader, train_loader
from vit.ema import EMA_PREFIX
from vit.loop import evaluate, fit
from workflows.configs import PretrainSettings
from workflows.recipes import load_recipe, recipe_names

REPO = Path(__file__).resolve().parents[1]
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
OBSERVER_EMA = {"decay": 0.999, "warmup": True}


def section(arm: str, args, batches_per_epoch: int) -> PretrainSettings:
    """The arm's pre-training section, resolved as a spec's would be."""
    steps = args.epochs * batches_per_epoch
    model = ({"variant": "Ti/4", "image_size": 32, "embed_dim": 96, "depth": 2, "num_heads": 3} if args.smoke
             else {"variant": "Ti/4", "image_size": 32, "depth": 6})
    data = {"batch_size": args.batch_size, "num_workers": 1, "shuffle_buffer": 2000, "crop_scale": [0.75, 1.0],
            "seed": args.seed,  # the data's order and augmentation: a second --seed is a second run in every way
            "crop_pct": 1.0, "mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)}
    train = {"total_steps": steps, "log_every": max(batches_per_epoch // 4, 1), "eval_every": batches_per_epoch,
             "checkpoint_every": batches_per_epoch,
             "precision": args.precision, "seed": args.seed,
             "optim": {"lr": args.lr, "warmup_steps": max(steps // 20, 1), "min_lr_ratio": 0.01}}
    fields = {"model": model, "data": data, "train": train}
    if arm == "baseline":
        train["label_smoothing"] = 0.1
        train["optim"]["weight_decay"] = 0.05
    else:
        fields["recipe"] = arm
    settings = PretrainSettings.model_validate(fields)
    if settings.train.ema is None:  # an observer: see the module's docstring
        train["ema"] = OBSERVER_EMA
        settings = PretrainSettings.model_validate(fields)
    return settings


def settings_dict(settings: PretrainSettings) -> dict:
    # through JSON: the form a progress file holds (tuples as lists)
    return json.loads(json.dumps({"data": settings.data.to_dict(), "train": settings.train.to_dict(),
                                  "model": settings.model.overrides()}))


def differences(before: dict, now: dict, prefix: str = "") -> str:
    """The keys whose values differ, as ``key: before -> now``, dotted; for the refusal to resume."""
    keys = sorted(set(before) | set(now))
    parts = []
    for key in keys:
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            parts.append(differences(a, b, f"{prefix}{key}."))
        elif a != b:
            parts.append(f"{prefix}{key}: {a} -> {b}")
    return ", ".join(part for part in parts if part)


def run_arm(arm: str, shards: Path, args) -> dict:
    # the data settings do not depend on the epoch's length: resolve once to count its batches
    batches = train_loader(shards, section(arm, args, batches_per_epoch=1).data, rank=0, world_size=1).batches_per_epoch
    settings = section(arm, args, batches)
    train = train_loader(shards, settings.data, rank=0, world_size=1)
    val = eval_loader(shards, settings.data, rank=0, world_size=1, split="val")
    test = eval_loader(shards, settings.data, rank=0, world_size=1, split="test")
    model = VisionTransformer(settings.model.build(num_classes=train.num_classes), seed=args.seed)
    curve = []

    checkpoints = args.workdir / "checkpoints" / arm
    progress_file = checkpoints / "progress.json"
    identity = {"epochs": args.epochs, "settings": settings_dict(settings)}
    resume_from, earlier_s = None, 0.0
    if args.resume and progress_file.is_file():
        progress = json.loads(progress_file.read_text())
        if progress["identity"] != identity:
            raise SystemExit(f"--resume: {checkpoints} holds a run of {arm} with other settings "
                             f"({differences(progress['identity'], identity)}); run without --resume to start over")
        resume_from = checkpoints / f"step-{progress['step']:06d}"
        if not resume_from.is_dir():
            raise SystemExit(f"--resume: {progress_file} names {resume_from.name}, which is not in {checkpoints}")
        curve, earlier_s = progress["curve"], progress["seconds"]
        print(f"  {arm}: resuming from {resume_from.name} (epoch {progress['step'] / batches:.0f}, "
              f"{earlier_s / 60:.0f} min so far)", flush=True)
    else:
        shutil.rmtree(checkpoints, ignore_errors=True)  # a fresh run of the arm
    started = time.monotonic()

    def report(step, metrics, checkpoint_dir=None):
        if "val/top1" in metrics:
            point = {"epoch": round(step / batches, 2), "val_top1": round(metrics["val/top1"], 4)}
            if f"{EMA_PREFIX}top1" in metrics:
                point["val_ema_top1"] = round(metrics[f"{EMA_PREFIX}top1"], 4)
            curve.append(point)
            print(f"  {arm}: {json.dumps(point)}", flush=True)
        if checkpoint_dir is not None:  # every epoch, after its evaluation: what --resume starts from
            progress = {"identity": identity, "step": step, "curve": curve,
                        "seconds": earlier_s + time.monotonic() - started}
            progress_file.write_text(json.dumps(progress, indent=1))
            for older in checkpoints.glob("step-*"):
                if older.name != Path(checkpoint_dir).name:
                    shutil.rmtree(older)

    fit(model, train, val, settings.train, report=report, checkpoint_dir=checkpoints, resume_from=resume_from)
    seconds = earlier_s + time.monotonic() - started
    row = {"arm": arm, "epochs": args.epochs, "steps": settings.train.total_steps,
           "test_top1": round(evaluate(model, test, precision=args.precision)["top1"], 4),
           "seconds": round(seconds), "curve": curve,
           "settings": settings_dict(settings)}
    final = sorted(checkpoints.glob("step-*"))[-1]
    averaged = model_from_checkpoint(final, weights="ema")
    row["test_ema_top1"] = round(evaluate(averaged, test, precision=args.precision)["top1"], 4)
    row["ema"] = "recipe" if arm != "baseline" and load_recipe(arm).pretrain.get("train", {}).get("ema") else "observer"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=["baseline", *recipe_names()],
                        choices=["baseline", *recipe_names()])
    parser.add_argument("--epochs", type=int, default=None, help="10 (--smoke: 1)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="every arm's peak lr (AdamW; 5% warm-up, cosine)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the model's initial weights, the data's order and augmentation, dropout's draws")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / ".work" / "recipes_cifar10")
    parser.add_argument("--resume", action="store_true",
                        help="go on from an arm's last epoch (its checkpoint) if an earlier run of the same settings "
                             "stopped; the arm's minutes then add up its runs")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny model, 1 epoch (or --epochs) of 2,000 images: checks the script")
    args = parser.parse_args()
    print(header(args.precision), flush=True)
    if args.smoke:
        args.epochs, args.batch_size = args.epochs or 1, 64
    args.epochs = args.epochs or 10
    args.workdir.mkdir(parents=True, exist_ok=True)
    shards = (cifar10_shards(args.workdir / "shards-smoke", train_rows=2000, test_rows=500, val_fraction=0.1)
              if args.smoke else cifar10_shards(args.workdir / "shards"))
    rows = []
    for arm in args.arms:
        print(f"{arm}: training {args.epochs} epochs", flush=True)
        rows.append(run_arm(arm, shards, args))
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("curve", "settings")}), flush=True)
        (args.workdir / "summary.json").write_text(json.dumps(rows, indent=2))  # after every arm: a long run
    print("\n| arm | epochs | test top-1 | + EMA: test top-1 (EMA) | minutes |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['arm']} | {row['epochs']} | {row['test_top1']:.1%} | {row['test_ema_top1']:.1%} ({row['ema']}) "
              f"| {row['seconds'] / 60:.0f} |")


if __name__ == "__main__":
    main()
