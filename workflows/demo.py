"""The model's smoke demo: train a small ViT for a few steps on real CIFAR-10 images and show that it learns.

This is the main-job command until the quickstart workflow exists. It reads the Hugging Face Parquet
layout directly (no shards yet), trains on CPU, and reports loss and held-out accuracy before and after.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torchvision.io import decode_jpeg

from vit import VisionTransformer, decode_variant, gflops

CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


@dataclass(frozen=True, kw_only=True)
class DemoResult:
    steps: int
    first_loss: float
    last_loss: float
    accuracy_before: float
    accuracy_after: float
    images_per_second: float


def load_cifar(parquet: Path, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``rows`` images of a CIFAR-10 Parquet file -> (rows, 3, 32, 32) floats, (rows,) labels."""
    if not parquet.is_file():
        raise FileNotFoundError(f"CIFAR-10 Parquet file not found: {parquet}")
    table = pq.read_table(parquet, columns=["image", "label"]).slice(0, rows)
    images = [decode_jpeg(torch.frombuffer(bytearray(item["bytes"]), dtype=torch.uint8)) for item in table.column("image").to_pylist()]
    x = torch.stack(images).float().div_(255)
    return (x - CIFAR_MEAN) / CIFAR_STD, torch.tensor(table.column("label").to_pylist())


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predictions = torch.cat([model(batch).argmax(1) for batch in images.split(256)])
    model.train()
    return (predictions == labels).float().mean().item()


def run_demo(parquet: Path, *, variant: str = "Ti/4", depth: int = 4, steps: int = 60, batch_size: int = 64,
             train_rows: int = 4000, eval_rows: int = 1000, lr: float = 1e-3, seed: int = 0,
             console: Console | None = None) -> DemoResult:
    console = console or Console()
    torch.manual_seed(seed)
    images, labels = load_cifar(parquet, train_rows + eval_rows)
    train_x, train_y = images[:train_rows], labels[:train_rows]
    eval_x, eval_y = images[train_rows:], labels[train_rows:]
    config = decode_variant(variant, image_size=32, num_classes=10, depth=depth)
    model = VisionTransformer(config)
    params = sum(p.numel() for p in model.parameters())
    console.print(f"ViT-{config.variant}, depth {config.depth}: {params / 1e6:.2f} M parameters, {gflops(config):.3f} GFLOPs/image")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    before = accuracy(model, eval_x, eval_y)
    losses = []
    start = time.perf_counter()
    columns = [TextColumn("[bold]training"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn()]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=steps, loss=float("nan"))
        for step in range(steps):
            index = torch.randint(0, train_rows, (batch_size,))
            loss = F.cross_entropy(model(train_x[index]), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            progress.update(task, advance=1, loss=loss.item())
    elapsed = time.perf_counter() - start
    after = accuracy(model, eval_x, eval_y)
    window = max(1, steps // 10)
    result = DemoResult(
        steps=steps,
        first_loss=sum(losses[:window]) / window,
        last_loss=sum(losses[-window:]) / window,
        accuracy_before=before,
        accuracy_after=after,
        images_per_second=steps * batch_size / elapsed,
    )
    console.print(
        f"loss {result.first_loss:.3f} -> {result.last_loss:.3f}; held-out top-1 {before:.1%} -> {after:.1%} "
        f"(chance 10%); {result.images_per_second:.0f} img/s"
    )
    return result
