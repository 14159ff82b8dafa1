"""Worklist step: radnode's UPS worklist (IHE AIW-I; PS3.4 Annex CC, PS3.18 §11) — the shared vocabulary (SOP
classes, states, the code that names a plugin, statuses), workitem validation and defaults, attribute matching,
and the Worklist that both front ends call (UPS-RS: node/api/ups.py, DIMSE: node/ups/dimse.py), so a workitem
behaves the same whichever way it is reached. The performer may import the vocabulary from here."""

from __future__ import annotations

import enum
import fnmatch
import logging
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.uid import generate_uid

from node.dicom.header import is_valid_uid
from node.logs import uid_hash

log = logging.getLogger("radnode.ups")

UPS_PUSH = "1.2.840.10008.5.1.4.34.6.1"  # every UPS instance is of this SOP class
UPS_WATCH = "1.2.840.10008.5.1.4.34.6.2"
UPS_PULL = "1.2.840.10008.5.1.4.34.6.3"
UPS_EVENT = "1.2.840.10008.5.1.4.34.6.4"
UPS_QUERY = "1.2.840.10008.5.1.4.34.6.5"
UPS_CLASSES = (UPS_PUSH, UPS_WATCH, UPS_PULL, UPS_EVENT, UPS_QUERY)
GLOBAL_SUBSCRIPTION = "1.2.840.10008.5.1.4.34.5"  # the well-known UID of worklist subscriptions
FILTERED_GLOBAL_SUBSCRIPTION = "1.2.840.10008.5.1.4.34.5.1"

SCHEME = "99RADNODE"  # CodingSchemeDesignator of the ScheduledWorkitemCodeSequence item; CodeValue = plugin name
UNSPECIFIED_DISCONTINUATION = ("110513", "DCM", "Discontinued for unspecified reason")  # CID 9300
CHANGE_STATE, REQUEST_CANCEL = 1, 2  # N-ACTION Action Type IDs (PS3.4 CC.2.1, CC.2.2)


class State(enum.StrEnum):
    """Procedure Step State (0074,1000), PS3.4 Table CC.1.1-1."""

    SCHEDULED = "SCHEDULED"
    IN_PROGRESS = "IN PROGRESS"
    CANCELED = "CANCELED"
    COMPLETED = "COMPLETED"


FINAL = frozenset({State.COMPLETED, State.CANCELED})


class Priority(enum.StrEnum):
    """Scheduled Procedure Step Priority (0074,1200)."""

    HIGH = "HIGH"
    MEDIUM = "MEDIUM"
    LOW = "LOW"


class InputReadiness(enum.StrEnum):
    """Input Readiness State (0040,4041)."""

    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    INCOMPLETE = "INCOMPLETE"


class Status(enum.IntEnum):
    """The DIMSE statuses radnode answers for UPS (PS3.4 CC.2, PS3.7 general statuses)."""

    SUCCESS = 0x0000
    CREATED_WITH_MODIFICATIONS = 0xB300
    ALREADY_CANCELED = 0xB304  # warning
    ALREADY_COMPLETED = 0xB306  # warning
    NO_LONGER_UPDATABLE = 0xC300
    WRONG_TRANSACTION_UID = 0xC301
    ALREADY_IN_PROGRESS = 0xC302
    ONLY_CREATE_SCHEDULES = 0xC303
    FINAL_STATE_NOT_MET = 0xC304
    NO_SUCH_UPS = 0xC307
    CREATE_NOT_SCHEDULED = 0xC309
    NOT_IN_PROGRESS = 0xC310
    COMPLETED_ALREADY = 0xC311  # a cancel request for a completed UPS
    NO_EVENT_REPORTS = 0xC315  # subscriptions are not offered
    DUPLICATE_INSTANCE = 0x0111
    INVALID_ATTRIBUTE_VALUE = 0x0106
    MISSING_ATTRIBUTE = 0x0120
    MISSING_ATTRIBUTE_VALUE = 0x0121
    INVALID_ARGUMENT_VALUE = 0x0115
    NO_SUCH_ACTION = 0x0123
    NO_SUCH_SOP_CLASS = 0x0118
    PROCESSING_FAILURE = 0x0110
    OUT_OF_RESOURCES = 0xA700
    IDENTIFIER_MISMATCH = 0xA900  # a C-FIND identifier (search) radnode cannot use


class UPSError(Exception):
    """A refused UPS operation: the DIMSE status, the HTTP status of UPS-RS and what was wrong."""

    def __init__(self, status: int, http: int, message: str) -> None:
        super().__init__(message)
        self.status, self.http, self.message = status, http, message


@dataclass(frozen=True)
class Outcome:
    """A successful operation: SUCCESS or a warning status with its text (the UPS-RS Warning header)."""

    status: int = Status.SUCCESS
    warning: str | None = None


def _bad(message: str, status: int = Status.INVALID_ATTRIBUTE_VALUE) -> UPSError:
    return UPSError(status, 400, message)


# --- datasets: DICOM JSON in and out ------------------------------------------------------------------------


def from_json(data: Any) -> Dataset:
    """A dataset from DICOM JSON (PS3.18 F.2): an object, or an array of exactly one. Raises UPSError (400)."""
    if isinstance(data, list):
        if len(data) != 1:
            raise _bad(f"the payload must hold one dataset, not {len(data)}")
        data = data[0]
    if not isinstance(data, dict):
        raise _bad("the payload is not a DICOM JSON dataset (an object of tags)")
    if "BulkDataURI" in repr(data):
        raise _bad("bulk data (BulkDataURI) is not supported in workitems")
    try:
        ds = Dataset.from_json(data)
        for elem in ds.iterall():  # decode everything now: a bad value is the client's error, here
            elem.value  # noqa: B018
    except Exception as exc:  # pydicom raises many kinds for malformed JSON
        raise _bad(f"not a valid DICOM JSON dataset: {type(exc).__name__}: {exc}"[:300]) from None
    return ds


def to_json(ds: Dataset) -> dict[str, Any]:
    """The dataset as DICOM JSON, without the Transaction UID and the Specific Character Set (JSON is UTF-8)."""
    out = Dataset()
    for elem in ds:
        if elem.keyword not in ("TransactionUID", "SpecificCharacterSet") and elem.tag.group > 0x0002:
            out.add(elem)
    return out.to_json_dict()


def valued(ds: Dataset, keyword: str) -> bool:
    """True when `keyword` is in `ds` with a value (a sequence with at least one item)."""
    return keyword in ds and not ds[keyword].is_empty


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def now_dt() -> str:
    """The current time as a DICOM DT in UTC with its offset."""
    return datetime.now(UTC).strftime("%Y%m%d%H%M%S") + "+0000"


_DT = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d{1,6})?([+-]\d{4})?$")
_LOW, _HIGH = "00000101000000", "99991231235959"


def dt_key(value: str, high: bool = False) -> str | None:
    """A DA/DT value as YYYYMMDDHHMMSS (missing parts padded to the earliest or, `high`, the latest moment;
    fraction and offset dropped), or None when it is not a date-time."""
    match = _DT.match(value.strip())
    if not match:
        return None
    digits = "".join(g or "" for g in match.groups()[:6])
    return digits + (_HIGH if high else _LOW)[len(digits):]


def _tm_key(value: str, high: bool = False) -> str | None:
    digits = value.strip().split(".")[0].replace(":", "")
    if not digits.isdigit() or len(digits) > 6:
        return None
    return digits + ("235959" if high else "000000")[len(digits):]


def code_value(item: Dataset) -> str:
    """A code's value: Code Value, or Long Code Value for one over 16 characters (PS3.3 8.8)."""
    return _text(item, "CodeValue") or _text(item, "LongCodeValue")


def plugin_of(ds: Dataset) -> str | None:
    """The plugin a workitem names: the value of its 99RADNODE ScheduledWorkitemCodeSequence item, or None."""
    for item in ds.get("ScheduledWorkitemCodeSequence", []):
        if _text(item, "CodingSchemeDesignator") == SCHEME and code_value(item):
            return code_value(item)
    return None


def cancel_requested(ds: Dataset) -> bool:
    """True when someone asked to cancel this IN PROGRESS workitem (the performer should cancel it): radnode
    records a cancel request as a Reason For Cancellation in the Procedure Step Progress Information."""
    return str(ds.get("ProcedureStepState", "")) == State.IN_PROGRESS and any(
        valued(item, "ReasonForCancellation") for item in ds.get("ProcedureStepProgressInformationSequence", []))


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """One item of a code sequence (a value over 16 characters as Long Code Value)."""
    item = Dataset()
    if len(value) > 16:
        item.LongCodeValue = value
    else:
        item.CodeValue = value
    item.CodingSchemeDesignator, item.CodeMeaning = scheme, meaning
    return item


# --- validation (PS3.4 Table CC.2.5-3, PS3.3 Table 10-3b) -------------------------------------------------

# N-CREATE: Type 1 for the SCU (radnode also needs the workitem code that names the plugin)
REQUIRED = ("ScheduledProcedureStepPriority", "ProcedureStepLabel", "ScheduledProcedureStepStartDateTime",
            "InputReadinessState", "ScheduledWorkitemCodeSequence")
# N-CREATE Type 2: an SCU leaving one out gets it created empty (the SCP's Type 2), with a warning
CREATED_EMPTY = (
    "ScheduledProcessingParametersSequence", "ScheduledStationNameCodeSequence", "ScheduledStationClassCodeSequence",
    "ScheduledStationGeographicLocationCodeSequence", "CommentsOnTheScheduledProcedureStep", "InputInformationSequence",
    "StudyInstanceUID", "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence", "PatientBirthDate", "PatientSex", "AdmissionID", "IssuerOfAdmissionIDSequence",
    "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "ReferencedRequestSequence",
    "ProcedureStepProgressInformationSequence", "UnifiedProcedureStepPerformedProcedureSequence")
EMPTY_AT_CREATE = ("ProcedureStepProgressInformationSequence", "UnifiedProcedureStepPerformedProcedureSequence")
# N-SET "Not Allowed": identity, state, the patient and the request the UPS was created for
NOT_SETTABLE = ("SOPClassUID", "SOPInstanceUID", "ProcedureStepState", "TransactionUID", "PatientName", "PatientID",
                "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "PatientBirthDate", "PatientSex",
                "AdmissionID", "IssuerOfAdmissionIDSequence", "AdmittingDiagnosesDescription",
                "AdmittingDiagnosesCodeSequence", "ReferencedRequestSequence", "ReplacedProcedureStepSequence",
                "ScheduledProcedureStepModificationDateTime")
# N-SET "3/1": may be left out, but never emptied
NOT_EMPTIED = ("ScheduledProcedureStepPriority", "ProcedureStepLabel", "WorklistLabel",
               "ScheduledProcedureStepStartDateTime", "InputReadinessState", "ScheduledWorkitemCodeSequence")
RETRIEVAL = {"DICOMRetrievalSequence": "RetrieveAETitle", "WADORSRetrievalSequence": "RetrieveURL",
             "WADORetrievalSequence": "RetrieveURI", "DICOMMediaRetrievalSequence": "StorageMediaFileSetUID",
             "XDSRetrievalSequence": "RepositoryUniqueID"}


def _check_values(ds: Dataset, plugins: Collection[str] | None) -> None:
    """Check the values radnode relies on, where present. Raises UPSError (400)."""
    for keyword, kind in (("ScheduledProcedureStepPriority", Priority), ("InputReadinessState", InputReadiness)):
        if valued(ds, keyword) and str(ds[keyword].value) not in set(kind):
            raise _bad(f"{keyword} {str(ds[keyword].value)!r} is not one of {', '.join(kind)}")
    for keyword in ("ScheduledProcedureStepStartDateTime", "ExpectedCompletionDateTime",
                    "ScheduledProcedureStepExpirationDateTime"):
        if valued(ds, keyword) and dt_key(str(ds[keyword].value)) is None:
            raise _bad(f"{keyword} {str(ds[keyword].value)!r} is not a DICOM date-time (YYYYMMDDHHMMSS)")
    if valued(ds, "StudyInstanceUID") and not is_valid_uid(str(ds.StudyInstanceUID)):
        raise _bad("StudyInstanceUID is not a valid UID")
    if "ScheduledWorkitemCodeSequence" in ds:
        _check_task_code(ds.ScheduledWorkitemCodeSequence, plugins)
    if "InputInformationSequence" in ds:
        check_references(ds.InputInformationSequence, "InputInformationSequence", dicom_only=True)
        if not ds.InputInformationSequence and _text(ds, "InputReadinessState") == InputReadiness.READY:
            raise _bad("InputReadinessState is READY but the InputInformationSequence lists no input (or send "
                       "UNAVAILABLE / INCOMPLETE and add the inputs later)")
    for item in ds.get("UnifiedProcedureStepPerformedProcedureSequence", []):
        if "OutputInformationSequence" in item:
            check_references(item.OutputInformationSequence, "OutputInformationSequence")


def _check_task_code(items: Iterable[Dataset], plugins: Collection[str] | None) -> None:
    items = list(items)
    if len(items) != 1:
        raise _bad(f"ScheduledWorkitemCodeSequence must hold exactly one item (the task), not {len(items)}")
    item = items[0]
    value, scheme = code_value(item), _text(item, "CodingSchemeDesignator")
    if scheme != SCHEME or not value:
        raise _bad(f"ScheduledWorkitemCodeSequence: the task code must have CodingSchemeDesignator {SCHEME} and the "
                   f"radnode plugin name as CodeValue (LongCodeValue if over 16 characters); got {value!r}, "
                   f"{scheme!r}")
    if not _text(item, "CodeMeaning"):
        raise _bad("ScheduledWorkitemCodeSequence: the code has no CodeMeaning", Status.MISSING_ATTRIBUTE_VALUE)
    if plugins is not None and value not in plugins:
        raise _bad(f"unknown plugin {value!r} in ScheduledWorkitemCodeSequence; installed: "
                   f"{', '.join(sorted(plugins))}")


def check_references(items: Iterable[Dataset], name: str, dicom_only: bool = False) -> None:
    """Check the items of an Input or Output Information Sequence against the Referenced Instances and Access
    Macro (PS3.3 Table 10-3b): DICOM study, series and instances with valid UIDs, and where to retrieve them.
    Raises UPSError (400) naming the item and the attribute."""
    for n, item in enumerate(items, 1):
        where = f"{name} item {n}"
        kind = _text(item, "TypeOfInstances")
        if kind not in ({"DICOM"} if dicom_only else {"DICOM", "CDA"}):
            raise _bad(f"{where}: TypeOfInstances must be DICOM (got {kind!r})", Status.MISSING_ATTRIBUTE_VALUE)
        if kind == "DICOM":
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
                if not is_valid_uid(_text(item, keyword)):
                    raise _bad(f"{where}: {keyword} missing or not a valid UID")
        sops = item.get("ReferencedSOPSequence", [])
        if not sops:
            raise _bad(f"{where}: ReferencedSOPSequence must list the instances (one item or more)",
                       Status.MISSING_ATTRIBUTE)
        for sop in sops:
            for keyword in ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID"):
                if not is_valid_uid(_text(sop, keyword)):
                    raise _bad(f"{where}: a ReferencedSOPSequence item has no valid {keyword}")
        found = [seq for seq in RETRIEVAL if item.get(seq)]
        if not found:
            raise _bad(f"{where}: say where to retrieve the instances: DICOMRetrievalSequence (RetrieveAETitle) "
                       "or WADORSRetrievalSequence (RetrieveURL)", Status.MISSING_ATTRIBUTE)
        for seq in found:
            if not all(valued(access, RETRIEVAL[seq]) for access in item[seq].value):
                raise _bad(f"{where}: {seq} items need {RETRIEVAL[seq]}", Status.MISSING_ATTRIBUTE_VALUE)


def prepare_create(ds: Dataset, uid: str | None, plugins: Collection[str] | None) -> tuple[str, Dataset, list[str]]:
    """Validate a new workitem (N-CREATE, Create Workitem) and fill what the provider fills: its UIDs, SCHEDULED,
    the modification time, a worklist label and the Type 2 attributes left out (created empty). Returns the
    Workitem UID, the dataset and what was added. Raises UPSError (400)."""
    ds = Dataset(ds)
    filled: list[str] = []
    given = _text(ds, "SOPInstanceUID") or None
    if uid and given and given != uid:
        raise _bad(f"SOPInstanceUID in the dataset differs from the Workitem UID {uid}")
    uid = uid or given
    if uid is None:
        uid = generate_uid()
        filled.append("SOPInstanceUID")
    if not is_valid_uid(uid):
        raise _bad("the Workitem UID is not a valid UID")
    if "SOPClassUID" in ds and _text(ds, "SOPClassUID") != UPS_PUSH:
        raise _bad(f"SOPClassUID must be UPS Push ({UPS_PUSH})")
    if valued(ds, "TransactionUID"):
        raise _bad("a new workitem has no Transaction UID: it is set when a performer claims the workitem")
    if "TransactionUID" in ds:
        del ds.TransactionUID
    state = _text(ds, "ProcedureStepState")
    if not state:
        filled.append("ProcedureStepState")
    elif state != State.SCHEDULED:
        raise UPSError(Status.CREATE_NOT_SCHEDULED, 400,
                       f"ProcedureStepState must be SCHEDULED in a new workitem (got {state!r})")
    missing = [k for k in REQUIRED if not valued(ds, k)]
    if missing:
        raise _bad(f"required attribute(s) missing or empty: {', '.join(missing)} (PS3.4 Table CC.2.5-3)",
                   Status.MISSING_ATTRIBUTE)
    for keyword in EMPTY_AT_CREATE:
        if valued(ds, keyword):
            raise _bad(f"{keyword} must be empty in a new workitem (the performer fills it)")
    _check_values(ds, plugins)
    for keyword in CREATED_EMPTY:
        if keyword not in ds:
            ds.add(DataElement(keyword, dictionary_VR(keyword), [] if dictionary_VR(keyword) == "SQ" else None))
            filled.append(keyword)
    if not valued(ds, "WorklistLabel"):
        ds.WorklistLabel = "radnode"
        filled.append("WorklistLabel")
    ds.SOPClassUID, ds.SOPInstanceUID = UPS_PUSH, uid
    ds.ProcedureStepState = State.SCHEDULED
    ds.ScheduledProcedureStepModificationDateTime = now_dt()
    return uid, ds, filled


def merge_update(current: Dataset, changes: Dataset, plugins: Collection[str] | None) -> Dataset:
    """The workitem with an update (N-SET, Update Workitem) applied: each attribute given replaces the stored one
    (a sequence with all its items). Raises UPSError (400) for an attribute an update may not touch, a required
    one emptied, or an invalid value."""
    refused = [e.keyword or str(e.tag) for e in changes if e.keyword in NOT_SETTABLE or e.tag.group <= 0x0002]
    if refused:
        raise _bad(f"an update may not change {', '.join(refused)} (the state changes through the state "
                   "resource / N-ACTION; identity and patient are fixed at creation)")
    emptied = [e.keyword for e in changes if e.keyword in NOT_EMPTIED and e.is_empty]
    if emptied:
        raise _bad(f"an update may not empty {', '.join(emptied)}", Status.MISSING_ATTRIBUTE_VALUE)
    merged = Dataset(current)
    for elem in changes:
        merged[elem.tag] = elem
    _check_values(merged, plugins if "ScheduledWorkitemCodeSequence" in changes else None)
    merged.ScheduledProcedureStepModificationDateTime = now_dt()
    return merged


def final_state_problems(ds: Dataset, target: State) -> list[str]:
    """What keeps the workitem from `target` (COMPLETED or CANCELED) by the Final State codes of PS3.4 Table
    CC.2.5-3 (R for both; P for COMPLETED; X for CANCELED). Empty when it may go there."""
    problems = [k for k in ("ScheduledProcedureStepPriority", "ScheduledProcedureStepModificationDateTime",
                            "ScheduledProcedureStepStartDateTime", "InputReadinessState", "ProcedureStepLabel")
                if not valued(ds, k)]
    if target == State.COMPLETED:
        performed = ds.get("UnifiedProcedureStepPerformedProcedureSequence", [])
        if not performed:
            problems.append("UnifiedProcedureStepPerformedProcedureSequence (one item: what was performed)")
        for item in performed:
            problems += [f"UnifiedProcedureStepPerformedProcedureSequence > {k}" for k in (
                "PerformedStationNameCodeSequence", "PerformedProcedureStepStartDateTime",
                "PerformedWorkitemCodeSequence", "PerformedProcedureStepEndDateTime") if not valued(item, k)]
            if "OutputInformationSequence" not in item:
                problems.append("UnifiedProcedureStepPerformedProcedureSequence > OutputInformationSequence (the "
                                "results; empty when there are none)")
    else:
        progress = ds.get("ProcedureStepProgressInformationSequence", [])
        if not progress or not all(valued(item, "ProcedureStepDiscontinuationReasonCodeSequence")
                                   for item in progress):
            problems.append("ProcedureStepProgressInformationSequence > ProcedureStepDiscontinuationReasonCodeSequence "
                            "(why it was canceled)")
    return problems


# --- matching (PS3.4 C.2.2.2): one matcher for C-FIND and Search -------------------------------------------

NOT_KEYS = ("TransactionUID", "SpecificCharacterSet", "TimezoneOffsetFromUTC")
_TEXT_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}


def matches(keys: Dataset, ds: Dataset) -> bool:
    """True when `ds` matches every matching key in `keys`: single value, wildcard (* ?), UID list, date/time
    range, sequence matching; an empty key matches anything (universal matching)."""
    for key in keys:
        if key.keyword in NOT_KEYS or key.tag.group <= 0x0002 or key.is_empty:
            continue
        if key.VR == "SQ":
            item_keys = key.value[0] if key.value else None
            if item_keys is None or all(k.is_empty for k in item_keys):  # universal: a return key only
                continue
            stored = ds.get(key.tag)
            if stored is None or not any(matches(item_keys, item) for item in stored.value):
                return False
            continue
        if key.tag not in ds or ds[key.tag].is_empty:
            return False
        if not _match_value(key, ds[key.tag]):
            return False
    return True


def _values(elem: DataElement) -> list[str]:
    value = elem.value
    items = list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
    return [str(v) for v in items]


def _match_value(key: DataElement, elem: DataElement) -> bool:
    stored = _values(elem)
    wanted = _values(key)
    if key.VR in ("DA", "DT", "TM") and "-" in wanted[0]:
        low, _, high = wanted[0].partition("-")
        norm = _tm_key if key.VR == "TM" else dt_key
        lo, hi = norm(low, False) if low else _LOW, norm(high, True) if high else _HIGH
        value = norm(stored[0])
        return None not in (lo, hi, value) and lo <= value <= hi  # type: ignore[operator]
    if key.VR in ("DA", "DT"):
        return dt_key(stored[0]) == dt_key(wanted[0])
    if key.VR == "UI":
        return any(v in wanted for v in stored)
    if key.VR in _TEXT_VRS and any(c in w for w in wanted for c in "*?"):
        pattern = wanted[0].replace("[", "[[]")
        return any(fnmatch.fnmatchcase(v.upper() if key.VR == "PN" else v,
                                       pattern.upper() if key.VR == "PN" else pattern) for v in stored)
    if key.VR == "PN":
        return any(v.upper() == w.upper() for v in stored for w in wanted)
    return any(v == w for v in stored for w in wanted)


def select_keys(ds: Dataset, keys: Dataset) -> Dataset:
    """The return keys of a C-FIND match: each key's value from `ds` (a sequence's items cut to the item's keys
    when it names any), empty when `ds` has none. Never the Transaction UID."""
    out = Dataset()
    for key in keys:
        if key.keyword in NOT_KEYS or key.tag.group <= 0x0002:
            continue
        if key.tag not in ds:
            out.add(DataElement(key.tag, key.VR, [] if key.VR == "SQ" else None))
        elif key.VR == "SQ" and key.value and len(key.value[0]):
            out.add(DataElement(key.tag, "SQ", [select_keys(item, key.value[0]) for item in ds[key.tag].value]))
        else:
            out.add(ds[key.tag])
    return out


# --- the worklist --------------------------------------------------------------------------------------------

CAS_TRIES = 5


class Worklist:
    """radnode's UPS worklist: the one implementation of create, retrieve, search, update, change state and
    request cancellation over the workitem table. Errors are UPSError (with DIMSE and HTTP statuses); a
    database failure raises SQLAlchemy's error."""

    def __init__(self, sessionmaker: Any, plugins: Callable[[], Collection[str] | None] = lambda: None) -> None:
        """`plugins`: the installed plugin names, or None where they are not known (no check then)."""
        self.sessionmaker = sessionmaker
        self.plugins = plugins

    def create(self, ds: Dataset, uid: str | None = None) -> tuple[str, Outcome]:
        """Add a workitem (SCHEDULED). Returns its UID and SUCCESS, or the warning that the provider added
        attributes. Raises UPSError: 400 for an invalid dataset, 409 (0x0111) when the UID exists."""
        from db import workitems as rows

        uid, ds, filled = prepare_create(ds, uid, self.plugins())
        try:
            with self.sessionmaker.begin() as session:
                rows.create(session, uid=uid, state=State.SCHEDULED, dataset=to_json(ds), **_columns(ds))
        except rows.Exists:
            raise UPSError(Status.DUPLICATE_INSTANCE, 409, "a workitem with this UID exists already") from None
        log.info("UPS %s created for plugin %s", uid_hash(uid), plugin_of(ds))
        if not filled:
            return uid, Outcome()
        return uid, Outcome(Status.CREATED_WITH_MODIFICATIONS,
                            f"The Workitem was created with modifications: added {', '.join(filled)}")

    def retrieve(self, uid: str) -> Dataset:
        """The workitem (never its Transaction UID). Raises UPSError 404 (0xC307)."""
        from db import workitems as rows

        with self.sessionmaker() as session:
            row = rows.get(session, uid)
            if row is None:
                raise _missing()
            return _present(row)

    def search(self, keys: Dataset, offset: int = 0, limit: int | None = None) -> tuple[list[Dataset], bool]:
        """Workitems matching `keys` (full datasets) in scheduled order, after `offset`, at most `limit`; and
        whether more matched beyond them."""
        from db import workitems as rows

        found: list[Dataset] = []
        skipped = 0
        with self.sessionmaker() as session:
            for row in rows.candidates(session, **_prefilter(keys)):
                ds = _present(row)
                if not matches(keys, ds):
                    continue
                if skipped < offset:
                    skipped += 1
                    continue
                if limit is not None and len(found) >= limit:
                    return found, True
                found.append(ds)
        return found, False

    def update(self, uid: str, changes: Dataset, transaction_uid: str | None) -> Outcome:
        """Apply an update: a SCHEDULED workitem takes it without a Transaction UID, an IN PROGRESS one only
        with its Transaction UID, a COMPLETED or CANCELED one never. Raises UPSError."""
        transaction_uid = transaction_uid or None

        def change(row: Any, current: Dataset) -> dict[str, Any]:
            if row.state in FINAL:
                raise UPSError(Status.NO_LONGER_UPDATABLE, 400,
                               f"The workitem is {row.state} and may no longer be updated")
            if row.state == State.SCHEDULED and transaction_uid is not None:
                raise UPSError(Status.NOT_IN_PROGRESS, 409, "The workitem is SCHEDULED (not claimed): update it "
                                                            "without a Transaction UID")
            if row.state == State.IN_PROGRESS and transaction_uid != row.transaction_uid:
                raise UPSError(Status.WRONG_TRANSACTION_UID, 400, "The Transaction UID is missing." if
                               transaction_uid is None else "The Transaction UID is incorrect.")
            merged = merge_update(current, changes, self.plugins())
            return {"dataset": to_json(merged), **_columns(merged)}

        self._change(uid, change)
        return Outcome()

    def change_state(self, uid: str, requested: str, transaction_uid: str | None) -> Outcome:
        """Claim (SCHEDULED -> IN PROGRESS with a new Transaction UID), complete or cancel (IN PROGRESS ->
        COMPLETED / CANCELED with the Transaction UID, once the final state requirements are met); the state
        transition table of PS3.4 Table CC.1.1-2. Returns SUCCESS or the "already in that state" warning.
        Raises UPSError."""
        requested = "CANCELED" if requested == "CANCELLED" else requested  # PS3.18 11.7.1.4 spells it so
        if requested == State.SCHEDULED:
            raise UPSError(Status.ONLY_CREATE_SCHEDULES, 400, "A workitem becomes SCHEDULED only when created")
        if requested not in (State.IN_PROGRESS, State.COMPLETED, State.CANCELED):
            raise UPSError(Status.INVALID_ARGUMENT_VALUE, 400, f"ProcedureStepState {requested!r} is not IN "
                                                               "PROGRESS, COMPLETED or CANCELED")
        if not transaction_uid:
            raise UPSError(Status.WRONG_TRANSACTION_UID, 400, "The Transaction UID is missing.")
        if not is_valid_uid(transaction_uid):
            raise UPSError(Status.INVALID_ARGUMENT_VALUE, 400, "The Transaction UID is not a valid UID")
        outcome = Outcome()

        def change(row: Any, current: Dataset) -> dict[str, Any] | None:
            nonlocal outcome
            state, owner = row.state, row.transaction_uid == transaction_uid
            if requested == State.IN_PROGRESS:
                if state == State.IN_PROGRESS:
                    raise UPSError(Status.ALREADY_IN_PROGRESS if owner else Status.WRONG_TRANSACTION_UID, 409,
                                   "The workitem is already IN PROGRESS (claimed" + (" by you)" if owner else
                                                                                      " by another performer)"))
                if state in FINAL:
                    raise UPSError(Status.NO_LONGER_UPDATABLE, 409, f"The workitem is {state}")
                current.ProcedureStepState = State.IN_PROGRESS
                return {"state": State.IN_PROGRESS, "transaction_uid": transaction_uid, "dataset": to_json(current)}
            if state == State.SCHEDULED:
                raise UPSError(Status.NOT_IN_PROGRESS, 409, "The workitem is not yet IN PROGRESS: claim it first")
            if not owner:
                raise UPSError(Status.WRONG_TRANSACTION_UID, 400, "The Transaction UID is incorrect.")
            if state == requested:
                outcome = Outcome(Status.ALREADY_CANCELED if state == State.CANCELED else Status.ALREADY_COMPLETED,
                                  f"The UPS is already in the requested state of {state}.")
                return None
            if state in FINAL:
                raise UPSError(Status.NO_LONGER_UPDATABLE, 409, f"The workitem is {state} already")
            if requested == State.CANCELED:
                _fill_cancellation_time(current)
            problems = final_state_problems(current, State(requested))
            if problems:
                raise UPSError(Status.FINAL_STATE_NOT_MET, 409, f"The workitem cannot be {requested}: it needs "
                                                                f"{'; '.join(problems)} (PS3.4 CC.2.5.1.1)")
            current.ProcedureStepState = requested
            return {"state": requested, "dataset": to_json(current)}

        self._change(uid, change)
        log.info("UPS %s: %s", uid_hash(uid), outcome.warning or f"now {requested}")
        return outcome

    def request_cancel(self, uid: str, info: Dataset, requester: str) -> Outcome:
        """Ask for cancellation (N-ACTION Request UPS Cancel, Request Cancellation): a SCHEDULED workitem is
        canceled at once (through IN PROGRESS, final state filled); for an IN PROGRESS one the request is
        recorded for its performer (see cancel_requested). Raises UPSError."""
        allowed = {"ReasonForCancellation", "ProcedureStepDiscontinuationReasonCodeSequence", "ContactURI",
                   "ContactDisplayName"}
        other = [e.keyword or str(e.tag) for e in info if e.keyword not in allowed and e.tag.group > 0x0002]
        if other:
            raise _bad(f"a cancel request carries only {', '.join(sorted(allowed))}; not {', '.join(other)}",
                       Status.INVALID_ARGUMENT_VALUE)
        reason = _text(info, "ReasonForCancellation") or f"cancel requested by {requester}"
        outcome = Outcome()

        def change(row: Any, current: Dataset) -> dict[str, Any] | None:
            nonlocal outcome
            if row.state == State.COMPLETED:
                raise UPSError(Status.COMPLETED_ALREADY, 409, "The workitem is already COMPLETED")
            if row.state == State.CANCELED:
                outcome = Outcome(Status.ALREADY_CANCELED, "The UPS is already in the requested state of CANCELED.")
                return None
            _record_cancel_request(current, info, reason)
            now = {"cancel_requested_at": _utcnow(), "cancel_requested_by": requester[:64], "cancel_reason": reason}
            if row.state == State.IN_PROGRESS:
                return {**now, "dataset": to_json(current)}
            _fill_cancellation_time(current)
            current.ProcedureStepState = State.CANCELED  # SCHEDULED -> IN PROGRESS -> CANCELED, by radnode
            return {**now, "state": State.CANCELED, "transaction_uid": generate_uid(), "dataset": to_json(current)}

        self._change(uid, change)
        log.info("UPS %s: cancel requested by %s", uid_hash(uid), requester)
        return outcome

    def _change(self, uid: str, change: Callable[[Any, Dataset], dict[str, Any] | None]) -> None:
        """Read the workitem, let `change` decide (columns to write, None for nothing), write it by
        compare-and-set; again when another writer came first. Raises UPSError."""
        from db import workitems as rows

        for _ in range(CAS_TRIES):
            with self.sessionmaker.begin() as session:
                row = rows.get(session, uid)
                if row is None:
                    raise _missing()
                current = Dataset.from_json(row.dataset)
                columns = change(row, current)
                if columns is None or rows.save(session, row, **columns):
                    return
        raise UPSError(Status.PROCESSING_FAILURE, 409, "the workitem is being changed by others; try again")


def _missing() -> UPSError:  # no UID in the message: messages are logged
    return UPSError(Status.NO_SUCH_UPS, 404, "no workitem with this UID")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _columns(ds: Dataset) -> dict[str, Any]:
    """The searched columns of a workitem row."""
    return {"plugin": plugin_of(ds), "scheduled_start": dt_key(_text(ds, "ScheduledProcedureStepStartDateTime")),
            "priority": _text(ds, "ScheduledProcedureStepPriority") or Priority.MEDIUM,
            "patient_id": _text(ds, "PatientID")[:64] or None}


def _present(row: Any) -> Dataset:
    """A stored workitem as its dataset (never the Transaction UID)."""
    return Dataset.from_json(row.dataset)


def _progress_item(ds: Dataset) -> Dataset:
    if not ds.get("ProcedureStepProgressInformationSequence"):
        ds.ProcedureStepProgressInformationSequence = [Dataset()]
    return ds.ProcedureStepProgressInformationSequence[0]


def _fill_cancellation_time(ds: Dataset) -> None:
    """PS3.4 Table CC.2.5-3: when canceling without a Procedure Step Cancellation DateTime, the SCP fills it."""
    item = _progress_item(ds)
    if not valued(item, "ProcedureStepCancellationDateTime"):
        item.ProcedureStepCancellationDateTime = now_dt()


def _record_cancel_request(ds: Dataset, info: Dataset, reason: str) -> None:
    """Put a cancel request in the Progress Information: the reason, the proposed discontinuation code (or
    "unspecified") and whom to contact."""
    item = _progress_item(ds)
    item.ReasonForCancellation = reason[:1024]
    if info.get("ProcedureStepDiscontinuationReasonCodeSequence"):
        item.ProcedureStepDiscontinuationReasonCodeSequence = info.ProcedureStepDiscontinuationReasonCodeSequence
    elif not item.get("ProcedureStepDiscontinuationReasonCodeSequence"):
        item.ProcedureStepDiscontinuationReasonCodeSequence = [code_item(*UNSPECIFIED_DISCONTINUATION)]
    if valued(info, "ContactURI"):
        contact = Dataset()
        contact.ContactURI = info.ContactURI
        if valued(info, "ContactDisplayName"):
            contact.ContactDisplayName = info.ContactDisplayName
        item.ProcedureStepCommunicationsURISequence = [contact]


def _prefilter(keys: Dataset) -> dict[str, Any]:
    """The indexed-column filters a query implies (never narrower than the matcher)."""
    out: dict[str, Any] = {}

    def element(keyword: str) -> DataElement | None:
        return keys[keyword] if keyword in keys else None

    state = element("ProcedureStepState")
    if state is not None and not state.is_empty and not any(c in str(state.value) for c in "*?"):
        out["states"] = _values(state)
    start = element("ScheduledProcedureStepStartDateTime")
    if start is not None and not start.is_empty:
        low, dash, high = str(start.value).partition("-")
        if dash:
            out["start_from"] = dt_key(low) if low else None
            out["start_to"] = dt_key(high, high=True) if high else None
        elif dt_key(low):
            out["start_from"] = out["start_to"] = dt_key(low)
    codes = element("ScheduledWorkitemCodeSequence")
    if codes is not None and codes.value and len(codes.value[0]):
        item = codes.value[0]
        value, scheme = code_value(item), _text(item, "CodingSchemeDesignator")
        if value and not any(c in value for c in "*?") and scheme in ("", SCHEME):
            out["plugin"] = value
    patient = element("PatientID")
    if patient is not None and not patient.is_empty and not any(c in str(patient.value) for c in "*?\\"):
        out["patient_id"] = str(patient.value)
    return out
