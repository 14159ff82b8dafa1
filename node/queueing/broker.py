"""Queue step: the Celery configuration shared by the node (which enqueues by task name) and the workers."""

from __future__ import annotations

import logging
import re
from typing import Any

from celery import Celery

from node.settings import Settings

log = logging.getLogger("radnode.queue")

TASK_INFER = "radnode.infer"  # explicit, stable task names: the node never imports the worker code
TASK_DISPATCH = "radnode.dispatch"
DISPATCH_QUEUE = "dispatch"
BASE_QUEUES = ("gpu", "cpu", "dispatch")
QUEUE_RE = re.compile(r"^(gpu|cpu)(\.[a-z0-9][a-z0-9-]*)?$")
# Redis serves lower numbers first; messages are spread over these steps.
PRIORITY_STEPS = [0, 3, 6, 9]
PRIORITY = {"stat": 0, "routine": 6}


def is_embedded(settings: Settings) -> bool:
    """True when the broker is the server-less SQLite file (kombu's SQLAlchemy transport)."""
    return settings.broker.startswith("sqla+")


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for the node's client and every worker (one place, read from Settings)."""
    embedded = is_embedded(settings)
    if embedded:
        # kombu hands these to create_engine: wait for SQLite's write lock instead of failing.
        transport: dict[str, Any] = {"connect_args": {"timeout": 30}}
    else:
        transport = {"priority_steps": PRIORITY_STEPS, "sep": ":", "queue_order_strategy": "priority"}
    return {
        "broker_url": settings.broker,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": "cpu",
        "task_create_missing_queues": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        # The embedded transport cannot broadcast: no remote control, gossip or mingle there.
        "worker_enable_remote_control": not embedded,
        "worker_send_task_events": False,
        "broker_pool_limit": 4,
    }


EMBEDDED_POLL_SECONDS = 0.1


def make_celery(settings: Settings, main: str = "radnode") -> Celery:
    """A Celery app configured from the settings (tasks are registered by `workers`)."""
    if is_embedded(settings):
        # A worker polls the SQLite queue tables; kombu's default 1 s costs up to a second per hop (twice
        # per job: infer, then dispatch). This transport hands every transport option to create_engine, so
        # the interval cannot go there: it is a class attribute.
        from kombu.transport import sqlalchemy as sqla_transport

        sqla_transport.Transport.polling_interval = EMBEDDED_POLL_SECONDS
    app = Celery(main, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


class Enqueuer:
    """Sends tasks by name from the node (enqueue only after the job rows are committed)."""

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        self.app = app if app is not None else make_celery(settings, "radnode-node")
        self._own_app = app is None

    def infer(self, job_id: int, queue: str, priority: str) -> None:
        """Send the inference task for one job. Raises kombu/celery errors when the broker is down."""
        self.app.send_task(TASK_INFER, args=[job_id], queue=queue, priority=PRIORITY.get(priority, PRIORITY["routine"]))

    def dispatch(self, delivery_id: int, priority: str = "routine") -> None:
        """Send the delivery task for one delivery row (its own queue: a PACS outage never holds a GPU); a
        triage-flagged result goes at stat priority, ahead of routine deliveries waiting on the broker."""
        self.app.send_task(TASK_DISPATCH, args=[delivery_id], queue=DISPATCH_QUEUE,
                           priority=PRIORITY.get(priority, PRIORITY["routine"]))

    def send_dispatch(self, delivery_ids: list[int], priority: str = "routine") -> list[int]:
        """Send delivery tasks in order; stops at the first broker error (the sweeper sends the rest)."""
        sent = []
        for delivery_id in delivery_ids:
            try:
                self.dispatch(delivery_id, priority)
            except Exception:
                log.exception("broker unavailable: delivery %d stays pending and will be sent again", delivery_id)
                break
            sent.append(delivery_id)
        return sent

    def send(self, items: list[tuple[int, str, str]]) -> list[int]:
        """Send (job id, queue, priority) tasks in order; stops at the first broker error, which is
        logged (the sweeper sends the rest later). Returns the ids sent."""
        sent = []
        for job_id, queue, priority in items:
            try:
                self.infer(job_id, queue, priority)
            except Exception:
                log.exception("broker unavailable: job %d stays queued and will be sent again", job_id)
                break
            sent.append(job_id)
        return sent

    def close(self) -> None:
        if self._own_app:
            self.app.close()
