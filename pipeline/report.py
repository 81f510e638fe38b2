"""What a sharding run shows on the terminal while it runs: a live progress bar (the summary table at the
end is the CLI's: ``workflows/cli/shard.py``)."""

from __future__ import annotations

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
from rich.text import Text


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
