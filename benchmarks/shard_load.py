"""Sharding under load: 200,000 tiny generated images. Prints the peak RSS of the driver and of each Ray
worker, whether memory stays flat over the run, and the throughput of the first vs the last 10%.

    flock /tmp/vitflow-ray.lock python benchmarks/shard_load.py --tmp /dev/shm   # 200,000 8x8 PNGs, 2 Ray workers
    python benchmarks/shard_load.py --images 20000 --workers 0            # a quick look, no Ray
    flock /tmp/vitflow-ray.lock python benchmarks/shard_load.py --source parquet   # one HF-layout table

The corpus is generated under a temporary folder (removed afterwards unless --keep): an image folder of
``--images`` 8x8 RGB PNGs of random pixels in 10 class folders, or the same images as rows of one Parquet
file in the Hugging Face layout. ``--shard-samples`` (default 2,000: 100 shards) sets how finely progress
is seen. Generating the corpus is not timed.

Throughput over time: each shard task writes its receipt (``OUT/.vitflow/<split>-NNNNNN.json``) the moment
its shard is finished, so the receipts' mtimes, sorted, give images finished against time. The first 10%
is the first tenth of the shards to finish, the last 10% the last tenth; each rate is the images of that
tenth (less its first shard) over the time from its first to its last finish, so Ray's start and the
workers' torch import are not counted against the first tenth. The ratio last/first is what the issue
bounds (within 10%: 0.9-1.1). Wall-clock rates move with whatever else the machine runs, so the same
ratio is also given per CPU-second of this process (``--workers 0`` only), which other load hardly moves.
With Ray workers that figure is not printed: sampling the workers' CPU through /proc proved unreliable
(ratios of 0.8 and 3.4 in two runs whose wall-clock ratios were 0.58 and 1.00); use an idle machine.

Memory: a thread samples VmRSS of this process and of every descendant (raylet, GCS, Ray workers) from
/proc every 0.25 s; peaks are VmHWM where the process still exists at the end, else the highest sample.
"Flat" compares the mean RSS in the first and the last tenth of the sharding time (the final step that
writes manifest.parquet is reported apart: it holds every sample's row at once).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 10


def generate_folder(root: Path, count: int, size: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for label in range(CLASSES):
        (root / f"class_{label:02d}").mkdir(parents=True)
    pixels = rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)
    for index in range(count):
        Image.fromarray(pixels[index]).save(root / f"class_{index % CLASSES:02d}" / f"img_{index:07d}.png")
    return root


def generate_parquet(root: Path, count: int, size: int, seed: int = 0) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)
    images = []
    for index in range(count):
        buffer = io.BytesIO()
        Image.fromarray(pixels[index]).save(buffer, "PNG")
        images.append({"bytes": buffer.getvalue(), "path": f"img_{index:07d}.png"})
    names = [f"class_{k:02d}" for k in range(CLASSES)]
    metadata = {"huggingface": json.dumps({"info": {"features": {"label": {"names": names}}}})}
    table = pa.table({"image": images, "label": [i % CLASSES for i in range(count)]}).replace_schema_metadata(metadata)
    root.mkdir(parents=True)
    pq.write_table(table, root / "train-00000-of-00001.parquet", row_group_size=10_000)
    return root


def _status(pid: int) -> dict[str, int]:
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    fields[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return fields


def _cpu_seconds(pid: int) -> float:
    """user + system CPU time of one process so far (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _descendants(root: int) -> dict[int, str]:
    """pid -> name of every descendant of ``root`` (by /proc's parent links)."""
    parent_of, name_of = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    stat = handle.read()
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            parent_of[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
            name_of[int(entry)] = cmdline[:60] or stat[stat.index("(") + 1 : stat.rindex(")")]
    found, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parent_of.items():
            if parent == pid and child not in found:
                found[child] = name_of[child]
                frontier.append(child)
    return found


class MemorySampler(threading.Thread):
    """Samples (time, driver RSS, {pid: RSS}) of this process tree until stopped."""

    def __init__(self, every_s: float = 0.25, *, children: bool = True):
        super().__init__(daemon=True)
        self.every_s, self.children, self.samples, self.names, self.peaks = every_s, children, [], {}, {}
        self._finished = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._finished.is_set():
            children = _descendants(me) if self.children else {}
            self.names.update(children)
            rss = {pid: _status(pid).get("VmRSS", 0) for pid in children}
            for pid, value in rss.items():
                self.peaks[pid] = max(self.peaks.get(pid, 0), value)
            # Less this thread's own CPU: walking /proc costs more the more processes the machine runs.
            cpu_of = {pid: _cpu_seconds(pid) for pid in children}
            cpu = _cpu_seconds(me) + sum(cpu_of.values()) - time.thread_time()
            # The processes that shard: Ray workers (they retitle themselves ray::...), else this one.
            shard_cpu = sum(v for pid, v in cpu_of.items() if children[pid].startswith("ray::")) if self.children else cpu
            self.samples.append((time.time(), _status(me).get("VmRSS", 0), rss, cpu, shard_cpu))
            self._finished.wait(self.every_s)

    def stop(self) -> None:
        for pid in list(self.names):  # VmHWM catches peaks between samples, for processes still alive
            self.peaks[pid] = max(self.peaks.get(pid, 0), _status(pid).get("VmHWM", 0))
        self._finished.set()
        self.join()


def decile_rates(receipts: list[tuple[float, int]], clock=lambda moment: moment) -> tuple[float, float]:
    """(images per second of the first tenth of the shards to finish, of the last tenth), seconds as
    ``clock`` counts them at each finish: wall time by default; see the module docstring."""
    n = len(receipts)
    k = max(2, n // 10)
    first, last = receipts[:k], receipts[-k:]

    def rate(part: list[tuple[float, int]]) -> float:
        return sum(samples for _, samples in part[1:]) / max(clock(part[-1][0]) - clock(part[0][0]), 1e-9)

    return rate(first), rate(last)


def mib(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=8, help="image side in pixels")
    parser.add_argument("--source", choices=["folder", "parquet"], default="folder")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers; 0: in this process, no Ray")
    parser.add_argument("--shard-samples", type=int, default=2_000)
    parser.add_argument("--keep", action="store_true", help="keep the generated corpus and shards")
    parser.add_argument("--tmp", help="where to generate the corpus and write shards (default: the system's "
                        "temp folder; /dev/shm keeps disk speed out of it, and deleting 200,000 files fast)")
    args = parser.parse_args()

    from pipeline import ShardConfig, write_shards

    base = Path(tempfile.mkdtemp(prefix="vitflow-shard-load-", dir=args.tmp))
    try:
        started = time.perf_counter()
        make = generate_folder if args.source == "folder" else generate_parquet
        source = make(base / "corpus", args.images, args.size)
        print(f"generated {args.images:,} {args.size}x{args.size} PNGs as an image {args.source} in "
              f"{time.perf_counter() - started:.0f} s under {base}")

        os.environ.setdefault("RAY_TMPDIR", str(base / "ray"))
        out = base / "shards"
        sampler = MemorySampler()
        sampler.start()
        begin = time.time()
        result = write_shards(source, out, ShardConfig(max_shard_samples=args.shard_samples),
                              workers=args.workers, progress=False)
        end = time.time()
        sampler.stop()
        driver_peak = _status(os.getpid()).get("VmHWM", 0)

        receipts = sorted(
            (p.stat().st_mtime, json.loads(p.read_text())["shard"]["num_samples"])
            for p in (out / ".vitflow").glob("*.json")
        )
        sharding_end = receipts[-1][0]  # after it: assembling the manifests
        first_rate, last_rate = decile_rates(receipts)

        def cpu_at(moment: float) -> float:  # CPU seconds of the process tree at the sample nearest ``moment``
            return min(sampler.samples, key=lambda sample: abs(sample[0] - moment))[3]

        first_cpu, last_cpu = decile_rates(receipts, cpu_at)

        def shard_cpu_at(moment: float) -> float:
            return min(sampler.samples, key=lambda sample: abs(sample[0] - moment))[4]

        first_worker, last_worker = decile_rates(receipts, shard_cpu_at)
        print(f"sharded {result.num_sharded:,} of {result.num_inputs:,} inputs into {len(receipts)} shards in "
              f"{result.seconds:.1f} s ({result.images_per_second:,.0f} images/s overall, Ray start included)")
        print(f"throughput: first 10% {first_rate:,.0f} images/s, last 10% {last_rate:,.0f} images/s, "
              f"ratio last/first {last_rate / first_rate:.3f} (wall clock)")
        if args.workers == 0:  # with Ray, the /proc walk misses short-lived samples of workers: not reliable yet
            print(f"per CPU-second of this process tree: first 10% {first_cpu:,.0f} images, last 10% {last_cpu:,.0f} "
                  f"images, ratio last/first {last_cpu / first_cpu:.3f} (what other load on the machine does not move)")
            print(f"per CPU-second of the processes that shard ({'Ray workers' if args.workers else 'this one'}): first 10% "
                  f"{first_worker:,.0f} images, last 10% {last_worker:,.0f} images, ratio last/first "
                  f"{last_worker / first_worker:.3f} (idle time at the run's ends does not count either)")

        window = (receipts[0][0], sharding_end)  # from the first finished shard to the last
        tenth = (window[1] - window[0]) / 10

        def mean_rss(pick, lo: float, hi: float) -> float:
            values = [pick(s) for s in sampler.samples if lo <= s[0] <= hi]
            return statistics.fmean(values) if values else float("nan")

        def driver(sample) -> int:
            return sample[1]

        def is_worker(pid: int) -> bool:  # Ray workers retitle themselves ray::IDLE, ray::<task>
            return sampler.names.get(pid, "").startswith("ray::")

        def workers(sample) -> int:
            return sum(v for pid, v in sample[2].items() if is_worker(pid))

        for label, pick in (("driver", driver), ("Ray workers (sum)", workers)):
            if label != "driver" and args.workers == 0:
                continue
            early = mean_rss(pick, window[0], window[0] + tenth)
            late = mean_rss(pick, window[1] - tenth, window[1])
            print(f"{label}: mean RSS first 10% {mib(early)}, last 10% {mib(late)} (x{late / early:.2f})")
        assembly = [s[1] for s in sampler.samples if s[0] >= sharding_end]
        print(f"driver peak RSS {mib(driver_peak)}; while writing the manifests {mib(max(assembly, default=0))}; "
              f"sharding took {sharding_end - begin:.1f} s, the manifests {end - sharding_end:.1f} s")
        workers_seen = {pid: peak for pid, peak in sampler.peaks.items() if is_worker(pid)}
        if workers_seen:
            print(f"Ray workers: {len(workers_seen)}, peak RSS each: "
                  + ", ".join(mib(p) for p in sorted(workers_seen.values(), reverse=True)[:6]))
        others = {sampler.names[pid].split()[0].rsplit("/", 1)[-1]: peak for pid, peak in sampler.peaks.items()
                  if pid not in workers_seen}
        if others:
            print("other processes (peak RSS): " + ", ".join(f"{name} {mib(p)}" for name, p in sorted(others.items())))
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
