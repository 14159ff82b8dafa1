"""Queueing: the Celery wiring (the only place in node/ that imports Celery) and the sweeper."""
