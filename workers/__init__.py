"""radnode workers: the Celery app and its tasks (filled by the routing/execution step)."""
