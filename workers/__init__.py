"""radnode workers: the Celery app and its tasks (thin: load job -> call plugin -> encode -> record)."""
