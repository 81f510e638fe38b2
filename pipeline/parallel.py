"""Fan shard tasks out over Ray. The only module of ``pipeline`` that touches Ray.

Why here and not in ``workflows/``: sharding is useful on its own (``vitflow shard``, or
``pipeline.write_shards`` in a notebook) without the workflow layer's tracking and stage runner, and the
Ray part is small: map a pure function (``shards.build_shard``) over a list of tasks. Keeping every Ray
call in this module leaves the rest of ``pipeline`` plain Python that tests run in-process
(``workers=0``), while a workflow stage simply calls ``write_shards`` inside its own Ray session.

Tasks in flight (running or queued): ``workers=N`` means at most N. By default (``workers=None``) the
cluster's CPUs now, looked up again every second, plus as many again queued behind them (at least
``MIN_QUEUED``, at most ``MAX_QUEUED``). The queue is the point: a Ray autoscaler adds nodes for the
resources that waiting tasks ask for, not for work a driver has yet to submit, so a window fixed at the
CPUs present at start would keep an autoscaling cluster (``cluster.yaml``: ``min_workers: 0``) at its head
node. Nodes that join take queued tasks and the window grows with them (``tests/pipeline/test_scaleout.py``).
``ray.autoscaler.sdk.request_resources`` is not used: there is one such request per cluster, which any
other driver overwrites and which stays until cleared. The bound keeps memory flat: a task in flight holds
its arguments (a shard's inputs) in the driver and the object store, so a plan of millions of shards is
fed in as tasks finish. Results come back in the order of ``tasks`` wherever they ran, and a task's output
depends only on its arguments: the bytes written do not depend on the window.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# fn(task, report) -> result, where report(n) says n more inputs were handled.
TaskFn = Callable[[T, Callable[[int], None]], R]

# With workers=None, the tasks queued beyond the cluster's CPUs: as many as it has CPUs (each round of
# autoscaling may double it), at least MIN_QUEUED (a head with no CPUs still asks for nodes), at most
# MAX_QUEUED (the memory a plan of any size holds in flight).
MIN_QUEUED = 4
MAX_QUEUED = 256
RESIZE_EVERY_S = 1.0  # how often the window follows the cluster's size (one GCS call)


def map_tasks(
    fn: TaskFn,
    tasks: Sequence[T],
    *,
    workers: int | None,
    address: str | None,
    on_progress: Callable[[int], None],
    on_done: Callable[[], None],
) -> list[R]:
    """``[fn(t, report) for t in tasks]``, at most ``workers`` at once; results in the order of ``tasks``.

    ``workers=0`` runs in this process. Otherwise Ray: the cluster at ``address``, the Ray this process
    is already connected to, or a local one with ``workers`` CPUs (all CPUs when None) that is shut
    down afterwards. ``workers=None`` follows the cluster as it grows and keeps tasks queued for an
    autoscaler to see (the module's docstring).
    """
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers == 0:
        results = []
        for task in tasks:
            results.append(fn(task, on_progress))
            on_done()
        return results

    import ray  # framework touch point: the only Ray import in pipeline

    started_here = not ray.is_initialized()
    if started_here:
        common = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        if address:
            ray.init(address=address, **common)
        else:
            ray.init(num_cpus=workers or os.cpu_count(), **common)
    counter = None
    try:
        @ray.remote(num_cpus=0)
        class Counter:  # tasks add to it as they go, the driver polls it: images/s between shard ends
            def __init__(self) -> None:
                self.total = 0

            def add(self, n: int) -> None:
                self.total += n

            def get(self) -> int:
                return self.total

        counter = Counter.remote()

        def report_to(actor) -> Callable[[int], None]:
            return lambda n: actor.add.remote(n) if n else None

        # Idempotent by construction (atomic writes, same bytes), so Ray's retry after a worker crash is safe.
        run = ray.remote(num_cpus=1)(lambda f, task, actor: f(task, report_to(actor)))
        results: list[R | None] = [None] * len(tasks)
        pending: dict = {}
        submitted, reported = 0, 0
        window, resized = _window(ray, workers), time.monotonic()
        try:
            while submitted < len(tasks) or pending:
                if workers is None and time.monotonic() - resized >= RESIZE_EVERY_S:
                    window, resized = _window(ray, workers), time.monotonic()
                while submitted < len(tasks) and len(pending) < window:
                    pending[run.remote(fn, tasks[submitted], counter)] = submitted
                    submitted += 1
                done, _ = ray.wait(list(pending), num_returns=1, timeout=0.25)
                for ref in done:
                    index = pending.pop(ref)
                    results[index] = _result(ray, ref)
                    on_done()
                total = ray.get(counter.get.remote())
                on_progress(total - reported)
                reported = total
        except BaseException:
            for ref in pending:  # on a shared cluster they would run on after this call has failed
                ray.cancel(ref)
            raise
        return results  # type: ignore[return-value]
    finally:
        if counter is not None:
            ray.kill(counter)
        if started_here:
            ray.shutdown()


def _window(ray, workers: int | None) -> int:
    """Tasks to keep in flight: ``workers``, or the cluster's CPUs now plus a queue an autoscaler sees."""
    if workers:
        return workers
    cpus = int(ray.cluster_resources().get("CPU", 0))
    return cpus + min(max(cpus, MIN_QUEUED), MAX_QUEUED)


def _result(ray, ref):
    """``ray.get(ref)``; a task's own exception is raised as itself (its message unchanged, the remote
    traceback chained), so callers catch and show it as if the task had run here."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, Exception):
            raise error.cause from error
        raise
