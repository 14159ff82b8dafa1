"""Receive and persist: one store path for every way an instance arrives (C-STORE, STOW-RS, pull, the
on-demand upload). Size and header checks, then the durable file, then the row, then the answer: every
outcome is a DICOM status with a reason, counted in the metrics, and nothing raises."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from db.models import utcnow
from db.records import InstanceRecorder, ReceivedInstance
from node import metrics
from node.dicom.header import InstanceHeader, InvalidUID, UndecodableDataset, read_header
from node.dicom.status import Status
from node.ingest.storage import InstanceStore, StorageFull
from node.logs import uid_hash
from node.settings import Settings

log = logging.getLogger("radnode.ingest")

# metric source label -> how the log names the route
ROUTES = {"dimse": "C-STORE", "stow": "STOW-RS", "pull": "pull", "upload": "infer upload", "ups": "UPS retrieval"}


@dataclass(frozen=True)
class Stored:
    """The answer to one offered instance. `header` is None when the bytes are not a usable instance."""

    status: int
    reason: str
    header: InstanceHeader | None = None

    @property
    def ok(self) -> bool:
        return self.status == Status.SUCCESS


def to_record(header: InstanceHeader, path: str, size_bytes: int, calling_ae: str | None,
              called_ae: str | None = None) -> ReceivedInstance:
    """The job-table record of a stored instance."""
    return ReceivedInstance(
        path=path,
        size_bytes=size_bytes,
        calling_ae=calling_ae,
        called_ae=called_ae,
        **{f.name: getattr(header, f.name) for f in fields(header)},
    )


class Ingest:
    """Stores offered instances durably and records them: file first (fsync, atomic rename), then the row,
    then the status. One instance per receive process or HTTP app; thread-safe as the SCP uses it."""

    def __init__(self, settings: Settings, sessionmaker: Any, store: InstanceStore | None = None) -> None:
        self.instances = store or InstanceStore(settings.instances_dir, settings.tmp_dir, settings.min_free_bytes)
        self.sessionmaker = sessionmaker
        self.engine = sessionmaker.kw["bind"]  # rows are recorded on a connection: no ORM session per instance
        self.recorder = InstanceRecorder()
        self.max_bytes = settings.max_instance_bytes

    def store(self, data: bytes, calling_ae: str | None, *, source: str, study_uid: str | None = None,
              sop_class_uid: str | None = None, sop_instance_uid: str | None = None,
              called_ae: str | None = None) -> Stored:
        """Store one encoded instance (with file meta) offered by `source` (a ROUTES key); `called_ae` is
        the AE title a C-STORE sender called (rules may route and prioritise by it).

        `study_uid` refuses an instance of another study (STOW-RS to a study URL, a pull of one study);
        `sop_class_uid`/`sop_instance_uid` refuse a data set that differs from its C-STORE request."""
        stored = self._store(data, calling_ae, study_uid, sop_class_uid, sop_instance_uid, called_ae)
        self._count(source, calling_ae, stored.status, len(data))
        if not stored.ok:
            log.warning("%s refused: %s", ROUTES.get(source, source), stored.reason)
        return stored

    def refused(self, source: str, calling_ae: str | None, status: int, reason: str, size: int) -> Stored:
        """An instance refused before its bytes could be offered (a wrong part type, too large to read)."""
        self._count(source, calling_ae, status, size)
        log.warning("%s refused: %s", ROUTES.get(source, source), reason)
        return Stored(status, reason)

    def _store(self, data: bytes, calling_ae: str | None, study_uid: str | None, sop_class_uid: str | None,
               sop_instance_uid: str | None, called_ae: str | None = None) -> Stored:
        if len(data) > self.max_bytes:
            return Stored(Status.TOO_LARGE, "instance larger than the configured maximum")
        try:
            header = read_header(data)
        except InvalidUID as exc:
            return Stored(Status.INVALID_UID, str(exc))
        except UndecodableDataset as exc:
            return Stored(Status.CANNOT_UNDERSTAND, str(exc))
        if study_uid is not None and header.study_uid != study_uid:
            return Stored(Status.SOP_CLASS_MISMATCH, "instance belongs to another study than the request names",
                          header)
        if sop_class_uid is not None and header.sop_class_uid != sop_class_uid:
            return Stored(Status.SOP_CLASS_MISMATCH, "SOPClassUID differs from the C-STORE request", header)
        if sop_instance_uid is not None and header.sop_instance_uid != sop_instance_uid:
            return Stored(Status.SOP_CLASS_MISMATCH, "SOPInstanceUID differs from the C-STORE request", header)
        return self.persist(header, data, calling_ae, called_ae)

    def persist(self, header: InstanceHeader, data: bytes, calling_ae: str | None,
                called_ae: str | None = None) -> Stored:
        """Durable write, then the row; a status for every failure."""
        try:
            relative = self.instances.write(header, data)
        except StorageFull as exc:
            log.error("instance not stored: %s", exc)
            return Stored(Status.OUT_OF_RESOURCES, f"not stored: {exc}", header)
        except InvalidUID as exc:
            return Stored(Status.INVALID_UID, str(exc), header)
        except OSError:
            log.exception("instance not stored: could not write the file")
            return Stored(Status.OUT_OF_RESOURCES, "not stored: could not write the file", header)
        rec = to_record(header, relative, len(data), calling_ae, called_ae)
        try:
            with self.engine.begin() as connection:
                new = self.recorder.record(connection, rec, utcnow())
        except SQLAlchemyError:
            self.recorder.forget()
            # The file is on disk (a resend overwrites it; start-up reconciles it); the sender retries.
            log.exception("instance not recorded: database unavailable")
            return Stored(Status.OUT_OF_RESOURCES, "not stored: database unavailable", header)
        if log.isEnabledFor(logging.DEBUG):  # the hashes cost more than the rest of the line
            log.debug("stored instance %s series %s (%s, %d bytes)", uid_hash(header.sop_instance_uid),
                      uid_hash(header.series_uid), "new" if new else "re-sent", len(data))
        return Stored(Status.SUCCESS, "stored", header)

    @staticmethod
    def _count(source: str, calling_ae: str | None, status: int, size: int) -> None:
        try:
            metrics.instance_received(source, calling_ae, status, size)
        except Exception:  # a metrics failure never changes the answer to the sender
            log.exception("%s: metrics not recorded", ROUTES.get(source, source))
