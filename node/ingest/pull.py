"""Pull side of receive: fetch studies from Orthanc (REST) or a DICOMweb server (WADO-RS) into the same
durable storage path as C-STORE, once (`radnode pull`) or by following Orthanc's /changes for StableStudy
(`radnode watch`, or `watch_orthanc` in the node)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from node.ingest.ingest import Ingest
from node.logs import uid_hash

log = logging.getLogger("radnode.pull")


MAX_TRIES = 5  # pulls of one stable study before the watcher gives up on it


class PullError(RuntimeError):
    """The source could not be reached or does not have the study (the message says which)."""


@dataclass
class PullReport:
    stored: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (instance, reason)

    def add(self, ingest: Ingest, data: bytes, source_ae: str | None, name: str) -> None:
        """Store one fetched instance, or note why not."""
        stored = ingest.store(data, source_ae, source="pull")
        if stored.ok:
            self.stored += 1
        else:
            self.failed.append((name, stored.reason))


# --- Orthanc --------------------------------------------------------------------------------------------


def orthanc_client(url: str, username: str | None = None, password: str | None = None) -> Any:
    from orthanc_api_client import OrthancApiClient

    return OrthancApiClient(url.rstrip("/"), user=username, pwd=password)


def _orthanc_call(url: str, fn: Callable[[], Any]) -> Any:
    from orthanc_api_client import exceptions as oe

    try:
        return fn()
    except oe.OrthancApiException as exc:
        raise PullError(f"Orthanc {url}: {type(exc).__name__}: {exc.msg}") from None


def orthanc_ae(client: Any) -> str | None:
    """Orthanc's own AE title: pulled instances are recorded as sent by it (rules, return to sender)."""
    return (_orthanc_call(str(client), lambda: client.get_system()).get("DicomAet") or "").strip()[:16] or None


def pull_orthanc(client: Any, ingest: Ingest, *, study_uid: str | None = None, orthanc_id: str | None = None,
                 source_ae: str | None = None) -> PullReport:
    """Fetch every instance of one study (by Study Instance UID or Orthanc id). Raises PullError."""
    url = str(client)
    if orthanc_id is None:
        found = _orthanc_call(url, lambda: client.studies.lookup(study_uid))
        if found is None:
            raise PullError(f"Orthanc {url} has no study {study_uid}")
        orthanc_id = found
    ids = _orthanc_call(url, lambda: client.studies.get_instances_ids(orthanc_id))
    report = PullReport()
    for instance_id in ids:
        try:
            data = _orthanc_call(url, lambda i=instance_id: client.instances.get_file(i))
        except PullError as exc:
            report.failed.append((instance_id, str(exc)))
            continue
        report.add(ingest, data, source_ae, instance_id)
    return report


class OrthancWatcher:
    """Follows Orthanc's /changes and pulls every study that becomes stable.

    The last change handled is kept in `state_file`, so a restart resumes where it stopped (a study
    pulled twice is harmless: the same instances are stored again). The first start begins at the
    current end of the change log unless `from_start`.
    """

    def __init__(self, client: Any, ingest: Ingest, state_file: Path, from_start: bool = False) -> None:
        self.client, self.ingest, self.state_file, self.from_start = client, ingest, state_file, from_start
        self.source_ae: str | None = None
        self.since: int | None = None
        self.failures: dict[int, int] = {}  # change sequence -> failed pulls

    def _load(self) -> int:
        try:
            return int(json.loads(self.state_file.read_text())["last"])
        except FileNotFoundError:
            if self.from_start:
                return 0
            return int(_orthanc_call(str(self.client), lambda: self.client.get_json("changes?last"))["Last"])
        except (ValueError, KeyError, TypeError) as exc:
            raise PullError(f"{self.state_file}: unreadable watch state ({exc}); delete it to start afresh") from None

    def _save(self, last: int) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"url": str(self.client), "last": last}))
        tmp.replace(self.state_file)

    def poll(self) -> list[PullReport]:
        """Handle the changes since the last call. Raises PullError when Orthanc is unreachable."""
        if self.since is None:
            self.since = self._load()
            self.source_ae = orthanc_ae(self.client)
        reports = []
        while True:
            changes, last, done = _orthanc_call(str(self.client),
                                                lambda: self.client.get_changes(since=self.since, limit=100))
            for change in changes:
                if change.change_type == "StableStudy":
                    try:
                        report = pull_orthanc(self.client, self.ingest, orthanc_id=change.resource_id,
                                              source_ae=self.source_ae)
                    except PullError as exc:
                        # tried again on the next poll (Orthanc down a moment); a study that keeps failing
                        # (deleted meanwhile) is given up after MAX_TRIES so the watcher does not stall
                        self.failures[change.sequence_id] = self.failures.get(change.sequence_id, 0) + 1
                        if self.failures[change.sequence_id] < MAX_TRIES:
                            raise
                        log.error("watch: giving up on stable study %s after %d tries: %s",
                                  uid_hash(change.resource_id), MAX_TRIES, exc)
                    else:
                        log.info("pulled stable study %s from Orthanc: %d stored, %d failed",
                                 uid_hash(change.resource_id), report.stored, len(report.failed))
                        reports.append(report)
                self.failures.pop(change.sequence_id, None)
                self.since = change.sequence_id
                self._save(self.since)
            if last is not None and last > (self.since or 0):
                self.since = last
                self._save(last)
            if done or not changes:
                return reports

    def run(self, stop: threading.Event, interval: float) -> None:
        """Poll until `stop`; an unreachable Orthanc is logged and tried again."""
        while not stop.is_set():
            try:
                self.poll()
            except PullError as exc:
                log.warning("watch: %s; retrying in %g s", exc, interval)
            except Exception:
                log.exception("watch: unexpected error; retrying")
            stop.wait(interval)


# --- DICOMweb -------------------------------------------------------------------------------------------


def dicomweb_client(url: str, username: str | None = None, password: str | None = None,
                    token: str | None = None) -> Any:
    import requests
    from dicomweb_client import DICOMwebClient

    session = requests.Session()
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif username:
        session.auth = (username, password or "")
    return DICOMwebClient(url=url.rstrip("/"), session=session, timeout=60)


def _encoded(ds: Any) -> bytes:
    import pydicom

    buffer = BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _wado_instances(client: Any, study_uid: str) -> Iterator[Any]:
    """The study's instances in their stored transfer syntax (no transcoding by the server)."""
    import requests

    try:
        yield from client.iter_study(study_uid, media_types=(("application/dicom", "*"),))
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 404:
            raise PullError(f"{client.base_url}: no study {study_uid}") from None
        raise PullError(f"{client.base_url}: WADO-RS HTTP {status}: {exc}") from None
    except requests.RequestException as exc:
        raise PullError(f"{client.base_url}: {type(exc).__name__}: {exc}") from None


def pull_dicomweb(client: Any, ingest: Ingest, study_uid: str, source_ae: str | None = None) -> PullReport:
    """Fetch one study with WADO-RS. Raises PullError."""
    report = PullReport()
    for i, ds in enumerate(_wado_instances(client, study_uid)):
        try:
            data = _encoded(ds)
        except Exception as exc:
            report.failed.append((f"instance {i + 1}", f"cannot encode: {type(exc).__name__}"))
            continue
        report.add(ingest, data, source_ae, f"instance {i + 1}")
    if report.stored == 0 and not report.failed:
        raise PullError(f"{client.base_url}: study {study_uid} has no instances")
    return report
