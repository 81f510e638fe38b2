"""The cost of Ray Train: the same training steps through a plain in-process loop and through a 1-worker
TorchTrainer (the pre-training stage as users run it), on the same CIFAR-10 shards. Prints img/s and
the ratio TorchTrainer / plain (target >= 0.9).

Start-up (Ray, the worker group, imports) is excluded: both sides are measured from the img/s that
``vit.loop.fit`` reports over its logging windows, the first window (warm-up) dropped, the median kept.

    python benchmarks/pretrain_overhead.py             # Ti/4 depth 6, 32 px, precision auto, batch 128
    python benchmarks/pretrain_overhead.py --smoke     # a tiny model, seconds: checks the script runs
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient

from benchmarks.corpora import cifar10_shards
from benchmarks.machine import header
from vit import VisionTransformer
from vit.data import eval_loader, train_loader
from vit.loop import fit
from workflows.stages.pretrain import PretrainConfig, run_pretrain

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def settings(args, shards: Path, work: Path) -> PretrainConfig:
    model = {"variant": "Ti/4", "image_size": 32, "depth": 6}
    if args.smoke:
        model.update(embed_dim=48, depth=2, num_heads=3)
    return PretrainConfig.model_validate({
        "name": "overhead",
        "dataset": str(shards),
        "model": model,
        "data": {"batch_size": args.batch_size, "num_workers": 1, "mean": CIFAR_MEAN, "std": CIFAR_STD, "crop_scale": (0.5, 1.0)},
        "train": {"total_steps": args.steps, "log_every": args.log_every, "precision": args.precision,
                  "optim": {"lr": 1e-3, "warmup_steps": 5}},
        "resources": {"num_workers": 1, "cpus_per_worker": args.cpus},
        "storage_path": str(work / "runs"),
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "overhead"},
        "register_as": None,
    })


def steady_rate(rates: list[float]) -> float:
    return statistics.median(rates[1:] if len(rates) > 2 else rates)


def plain(config: PretrainConfig) -> float:
    index_classes = len(train_loader(config.dataset, config.data, rank=0, world_size=1).class_names)
    model = VisionTransformer(config.model.build(num_classes=index_classes))
    rates: list[float] = []

    def report(step, metrics, checkpoint_dir=None):
        if "train/images_per_sec" in metrics:
            rates.append(metrics["train/images_per_sec"])

    train = train_loader(config.dataset, config.data, rank=0, world_size=1)
    val = eval_loader(config.dataset, config.data, rank=0, world_size=1)
    fit(model, train, val, config.train, report=report)
    return steady_rate(rates[:-1])  # the last window includes the final evaluation's set-up


def through_ray(config: PretrainConfig) -> float:
    result = run_pretrain(config)
    history = MlflowClient(config.tracking.uri).get_metric_history(result.run_id, "train/images_per_sec")
    return steady_rate([m.value for m in sorted(history, key=lambda m: m.step)][:-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 where the CPU/GPU does it natively, else fp32")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the Ray worker (= torch threads)")
    parser.add_argument("--train-rows", type=int, default=20000)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    print(header(args.precision), flush=True)
    if args.smoke:
        args.steps, args.log_every, args.batch_size, args.train_rows = 12, 3, 32, 2000
    work = Path(tempfile.mkdtemp(prefix="vitflow-overhead-"))
    shards = cifar10_shards(work / "shards", train_rows=args.train_rows, test_rows=1000)
    config = settings(args, shards, work)
    ray.init(num_cpus=args.cpus, include_dashboard=True, logging_level="WARNING")
    try:
        plain_rate = plain(config)
        ray_rate = through_ray(config)
    finally:
        ray.shutdown()
    print(f"model {config.model.variant} depth {config.model.build(num_classes=10).depth}, batch {args.batch_size}, "
          f"{args.precision}, {args.steps} steps, log windows of {args.log_every}")
    print(f"plain loop           {plain_rate:8.1f} img/s")
    print(f"1-worker TorchTrainer {ray_rate:7.1f} img/s")
    print(f"ratio TorchTrainer/plain {ray_rate / plain_rate:.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
