"""UPS task performer (IHE AIW-I): take AI tasks from a UPS-RS worklist (PS3.18 11), fetch their inputs from the
PACS into the instance store, run the plugin the workitem names as a job, and complete the workitem with the
result objects (or cancel it with the reason).

Each workitem radnode takes is a row of db/performer.py, written before the claim is sent: a restarted node
resumes its workitems and never claims one twice. The node runs `Performer.run` in a thread (node/service.py).
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydicom import Dataset
from pydicom.uid import generate_uid
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db import performer as tasks
from db.jobs import NewJob, list_jobs, mark_enqueued
from db.models import JobState, utcnow
from db.performer import PerformedTask, TaskState
from db.records import series_id_of
from node.ingest.ingest import Ingest
from node.logs import uid_hash
from node.pipeline.priors import PriorError, Source, fetch_series
from node.queueing.broker import Enqueuer
from node.settings import DicomDestination, DicomwebDestination, Settings, UpsWorklist
from plugins.base import Manifest
from plugins.registry import unavailable_reason

log = logging.getLogger("radnode.ups")

SCHEME = "99RADNODE"  # ScheduledWorkitemCodeSequence: CodeValue = plugin name in this coding scheme
RULE = "ups:workitem"  # the job's rule column
SOURCE = "ups"  # the ingest source label (metrics, logs)
MEDIA = "application/dicom+json"
TIMEOUT = 30.0
MAX_TRIES = 5  # failed retrievals (or refused final updates) of a workitem before it is given up
BACKOFF_MAX_SECONDS = 600.0  # a failed step waits poll_seconds, doubling per try, at most this, before the next
UPS_PUSH = "1.2.840.10008.5.1.4.34.6.1"
# CID 9300 Procedure Discontinuation Reasons
UNSPECIFIED = ("110513", "DCM", "Discontinued for unspecified reason")
INCOMPLETE = ("110523", "DCM", "Object Set incomplete")


class UpsError(RuntimeError):
    """A UPS-RS request failed. `status` is the HTTP status, None when the provider did not answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def refused(self) -> bool:
        """The provider answered with a 4xx: the request will not succeed by trying again."""
        return self.status is not None and 400 <= self.status < 500


# --- UPS-RS client --------------------------------------------------------------------------------------


class UpsClient:
    """The UPS-RS transactions a performer uses: search, retrieve, update, change state (PS3.18 11.4-11.9)."""

    def __init__(self, config: UpsWorklist, timeout: float = TIMEOUT) -> None:
        import requests

        self.url = config.url.rstrip("/")
        self.timeout = timeout
        self.http = requests.Session()
        self.http.headers["Accept"] = MEDIA
        if config.token is not None:
            self.http.headers["Authorization"] = f"Bearer {config.token.get_secret_value()}"
        elif config.username is not None:
            self.http.auth = (config.username, config.password.get_secret_value() if config.password else "")
        self.http.verify = str(config.verify_tls) if isinstance(config.verify_tls, Path) else config.verify_tls

    def _call(self, method: str, path: str, what: str, body: Dataset | None = None,
              params: Mapping[str, Any] | None = None) -> Any:
        """One request; returns the decoded JSON answer (None when empty). Raises UpsError. The error text names
        the transaction and the status, never the URL's query or a body (they may carry patient data)."""
        import requests

        data = None if body is None else _json([body])
        headers = {"Content-Type": MEDIA} if data is not None else {}
        try:
            r = self.http.request(method, f"{self.url}{path}", data=data, params=params, headers=headers,
                                  timeout=self.timeout)
        except requests.RequestException as exc:
            raise UpsError(f"UPS-RS {what}: {type(exc).__name__} (provider unreachable or timed out)") from None
        if r.status_code >= 300:
            warning = r.headers.get("Warning", "")[:200]
            raise UpsError(f"UPS-RS {what}: HTTP {r.status_code} {warning}".strip(), r.status_code)
        if r.status_code == 204 or not r.content:
            return None
        try:
            return r.json()
        except ValueError:
            raise UpsError(f"UPS-RS {what}: the answer is not JSON", r.status_code) from None

    def search(self, limit: int = 100) -> list[Dataset]:
        """SCHEDULED workitems (with their workitem and station codes). Raises UpsError."""
        params = {"ProcedureStepState": "SCHEDULED", "limit": str(limit),
                  "includefield": "ScheduledWorkitemCodeSequence,ScheduledStationNameCodeSequence"}
        return [Dataset.from_json(item) for item in self._call("GET", "/workitems", "search", params=params) or []]

    def get(self, uid: str) -> Dataset:
        """The whole workitem. Raises UpsError (404: no such workitem)."""
        answer = self._call("GET", f"/workitems/{uid}", "retrieve")
        items = answer if isinstance(answer, list) else [answer] if isinstance(answer, dict) else []
        if len(items) != 1:
            raise UpsError("UPS-RS retrieve: the answer is not one workitem", 200)
        return Dataset.from_json(items[0])

    def change_state(self, uid: str, state: str, transaction_uid: str) -> None:
        """PUT the Procedure Step State with our Transaction UID. Raises UpsError (409: not ours / not allowed)."""
        body = Dataset()
        body.ProcedureStepState = state
        body.TransactionUID = transaction_uid
        self._call("PUT", f"/workitems/{uid}/state", f"change state to {state}", body)

    def update(self, uid: str, transaction_uid: str, changes: Dataset) -> None:
        """POST changes to an IN PROGRESS workitem we own. Our Transaction UID goes as the query (PS3.18 11.6,
        `?{transaction}`) and in the payload too (as N-SET carries it, which some providers read). Raises
        UpsError."""
        body = Dataset()
        body.update(changes)
        body.TransactionUID = transaction_uid
        self._call("POST", f"/workitems/{uid}?{transaction_uid}", "update", body)


def _json(datasets: Sequence[Dataset]) -> str:
    import json

    return json.dumps([ds.to_json_dict() for ds in datasets])


# --- reading and writing workitems (pure) ---------------------------------------------------------------


@dataclass(frozen=True)
class InputSeries:
    """One input series of a workitem and where it may be retrieved."""

    study_uid: str
    series_uid: str
    sop_uids: tuple[str, ...]  # the instances named; () = the whole series
    retrieve_aes: tuple[str, ...]
    retrieve_urls: tuple[str, ...]


def _text(value: Any) -> str:
    return str(value or "").strip()


def _uid(value: Any) -> str | None:
    import re

    text = _text(value).rstrip("\0")
    return text if len(text) <= 64 and re.fullmatch(r"[0-9]+(\.[0-9]+)*", text) else None


def workitem_code(ds: Dataset) -> tuple[str, str] | None:
    """(plugin name, code meaning) of the workitem's radnode code (ScheduledWorkitemCodeSequence in scheme
    99RADNODE), or None when it names no radnode plugin."""
    for item in ds.get("ScheduledWorkitemCodeSequence") or []:
        if _text(item.get("CodingSchemeDesignator")) == SCHEME and _text(item.get("CodeValue")):
            return _text(item.CodeValue), _text(item.get("CodeMeaning")) or _text(item.CodeValue)
    return None


def scheduled_for(ds: Dataset, station: str) -> bool | None:
    """True when the workitem's ScheduledStationNameCodeSequence names `station`, False when it names others,
    None when it names no station."""
    names = [_text(i.get("CodeValue")) for i in ds.get("ScheduledStationNameCodeSequence") or []]
    names = [n for n in names if n]
    return None if not names else station in names


def input_series(ds: Dataset) -> list[InputSeries]:
    """The input series of a workitem's InputInformationSequence (PS3.3 Table 10-3b: StudyInstanceUID,
    SeriesInstanceUID, ReferencedSOPSequence, DICOMRetrievalSequence > RetrieveAETitle, WADORSRetrievalSequence >
    RetrieveURL; also items that list their series in ReferencedSeriesSequence and carry RetrieveAETitle /
    RetrieveURL themselves). Raises ValueError naming the first bad item."""
    out: dict[str, InputSeries] = {}
    for n, item in enumerate(ds.get("InputInformationSequence") or [], 1):
        if _text(item.get("TypeOfInstances")) not in ("", "DICOM"):
            continue
        study_uid = _uid(item.get("StudyInstanceUID"))
        if study_uid is None:
            raise ValueError(f"input item {n}: no valid Study Instance UID")
        aes = [_text(i.get("RetrieveAETitle")) for i in item.get("DICOMRetrievalSequence") or []]
        urls = [_text(i.get("RetrieveURL")) for i in item.get("WADORSRetrievalSequence") or []]
        aes += [_text(v) for v in _values(item.get("RetrieveAETitle"))]
        urls += [_text(item.get("RetrieveURL"))]
        refs = [(item.get("SeriesInstanceUID"), item.get("ReferencedSOPSequence"))] if "SeriesInstanceUID" in item \
            else [(s.get("SeriesInstanceUID"), s.get("ReferencedSOPSequence")) for s in
                  item.get("ReferencedSeriesSequence") or []]
        if not refs:
            raise ValueError(f"input item {n}: no Series Instance UID (nor a Referenced Series Sequence)")
        for series_value, sops in refs:
            series_uid = _uid(series_value)
            sop_uids = [_uid(s.get("ReferencedSOPInstanceUID")) for s in sops or []]
            if series_uid is None or None in sop_uids:
                raise ValueError(f"input item {n}: a Series or Referenced SOP Instance UID is not valid")
            known = out.get(series_uid)
            out[series_uid] = InputSeries(
                study_uid, series_uid,
                tuple(dict.fromkeys([*(known.sop_uids if known else ()), *sop_uids])),  # type: ignore[list-item]
                tuple(dict.fromkeys([*(known.retrieve_aes if known else ()), *(a for a in aes if a)])),
                tuple(dict.fromkeys([*(known.retrieve_urls if known else ()), *(u for u in urls if u)])))
    studies = {s.study_uid for s in out.values()}
    if len(studies) > 1:
        raise ValueError(f"the inputs belong to {len(studies)} studies; a radnode task takes series of one study")
    return list(out.values())


def _values(value: Any) -> list[Any]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def cancel_requested(ds: Dataset) -> str | None:
    """The reason when someone asked the provider to cancel this workitem (a cancel request the provider
    recorded in the Procedure Step Progress Information: Procedure Step Cancellation DateTime, Reason For
    Cancellation), else None."""
    for item in ds.get("ProcedureStepProgressInformationSequence") or []:
        if _text(item.get("ProcedureStepCancellationDateTime")) or _text(item.get("ReasonForCancellation")):
            return _text(item.get("ReasonForCancellation")) or "no reason given"
    return None


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning[:64]
    return item


def _dt(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def _text_item(code: tuple[str, str, str], text: str) -> Dataset:
    item = Dataset()
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = [_code(*code)]
    item.TextValue = text
    return item


@dataclass(frozen=True)
class Location:
    """Where a destination that received results serves them back: an AE title (C-MOVE/C-GET) or a WADO-RS root."""

    kinds: frozenset[str]  # SR, SEG, SC
    ae_title: str | None = None
    wado_root: str | None = None


def completion(objects: Iterable[Mapping[str, str]], locations: Sequence[Location], *, station: str,
               plugin: tuple[str, str], version: str, started: datetime, ended: datetime) -> Dataset:
    """The update that completes a workitem (PS3.4 CC.2.5.1.3.1 final state COMPLETED): the Unified Procedure
    Step Performed Procedure Sequence with the performed station, workitem code, start and end, the algorithm's
    name and version, and the Output Information Sequence: per result series its objects and where to retrieve
    them. No Actual Human Performers: the performer is an algorithm."""
    by_series: dict[tuple[str, str], list[Mapping[str, str]]] = {}
    for o in objects:
        by_series.setdefault((o["study_uid"], o["series_uid"]), []).append(o)
    outputs = []
    for (study_uid, series_uid), members in by_series.items():
        item = Dataset()
        item.TypeOfInstances = "DICOM"
        item.StudyInstanceUID, item.SeriesInstanceUID = study_uid, series_uid
        refs = []
        for o in members:
            ref = Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = o["sop_class_uid"], o["sop_instance_uid"]
            refs.append(ref)
        item.ReferencedSOPSequence = refs
        kinds = {o["kind"] for o in members}
        aes = sorted({loc.ae_title for loc in locations if loc.ae_title and kinds <= loc.kinds})
        roots = sorted({loc.wado_root for loc in locations if loc.wado_root and kinds <= loc.kinds})
        if aes:
            item.DICOMRetrievalSequence = [_ds(RetrieveAETitle=ae) for ae in aes]
        if roots:
            item.WADORSRetrievalSequence = [_ds(RetrieveURL=f"{r}/studies/{study_uid}/series/{series_uid}")
                                            for r in roots]
        outputs.append(item)
    performed = Dataset()
    performed.PerformedStationNameCodeSequence = [_code(station, SCHEME, station)]
    performed.PerformedProcedureStepStartDateTime = _dt(started)
    performed.PerformedProcedureStepEndDateTime = _dt(ended)
    performed.PerformedWorkitemCodeSequence = [_code(plugin[0], SCHEME, plugin[1])]
    performed.PerformedProcessingParametersSequence = [
        _text_item(("111001", "DCM", "Algorithm Name"), plugin[0]),
        _text_item(("111003", "DCM", "Algorithm Version"), version),
    ]
    performed.OutputInformationSequence = outputs
    ds = Dataset()
    ds.UnifiedProcedureStepPerformedProcedureSequence = [performed]
    ds.ProcedureStepProgressInformationSequence = [_ds(ProcedureStepProgress=100,
                                                       ProcedureStepProgressDescription="completed")]
    return ds


def cancellation(reason: str, code: tuple[str, str, str], when: datetime) -> Dataset:
    """The update that cancels a workitem (PS3.4 CC.2.5.1.3.1 final state CANCELED): Procedure Step Progress
    Information with the cancellation time, the reason as text and as a CID 9300 code."""
    item = _ds(ProcedureStepCancellationDateTime=_dt(when), ReasonForCancellation=reason[:10240])
    item.ProcedureStepDiscontinuationReasonCodeSequence = [_code(*code)]
    ds = Dataset()
    ds.ProcedureStepProgressInformationSequence = [item]
    return ds


def _ds(**values: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


# --- the performer ----------------------------------------------------------------------------------------


class Performer:
    """Polls the worklist, claims the workitems naming an installed plugin, and moves each claimed one on."""

    def __init__(self, settings: Settings, maker: sessionmaker[Session], manifests: Mapping[str, Manifest],
                 enqueuer: Enqueuer | None = None, ingest: Ingest | None = None, client: UpsClient | None = None
                 ) -> None:
        """`enqueuer`: by default one of its own (this runs in a thread beside the router's)."""
        if settings.ups_worklist is None:
            raise ValueError("the settings configure no ups_worklist")
        self.settings, self.config = settings, settings.ups_worklist
        self.maker, self.manifests = maker, manifests
        self.enqueuer, self._own_enqueuer = enqueuer or Enqueuer(settings), enqueuer is None
        self.ingest = ingest or Ingest(settings, maker)
        self.client = client or UpsClient(self.config)
        self.url = self.client.url
        self.station = self.config.station_name or settings.ae_title
        self.destinations = self.config.destinations

    def run(self, stop: threading.Event) -> None:
        """Poll every poll_seconds until `stop`; an unreachable provider or database is logged and retried."""
        try:
            while not stop.is_set():
                try:
                    self.poll_once(stop)
                except UpsError as exc:
                    log.warning("UPS worklist: %s; retrying in %g s", exc, self.config.poll_seconds)
                except SQLAlchemyError:
                    log.exception("UPS worklist: database unavailable; retrying")
                except Exception:
                    log.exception("UPS worklist: unexpected error; retrying")
                stop.wait(self.config.poll_seconds)
        finally:
            if self._own_enqueuer:
                self.enqueuer.close()

    def poll_once(self, stop: threading.Event | None = None) -> None:
        """Move every open task on, then claim new workitems. Raises UpsError when the search fails and
        SQLAlchemyError when the database does."""
        with self.maker() as session:
            open_ = tasks.open_tasks(session, self.url)
        for task in open_:
            if stop is not None and stop.is_set():
                return
            self._advance(task)
        for uid, plugin in self._candidates():
            if stop is not None and stop.is_set():
                return
            self._claim(uid, plugin)

    # --- claiming -------------------------------------------------------------------------------------

    def _candidates(self) -> list[tuple[str, str]]:
        """(workitem UID, plugin) of the SCHEDULED workitems that name a plugin that can run here and that we
        have no record of; the others are left to other performers."""
        found = []
        for ds in self.client.search():
            uid = _uid(ds.get("SOPInstanceUID"))
            if uid is None:
                continue
            if "ScheduledWorkitemCodeSequence" not in ds:  # a provider that ignores includefield
                ds = self.client.get(uid)
            code = workitem_code(ds)
            manifest = self.manifests.get(code[0]) if code else None
            if manifest is None or unavailable_reason(manifest, self.settings.models_path):
                continue
            assigned = scheduled_for(ds, self.station)
            if assigned is False or (assigned is None and self.config.only_our_station):
                continue  # scheduled for another station (or for none, when we take only ours)
            found.append((uid, manifest.name))
        with self.maker() as session:
            known = tasks.known_workitems(session, self.url, [u for u, _ in found])
        return [(u, p) for u, p in found if u not in known]

    def _claim(self, uid: str, plugin: str) -> None:
        """Record the claim, then send it (IN PROGRESS with a new Transaction UID); a refusal means another
        performer took it. Raises UpsError when the provider does not answer (the record resumes the claim)."""
        with self.maker() as session:
            task_id = tasks.record_claim(session, self.url, uid, generate_uid(), plugin)
        if task_id is None:
            return
        with self.maker() as session:
            task = session.get(PerformedTask, task_id)
        self._send_claim(task)

    def _send_claim(self, task: PerformedTask) -> None:
        try:
            self.client.change_state(task.workitem_uid, "IN PROGRESS", task.transaction_uid)
        except UpsError as exc:
            if not exc.refused:
                raise
            self._give_up(task, TaskState.CLAIMED, f"claim refused (taken by another performer?): {exc}",
                          level=logging.INFO)
            return
        with self.maker.begin() as session:
            tasks.move(session, task.id, TaskState.CLAIMED, TaskState.CLAIMED, claimed_at=utcnow())
        log.info("workitem %s claimed: plugin %s (task %d)", uid_hash(task.workitem_uid), task.plugin, task.id)
        with self.maker() as session:
            self._advance(session.get(PerformedTask, task.id))

    def _confirm_claim(self, task: PerformedTask) -> None:
        """A claim sent without a known answer (the node stopped, the provider did not answer): send it again
        while the workitem is SCHEDULED; when it is IN PROGRESS, an update with our Transaction UID tells whether
        it is ours (the provider never shows a Transaction UID)."""
        try:
            ds = self.client.get(task.workitem_uid)
        except UpsError as exc:
            if exc.status != 404:
                raise
            self._give_up(task, TaskState.CLAIMED, "the workitem no longer exists at the provider")
            return
        state = _text(ds.get("ProcedureStepState"))
        if state == "SCHEDULED":
            self._send_claim(task)
            return
        if state != "IN PROGRESS":
            self._give_up(task, TaskState.CLAIMED, f"workitem is {state or 'in no state'} at the provider")
            return
        try:
            self.client.update(task.workitem_uid, task.transaction_uid,
                               _ds(ProcedureStepProgressInformationSequence=[
                                   _ds(ProcedureStepProgress=0, ProcedureStepProgressDescription="claimed")]))
        except UpsError as exc:
            if not exc.refused:
                raise
            self._give_up(task, TaskState.CLAIMED, f"workitem claimed by another performer: {exc}")
            return
        with self.maker.begin() as session:
            tasks.move(session, task.id, TaskState.CLAIMED, TaskState.CLAIMED, claimed_at=utcnow())
        log.info("workitem %s: our claim confirmed after a restart (task %d)", uid_hash(task.workitem_uid), task.id)

    # --- moving a task on -------------------------------------------------------------------------------

    def _advance(self, task: PerformedTask) -> None:
        """One step (or more) of a task; provider and PACS outages leave it where it is for the next poll. A step
        that failed waits poll_seconds, doubled per failed try."""
        if task.attempts:
            wait = min(BACKOFF_MAX_SECONDS, self.config.poll_seconds * 2 ** (task.attempts - 1))
            if utcnow() < task.updated_at + timedelta(seconds=wait):
                return
        try:
            if task.state == TaskState.CLAIMED:
                if task.claimed_at is None:
                    self._confirm_claim(task)
                    return
                with self.maker.begin() as session:
                    tasks.move(session, task.id, TaskState.CLAIMED, TaskState.RETRIEVING)
                task.state = TaskState.RETRIEVING
            if task.state == TaskState.RETRIEVING:
                self._retrieve(task)
            elif task.state == TaskState.RUNNING:
                self._follow(task)
            elif task.state == TaskState.COMPLETING:
                self._complete(task)
            elif task.state == TaskState.CANCELING:
                self._cancel(task)
        except UpsError as exc:
            log.warning("workitem %s (task %d, %s): %s; tried again later", uid_hash(task.workitem_uid), task.id,
                        task.state, exc)
        except SQLAlchemyError:
            log.exception("workitem %s (task %d): database unavailable; tried again later",
                          uid_hash(task.workitem_uid), task.id)
        except Exception:  # one task's bug must not stall the others: logged, tried again next poll
            log.exception("workitem %s (task %d): unexpected error; tried again later", uid_hash(task.workitem_uid),
                          task.id)

    def _give_up(self, task: PerformedTask, src: TaskState, reason: str, level: int = logging.WARNING) -> None:
        with self.maker.begin() as session:
            tasks.move(session, task.id, src, TaskState.FAILED, reason=reason[:4000])
        log.log(level, "workitem %s (task %d) left: %s", uid_hash(task.workitem_uid), task.id, reason)

    def _to_cancel(self, task: PerformedTask, src: TaskState, reason: str,
                   code: tuple[str, str, str] = UNSPECIFIED) -> None:
        """Decide to cancel: the reason and its CID 9300 code recorded first, then sent at once."""
        with self.maker.begin() as session:
            moved = tasks.move(session, task.id, src, TaskState.CANCELING, reason=reason[:4000],
                               reason_code=code[0], attempts=0)
        if moved:
            log.warning("workitem %s (task %d) to be canceled: %s", uid_hash(task.workitem_uid), task.id, reason)
            with self.maker() as session:
                self._cancel(session.get(PerformedTask, task.id))

    def _live(self, task: PerformedTask, src: TaskState) -> Dataset | None:
        """The workitem while it is still ours to perform; None (and the task moved on) when it was canceled
        at the provider's request or finished elsewhere. Raises UpsError."""
        try:
            ds = self.client.get(task.workitem_uid)
        except UpsError as exc:
            if exc.status == 404:
                self._give_up(task, src, "the workitem no longer exists at the provider")
                return None
            raise
        state = _text(ds.get("ProcedureStepState"))
        if state != "IN PROGRESS":
            self._give_up(task, src, f"the workitem is {state or 'in no state'} at the provider")
            return None
        why = cancel_requested(ds)
        if why is not None:
            self._to_cancel(task, src, f"cancellation requested: {why}")
            return None
        return ds

    def _retrieve(self, task: PerformedTask) -> None:
        """Fetch the inputs into the instance store, then create (or adopt) the jobs and send them."""
        ds = self._live(task, TaskState.RETRIEVING)
        if ds is None:
            return
        if task.plugin not in self.manifests:
            self._to_cancel(task, TaskState.RETRIEVING, f"plugin {task.plugin} is no longer installed here")
            return
        try:
            inputs = input_series(ds)
        except ValueError as exc:
            self._to_cancel(task, TaskState.RETRIEVING, f"bad Input Information Sequence: {exc}", INCOMPLETE)
            return
        if not inputs:
            self._to_cancel(task, TaskState.RETRIEVING, "the workitem names no DICOM input series", INCOMPLETE)
            return
        manifest = self.manifests[task.plugin]
        folder = self.settings.tmp_dir / "ups" / str(task.id)
        try:
            source = self._source(inputs)
            if source is None:
                self._to_cancel(task, TaskState.RETRIEVING, "no usable retrieve location: the inputs name no known "
                                "AE title or WADO-RS URL and ups_worklist.retrieve_from is not set", INCOMPLETE)
                return
            study_uid = inputs[0].study_uid
            paths = fetch_series(source, study_uid, [s.series_uid for s in inputs], folder,
                                 ae_title=self.settings.ae_title)
            modalities = self._store(paths, inputs, source)
        except (PriorError, OSError, ValueError) as exc:
            self._retrieval_failed(task, str(exc) if not isinstance(exc, OSError) else f"{type(exc).__name__}")
            return
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        wanted = [s.series_uid for s in inputs if modalities.get(s.series_uid) in manifest.modalities]
        if not wanted:
            found = ", ".join(sorted({m or "?" for m in modalities.values()}))
            self._to_cancel(task, TaskState.RETRIEVING, f"plugin {manifest.name} takes "
                            f"{', '.join(manifest.modalities)}; the inputs are {found}", INCOMPLETE)
            return
        self._submit(task, manifest, study_uid, wanted, ds)

    def _source(self, inputs: Sequence[InputSeries]) -> Source | None:
        """Where to fetch the inputs: a WADO-RS URL under a configured dicomweb destination (its credentials), an
        AE title of a configured dicom destination or peer, a WADO-RS URL of another server, else the
        retrieve_from destination."""
        s = self.settings
        urls = [u for i in inputs for u in i.retrieve_urls if urlsplit(u).scheme in ("http", "https")]
        aes = [a for i in inputs for a in i.retrieve_aes]
        roots = [u.split("/studies/")[0].rstrip("/") for u in urls]
        for root in roots:
            for d in s.destinations:
                if d.kind == "dicomweb" and d.url.rstrip("/") == root:
                    return d
        for ae in aes:
            for d in s.destinations:
                if d.kind == "dicom" and d.ae_title == ae:
                    return d
            peer = s.peer(ae)
            if peer is not None:
                return DicomDestination(name="ups-input", kind="dicom", ae_title=peer.ae_title, host=peer.host,
                                        port=peer.port, tls=peer.tls)
        if roots:
            return DicomwebDestination(name="ups-input", kind="dicomweb", url=roots[0])
        if self.config.retrieve_from is not None:
            return s.destination(self.config.retrieve_from)
        return None

    def _store(self, paths: Sequence[Path], inputs: Sequence[InputSeries], source: Source) -> dict[str, str | None]:
        """Store the fetched instances through the normal ingest path (the named ones when the workitem names
        instances). Returns {series UID: modality}. Raises PriorError when one is refused or a named one is
        missing."""
        named = {s.series_uid: set(s.sop_uids) for s in inputs}
        calling_ae = source.ae_title if source.kind == "dicom" else None
        modalities: dict[str, str | None] = {}
        stored: dict[str, set[str]] = {}
        for path in paths:
            series_uid, sop_uid = path.parent.name, path.stem
            if named.get(series_uid) and sop_uid not in named[series_uid]:
                continue
            result = self.ingest.store(path.read_bytes(), calling_ae, source=SOURCE, study_uid=inputs[0].study_uid)
            if not result.ok:
                raise PriorError(f"instance {uid_hash(sop_uid)} not stored: {result.reason}")
            modalities[series_uid] = result.header.modality if result.header else None
            stored.setdefault(series_uid, set()).add(sop_uid)
        missing = sum(len(sops - stored.get(uid, set())) for uid, sops in named.items())
        if missing:
            raise PriorError(f"{missing} instance(s) the workitem names were not delivered by {source.name}")
        return {uid: (m or "").upper() or None for uid, m in modalities.items()}

    def _retrieval_failed(self, task: PerformedTask, reason: str) -> None:
        with self.maker.begin() as session:
            tries = tasks.note_error(session, task.id, f"retrieval: {reason}")
        if tries >= MAX_TRIES:
            self._to_cancel(task, TaskState.RETRIEVING, f"inputs not retrieved after {tries} tries: {reason}",
                            INCOMPLETE)
        else:
            log.warning("workitem %s (task %d): retrieval failed (try %d of %d): %s", uid_hash(task.workitem_uid),
                        task.id, tries, MAX_TRIES, reason)

    def _submit(self, task: PerformedTask, manifest: Manifest, study_uid: str, series_uids: list[str],
                ds: Dataset) -> None:
        """One job per input series (a plugin taking several series: one job on all), its series taken out of
        rule routing, in one transaction with the task's move to running; then the tasks are sent."""
        priority = "stat" if _text(ds.get("ScheduledProcedureStepPriority")) == "HIGH" else "routine"
        runs = [(series_uids[0], series_uids[1:])] if manifest.series.multiple else [(u, []) for u in series_uids]
        now = utcnow()
        note = f"UPS workitem {task.workitem_uid}: plugin {manifest.name} (not routed by rules)"
        send: list[tuple[int, str, str]] = []
        job_ids: list[int] = []
        with self.maker.begin() as session:
            for series_uid, others in runs:
                series_id = series_id_of(session, series_uid)
                for uid in [series_uid, *others]:
                    tasks.take_series(session, series_id_of(session, uid), note, now)
                new = NewJob(manifest.name, manifest.version, RULE, manifest.queue, priority,
                             destinations=list(self.destinations) if self.destinations is not None else None,
                             extra_series=others or None)
                job_id, run = tasks.adopt_job(session, series_id, new, now)
                job_ids.append(job_id)
                if run:
                    send.append((job_id, manifest.queue, priority))
            if not tasks.move(session, task.id, TaskState.RETRIEVING, TaskState.RUNNING, study_uid=study_uid,
                              series_uids=series_uids, job_ids=job_ids, attempts=0, reason=None):
                session.rollback()
                return
        sent = self.enqueuer.send(send)  # after the commit; the sweeper sends any the broker refused
        if sent:
            with self.maker.begin() as session:
                mark_enqueued(session, sent, utcnow())
        log.info("workitem %s (task %d): %d series stored; job(s) %s", uid_hash(task.workitem_uid), task.id,
                 len(series_uids), ", ".join(map(str, job_ids)))

    def _jobs(self, task: PerformedTask) -> list[dict[str, Any]]:
        with self.maker() as session:
            return [row for i in task.job_ids or [] for row in list_jobs(session, job_id=i)]

    def _follow(self, task: PerformedTask) -> None:
        """A running task: canceled when the provider asks or a job fails, completing once every job's results
        reached our destinations."""
        if self._live(task, TaskState.RUNNING) is None:
            return
        jobs = self._jobs(task)
        if len(jobs) != len(task.job_ids or []):
            self._to_cancel(task, TaskState.RUNNING, "a job of this workitem was removed")
            return
        if any(j["state"] in (JobState.QUEUED, JobState.RUNNING) for j in jobs):
            return
        for j in jobs:
            if j["state"] in (JobState.FAILED, JobState.SKIPPED):
                what = f"failed ({j['fail_stage']})" if j["state"] == JobState.FAILED else "skipped"
                self._to_cancel(task, TaskState.RUNNING, f"job {j['id']} {what}: {j['reason'] or 'no reason'}")
                return
        if any(j["state"] == JobState.ENCODED and any(d["state"] == "pending" for d in j["deliveries"])
               for j in jobs):
            return  # deliveries under way
        wanted = set(self.destinations if self.destinations is not None else
                     [d.name for d in self.settings.destinations])
        short = [j for j in jobs if wanted - {d["destination"] for d in j["deliveries"] if d["state"] == "sent"}]
        if short:  # an adopted job that ran before our destinations were added to it: run it again
            self._rerun(task, short)
            return
        with self.maker.begin() as session:
            tasks.move(session, task.id, TaskState.RUNNING, TaskState.COMPLETING, attempts=0)
        with self.maker() as session:
            self._complete(session.get(PerformedTask, task.id))

    def _rerun(self, task: PerformedTask, jobs: list[dict[str, Any]]) -> None:
        """Run adopted jobs again so that their results reach every worklist destination (a few times at most)."""
        from db.jobs import requeue

        if (task.attempts or 0) + 1 >= MAX_TRIES:
            self._to_cancel(task, TaskState.RUNNING, "the results did not reach every worklist destination")
            return
        with self.maker.begin() as session:
            tasks.note_error(session, task.id, "results not delivered to every worklist destination: run again")
            items = [(j["id"], j["queue"], j["priority"]) for j in jobs if requeue(session, j["id"])]
        sent = self.enqueuer.send(items)
        if sent:
            with self.maker.begin() as session:
                mark_enqueued(session, sent, utcnow())

    def _locations(self, jobs: list[dict[str, Any]]) -> list[Location]:
        """Where the results can be retrieved: each destination that got them and serves them back."""
        sent = {d["destination"] for j in jobs for d in j["deliveries"] if d["state"] == "sent"}
        out = []
        for d in self.settings.destinations:
            if d.name not in sent:
                continue
            if d.kind == "dicom":
                out.append(Location(frozenset(d.objects), ae_title=d.ae_title))
            elif d.kind == "dicomweb":
                out.append(Location(frozenset(d.objects), wado_root=d.url.rstrip("/")))
        return out

    def _complete(self, task: PerformedTask) -> None:
        """Send the Output Information and Performed Procedure Step, then COMPLETED. A refusal of the final
        state is tried again, then the task is failed with the provider's answer."""
        jobs = self._jobs(task)
        objects = [o for j in jobs for o in j["objects"]]
        started = task.claimed_at or task.created_at
        code = (task.plugin, task.plugin)
        version = next((j["plugin_version"] for j in jobs if j["plugin_version"]), "unknown")
        update = completion(objects, self._locations(jobs), station=self.station, plugin=code, version=version,
                            started=started, ended=utcnow())
        self._finish(task, TaskState.COMPLETING, TaskState.COMPLETED, "COMPLETED", update,
                     f"{len(objects)} result object(s)")

    def _cancel(self, task: PerformedTask) -> None:
        """Send the cancellation reason, then CANCELED."""
        reason = task.reason or "no reason recorded"
        code = INCOMPLETE if task.reason_code == INCOMPLETE[0] else UNSPECIFIED
        update = cancellation(reason, code, utcnow())
        self._finish(task, TaskState.CANCELING, TaskState.CANCELED, "CANCELED", update, reason)

    def _finish(self, task: PerformedTask, src: TaskState, dst: TaskState, state: str, update: Dataset,
                what: str) -> None:
        try:
            self.client.update(task.workitem_uid, task.transaction_uid, update)
            self.client.change_state(task.workitem_uid, state, task.transaction_uid)
        except UpsError as exc:
            if not exc.refused:
                raise
            try:  # the node may have stopped after the provider took the final state, before it was recorded
                done = _text(self.client.get(task.workitem_uid).get("ProcedureStepState")) == state
            except UpsError:
                done = False
            if not done:
                with self.maker.begin() as session:
                    tries = tasks.note_error(session, task.id, f"{state} refused: {exc}")
                if tries >= MAX_TRIES:
                    self._give_up(task, src, f"the provider refused {state} {tries} times: {exc}",
                                  level=logging.ERROR)
                else:
                    log.warning("workitem %s (task %d): %s refused: %s", uid_hash(task.workitem_uid), task.id,
                                state, exc)
                return
        with self.maker.begin() as session:
            tasks.move(session, task.id, src, dst)
        log.info("workitem %s (task %d) %s: %s", uid_hash(task.workitem_uid), task.id, state.lower(), what)
