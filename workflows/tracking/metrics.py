"""Metrics on their way to MLflow: logged at once, buffered and sent by a background thread so training
never waits on tracking, or spilled to a JSON-lines file when the server stays away (sent later by
``vitflow upload``)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from mlflow.entities import Metric

from workflows.tracking.runs import client

log = logging.getLogger(__name__)

OFFLINE_METRICS = "metrics.jsonl"  # the spilled metrics' file in an offline bundle


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def log_metrics(tracking_uri: str, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    client(tracking_uri).log_batch(
        run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if _is_number(v)]
    )


def send_metrics(tracking_uri: str, run_id: str, metrics: list[Metric]) -> None:
    mlflow_client = client(tracking_uri)
    for start in range(0, len(metrics), 1000):
        mlflow_client.log_batch(run_id, metrics=metrics[start : start + 1000])


class MetricBuffer:
    """Metrics for one run, sent in batches by a background thread, so training never waits on tracking.

    When the tracking server is unreachable the metrics are kept (up to ``max_buffered``) and sent again
    with growing pauses (up to ``max_backoff_s``) until it is back. :meth:`close` makes a last bounded
    attempt and, if the server is still away, writes what is left to ``spill_path`` (JSON lines) for
    ``upload_offline``: nothing measured is lost.
    """

    def __init__(self, tracking_uri: str, run_id: str, flush_every_s: float = 5.0, max_buffered: int = 1_000_000,
                 max_backoff_s: float = 30.0):
        self.client = client(tracking_uri)
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.flush_every_s = flush_every_s
        self.max_buffered = max_buffered
        self.max_backoff_s = max_backoff_s
        self.pending: list[Metric] = []
        self.failures = 0  # failed send attempts, all told
        self.sent = 0
        self.retry_at = 0.0  # monotonic time before which the background thread does not try again
        self._streak = 0  # consecutive failures: the back-off grows with it
        self._lock = threading.Lock()  # guards `pending`
        self._sending = threading.Lock()  # one send at a time
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"mlflow-metrics-{run_id[:8]}", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self._streak == 0

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        fresh = [Metric(key, float(value), now, step) for key, value in metrics.items() if _is_number(value)]
        with self._lock:
            self.pending.extend(fresh)
            if len(self.pending) > self.max_buffered:
                dropped = len(self.pending) - self.max_buffered
                log.warning("MLflow metric buffer full: dropping the %d oldest metrics", dropped)
                del self.pending[:dropped]

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self.flush_every_s)
            self._wake.clear()
            if not self._closed.is_set() and time.monotonic() >= self.retry_at:
                self.flush()

    def flush(self) -> bool:
        """Send what is pending now; True when nothing is left over. Called by the background thread, and
        by training where a report must be on record before it goes on (a search may stop a trial)."""
        with self._sending:
            while True:
                with self._lock:
                    batch = self.pending[:1000]  # MLflow's log_batch limit
                if not batch:
                    return True
                try:
                    self.client.log_batch(self.run_id, metrics=batch)
                except Exception as error:  # any transport or server error: keep the metrics, retry later
                    self.failures += 1
                    self._streak += 1
                    self.retry_at = time.monotonic() + min(self.max_backoff_s, 2.0 ** self._streak)
                    if self._streak == 1:
                        log.warning("MLflow at %s unreachable (%s); metrics are kept and sent when it is back",
                                    self.tracking_uri, type(error).__name__)
                    return False
                if self._streak:
                    log.warning("MLflow at %s reachable again after %d failed attempt(s): sending the kept metrics",
                                self.tracking_uri, self._streak)
                self._streak = 0
                self.sent += len(batch)
                with self._lock:
                    del self.pending[: len(batch)]

    def flush_if_healthy(self) -> bool:
        """:meth:`flush` unless the server is known to be away (then training does not wait for it)."""
        return self.flush() if self.healthy else False

    def close(self, timeout_s: float = 30.0, spill_path: str | Path | None = None) -> bool:
        """Stop the background thread; keep trying to send for up to ``timeout_s``; then write anything
        still pending to ``spill_path``. True when everything reached MLflow."""
        self._closed.set()
        self._wake.set()
        self._thread.join()
        deadline = time.monotonic() + timeout_s
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        with self._lock:
            left = list(self.pending)
        if left and spill_path is not None:
            spill_metrics(spill_path, self.run_id, left)
            log.warning("MLflow at %s still unreachable: %d metrics written to %s for `vitflow upload`",
                        self.tracking_uri, len(left), spill_path)
        return not left


def spill_metrics(path: str | Path, run_id: str, metrics: list[Metric]) -> None:
    """Append ``metrics`` of ``run_id`` to a JSON-lines file (the offline bundle's metrics)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        for m in metrics:
            handle.write(json.dumps({"run_id": run_id, "key": m.key, "value": m.value, "timestamp": m.timestamp,
                                     "step": m.step}) + "\n")


def read_spilled_metrics(path: str | Path) -> dict[str, list[Metric]]:
    """The metrics :func:`spill_metrics` wrote, per run id."""
    found: dict[str, list[Metric]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            found.setdefault(row["run_id"], []).append(Metric(row["key"], float(row["value"]), int(row["timestamp"]), int(row["step"])))
    return found
