"""`vitflow shard`: shard an image corpus into WebDataset tars, and verify a sharded dataset.

``vitflow shard SOURCE OUT [options]`` is short for ``vitflow shard write SOURCE OUT [options]``;
``vitflow shard verify OUT`` checks one. The commands parse options into a ``ShardConfig`` and call
``pipeline``; heavy imports (torch, ray, pyarrow) happen inside them so ``vitflow --help`` stays fast.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import click
import typer
from typer.core import TyperGroup

from workflows.cli.errors import fail

if TYPE_CHECKING:  # the CLI starts light: the pipeline (and what it imports) loads once inputs check out
    from rich.table import Table

    from pipeline.shards import ShardResult


class _WriteByDefault(TyperGroup):
    """A first argument that is not a subcommand (nor --help) selects ``write``.

    So ``vitflow shard SOURCE OUT`` and ``vitflow shard verify OUT`` both work. A source literally named
    ``verify`` or ``write`` needs the explicit form: ``vitflow shard write ./verify OUT``.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["write", *args]
        return super().parse_args(ctx, args)


shard_app = typer.Typer(
    cls=_WriteByDefault,
    help="Shard image corpora into WebDataset tars (`vitflow shard SOURCE OUT` = `vitflow shard write SOURCE OUT`).",
    no_args_is_help=True,
)

# ShardConfig field -> the option that sets it, so validation errors name what the user typed.
_OPTION_OF = {
    "max_size": "--max-size",
    "resample": "--resample",
    "jpeg_quality": "--quality",
    "keep_formats": "--keep-formats",
    "max_pixels": "--max-pixels",
    "target_shard_bytes": "--shard-size",
    "max_shard_samples": "--shard-samples",
    "shard_multiple": "--shard-multiple",
    "val_fraction": "--val-fraction",
    "seed": "--seed",
    "limit": "--limit",
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "K": 10**3,
    "KB": 10**3,
    "KIB": 2**10,
    "M": 10**6,
    "MB": 10**6,
    "MIB": 2**20,
    "G": 10**9,
    "GB": 10**9,
    "GIB": 2**30,
    "T": 10**12,
    "TB": 10**12,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """``"256MiB"`` -> 268435456; plain numbers are bytes."""
    match = _SIZE.match(text)
    unit = (match.group(2) or "").upper() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"--shard-size {text!r}: expected a size such as 256MiB, 1GB or 100000000")
    return int(float(match.group(1)) * _UNITS[unit])


def _comma_list(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(part.strip() for part in text.split(",") if part.strip())


@shard_app.command("write")
def write(
    source: str = typer.Argument(
        ...,
        help="an image folder, a Parquet file or folder (HF image layout), or a CSV/Parquet manifest table; a local path or URI",
    ),
    out: str = typer.Argument(..., help="output folder or object-store prefix (s3://bucket/path; created; an earlier run there is resumed)"),
    max_size: int | None = typer.Option(None, help="resize so the shorter side is at most this (never upscales)"),
    resample: str = typer.Option("bicubic", help="resize filter: bicubic or bilinear"),
    quality: int = typer.Option(90, help="JPEG quality for re-encoded images"),
    keep_formats: str = typer.Option(
        "jpeg,png,webp", help="encodings kept as-is when no change is due ('' re-encodes all)"
    ),
    max_pixels: int = typer.Option(89_478_485, help="quarantine images with more pixels"),
    shard_size: str = typer.Option("256MiB", help="target shard size"),
    shard_samples: int | None = typer.Option(None, help="at most this many samples per shard"),
    shard_multiple: int = typer.Option(8, help="shard counts are a multiple of this (ranks x loader workers)"),
    val_fraction: float = typer.Option(0.0, help="carve this fraction of train (stratified, seeded) into 'val'"),
    seed: int = typer.Option(0, help="seeds the sample order and the validation carve-out"),
    limit: int | None = typer.Option(None, help="at most this many inputs per split (tiny mode)"),
    source_kind: str = typer.Option("auto", help="auto, folder, parquet or manifest"),
    class_names: str | None = typer.Option(None, help="comma-separated class names (Parquet / manifest sources)"),
    workers: int | None = typer.Option(
        None,
        help="shard tasks at once (default: the Ray cluster's CPUs, followed as nodes join, plus queued tasks "
        "that an autoscaler sees as demand; 0: in this process, no Ray)",
    ),
    address: str | None = typer.Option(None, help="Ray cluster address (default: start a local Ray)"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Shard SOURCE into OUT: OUT/<split>/<split>-NNNNNN.tar plus dataset.json, manifest.parquet, quarantine.parquet."""
    from pydantic import ValidationError

    from pipeline.config import ShardConfig
    from pipeline.sources import SourceError, open_source

    if source_kind not in ("auto", "folder", "parquet", "manifest"):
        fail(f"--source-kind {source_kind!r}: expected auto, folder, parquet or manifest")
    try:
        config = ShardConfig(
            max_size=max_size,
            resample=resample,
            jpeg_quality=quality,
            keep_formats=_comma_list(keep_formats),
            max_pixels=max_pixels,
            target_shard_bytes=parse_size(shard_size),
            max_shard_samples=shard_samples,
            shard_multiple=shard_multiple,
            val_fraction=val_fraction,
            seed=seed,
            limit=limit,
        )
    except ValidationError as error:
        fail("; ".join(f"{_OPTION_OF.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" for e in error.errors()))
    except ValueError as error:
        fail(str(error))
    if workers is not None and workers < 0:
        fail(f"--workers {workers}: must be 0 (no Ray) or more")
    try:
        opened = open_source(source, source_kind, _comma_list(class_names))  # type: ignore[arg-type]
    except SourceError as error:
        fail(str(error))

    from rich.console import (
        Console,  # the heavy part (torch, Ray) only once the inputs check out
    )

    from pipeline.shards import StorageError, write_shards

    try:
        result = write_shards(opened, out, config, workers=workers, address=address, progress=progress)
    except ValueError as error:  # SourceError included: a table's bad split name, an unusable OUT
        fail(str(error))
    except StorageError as error:  # OUT unwritable, full or over quota: fixable, then the same command resumes
        fail(str(error), code=1)
    Console().print(summary_table(result))


@shard_app.command("verify")
def verify(out: str = typer.Argument(..., help="a folder or object-store prefix written by `vitflow shard`")) -> None:
    """Recompute every shard's sha256 and sample count; exit 1 listing damaged shards."""
    from pipeline.verify import verify_shards

    try:
        report = verify_shards(out)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    except OSError as error:  # the store cannot be read (unreachable, no such bucket, no permission)
        fail(str(error), code=1)
    if not report.ok:
        for damaged in report.damaged:
            typer.echo(f"damaged: {damaged.path}: {damaged.problem}", err=True)
        for problem in report.problems:
            typer.echo(f"problem: {problem}", err=True)
        raise typer.Exit(1)
    typer.echo(
        f"ok: {report.num_shards} shards, {report.num_samples} samples in {report.root} match dataset.json and manifest.parquet"
    )


def summary_table(result: ShardResult) -> Table:
    """Per split: samples, shards, bytes; then inputs, quarantine reasons and throughput."""
    from rich.table import Table

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
