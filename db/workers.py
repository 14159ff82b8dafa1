"""Record step for workers: each worker process says it is alive (readiness, dashboard, metrics)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from db.models import Worker


def beat(session: Session, name: str, hostname: str, pid: int, queues: list[str], now: datetime) -> None:
    """Record that worker `name` is alive now (insert on the first beat). The caller commits."""
    updated = session.execute(
        update(Worker).where(Worker.name == name).values(seen_at=now, pid=pid, queues=queues, hostname=hostname)
    ).rowcount
    if not updated:
        session.add(Worker(name=name, hostname=hostname, pid=pid, queues=queues, started_at=now, seen_at=now))


def gone(session: Session, name: str) -> None:
    """A worker that stops cleanly removes its row. The caller commits."""
    session.execute(delete(Worker).where(Worker.name == name))


def alive(session: Session, now: datetime, within_seconds: float) -> list[dict[str, Any]]:
    """Workers seen in the last `within_seconds`, by name."""
    rows = session.execute(
        select(Worker).where(Worker.seen_at >= now - timedelta(seconds=within_seconds)).order_by(Worker.name)
    ).scalars()
    return [
        {"name": w.name, "hostname": w.hostname, "pid": w.pid, "queues": w.queues,
         "started_at": w.started_at.isoformat(), "seen_at": w.seen_at.isoformat()}
        for w in rows
    ]
