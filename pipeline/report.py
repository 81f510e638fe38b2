"""What a sharding run shows on the terminal: a live progress bar and the summary table at the end."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:  # only for annotations: shards imports this module
    from pipeline.shards import ShardResult


class _ImagesPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} img/s" if task.speed else "- img/s", style="progress.data.speed")


class ShardProgress:
    """Images handled (with images/s) and shards done; silent when ``enabled`` is false."""

    def __init__(self, total_images: int, total_shards: int, *, enabled: bool = True) -> None:
        self._total_shards = total_shards
        self._shards_done = 0
        self._progress = Progress(
            TextColumn("[bold]sharding"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("images"),
            _ImagesPerSecond(),
            TextColumn("{task.fields[shards]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not enabled,
            speed_estimate_period=10.0,
        )
        self._task = self._progress.add_task("sharding", total=total_images, shards=self._shards_text())

    def _shards_text(self) -> str:
        return f"{self._shards_done}/{self._total_shards} shards"

    def advance(self, images: int) -> None:
        self._progress.update(self._task, advance=images)

    def shard_done(self) -> None:
        self._shards_done += 1
        self._progress.update(self._task, shards=self._shards_text())

    def __enter__(self) -> ShardProgress:
        self._progress.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:  # progress messages may still be in flight when the last shard lands
            self._progress.update(self._task, completed=self._progress.tasks[0].total)
        self._progress.stop()


def summary_table(result: ShardResult) -> Table:
    """Per split: samples, shards, bytes; then inputs, quarantine reasons and throughput."""
    info = result.info
    table = Table(title=f"{info.root}  ({info.num_classes} classes)", title_justify="left")
    for column in ("split", "samples", "shards", "MiB", "built", "reused"):
        table.add_column(column, justify="left" if column == "split" else "right")
    built, reused = set(result.built), set(result.reused)
    for name, split in info.splits.items():
        paths = {s.path for s in split.shards}
        table.add_row(
            name,
            f"{split.num_samples:,}",
            str(len(split.shards)),
            f"{sum(s.bytes for s in split.shards) / 2**20:,.1f}",
            str(len(paths & built)),
            str(len(paths & reused)),
        )
    reasons = ", ".join(f"{reason} {n}" for reason, n in result.quarantined.items()) or "none"
    table.caption = (
        f"inputs {result.num_inputs:,} = sharded {result.num_sharded:,} + quarantined {result.num_quarantined:,} ({reasons})\n"
        f"{result.seconds:,.1f} s, {result.images_per_second:,.0f} images/s; fingerprint {info.fingerprint[:16]}"
    )
    table.caption_justify = "left"
    return table
