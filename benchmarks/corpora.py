"""The sample corpora as shards, for the benchmarks: written once per folder by vitflow's own sharder."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from pipeline import ShardConfig, write_shards

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def cifar10_shards(out: Path, *, train_rows: int | None = None, test_rows: int | None = None,
                   val_fraction: float = 0.02, workers: int = 0) -> Path:
    """CIFAR-10 (all of it, or the first rows of each split) -> shards under ``out``; a rerun verifies
    and reuses finished shards. 2% of train is carved out (stratified) as the validation split."""
    source = DATASETS / "cifar10"
    if train_rows is not None or test_rows is not None:
        subset = out.parent / f"{out.name}-source"
        subset.mkdir(parents=True, exist_ok=True)
        for split, rows in (("train", train_rows), ("test", test_rows)):
            name = f"{split}-00000-of-00001.parquet"
            table = pq.read_table(source / name)
            pq.write_table(table.slice(0, rows) if rows else table, subset / name)
        source = subset
    write_shards(source, out, ShardConfig(val_fraction=val_fraction), workers=workers, progress=False)
    return out


def flowers17_shards(out: Path, *, max_size: int = 96, val_fraction: float = 0.1, workers: int = 0) -> Path:
    """Flowers-17 (train/test folders) resized to ``max_size`` px on the shorter side -> shards."""
    write_shards(DATASETS / "flowers17", out, ShardConfig(max_size=max_size, val_fraction=val_fraction),
                 workers=workers, progress=False)
    return out
