"""Priors step: find a patient's earlier studies on the PACS and fetch them into a cache folder, by C-FIND and
C-GET or by QIDO-RS and WADO-RS, never through the instance store (a prior is never routed as a new study)."""

from __future__ import annotations

import logging
import re
import socket
import ssl
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, TypeVar

from pydicom import Dataset, dcmwrite

from node.dicom.association import keep_responses_for_their_caller
from node.files import atomic_write
from node.logs import uid_hash
from node.settings import DicomDestination, DicomwebDestination

log = logging.getLogger("radnode.priors")

TIMEOUT = 30.0  # seconds: TCP connect, association, each DIMSE answer, each HTTP request
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_MODALITY_RE = re.compile(r"^[A-Z0-9_ ]{1,16}$")  # a DICOM CS value
_PENDING = (0xFF00, 0xFF01)
_T = TypeVar("_T")


class PriorError(RuntimeError):
    """The source could not be queried or did not deliver the prior (the message names the source)."""


@dataclass(frozen=True)
class PriorStudy:
    """A study of the patient found on the source."""

    study_uid: str
    study_date: date | None
    modalities: tuple[str, ...]
    description: str | None


Source = DicomDestination | DicomwebDestination


def find_priors(source: Source, *, patient_id: str, modality: str, before: date, within_days: int,
                exclude_study_uid: str, max_studies: int, ae_title: str = "RADNODE",
                timeout: float = TIMEOUT) -> list[PriorStudy]:
    """The patient's studies on `source` that hold `modality` and are dated from `within_days` days before
    `before` up to `before` (both included), except `exclude_study_uid` (the current study); newest first, at
    most `max_studies`. The source's matching is checked again here, so a PACS that ignores a key never hands
    back another patient's study; a study whose answer lacks ModalitiesInStudy is kept (fetch_prior then
    finds no series of the modality in it if it has none). `ae_title` is our AE title (settings.ae_title),
    used for DICOM when the source sets no calling_ae.

    Raises ValueError for a bad argument (an empty or wildcard patient ID would match every patient) and
    PriorError when the source fails (refused, unreachable, timed out, HTTP error)."""
    if not patient_id.strip() or any(c in patient_id for c in "*?\\"):
        raise ValueError("patient_id must be a non-empty ID without the wildcards * ? or a backslash")
    _check_modality(modality)
    if within_days < 0:
        raise ValueError(f"within_days must be 0 or more, got {within_days}")
    if max_studies < 1:
        raise ValueError(f"max_studies must be 1 or more, got {max_studies}")
    first = before - timedelta(days=within_days)
    query = {"PatientID": patient_id, "StudyDate": f"{first:%Y%m%d}-{before:%Y%m%d}", "ModalitiesInStudy": modality}
    if source.kind == "dicom":
        answers = _dimse_studies(source, query, ae_title, timeout)
    elif source.kind == "dicomweb":
        answers = _qido_studies(source, query, timeout)
    else:
        raise PriorError(f"{_where(source)}: priors are fetched from a 'dicom' or 'dicomweb' destination only")

    found: dict[str, tuple[str, PriorStudy]] = {}
    for ds in answers:
        study_uid = _uid(ds.get("StudyInstanceUID"))
        study_date = _date(ds.get("StudyDate"))
        modalities = tuple(sorted(_values(ds.get("ModalitiesInStudy"))))
        if (str(ds.get("PatientID") or "").strip() != patient_id.strip() or study_uid in (None, exclude_study_uid)
                or study_date is None or not first <= study_date <= before
                or (modalities and modality not in modalities)):
            continue
        description = str(ds.get("StudyDescription") or "").strip() or None
        study_time = str(ds.get("StudyTime") or "").strip()
        found[study_uid] = (study_time, PriorStudy(study_uid, study_date, modalities, description))
    ordered = sorted(found.values(), key=lambda item: (item[1].study_date, item[0]), reverse=True)
    priors = [prior for _, prior in ordered[:max_studies]]
    log.info("priors: %d matching %s stud(ies) on %s, %d kept: %s", len(found), modality, source.name,
             len(priors), ", ".join(uid_hash(p.study_uid) for p in priors) or "-")
    return priors


def fetch_prior(source: Source, prior: PriorStudy, modality: str, dest_dir: Path, *, ae_title: str = "RADNODE",
                timeout: float = TIMEOUT) -> list[Path]:
    """Retrieve the series of `modality` of `prior` into `dest_dir/<study_uid>/<series_uid>/<sop_uid>.dcm`
    (each file written to a temporary file, then renamed) and return the paths, sorted; [] when the study
    has no series of that modality. DICOM uses C-GET on one association (C-MOVE would send the prior into our
    own receiver), DICOMweb uses WADO-RS in the stored transfer syntax. The files are a cache of the caller:
    nothing enters the instance store or the job table.

    Raises ValueError for a bad UID or modality, PriorError when the source fails or does not deliver every
    instance of the series or an instance cannot be written, OSError when a folder cannot be made."""
    study_uid = _uid(prior.study_uid)
    if study_uid is None:
        raise ValueError(f"not a DICOM UID: {prior.study_uid!r}")
    _check_modality(modality)
    if source.kind == "dicom":
        paths = _c_get_series(source, study_uid, modality, dest_dir / study_uid, ae_title, timeout)
    elif source.kind == "dicomweb":
        paths = _wado_series(source, study_uid, modality, dest_dir / study_uid, timeout)
    else:
        raise PriorError(f"{_where(source)}: priors are fetched from a 'dicom' or 'dicomweb' destination only")
    log.info("prior %s: %d %s instance(s) fetched from %s", uid_hash(study_uid), len(paths), modality, source.name)
    return sorted(paths)


def fetch_series(source: Source, study_uid: str, series_uids: Iterable[str], dest_dir: Path, *,
                 ae_title: str = "RADNODE", timeout: float = TIMEOUT) -> list[Path]:
    """Retrieve the named series of a study (a UPS workitem's inputs) like `fetch_prior` retrieves a prior's
    series, into `dest_dir/<study_uid>/<series_uid>/<sop_uid>.dcm`; returns the paths, sorted.

    Raises ValueError for a bad UID or no series, PriorError when the source fails or a series has no instance,
    OSError when a folder cannot be made."""
    uids = [_uid(u) for u in series_uids]
    if _uid(study_uid) is None or not uids or None in uids:
        raise ValueError("fetch_series needs a valid Study Instance UID and one or more valid Series Instance UIDs")
    wanted = sorted(set(uids))  # type: ignore[arg-type]
    if source.kind == "dicom":
        paths = _c_get_series(source, study_uid, None, dest_dir / study_uid, ae_title, timeout, wanted)
    elif source.kind == "dicomweb":
        paths = _wado_series(source, study_uid, None, dest_dir / study_uid, timeout, wanted)
    else:
        raise PriorError(f"{_where(source)}: series are fetched from a 'dicom' or 'dicomweb' destination only")
    empty = [u for u in wanted if not any(p.parent.name == u for p in paths)]
    if empty:
        raise PriorError(f"{_where(source)}: series {', '.join(uid_hash(u) for u in empty)}: no instances")
    log.info("study %s: %d instance(s) of %d series fetched from %s", uid_hash(study_uid), len(paths), len(wanted),
             source.name)
    return sorted(paths)


# --- values ---------------------------------------------------------------------------------------------


def _check_modality(modality: str) -> None:
    if not _MODALITY_RE.match(modality):
        raise ValueError(f"not a DICOM modality (upper-case Defined Term such as CT): {modality!r}")


def _uid(value: Any) -> str | None:
    """A well-formed UID (also safe as a file name), else None."""
    text = str(value or "").strip().rstrip("\0")
    return text if len(text) <= 64 and _UID_RE.match(text) else None


def _date(value: Any) -> date | None:
    text = str(value or "").strip()
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8])) if re.fullmatch(r"\d{8}", text) else None
    except ValueError:
        return None


def _values(value: Any) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)  # pydicom: a str, or a MultiValue of them
    return [text for text in (str(v).strip() for v in items) if text]


def _where(source: Any) -> str:
    if source.kind == "dicom":
        return f"prior source {source.name!r} ({source.ae_title}@{source.host}:{source.port})"
    if source.kind == "dicomweb":
        return f"prior source {source.name!r} ({source.url})"
    return f"prior source {source.name!r} (kind {source.kind})"


# --- DICOM: C-FIND and C-GET ----------------------------------------------------------------------------


def _tls_context(source: DicomDestination) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(source.tls_ca) if source.tls_ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if source.tls_cert is not None:
        ctx.load_cert_chain(str(source.tls_cert), str(source.tls_key) if source.tls_key else None)
    return ctx


def _associate(source: DicomDestination, ae_title: str, timeout: float, *, get: bool,
               on_store: Callable[[Any], int] | None = None) -> Any:
    """An association for Study Root C-FIND (and C-GET with every storage SOP class in the SCP role, the
    instances arriving on `on_store`). Raises PriorError when it is not established."""
    from pynetdicom import AE, StoragePresentationContexts, build_context, build_role, evt
    from pynetdicom.sop_class import (
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
    )

    ae = AE(ae_title=source.calling_ae or ae_title)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    contexts = [build_context(StudyRootQueryRetrieveInformationModelFind)]
    roles = []
    if get:
        contexts.append(build_context(StudyRootQueryRetrieveInformationModelGet))
        contexts += StoragePresentationContexts  # 120 + 2: within the 128 contexts of one association
        roles = [build_role(cx.abstract_syntax, scp_role=True) for cx in StoragePresentationContexts]
    ae.requested_contexts = contexts
    try:
        tls_args = (_tls_context(source), source.host) if source.tls else None
    except (OSError, ssl.SSLError) as exc:
        raise PriorError(f"{_where(source)}: TLS set-up failed: {type(exc).__name__}: {exc}") from None
    handlers = [(evt.EVT_C_STORE, on_store)] if on_store is not None else []
    assoc = ae.associate(source.host, source.port, ae_title=source.ae_title, ext_neg=roles or None,
                         evt_handlers=handlers, tls_args=tls_args)
    if not assoc.is_established:
        reason = ("association rejected (check the AE titles and that the PACS knows our calling AE)"
                  if assoc.is_rejected else "no association: connection refused, unreachable, timed out or aborted")
        raise PriorError(f"{_where(source)}: {reason}")
    keep_responses_for_their_caller(assoc)
    sock = assoc.dul.socket.socket if assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    wanted = [StudyRootQueryRetrieveInformationModelFind, *([StudyRootQueryRetrieveInformationModelGet] if get else [])]
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    missing = [str(uid.name) for uid in wanted if uid not in accepted]
    if missing:
        assoc.release()
        raise PriorError(f"{_where(source)}: the PACS does not support {', '.join(missing)}")
    return assoc


def _released(assoc: Any) -> None:
    if assoc.is_established:
        assoc.release()


def _lost(assoc: Any) -> str:
    """Why a request got no answer (a PACS that refuses our calling AE often aborts instead of answering)."""
    return (f"no answer: the association was aborted or timed out (does the PACS allow queries and retrieves "
            f"from our calling AE {assoc.requestor.ae_title!r}?)")


def _status(status: Any) -> int | None:
    return int(status.Status) if status is not None and "Status" in status else None


def _c_find(assoc: Any, source: DicomDestination, keys: dict[str, str]) -> list[Dataset]:
    """The identifiers a Study Root C-FIND answers. Raises PriorError on a failure status or no answer."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    identifier = Dataset()
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    out = []
    for status, found in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
        code = _status(status)
        if code is None:
            raise PriorError(f"{_where(source)}: C-FIND at {keys['QueryRetrieveLevel']} level: {_lost(assoc)}")
        if code in _PENDING:
            if found is not None:
                out.append(found)
        elif code == 0x0000:
            break
        else:
            comment = str(status.get("ErrorComment", "")).strip()
            raise PriorError(f"{_where(source)}: C-FIND at {keys['QueryRetrieveLevel']} level refused: status "
                             f"0x{code:04X} {comment}".strip())
    return out


def _dimse_studies(source: DicomDestination, query: dict[str, str], ae_title: str, timeout: float) -> list[Dataset]:
    keys = {"QueryRetrieveLevel": "STUDY", **query, "StudyTime": "", "StudyInstanceUID": "", "StudyDescription": ""}
    assoc = _associate(source, ae_title, timeout, get=False)
    try:
        return _c_find(assoc, source, keys)
    finally:
        _released(assoc)


class _Receiver:
    """EVT_C_STORE handler of a C-GET: writes each instance as it was encoded into the current folder."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.paths: list[Path] = []
        self.errors: list[str] = []

    def __call__(self, event: Any) -> int:
        sop_uid = _uid(event.request.AffectedSOPInstanceUID)
        if sop_uid is None or self.folder is None:
            self.errors.append("an instance without a valid SOP Instance UID")
            return 0xC210
        path = self.folder / f"{sop_uid}.dcm"
        try:
            atomic_write(path, event.encoded_dataset(include_meta=True))
        except OSError as exc:
            self.errors.append(f"cannot write {uid_hash(sop_uid)}: {type(exc).__name__}")
            return 0xA700
        except Exception:  # the DIMSE boundary: a status to the sender, the traceback in our log
            log.exception("prior: cannot store instance %s", uid_hash(sop_uid))
            self.errors.append(f"cannot store {uid_hash(sop_uid)}")
            return 0xC211
        self.paths.append(path)
        return 0x0000


def _c_get_series(source: DicomDestination, study_uid: str, modality: str | None, folder: Path, ae_title: str,
                  timeout: float, series: list[str] | None = None) -> list[Path]:
    """C-GET of the study's series of `modality` (found by C-FIND), or of the `series` named."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    receiver = _Receiver()
    assoc = _associate(source, ae_title, timeout, get=True, on_store=receiver)
    try:
        if series is None:
            answers = _c_find(assoc, source, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": study_uid,
                                              "SeriesInstanceUID": "", "Modality": modality})
            series = sorted({uid for ds in answers if str(ds.get("Modality") or "").strip() == modality
                             and (uid := _uid(ds.get("SeriesInstanceUID"))) is not None})
        for series_uid in series:
            if not assoc.is_established:
                raise PriorError(f"{_where(source)}: C-GET of series {uid_hash(series_uid)}: {_lost(assoc)}")
            receiver.folder = folder / series_uid
            receiver.folder.mkdir(parents=True, exist_ok=True)
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "SERIES"
            identifier.StudyInstanceUID = study_uid
            identifier.SeriesInstanceUID = series_uid
            final = None
            for status, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
                final = status
                if _status(status) not in _PENDING:
                    break
            code = _status(final)
            where = f"{_where(source)}: C-GET of series {uid_hash(series_uid)}"
            if code is None:
                raise PriorError(f"{where}: {_lost(assoc)}")
            failed = int(final.get("NumberOfFailedSuboperations", 0) or 0)
            if code != 0x0000 or failed or receiver.errors:
                detail = "; ".join(receiver.errors[:3])
                raise PriorError(f"{where}: status 0x{code:04X}, {failed} instance(s) failed {detail}".strip())
    finally:
        _released(assoc)
    return receiver.paths


# --- DICOMweb: QIDO-RS and WADO-RS ----------------------------------------------------------------------


def _dicomweb(source: DicomwebDestination, timeout: float) -> Any:
    import requests
    from dicomweb_client import DICOMwebClient

    session = requests.Session()
    if source.token is not None:
        session.headers["Authorization"] = f"Bearer {source.token.get_secret_value()}"
    elif source.username is not None:
        session.auth = (source.username, source.password.get_secret_value() if source.password else "")
    session.verify = str(source.verify_tls) if isinstance(source.verify_tls, Path) else source.verify_tls
    client = DICOMwebClient(url=source.url.rstrip("/"), session=session, timeout=timeout)
    client.set_http_retry_params(retry=False)  # bounded: one try per request; the caller decides on retries
    return client


def _web(source: DicomwebDestination, what: str, call: Callable[[], _T]) -> _T:
    """Run one DICOMweb call; HTTP and network errors become PriorError. The exception's own text is left
    out: it carries the request URL, whose query names the patient."""
    import requests

    try:
        return call()
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        raise PriorError(f"{_where(source)}: {what}: HTTP {status}") from None
    except requests.RequestException as exc:
        raise PriorError(f"{_where(source)}: {what}: {type(exc).__name__} (unreachable or timed out)") from None


def _from_json(items: Iterable[dict]) -> list[Dataset]:
    return [Dataset.from_json(item) for item in items]


def _qido_studies(source: DicomwebDestination, query: dict[str, str], timeout: float) -> list[Dataset]:
    client = _dicomweb(source, timeout)
    fields = ["StudyInstanceUID", "StudyDate", "StudyTime", "StudyDescription", "ModalitiesInStudy", "PatientID"]
    return _from_json(_web(source, "QIDO-RS study search",
                           lambda: client.search_for_studies(search_filters=query, fields=fields)))


def _wado_series(source: DicomwebDestination, study_uid: str, modality: str | None, folder: Path,
                 timeout: float, series: list[str] | None = None) -> list[Path]:
    """WADO-RS of the study's series of `modality` (found by QIDO-RS), or of the `series` named."""
    client = _dicomweb(source, timeout)
    if series is None:
        answers = _from_json(_web(source, "QIDO-RS series search", lambda: client.search_for_series(
            study_uid, search_filters={"Modality": modality}, fields=["Modality"])))
        series = sorted({uid for ds in answers if str(ds.get("Modality") or "").strip() == modality
                         and (uid := _uid(ds.get("SeriesInstanceUID"))) is not None})
    paths = []
    for series_uid in series:
        (folder / series_uid).mkdir(parents=True, exist_ok=True)
        instances: Iterator[Dataset] = client.iter_series(study_uid, series_uid,
                                                          media_types=(("application/dicom", "*"),))
        what = f"WADO-RS of series {uid_hash(series_uid)}"
        while (ds := _web(source, what, lambda it=instances: next(it, None))) is not None:
            sop_uid = _uid(ds.get("SOPInstanceUID"))
            if sop_uid is None:
                raise PriorError(f"{_where(source)}: {what}: an instance without a valid SOP Instance UID")
            path = folder / series_uid / f"{sop_uid}.dcm"
            try:
                atomic_write(path, lambda f, ds=ds: dcmwrite(f, ds, enforce_file_format=True))
            except OSError as exc:
                raise PriorError(f"{_where(source)}: {what}: cannot write {uid_hash(sop_uid)}: "
                                 f"{type(exc).__name__}: {exc.strerror}") from None
            paths.append(path)
        if not any(p.parent.name == series_uid for p in paths):
            raise PriorError(f"{_where(source)}: {what}: no instances")
    return paths
