"""Dispatch step: a job's result objects to one destination (C-STORE SCU, STOW-RS, Orthanc REST, return
to sender), one attempt per task, recorded in the delivery row; the sweeper sends retries when due."""

from __future__ import annotations

import functools
import json
import logging
import ssl
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from db import deliveries, jobs
from db.heartbeat import Heartbeat
from db.models import utcnow
from node import metrics
from node.dispatch.errors import DeliveryError
from node.dispatch.net import http_session, tls_context
from node.dispatch.report import JobReport, build_report
from node.dispatch.scu import AssociationFailed, send
from node.results import object_kind
from node.settings import (
    DicomDestination,
    DicomwebDestination,
    FhirDestination,
    Hl7v2Destination,
    OrthancDestination,
    Peer,
    ReturnToSender,
    Settings,
)

log = logging.getLogger("radnode.dispatch")

TIMEOUT = 60.0  # seconds for one HTTP request or DIMSE exchange


def result_files(outputs: Sequence[str], kinds: Collection[str] = ("SR", "SEG", "SC")) -> list[Path]:
    """The DICOM objects of the given kinds among a job's outputs (findings.json and arrays stay local).
    Raises DeliveryError (permanent) when one of them is missing on disk."""
    files = [Path(p) for p in outputs if object_kind(p) in kinds]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DeliveryError(f"output files missing: {', '.join(missing)}; retry the job to write them again",
                            permanent=True)
    return files


# --- senders --------------------------------------------------------------------------------------------


def send_dicom(files: list[Path], host: str, port: int, called_ae: str, calling_ae: str,
               tls: ssl.SSLContext | None = None) -> int:
    """C-STORE every file over one association (TCP_NODELAY). Returns the number stored."""
    try:
        report = send(files, host, port, called_ae=called_ae, calling_ae=calling_ae, tls=tls)
    except AssociationFailed as exc:
        raise DeliveryError(str(exc)) from None
    except (OSError, ssl.SSLError) as exc:
        raise DeliveryError(f"{called_ae}@{host}:{port}: {type(exc).__name__}: {exc}") from None
    problems = report.failed + report.skipped
    if problems:
        shown = "; ".join(f"{Path(f).name}: {why}" for f, why in problems[:5])
        raise DeliveryError(f"{len(problems)} of {len(files)} object(s) not stored by {called_ae}: {shown}")
    return report.sent


def send_dicomweb(files: list[Path], dest: DicomwebDestination) -> int:
    """STOW-RS of every file in one multipart request. Returns the number the server stored."""
    import requests
    from dicomweb_client import DICOMwebClient

    datasets = [dcmread(f) for f in files]
    client = DICOMwebClient(url=dest.url.rstrip("/"), session=http_session(dest.username, dest.password, dest.token,
                                                                       dest.verify_tls), timeout=TIMEOUT)
    try:
        response = client.store_instances(datasets)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        permanent = status in (400, 401, 403, 404, 405)
        raise DeliveryError(f"STOW-RS to {dest.url}: HTTP {status}: {exc}", permanent=permanent) from None
    except requests.RequestException as exc:
        raise DeliveryError(f"STOW-RS to {dest.url}: {type(exc).__name__}: {exc}") from None
    failed = list(getattr(response, "FailedSOPSequence", []) or [])
    if failed:
        reasons = ", ".join(f"0x{int(item.get('FailureReason', 0)):04X}" for item in failed[:5])
        raise DeliveryError(f"STOW-RS to {dest.url}: {len(failed)} of {len(files)} refused (reasons {reasons})")
    stored = list(getattr(response, "ReferencedSOPSequence", []) or [])
    return len(stored) if stored else len(files)


def send_orthanc(files: list[Path], dest: OrthancDestination) -> int:
    """POST each file to Orthanc's /instances. Returns the number stored (or already there)."""
    from orthanc_api_client import OrthancApiClient
    from orthanc_api_client import exceptions as oe

    password = dest.password.get_secret_value() if dest.password is not None else None
    client = OrthancApiClient(dest.url.rstrip("/"), user=dest.username, pwd=password)
    stored = 0
    for f in files:
        try:
            answer = client.post("instances", data=f.read_bytes()).json()
        except (oe.NotAuthorized, oe.Forbidden) as exc:
            raise DeliveryError(f"Orthanc {dest.url} refused our credentials: {exc.msg}", permanent=True) from None
        except oe.HttpError as exc:
            raise DeliveryError(f"Orthanc {dest.url}: {f.name}: HTTP {exc.http_status_code}: {exc.msg}") from None
        except oe.OrthancApiException as exc:
            raise DeliveryError(f"Orthanc {dest.url}: {type(exc).__name__}: {exc.msg}") from None
        status = answer.get("Status") if isinstance(answer, dict) else None
        if status not in ("Success", "AlreadyStored"):
            raise DeliveryError(f"Orthanc {dest.url}: {f.name}: unexpected answer {answer!r}"[:500])
        stored += 1
    return stored


def send_to(dest: Any, files: list[Path], settings: Settings, sender_ae: str | None) -> int:
    """Send `files` to one configured destination. Returns the number of objects stored.

    Raises DeliveryError; `sender_ae` is the calling AE of the source series (return to sender).
    """
    if isinstance(dest, DicomDestination):
        tls = tls_context(dest.tls_ca, dest.tls_cert, dest.tls_key) if dest.tls else None
        return send_dicom(files, dest.host, dest.port, dest.ae_title, dest.calling_ae or settings.ae_title, tls)
    if isinstance(dest, DicomwebDestination):
        return send_dicomweb(files, dest)
    if isinstance(dest, OrthancDestination):
        return send_orthanc(files, dest)
    if isinstance(dest, ReturnToSender):
        peer: Peer | None = settings.peer(sender_ae)
        if peer is None:
            known = ", ".join(p.ae_title for p in settings.peers) or "none"
            who = f"calling AE {sender_ae!r}" if sender_ae else "the sender (the series arrived without a calling AE)"
            raise DeliveryError(f"return to sender: {who} is not among the configured peers ({known})",
                                permanent=True)
        tls = tls_context(settings.tls_ca, settings.tls_cert, settings.tls_key) if peer.tls else None
        return send_dicom(files, peer.host, peer.port, peer.ae_title, settings.ae_title, tls)
    raise DeliveryError(f"unknown destination kind {type(dest).__name__}", permanent=True)


# --- results as a report (FHIR, HL7 v2) -------------------------------------------------------------------

REPORT_KINDS = (FhirDestination, Hl7v2Destination)


def job_report(job_id: int, outputs: Sequence[str], dest: FhirDestination | Hl7v2Destination, source: Path | None,
               flag_findings: dict[str, Any] | None) -> JobReport:
    """The report a FHIR or HL7 v2 destination gets: from findings.json and the result objects, or, for a triage
    flag sent ahead (`flag_findings`, the findings recorded on the job), from those alone. Patient and study come
    from a stored instance of the source series (`source`), else from the SR. Raises DeliveryError (permanent)."""
    objects: list[Dataset] = []
    if flag_findings is None:
        document = next((Path(p) for p in outputs if Path(p).name == "findings.json"), None)
        if document is None or not document.is_file():
            raise DeliveryError("findings.json missing; retry the job to write it again", permanent=True)
        findings = json.loads(document.read_text(encoding="utf-8"))
        objects = [dcmread(f, stop_before_pixels=True) for f in result_files(outputs, dest.objects)]
    else:
        findings = flag_findings
    header = dcmread(source, stop_before_pixels=True) if source is not None and source.is_file() else None
    if header is None and not objects:
        raise DeliveryError("no header to take the patient and study from: the source instances were removed "
                            "and the job has no result object for this destination", permanent=True)
    return build_report(job_id, findings, header if header is not None else objects[0], objects,
                        flag_only=flag_findings is not None)


def send_report(dest: FhirDestination | Hl7v2Destination, report: JobReport) -> int:
    """Send one job's report. Returns the number of resources or messages the destination took. Raises
    DeliveryError."""
    if isinstance(dest, FhirDestination):
        from node.dispatch.fhir import send_fhir

        return send_fhir(report, dest)
    from node.dispatch.hl7v2 import send_hl7v2

    return send_hl7v2(report, dest)


# --- one attempt ----------------------------------------------------------------------------------------


Sender = Callable[[Any, list[Path], Settings, str | None], int]
Reporter = Callable[[Any, JobReport], int]


class Dispatcher:
    """Runs one delivery attempt and records its outcome (the task body of `radnode.dispatch`)."""

    def __init__(self, settings: Settings, maker: sessionmaker[Session], sender: Sender = send_to,
                 reporter: Reporter = send_report) -> None:
        self.settings, self.maker, self.sender, self.reporter = settings, maker, sender, reporter

    def run(self, delivery_id: int) -> str:
        """Attempt delivery `delivery_id` if it is due and nobody else holds it. Returns what happened:
        sent, retry, failed, or duplicate (nothing done). Raises only database errors."""
        s = self.settings
        now = utcnow()
        with self.maker.begin() as session:
            claim = deliveries.claim(session, delivery_id, now)
            if claim is None:
                log.info("delivery %d not due or held elsewhere; task ignored", delivery_id)
                return "duplicate"
            plugin, outputs, sender_ae = deliveries.job_outputs(session, claim.job_id)
            flag_to = deliveries.flag_of(claim.destination)
            recorded, source_path = deliveries.flag_inputs(session, claim.job_id)
            moot = flag_to is not None and deliveries.results_sent(session, claim.job_id, flag_to)
        t = time.perf_counter()
        beat = functools.partial(deliveries.heartbeat, delivery_id=delivery_id)
        error: DeliveryError | None = None
        with Heartbeat(self.maker, beat, s.job_heartbeat_seconds, f"delivery {delivery_id}"):
            try:
                dest = s.destination(flag_to or claim.destination)
                if moot:  # the results, which carry the flag, are there already: a late flag would demote them
                    count = 0
                elif isinstance(dest, REPORT_KINDS):
                    source = s.instances_dir / source_path if source_path else None
                    report = job_report(claim.job_id, outputs, dest, source, recorded if flag_to else None)
                    count = self.reporter(dest, report)
                else:
                    files = result_files(outputs, dest.objects)
                    # a job may have none of the kinds this destination takes (an SR-only job, a SEG-only PACS)
                    count = self.sender(dest, files, s, sender_ae) if files else 0
            except KeyError:
                error = DeliveryError(f"destination {claim.destination!r} is not configured on this worker",
                                      permanent=True)
            except DeliveryError as exc:
                error = exc
            except Exception as exc:  # a sender bug or an unexpected library error: retried, logged in full
                log.exception("delivery %d to %s: unexpected error", delivery_id, claim.destination)
                error = DeliveryError(f"{type(exc).__name__}: {exc}")
        seconds = time.perf_counter() - t
        with self.maker.begin() as session:
            if error is None:
                job_state = deliveries.succeeded(session, claim, count, utcnow())
                outcome = "sent" if job_state is not None or deliveries.is_sent(session, delivery_id) else "lost"
                if outcome == "sent":
                    jobs.add_timing(session, claim.job_id, f"deliver:{claim.destination}", round(seconds, 3))
            else:
                outcome, job_state = deliveries.attempt_failed(
                    session, claim, str(error), utcnow(), max_attempts=s.delivery_max_attempts,
                    base=s.delivery_backoff_seconds, cap=s.delivery_backoff_max_seconds, permanent=error.permanent,
                )
        metrics.delivery_attempt(claim.destination, plugin, outcome, seconds)
        if outcome == "lost":
            log.warning("job %d: delivery to %s was taken back meanwhile (job retried or attempt released)",
                        claim.job_id, claim.destination)
        elif error is None:
            log.info("job %d: %d object(s) sent to %s in %.2f s", claim.job_id, count, claim.destination, seconds)
        elif outcome == "retry":
            wait = deliveries.backoff(claim.attempt, s.delivery_backoff_seconds, s.delivery_backoff_max_seconds)
            log.warning("job %d: delivery to %s failed (attempt %d of %d), retry in %g s: %s", claim.job_id,
                        claim.destination, claim.attempt, s.delivery_max_attempts, wait, error)
        else:
            log.error("job %d: delivery to %s failed for good after %d attempt(s): %s", claim.job_id,
                      claim.destination, claim.attempt, error)
        if job_state:
            log.info("job %d %s", claim.job_id, job_state)
        return outcome
