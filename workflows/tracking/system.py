"""System metrics of a run (CPU, memory, disk, network, GPU), sampled by MLflow's monitor in a
background thread of the process that trains."""

from __future__ import annotations

import logging

from workflows.tracking.runs import client_defaults

log = logging.getLogger(__name__)

SYSTEM_METRICS_INTERVAL_S = 5.0  # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it


def start_system_metrics(tracking_uri: str, run_id: str, node_id: str | None = None) -> SystemMetrics | None:
    """MLflow's system metrics (CPU, memory, disk, network; GPU utilisation and memory through NVML when a
    GPU is present) for ``run_id``, sampled from this process's machine every few seconds in a background
    thread until ``finish()``. ``node_id`` names the metrics ``system/<node_id>/...``, so the workers of a
    multi-node run appear side by side. None when MLflow cannot monitor (a warning says why): training
    never depends on it."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    client_defaults()  # the monitor makes its own client
    try:
        monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, resume_logging=True,
                                       node_id=node_id, tracking_uri=tracking_uri)
    except Exception as error:  # e.g. an unreachable server while it looks up the run's last step
        log.warning("system metrics for run %s are off: %s", run_id, error)
        return None
    monitor.start()
    return SystemMetrics(monitor)


class SystemMetrics:
    """A running ``SystemMetricsMonitor``; ``finish`` also logs a last sample, so a run shorter than the
    sampling interval still has one."""

    def __init__(self, monitor):
        self.monitor = monitor

    def finish(self, last_sample: bool = True) -> None:
        """Stop sampling; log a last sample unless ``last_sample`` is false (the server is known to be
        away: its retries would only delay the end of training)."""
        self.monitor.finish()  # stops and joins the sampling thread
        if not last_sample:
            return
        try:
            self.monitor.collect_metrics()
            self.monitor.publish_metrics(self.monitor.aggregate_metrics())
            self.monitor.mlflow_logger.flush()
        except Exception as error:  # the server away at the end: the samples already sent stay
            log.warning("last system metrics sample not logged: %s", error)
