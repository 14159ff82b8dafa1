"""Metrics step: Prometheus counters and histograms written by every process of the node, and gauges read
from the job table when /metrics is scraped.

`radnode run` calls `enable_multiprocess` before it starts any child, so the receivers, the API and the
embedded worker all write into one folder that the API process reads (prometheus-client's multiprocess
mode). prometheus_client is imported lazily: the environment variable must be set before its first import.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)
WORKER_ALIVE_PERIODS = 3  # a worker is alive if seen within this many heartbeat periods


def enable_multiprocess(directory: Path) -> None:
    """Make this process and every child started from now on write metrics into `directory` (emptied:
    counters start from zero with the node). Call before anything imports prometheus_client."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(directory)


_CREATE = threading.Lock()
_families: SimpleNamespace | None = None


def _metrics() -> SimpleNamespace:
    """This process's metric families, created once: receiver threads serving parallel associations reach
    here together, and a second creation would be refused by the registry (duplicated timeseries)."""
    global _families
    if _families is None:
        with _CREATE:
            if _families is None:
                _families = _create()
    return _families


def _create() -> SimpleNamespace:
    from prometheus_client import Counter, Histogram

    return SimpleNamespace(
        received=Counter(
            "radnode_instances_received", "Instances offered to radnode, by source, calling AE and DICOM status",
            ["source", "calling_ae", "status"],
        ),
        received_bytes=Counter(
            "radnode_received_bytes", "Bytes of instances stored, by source and calling AE", ["source", "calling_ae"]
        ),
        stage=Histogram(
            "radnode_stage_duration_seconds", "Seconds per job stage (queue_wait, model_load, image_load, infer, "
            "encode, deliver)", ["stage", "plugin"], buckets=STAGE_BUCKETS,
        ),
        deliveries=Counter(
            "radnode_delivery_attempts", "Delivery attempts by destination and result (sent, retry, failed)",
            ["destination", "result"],
        ),
        http=Counter("radnode_http_requests", "HTTP requests by method, route and status",
                     ["method", "route", "status"]),
        dicom_rejected=Counter("radnode_dicom_rejected", "DICOM connections a receiver refused (limits) or "
                               "dropped (timeouts, protocol errors), by reason", ["reason"]),
    )


def instance_received(source: str, calling_ae: str | None, status: int, size: int) -> None:
    """Count one instance offered by C-STORE, STOW-RS or a pull, with the status it got."""
    m = _metrics()
    ae = calling_ae or "-"
    m.received.labels(source, ae, f"0x{status:04X}").inc()
    if status == 0:
        m.received_bytes.labels(source, ae).inc(size)


def job_timings(plugin: str, timings: dict[str, float]) -> None:
    """Observe a finished attempt's stage durations (the job's `timings`, without the per-object parts)."""
    m = _metrics()
    for stage, seconds in timings.items():
        if ":" not in stage:
            m.stage.labels(stage, plugin).observe(seconds)


def delivery_attempt(destination: str, plugin: str, result: str, seconds: float) -> None:
    """Count one delivery attempt and observe how long it took."""
    m = _metrics()
    m.deliveries.labels(destination, result).inc()
    m.stage.labels("deliver", plugin).observe(seconds)


def http_request(method: str, route: str, status: int) -> None:
    _metrics().http.labels(method, route, str(status)).inc()


def dicom_rejected(reason: str) -> None:
    """Count one DICOM connection refused or dropped by a receiver (reasons: node.ingest.scp.REASONS)."""
    _metrics().dicom_rejected.labels(reason).inc()


class JobTableCollector:
    """Gauges read from the job table at scrape time: jobs by plugin and state, queue depth, deliveries by
    destination and state, series by state, live workers, and free disk space of the data folder; with `drift` (a
    function returning (plugin, statistic, kind, score, warning) rows, e.g. node.monitor's, cached by its caller)
    also the drift check's score and warning per plugin and statistic."""

    def __init__(self, sessionmaker: Any, data_path: Path, heartbeat_seconds: float,
                 drift: Callable[[], list[tuple[str, str, str, float, bool]]] | None = None) -> None:
        self.sessionmaker, self.data_path, self.heartbeat_seconds = sessionmaker, data_path, heartbeat_seconds
        self.drift = drift

    def describe(self) -> list:
        return []  # computed per scrape; nothing to check at registration

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        from db.models import utcnow
        from db.stats import table_counts

        jobs = GaugeMetricFamily("radnode_jobs", "Jobs by plugin and state", labels=["plugin", "state"])
        depth = GaugeMetricFamily("radnode_queue_depth", "Jobs queued and not yet started, by queue", labels=["queue"])
        deliveries = GaugeMetricFamily("radnode_deliveries", "Deliveries by destination and state",
                                       labels=["destination", "state"])
        series = GaugeMetricFamily("radnode_series", "Series by state", labels=["state"])
        workers = GaugeMetricFamily("radnode_workers_alive", "Worker processes seen in the last heartbeat periods")
        with self.sessionmaker() as session:
            counts = table_counts(session, utcnow(), WORKER_ALIVE_PERIODS * self.heartbeat_seconds)
        for plugin, state, n in counts.jobs:
            jobs.add_metric([plugin, state], n)
        for queue, n in counts.queued:
            depth.add_metric([queue], n)
        for dest, state, n in counts.deliveries:
            deliveries.add_metric([dest, state], n)
        for state, n in counts.series:
            series.add_metric([state], n)
        workers.add_metric([], counts.workers_alive)
        usage = shutil.disk_usage(self.data_path)
        disk = GaugeMetricFamily("radnode_disk_free_bytes", "Free bytes on the data folder's file system")
        disk.add_metric([], usage.free)
        total = GaugeMetricFamily("radnode_disk_total_bytes", "Size of the data folder's file system")
        total.add_metric([], usage.total)
        yield from (jobs, depth, deliveries, series, workers, disk, total)
        if self.drift is not None:
            yield from drift_families(self.drift())


def drift_families(rows: list[tuple[str, str, str, float, bool]]) -> tuple[Any, Any]:
    """The drift gauges: score per plugin, statistic and kind (psi, ks, ks_pvalue), warning (0/1) per plugin and
    statistic."""
    from prometheus_client.core import GaugeMetricFamily

    score = GaugeMetricFamily("radnode_drift_score", "Drift of a plugin's input/output statistic, last window against "
                              "the reference: PSI, KS statistic or KS p value", labels=["plugin", "statistic", "kind"])
    warning = GaugeMetricFamily("radnode_drift_warning", "1 when the drift check warns for this plugin and statistic",
                                labels=["plugin", "statistic"])
    warned: dict[tuple[str, str], bool] = {}
    for plugin, statistic, kind, value, warn in rows:
        score.add_metric([plugin, statistic, kind], value)
        warned[(plugin, statistic)] = warned.get((plugin, statistic), False) or warn
    for (plugin, statistic), warn in warned.items():
        warning.add_metric([plugin, statistic], float(warn))
    return score, warning


def exposition(collector: JobTableCollector) -> tuple[bytes, str]:
    """The text exposition of every process's metrics plus the job-table gauges. Raises SQLAlchemyError."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

    _metrics()  # the families exist (at zero) even before the first event
    registry = CollectorRegistry()
    registry.register(collector)
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY) + generate_latest(registry), CONTENT_TYPE_LATEST
