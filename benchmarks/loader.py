"""vitflow's shard loader against WebDataset's own pipeline, on the same shards with the same transforms,
batch size and loader workers. Prints img/s of each and the ratio vitflow / WebDataset (target >= 1.0),
for 0 and 2 loader workers.

The WebDataset side is the pipeline its documentation shows: ``wds.WebDataset(urls).shuffle(n)
.decode("pil").to_tuple("jpg", "cls").map(transform).batched(b)`` read through ``wds.WebLoader``, with
each image turned into the same uint8 tensor vitflow decodes to and passed through vitflow's own training
transform (random-resized crop, flip, normalise). The two are read in alternating rounds (a full pass over
the training split each), so drifts in machine load hit both; the figure is the median.

    python -m benchmarks.loader                 # 10,000 CIFAR-10 images, batch 128, 5 rounds
    python -m benchmarks.loader --smoke         # 1,000 images, 1 round: checks the script runs
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds
from torchvision.transforms import v2

from benchmarks.corpora import cifar10_shards
from benchmarks.machine import header
from vit.data import DataConfig, read_dataset_index, train_loader
from vit.data.transforms import train_transform

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def vitflow_pass(shards: Path, config: DataConfig) -> float:
    loader = train_loader(shards, config, rank=0, world_size=1)
    start, seen = time.perf_counter(), 0
    for batch in loader.epoch(0):
        seen += batch.images.shape[0]
    return seen / (time.perf_counter() - start)


def webdataset_pass(shards: Path, config: DataConfig) -> float:
    index = read_dataset_index(shards)
    urls = [entry.url for entry in index.split("train").shards]
    transform = train_transform(config)

    def sample(item):
        image, label = item
        return transform(v2.functional.pil_to_tensor(image.convert("RGB"))), int(label)

    def collate(samples):
        images, labels = zip(*samples)
        return torch.stack(images), torch.tensor(labels, dtype=torch.int64)

    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.single_node_only,
                              workersplitter=wds.split_by_worker, empty_check=False)
               .shuffle(config.shuffle_buffer).decode("pil").to_tuple("jpg", "cls").map(sample)
               .batched(config.batch_size, collation_fn=collate, partial=True))
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=config.num_workers)
    start, seen = time.perf_counter(), 0
    for images, _ in loader:
        seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000, help="CIFAR-10 training rows to shard")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--smoke", action="store_true", help="1,000 images, 1 round")
    parser.add_argument("--tmp", default=None, help="where to write the shards (default: a temp folder)")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.rounds = 1_000, 1
    print(header())
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        shards = cifar10_shards(Path(tmp) / "cifar10", train_rows=args.images, test_rows=100, val_fraction=0.0)
        num = read_dataset_index(shards).split("train").num_samples
        print(f"{num:,} images in {len(read_dataset_index(shards).split('train').shards)} shards, "
              f"batch {args.batch_size}, {args.rounds} rounds (medians, alternating order)")
        print(f"{'workers':>7} {'vitflow img/s':>13} {'webdataset img/s':>16} {'ratio':>6}")
        for workers in args.workers:
            config = DataConfig(batch_size=args.batch_size, num_workers=workers, image_size=32, crop_scale=(0.35, 1.0),
                                crop_pct=1.0, mean=CIFAR_MEAN, std=CIFAR_STD)
            rates: dict[str, list[float]] = {"vitflow": [], "webdataset": []}
            for round_index in range(args.rounds + 1):  # round 0 warms the page cache and is dropped
                order = [("vitflow", vitflow_pass), ("webdataset", webdataset_pass)]
                for name, run in order if round_index % 2 == 0 else reversed(order):
                    rate = run(shards, config)
                    if round_index:
                        rates[name].append(rate)
            ours, theirs = statistics.median(rates["vitflow"]), statistics.median(rates["webdataset"])
            print(f"{workers:>7} {ours:>13,.0f} {theirs:>16,.0f} {ours / theirs:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
