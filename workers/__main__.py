"""Worker process entry (`radnode worker`, and the embedded worker of `radnode run`): a Celery worker."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from node.queueing.broker import BASE_QUEUES, QUEUE_RE, is_embedded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="radnode worker", description=__doc__)
    parser.add_argument("--queues", default=",".join(BASE_QUEUES), help="comma-separated queues to consume")
    parser.add_argument("--concurrency", type=int, default=1, help="worker processes")
    parser.add_argument("--name", default=None, help="worker node name (default radnode@HOST-PID)")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="serve this worker's Prometheus metrics (stage durations, deliveries) on this port")
    args = parser.parse_args(argv)
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    bad = [q for q in queues if q != "dispatch" and not QUEUE_RE.match(q)]
    if not queues or bad:
        parser.error(f"unknown queue(s) {bad or queues}: use gpu, cpu, dispatch or gpu.NAME / cpu.NAME")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")

    if args.metrics_port:
        serve_metrics(args.metrics_port)
    from node.logs import setup_logging
    from workers.celery_app import app, settings

    setup_logging(settings.log_level, settings.log_json, settings.uid_hash_salt.get_secret_value())
    name = args.name or f"radnode@{socket.gethostname()}-{os.getpid()}"
    celery_args = [
        "worker", "--queues", ",".join(queues), "--concurrency", str(args.concurrency), "--pool", "prefork",
        "--hostname", name, "--loglevel", settings.log_level, "--without-mingle", "--without-gossip",
    ]
    if is_embedded(settings):
        celery_args.append("--without-heartbeat")
    app.worker_main(celery_args)
    return 0


def serve_metrics(port: int) -> None:
    """A worker on another host than the node: its pool processes write metrics into a folder of its own,
    served on `port` for Prometheus (on the node's host the embedded worker writes into the node's folder)."""
    import tempfile
    from pathlib import Path

    from node.metrics import enable_multiprocess

    enable_multiprocess(Path(tempfile.mkdtemp(prefix="radnode-worker-metrics-")))
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    start_http_server(port, registry=registry)


if __name__ == "__main__":
    sys.exit(main())
