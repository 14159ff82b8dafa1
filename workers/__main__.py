"""Worker process entry (`radnode worker`, and the embedded worker of `radnode run`): a Celery worker."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from node.queueing import BASE_QUEUES, QUEUE_RE, is_embedded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="radnode worker", description=__doc__)
    parser.add_argument("--queues", default=",".join(BASE_QUEUES), help="comma-separated queues to consume")
    parser.add_argument("--concurrency", type=int, default=1, help="worker processes")
    parser.add_argument("--name", default=None, help="worker node name (default radnode@HOST-PID)")
    args = parser.parse_args(argv)
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    bad = [q for q in queues if q != "dispatch" and not QUEUE_RE.match(q)]
    if not queues or bad:
        parser.error(f"unknown queue(s) {bad or queues}: use gpu, cpu, dispatch or gpu.NAME / cpu.NAME")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")

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


if __name__ == "__main__":
    sys.exit(main())
