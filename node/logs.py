"""Logging set-up: PHI-free by construction (UIDs are hashed, datasets never logged)."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import sys
import time
from collections.abc import Iterator

_salt = b""
_job_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("radnode_job_id", default=None)


@contextlib.contextmanager
def job_context(job_id: int) -> Iterator[None]:
    """Lines logged inside carry `job_id` (a field of the JSON logs)."""
    token = _job_id.set(job_id)
    try:
        yield
    finally:
        _job_id.reset(token)


class _JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = _job_id.get()
        return True


def uid_hash(uid: str | None) -> str:
    """A short stable hash of a UID for logs: correlates lines without revealing the UID."""
    if not uid:
        return "-"
    return hashlib.sha256(_salt + uid.encode("ascii", "replace")).hexdigest()[:12]


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        if getattr(record, "job_id", None) is not None:
            out["job_id"] = record.job_id
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str = "INFO", json_lines: bool = False, salt: str = "") -> None:
    """Configure the root logger once per process and silence identifier logging in pynetdicom."""
    global _salt
    _salt = salt.encode()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_JobIdFilter())
    if json_lines:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet_pynetdicom()
    # These libraries log dataset UIDs and file names at INFO; our own lines carry hashed UIDs only.
    for name in ("highdicom", "dicomweb_client", "orthanc_api_client"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # dicomweb-client's retry wrapper logs each failed request's URL at WARNING: study UIDs, and for a
    # prior search the PatientID in the query
    logging.getLogger("retrying").setLevel(logging.ERROR)


def quiet_pynetdicom() -> None:
    """pynetdicom logs request identifiers and dataset summaries by default: switch that off."""
    from pynetdicom import _config

    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    # Its INFO/DEBUG lines carry AE titles and dataset dumps; we log our own PHI-free lines.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
