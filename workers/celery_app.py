"""Queue step, worker side: the Celery app every worker runs, configured from the same settings as the node."""

from __future__ import annotations

from node.queueing.broker import make_celery
from node.settings import load_settings

settings = load_settings()
app = make_celery(settings, "radnode-worker")

import workers.tasks  # noqa: E402,F401  (registers the tasks on `app`)
