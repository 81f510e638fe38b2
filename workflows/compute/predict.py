"""Batch prediction on Ray Data: encoded images in, one Parquet row per image out.

Inputs, local or on an object store: an image folder (every image file under it, at any depth; class
folders are not needed), a Parquet table of image bytes or a manifest table of paths (as ``vitflow
shard`` reads them: ``pipeline.sources``), or a shard set written by ``vitflow shard`` (``dataset.json``).

Ray Data runs the work as a stream through an actor pool; each actor holds the model once and classifies in
batches sized to memory (``vit.inference.batch_size_for``). Each image is prepared (decoded, resized and
centre-cropped as the model was evaluated: ``vit.inference.ImagePreparer``) before it is classified, in one
of two arrangements (``Plan.read_in_actors``):

- with GPUs, reading tasks fetch and prepare the images on the CPUs while the actors classify on the GPUs;
- on CPUs only, each actor reads, prepares and classifies its own share, one torch thread per actor and one
  actor per CPU. Measured on 2 cores (``benchmarks/predict_throughput.py``, docs/BENCHMARKS.md): a model
  runs faster as two single-threaded processes than as one process of two threads (ViT-Ti/16 at 224 px,
  fp32, AMD EPYC: 52.8 vs 43.8 img/s), and a reading task beside a multi-threaded actor stalls the actor's
  threads; only small output rows cross between processes, not prepared images.

The driver writes rows in input order to one Parquet file as they arrive and publishes it whole at the end.
A bad image is a row with its reason (``error``), never a failed run.

What Ray Data lacks and this module adds: listing the three kinds of input as the pipeline reads them, the
model's own preprocessing, and a single Parquet file published whole (``pipeline.storage.Location``) rather
than a folder of part files.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.manifest import Rejected
from pipeline.sources import (
    IMAGE_EXTENSIONS,
    ImageFolderSource,
    Record,
    SourceError,
    filesystem,
    open_source,
)
from pipeline.storage import Location

DATASET_FILE = "dataset.json"
READ_CPUS = 0.5  # per reading task
CPU_BATCH_LIMIT = 64  # on CPUs a larger batch is no faster, and holds the stream back
OUTPUT_SCHEMA = pa.schema([
    ("source", pa.string()),  # the image's path under the input, its table's source column, or SHARD#KEY
    ("label", pa.string()),  # the top-1 class name (null for a bad image)
    ("score", pa.float64()),  # its probability
    ("top_labels", pa.list_(pa.string())),  # the k most probable class names, most probable first
    ("top_scores", pa.list_(pa.float64())),
    ("error", pa.string()),  # why the image could not be classified (null for a good one)
    ("model_uri", pa.string()),
])


@dataclass(frozen=True)
class Listing:
    """What to read, listed on the driver without reading any image."""

    kind: str  # folder | table | shards
    uri: str
    units: list[dict[str, Any]]  # one read unit each: a file, a table row, or a whole shard
    rejected: list[dict[str, str]] = field(default_factory=list)  # {"source", "error"}: unusable from listing alone
    num_images: int = 0  # images the units hold
    source: Any = None  # the pipeline source (folder, table) the read tasks read through


def list_inputs(uri: str) -> Listing:
    """List ``uri``; ``SourceError`` naming it when it is none of the three kinds, or holds no image."""
    uri = str(uri)
    location = Location(uri)
    if (location / DATASET_FILE).is_file():
        from vit.data import read_dataset_index

        index = read_dataset_index(uri)
        units = [{"shard": shard.url, "split": split} for split, entry in sorted(index.splits.items())
                 for shard in entry.shards]
        return Listing("shards", uri, units, num_images=sum(entry.num_samples for entry in index.splits.values()))
    fs, root = filesystem(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"{uri}: not found")
    if info.type == pafs.FileType.Directory:
        files = sorted(
            posixpath.relpath(entry.path, root) for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if entry.type == pafs.FileType.File)
        files = [f for f in files if not any(part.startswith(".") for part in f.split("/"))]
        extensions = {posixpath.splitext(f)[1].lower() for f in files}
        if extensions & IMAGE_EXTENSIONS or ".parquet" not in extensions:
            images = [f for f in files if posixpath.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
            rejected = [{"source": f, "error": f"not_an_image: extension {posixpath.splitext(f)[1]!r} is not an image type"}
                        for f in files if posixpath.splitext(f)[1].lower() not in IMAGE_EXTENSIONS]
            if not images:
                raise SourceError(f"{uri}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in it")
            return Listing("folder", uri, [{"file": f} for f in images], rejected, len(images), ImageFolderSource(uri))
    source = open_source(uri)  # a Parquet table of images, or a manifest table of paths
    scan = source.scan()
    units = [{"split": r.split, "source": r.source, "label": r.label, "file": r.file, "row": r.row} for r in scan.records]
    rejected = [{"source": u.source, "error": f"{u.reason.value}: {u.detail}"} for u in scan.rejected
                if u.reason.value != "unknown_label"]  # prediction needs no label
    if not units:
        raise SourceError(f"{uri}: no readable images in it")
    return Listing("table", uri, units, rejected, len(units), source)


def _encoded(listing_kind: str, source, batch: dict[str, np.ndarray]) -> Iterator[tuple[str, bytes | str]]:
    """(name, bytes) per image of a batch of read units, or (name, why it could not be read)."""
    if listing_kind == "shards":
        from vit.data.shards import IMAGE_EXTENSIONS as SHARD_IMAGES
        from vit.data.shards import iter_shard

        for url in batch["shard"]:
            name = posixpath.basename(str(url))
            try:
                for sample in iter_shard(str(url)):
                    members = [ext for ext in sample.members if ext in SHARD_IMAGES]
                    if len(members) != 1:
                        yield f"{name}#{sample.key}", f"expected one image member, found {members or 'none'}"
                    else:
                        yield f"{name}#{sample.key}", sample.members[members[0]]
            except (OSError, ValueError) as error:  # a shard cut short or unreadable: its remaining images
                yield f"{name}", f"unreadable shard: {type(error).__name__}: {error}"
        return
    if listing_kind == "folder":
        records = [Record("", str(f), -1, str(f)) for f in batch["file"]]
    else:
        records = [Record(str(s), str(n), int(lab), str(f), int(r))
                   for s, n, lab, f, r in zip(batch["split"], batch["source"], batch["label"], batch["file"], batch["row"])]
    for record, data in source.read(records):
        yield record.source, (f"{data.reason.value}: {data.detail}" if isinstance(data, Rejected) else data)


def read_and_prepare(batch: dict[str, np.ndarray], *, kind: str, source, preprocessing: dict,
                     image_size: int) -> dict[str, np.ndarray]:
    """A Ray Data batch of read units -> one row per image: source, the prepared (3, S, S) uint8 image
    (zeros for a bad one) and the error (None for a good one)."""
    from vit.inference import ImagePreparer

    prepare = ImagePreparer(preprocessing, image_size)
    names, images, errors = [], [], []
    blank = np.zeros((3, image_size, image_size), dtype=np.uint8)
    for name, data in _encoded(kind, source, batch):
        names.append(name)
        if isinstance(data, str):
            images.append(blank)
            errors.append(data)
            continue
        try:
            images.append(prepare(data, what=name).numpy())
            errors.append(None)
        except ValueError as error:
            images.append(blank)
            errors.append(str(error))
    return {"source": np.array(names, dtype=object),
            "image": np.stack(images) if images else np.zeros((0, 3, image_size, image_size), dtype=np.uint8),
            "error": np.array(errors, dtype=object)}


class Classify:
    """A Ray Data actor: the model, once, classifying prepared images (``vit.inference.ImageClassifier``)."""

    def __init__(self, model: list, model_uri: str, precision: str, top_k: int, batch_size: int, threads: int):
        import ray
        import torch

        from vit import VisionTransformer
        from vit.inference import ImageClassifier

        if threads:
            torch.set_num_threads(threads)
        plain = ray.get(model[0])  # inside a list: Ray Data hands constructor arguments over as they are
        vit = VisionTransformer(plain.config)
        vit.load_state_dict(plain.state_dict)
        device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        self.classifier = ImageClassifier(vit, plain.class_names, plain.preprocessing, device=device,
                                          precision=precision, top_k=top_k, batch_size=batch_size)
        self.model_uri = model_uri

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """A batch of prepared images (``read_and_prepare``'s rows) -> one output row each."""
        import torch

        errors = [None if error is None or error != error else str(error) for error in batch["error"]]  # NaN: none
        good = np.array([error is None for error in errors], dtype=bool)
        rows = len(errors)
        labels, scores, top_labels, top_scores = [None] * rows, [None] * rows, [None] * rows, [None] * rows
        if good.any():
            predictions = self.classifier.predictions(self.classifier.probabilities(torch.from_numpy(batch["image"][good])))
            for i, prediction in zip(np.flatnonzero(good), predictions):
                labels[i], scores[i] = prediction.label, prediction.score
                top_labels[i], top_scores[i] = list(prediction.top_labels), list(prediction.top_scores)
        # Typed here: a column that is all nulls in one batch keeps its type (a string, not a float NaN).
        return pa.Table.from_pydict(
            {"source": [str(name) for name in batch["source"]], "label": labels, "score": scores,
             "top_labels": top_labels, "top_scores": top_scores, "error": errors, "model_uri": [self.model_uri] * rows},
            schema=OUTPUT_SCHEMA)


class ReadAndClassify(Classify):
    """A Ray Data actor that reads and prepares its own batches of read units, then classifies them: on CPUs,
    where a separate reading task would take cores from the model (``Plan.read_in_actors``)."""

    def __init__(self, *, kind: str, source, preprocessing: dict, image_size: int, **classify):
        super().__init__(**classify)
        self.read = {"kind": kind, "source": source, "preprocessing": preprocessing, "image_size": image_size}

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """A batch of read units -> one output row per image they hold."""
        return super().__call__(read_and_prepare(batch, **self.read))


@dataclass(frozen=True)
class PredictStats:
    images: int  # rows written
    bad: int  # of them, images that could not be classified
    seconds: float  # from the first read to the file published
    batch_size: int
    actors: int
    ray_data_stats: str = ""  # Ray Data's account of each operator: tasks, wall and CPU time, rows/s

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def predict(listing: Listing, model, model_uri: str, out: str, *, batch_size: int, actors: int = 1,
            gpus_per_actor: float = 0.0, cpus_per_actor: float = 1.0, precision: str = "auto", top_k: int = 5,
            read_batch: int = 32, threads: int = 0, readers: int = 0, read_in_actors: bool = False,
            progress: Callable[[int], None] | None = None) -> PredictStats:
    """Classify every image of ``listing`` with ``model`` (a ``workflows.tracking.PlainModel``) on the Ray
    this process is connected to; write the rows to ``out`` (a Parquet file, local or object store).
    ``read_in_actors``: the actors read and prepare their own images (else reading tasks do, ``readers`` at
    once). ``progress(rows)`` is called as rows are written."""
    import ray

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows in input order
    context.enable_progress_bars = False  # the caller shows one bar for the whole run
    started = time.monotonic()
    image_size = model.config.image_size[0]
    dataset = ray.data.from_items(listing.units, override_num_blocks=max(1, min(len(listing.units), 4 * actors * 8)))
    reading = {"kind": listing.kind, "source": listing.source, "preprocessing": model.preprocessing,
               "image_size": image_size}
    units_per_read = 1 if listing.kind == "shards" else None  # a shard is one unit of many images
    classify = {"model": [ray.put(model)], "model_uri": model_uri, "precision": precision, "top_k": top_k,
                "batch_size": batch_size, "threads": threads}
    if read_in_actors:
        dataset = dataset.map_batches(
            ReadAndClassify, batch_size=units_per_read or batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, fn_constructor_kwargs={**reading, **classify})
    else:
        # Reading runs as tasks of their own (half a CPU each, so they are not fused into the actors: reading
        # and classifying overlap, and the reads spread over the cluster).
        dataset = dataset.map_batches(
            read_and_prepare, batch_size=units_per_read or read_batch, num_cpus=READ_CPUS,
            compute=ray.data.TaskPoolStrategy(size=readers or None), fn_kwargs=reading)
        dataset = dataset.map_batches(
            Classify, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor, fn_constructor_kwargs=classify)
    written = bad = 0
    target = Location(out)
    with target.writing() as scratch, pq.ParquetWriter(str(scratch), OUTPUT_SCHEMA) as writer:
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            table = batch.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
            writer.write_table(table)
            written += table.num_rows
            bad += table.num_rows - table.column("error").null_count
            if progress:
                progress(written)
        if listing.rejected:  # unusable from the listing alone: after the rest
            rejected = {"source": [r["source"] for r in listing.rejected], "error": [r["error"] for r in listing.rejected],
                        "model_uri": [model_uri] * len(listing.rejected)}
            writer.write_table(pa.Table.from_pydict(
                {name: rejected.get(name, [None] * len(listing.rejected)) for name in OUTPUT_SCHEMA.names},
                schema=OUTPUT_SCHEMA))
            written += len(listing.rejected)
            bad += len(listing.rejected)
            if progress:
                progress(written)
    return PredictStats(images=written, bad=bad, seconds=time.monotonic() - started, batch_size=batch_size, actors=actors,
                        ray_data_stats=dataset.stats())


@dataclass(frozen=True)
class Plan:
    batch_size: int
    actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    threads: int  # torch threads an actor uses (0: as Ray sets them)
    read_in_actors: bool  # the actors read and prepare their own images (CPUs only)


def plan(config, *, batch_size: int | None, actors: int | None) -> Plan:
    """How to spread the work over the Ray this process is connected to, and size its batches.

    On GPUs: one actor per GPU, reading tasks on the CPUs. On CPUs: one actor per CPU (``actors`` given: the
    CPUs shared among them), each reading its own images and running the model on its share of the cores as
    torch threads. Measured on 2 cores (AMD EPYC, AVX2, fp32) with ViT-Ti/16 at 224 px over Flowers-17's photos
    (benchmarks/predict_throughput.py, docs/BENCHMARKS.md), the stage's rate on 5,440 photos: two actors of one
    thread, each reading its own, 41.1 img/s; one actor of 2 threads beside reading tasks 31.6; the plain loop
    in one process 39.3. On 1,360 photos the actors' start (some 9 s) keeps the stage below the loop.
    Batches: a forward pass's activations within a memory budget (``vit.inference.batch_size_for``): 4 GiB
    on a GPU (any current one has it free), on CPUs a quarter of the memory Ray sees, shared by the actors,
    at most 1 GiB each, and at most 64 images (larger batches are no faster on CPUs, and hold the stream back)."""
    import ray

    from vit.inference import batch_size_for

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    if gpus:
        actors = actors or gpus
        budget, gpus_per_actor, threads = 4 << 30, 1.0, 0
        # The actors never hold every CPU: a reading task must always find room, or the actors wait forever.
        cpus_per_actor = min(1.0, max(0.1, (cpus - READ_CPUS) / actors))
    else:
        actors = actors or cpus
        threads = max(1, cpus // actors)
        cpus_per_actor, gpus_per_actor = min(float(threads), cpus / actors), 0.0
        budget = min(1 << 30, resources.get("memory", 4 << 30) / 4 / actors)
    limit = 512 if gpus else CPU_BATCH_LIMIT
    return Plan(batch_size=batch_size or batch_size_for(config, budget, limit=limit), actors=actors,
                gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, threads=threads,
                read_in_actors=not gpus)
