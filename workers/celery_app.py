"""Queue step, worker side: the Celery app every worker runs, configured from the same settings as the node.

The tasks live in workers.tasks, which imports this app to register them; this module does not import it back:
Celery imports the modules named in `include` when a worker starts (`python -m workers`, `radnode worker`)."""

from __future__ import annotations

from node.queueing.broker import make_celery
from node.settings import load_settings

TASK_MODULES = ("workers.tasks",)

settings = load_settings()
app = make_celery(settings, "radnode-worker")
app.conf.include = TASK_MODULES
