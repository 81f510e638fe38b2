"""Sharding throughput: vitflow's sharder vs a naive loop, and 1 vs 2 Ray workers. Prints images/s and ratios.

    python benchmarks/shard_throughput.py                      # Flowers-17 to 256 px, 10k CIFAR-10 rows
    python benchmarks/shard_throughput.py --repeats 1 --cifar-rows 2000   # quick look

The naive loop is what one writes first: PIL full decode, convert to RGB, bicubic resize of the shorter
side to 256, JPEG encode, ``webdataset.ShardWriter``; one process. vitflow runs in-process (``workers=0``)
and as Ray tasks with 1 and 2 workers. Ray is started once before the timed runs and its workers are
warmed up (the first task in a fresh worker imports torch), so the Ray figures exclude start-up; the
one cold run, which starts and stops its own Ray, is reported separately. Every run writes to a fresh
folder (a rerun into the same folder would resume and skip everything). Repeats alternate the
contenders, the median is reported: images per second (wall clock), and images per CPU-second of this
process tree (driver, raylet, Ray workers), which other users of a shared machine do not disturb.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from pipeline import ShardConfig, write_shards
from pipeline.sources import open_source

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
SHARDS = 8  # both writers produce the same number of shards


def naive_inputs(source: Path) -> Iterator[tuple[str, bytes, int]]:
    """(identity, bytes, label) for the naive loop; listing and reading are not what is compared."""
    if source.is_dir() and not list(source.glob("*.parquet")):
        for split in sorted(p for p in source.iterdir() if p.is_dir()):
            classes = sorted(p.name for p in split.iterdir() if p.is_dir())
            for label, name in enumerate(classes):
                for file in sorted((split / name).iterdir()):
                    yield f"{split.name}/{name}/{file.name}", file.read_bytes(), label
    else:
        for file in sorted(source.glob("*.parquet")):
            table = pq.read_table(file)
            for row, (image, label) in enumerate(zip(table.column("image").to_pylist(), table.column("label").to_pylist())):
                yield f"{file.name}#{row}", image["bytes"], label


def naive_loop(inputs: list[tuple[str, bytes, int]], out: Path, max_size: int | None) -> int:
    out.mkdir(parents=True)
    count = 0
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=math.ceil(len(inputs) / SHARDS), verbose=0) as sink:
        for index, (identity, data, label) in enumerate(inputs):
            image = Image.open(io.BytesIO(data)).convert("RGB")
            width, height = image.size
            if max_size is not None and min(width, height) > max_size:
                scale = max_size / min(width, height)
                image = image.resize((round(width * scale), round(height * scale)), Image.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=90)
            meta = {"source": identity, "width": width, "height": height, "label": label}
            sink.write({"__key__": f"{index:08d}", "jpg": buffer.getvalue(), "cls": label, "json": meta})
            count += 1
    return count


def cpu_seconds_of_this_process_tree() -> float:
    """user + system CPU of this process and all its descendants (Ray's raylet and workers included).

    Read from /proc, so other users' processes on a shared machine do not count: images per CPU-second
    stays meaningful when wall-clock speed-ups are not (see docs/BENCHMARKS.md).
    """
    ticks = os.sysconf("SC_CLK_TCK")
    parent_of, cpu_of = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
        except OSError:  # the process ended meanwhile
            continue
        parent_of[int(entry)] = int(fields[1])
        cpu_of[int(entry)] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    mine, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, p in parent_of.items() if p == parent and pid not in mine]
        mine.update(children)
        frontier += children
    return sum(cpu_of.get(pid, 0.0) for pid in mine)


def timed(run: Callable[[Path], int], scratch: Path, name: str) -> tuple[float, float]:
    """(images per second, images per CPU-second) of one run into a fresh folder."""
    out = scratch / name
    shutil.rmtree(out, ignore_errors=True)
    cpu, started = cpu_seconds_of_this_process_tree(), time.perf_counter()
    images = run(out)
    seconds, cpu = time.perf_counter() - started, cpu_seconds_of_this_process_tree() - cpu
    shutil.rmtree(out, ignore_errors=True)
    return images / seconds, images / cpu


def cifar_subset(rows: int, into: Path) -> Path:
    into.mkdir(parents=True)
    table = pq.read_table(DATASETS / "cifar10" / "train-00000-of-00001.parquet").slice(0, rows)
    pq.write_table(table, into / "train-00000-of-00001.parquet")  # schema metadata (class names) kept
    return into


def bench(name: str, source: Path, max_size: int | None, repeats: int, scratch: Path) -> dict[str, float]:
    inputs = list(naive_inputs(source))
    config = ShardConfig(max_size=max_size, shard_multiple=SHARDS)
    num = len(inputs)

    def vitflow(workers: int, config: ShardConfig = config) -> Callable[[Path], int]:
        return lambda out: write_shards(open_source(str(source)), out, config, workers=workers, progress=False).num_inputs

    contenders = {
        "naive PIL loop": lambda out: naive_loop(inputs, out, max_size),
        "vitflow in-process": vitflow(0),
        "vitflow Ray, 1 worker": vitflow(1),
        "vitflow Ray, 2 workers": vitflow(2),
    }
    if max_size is not None:
        bilinear = config.model_copy(update={"resample": "bilinear"})
        contenders["vitflow in-process, bilinear"] = vitflow(0, bilinear)
    # Warm-up: Ray workers start and import torch on their first task; files land in the page cache.
    write_shards(open_source(str(source)), scratch / "warm", config.model_copy(update={"limit": 16}), workers=2, progress=False)
    shutil.rmtree(scratch / "warm")
    samples: dict[str, list[tuple[float, float]]] = {key: [] for key in contenders}
    for repeat in range(repeats):
        order = list(contenders) if repeat % 2 == 0 else list(reversed(contenders))
        for key in order:
            samples[key].append(timed(contenders[key], scratch, "run"))
    result = {key: statistics.median(wall for wall, _ in values) for key, values in samples.items()}
    per_cpu = {key: statistics.median(cpu for _, cpu in values) for key, values in samples.items()}
    print(f"\n{name}: {num:,} images, max_size={max_size}, {repeats} repeats (medians)")
    print(f"  {'':<30} {'img/s':>8}  {'range':>13}  {'img/CPU-s':>9}")
    for key, value in result.items():
        spread = f"{min(w for w, _ in samples[key]):,.0f}-{max(w for w, _ in samples[key]):,.0f}"
        print(f"  {key:<30} {value:>8,.0f}  {spread:>13}  {per_cpu[key]:>9,.0f}")
    naive = result["naive PIL loop"]
    two, one = result["vitflow Ray, 2 workers"], result["vitflow Ray, 1 worker"]
    print(f"  vitflow 2 workers / naive, wall clock:      {two / naive:5.2f}x")
    print(f"  vitflow in-process / naive, wall clock:     {result['vitflow in-process'] / naive:5.2f}x")
    print(f"  vitflow in-process / naive, per CPU-second: {per_cpu['vitflow in-process'] / per_cpu['naive PIL loop']:5.2f}x")
    print(f"  2 workers / 1 worker, wall clock:           {two / one:5.2f}x")
    print(
        f"  2 workers / 1 worker, per CPU-second:       {per_cpu['vitflow Ray, 2 workers'] / per_cpu['vitflow Ray, 1 worker']:5.2f}x"
        "  (1.00 = no parallel overhead)"
    )
    return result


def cold_run(source: Path, max_size: int | None, scratch: Path) -> float:
    """One run that starts (and stops) its own local Ray with 2 CPUs: what a fresh `vitflow shard` pays."""
    config = ShardConfig(max_size=max_size, shard_multiple=SHARDS)
    out = scratch / "cold"
    started = time.perf_counter()
    result = write_shards(open_source(str(source)), out, config, workers=2, progress=False)
    seconds = time.perf_counter() - started
    shutil.rmtree(out)
    return result.num_inputs / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cifar-rows", type=int, default=10_000)
    args = parser.parse_args()

    import ray

    scratch = Path(tempfile.mkdtemp(prefix="vitflow-bench-"))
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    try:
        print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")
        cold = cold_run(DATASETS / "flowers17", 256, scratch)
        print(f"Flowers-17 cold (starts its own Ray, 2 workers): {cold:,.0f} img/s")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        bench("Flowers-17 (image folder, resize to 256)", DATASETS / "flowers17", 256, args.repeats, scratch)
        cifar = cifar_subset(args.cifar_rows, scratch / "cifar10")
        bench(f"CIFAR-10 ({args.cifar_rows:,} Parquet rows, 32 px kept)", cifar, None, args.repeats, scratch)
        print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
