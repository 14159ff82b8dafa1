"""Database connection: one engine per process, built from the settings' URL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_SECONDS = 30


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cur = dbapi_connection.cursor()
    # WAL lets readers run beside the receivers' writes; NORMAL keeps commits durable across a
    # process crash (kill -9). Files are fsynced before their row, and `reconcile` re-indexes any
    # file whose row a power loss took away.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_SECONDS * 1000}")
    cur.close()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create the engine for `url` (SQLite file or PostgreSQL via psycopg 3); `kwargs` go to create_engine."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            from pathlib import Path

            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_SECONDS}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    if "poolclass" not in kwargs:
        kwargs |= {"pool_pre_ping": True, "pool_size": 8, "max_overflow": 8}
    return create_engine(url, **kwargs)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def ping(maker: sessionmaker[Session]) -> None:
    """One round trip to the database. Raises SQLAlchemy's error when it does not answer."""
    with maker() as session:
        session.execute(text("SELECT 1"))
