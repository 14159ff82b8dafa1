"""API step, UPS-RS (PS3.18 §11, the Worklist Service) under /dicomweb/workitems: create, retrieve, search, update,
change the state of and request the cancellation of radnode's workitems, in DICOM JSON. The rules are those of
node/ups/workitem.py, shared with the DIMSE front end; refusals carry a Warning header that says why."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any
from urllib.parse import parse_qsl, unquote

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response
from pydicom import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.tag import Tag
from starlette.concurrency import run_in_threadpool

from node.api.auth import Reader, Writer
from node.dicom.header import is_valid_uid
from node.ups.workitem import Outcome, Status, UPSError, Worklist, from_json, to_json

log = logging.getLogger("radnode.api")
router = APIRouter(prefix="/dicomweb/workitems", tags=["DICOMweb"])
DICOM_JSON = "application/dicom+json"
JSON_TYPES = {DICOM_JSON, "application/json"}
SEARCH_LIMIT, SEARCH_LIMIT_MAX = 100, 1000
WorkitemUID = Annotated[str, Path(max_length=64, description="the Workitem UID")]


def _worklist(request: Request) -> Worklist:
    state = request.app.state
    if getattr(state, "worklist", None) is None:
        state.worklist = Worklist(state.sessionmaker, lambda: set(state.discovery.manifests))
    return state.worklist


def _warning(text: str) -> dict[str, str]:
    """PS3.18 8.6.2: a Warning header (299) with the text on one line."""
    clean = " ".join(text.split()).replace('"', "'")[:1000]
    # header values are Latin-1 on the wire: anything else (a UID made of emoji, a Cyrillic name) is escaped
    clean = clean.encode("ascii", "backslashreplace").decode("ascii")
    return {"Warning": f'299 radnode "{clean}"'}


def _refused(exc: UPSError) -> JSONResponse:
    return JSONResponse({"detail": exc.message, "status": f"0x{exc.status:04X}"}, status_code=exc.http,
                        headers=_warning(exc.message))


def _done(code: int, outcome: Outcome, headers: dict[str, str] | None = None) -> Response:
    headers = dict(headers or {})
    if outcome.warning:
        headers |= _warning(outcome.warning)
    return Response(status_code=code, headers=headers)


def _check_uid(uid: str, what: str = "Workitem UID") -> None:
    if not is_valid_uid(uid):
        raise UPSError(Status.INVALID_ATTRIBUTE_VALUE, 400, f"{what} {uid[:80]!r} is not a valid UID")


def _acceptable(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    kinds = {part.split(";")[0].strip() for part in accept.split(",")} if accept else {"*/*"}
    return bool(kinds & (JSON_TYPES | {"*/*", "application/*"}))


def _not_acceptable() -> JSONResponse:
    return JSONResponse({"detail": f"radnode answers workitems as {DICOM_JSON} only"}, status_code=406)


async def _payload(request: Request, required: bool = True) -> Dataset:
    """The request's DICOM JSON dataset (empty when none is sent and none is `required`). Raises UPSError 400,
    or 415 for another media type."""
    body = await request.body()
    if not body.strip() and not required:
        return Dataset()
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in JSON_TYPES:
        raise UPSError(Status.INVALID_ATTRIBUTE_VALUE, 415,
                       f"send the workitem as {DICOM_JSON} (got {kind or 'no Content-Type'!r})")
    if not body.strip():
        raise UPSError(Status.MISSING_ATTRIBUTE, 400, "the request has no payload; a DICOM JSON dataset is needed")
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise UPSError(Status.INVALID_ATTRIBUTE_VALUE, 400, f"the payload is not JSON: {exc}") from None
    return from_json(data)


def _bare_query(request: Request, name: str) -> str | None:
    """A parameter given PS3.18's way, as the whole query (`?{uid}`), or as `name=value`."""
    query = request.url.query
    if query and "=" not in query and "&" not in query:
        return unquote(query)
    return request.query_params.get(name) or None


@router.post("", status_code=201, summary="Create Workitem (UPS-RS)",
             responses={201: {"description": "created; Location names it"}, 400: {}, 409: {}, 415: {}})
async def create(request: Request, _: Writer) -> Response:
    """Create a workitem: `POST /dicomweb/workitems?{workitem-uid}` with one DICOM JSON dataset (SCHEDULED). The
    task is the ScheduledWorkitemCodeSequence item (CodingSchemeDesignator 99RADNODE, CodeValue = plugin name)."""
    try:
        uid = _bare_query(request, "workitem")
        if uid is not None:
            _check_uid(uid)
        ds = await _payload(request)
        uid, outcome = await run_in_threadpool(_worklist(request).create, ds, uid)
    except UPSError as exc:
        return _refused(exc)
    return _done(201, outcome, {"Location": f"{str(request.base_url).rstrip('/')}/dicomweb/workitems/{uid}"})


@router.get("", summary="Search for Workitems (UPS-RS)", responses={204: {"description": "nothing matches"}})
async def search(request: Request, _: Reader) -> Response:
    """Search the worklist: `?{attribute}={value}` (keywords or tags, `Sequence.Attribute` for sequence matching;
    wildcards, UID lists and date-time ranges), `limit`, `offset`. Answers full workitems, oldest scheduled first."""
    if not _acceptable(request):
        return _not_acceptable()
    try:
        keys, offset, limit, warnings = parse_search(parse_qsl(request.url.query, keep_blank_values=True))
        found, more = await run_in_threadpool(_worklist(request).search, keys, offset, limit)
    except UPSError as exc:
        return _refused(exc)
    if more:
        warnings.append(f"There are additional results that can be requested (offset={offset + len(found)})")
    headers = _warning("; ".join(warnings)) if warnings else {}
    if not found:
        return Response(status_code=204, headers=headers)
    return JSONResponse([to_json(ds) for ds in found], media_type=DICOM_JSON, headers=headers)


@router.get("/{uid}", summary="Retrieve Workitem (UPS-RS)", responses={404: {}})
async def retrieve(request: Request, _: Reader, uid: WorkitemUID) -> Response:
    """One workitem as DICOM JSON (an array of one dataset); never its Transaction UID."""
    if not _acceptable(request):
        return _not_acceptable()
    try:
        _check_uid(uid)
        ds = await run_in_threadpool(_worklist(request).retrieve, uid)
    except UPSError as exc:
        return _refused(exc)
    return JSONResponse([to_json(ds)], media_type=DICOM_JSON)


@router.post("/{uid}", summary="Update Workitem (UPS-RS)", responses={400: {}, 404: {}, 409: {}, 415: {}})
async def update(request: Request, _: Writer, uid: WorkitemUID) -> Response:
    """Update a workitem: `POST /dicomweb/workitems/{uid}?{transaction-uid}` — the Transaction UID only for an
    IN PROGRESS workitem (its performer); each attribute sent replaces the stored one."""
    try:
        _check_uid(uid)
        transaction_uid = _bare_query(request, "transaction-uid")
        changes = await _payload(request)
        if "TransactionUID" in changes:  # some clients repeat it in the dataset: it must agree with the query
            given = str(changes.TransactionUID or "")
            if transaction_uid not in (None, given):
                raise UPSError(Status.WRONG_TRANSACTION_UID, 400,
                               "The Transaction UID in the dataset differs from the query's")
            transaction_uid = given or None
            del changes.TransactionUID
        outcome = await run_in_threadpool(_worklist(request).update, uid, changes, transaction_uid)
    except UPSError as exc:
        return _refused(exc)
    return _done(200, outcome)


@router.put("/{uid}/state", summary="Change Workitem State (UPS-RS)", responses={400: {}, 404: {}, 409: {}})
async def change_state(request: Request, _: Writer, uid: WorkitemUID) -> Response:
    """Claim (IN PROGRESS with a new Transaction UID), complete or cancel: a dataset with ProcedureStepState and
    TransactionUID."""
    try:
        _check_uid(uid)
        ds = await _payload(request)
        requested = str(ds.get("ProcedureStepState", "") or "")
        transaction_uid = str(ds.get("TransactionUID", "") or "") or None
        outcome = await run_in_threadpool(_worklist(request).change_state, uid, requested, transaction_uid)
    except UPSError as exc:
        return _refused(exc)
    return _done(200, outcome)


@router.post("/{uid}/cancelrequest", status_code=202, summary="Request Workitem Cancellation (UPS-RS)",
             responses={202: {"description": "accepted"}, 404: {}, 409: {}})
async def cancel_request(request: Request, who: Writer, uid: WorkitemUID) -> Response:
    """Ask for a workitem to be canceled: a SCHEDULED one is canceled at once; for an IN PROGRESS one the request
    is recorded for its performer. Optional dataset: ReasonForCancellation, ProcedureStepDiscontinuationReasonCode
    Sequence, ContactURI, ContactDisplayName."""
    try:
        _check_uid(uid)
        info = await _payload(request, required=False)
        outcome = await run_in_threadpool(_worklist(request).request_cancel, uid, info, f"API token {who.name}")
    except UPSError as exc:
        return _refused(exc)
    return _done(202, outcome)


@router.api_route("/{uid}/subscribers/{aetitle}", methods=["POST", "DELETE"], include_in_schema=False)
@router.api_route("/{uid}/subscribers/{aetitle}/suspend", methods=["POST"], include_in_schema=False)
def subscriptions(uid: str, aetitle: str) -> JSONResponse:
    """Subscriptions (event notifications over WebSocket) are not offered: performers poll the worklist."""
    text = "UPS-RS subscriptions and notifications are not supported by radnode: search the worklist instead"
    return JSONResponse({"detail": text}, status_code=501, headers=_warning(text))


RESERVED = {"limit", "offset", "includefield", "fuzzymatching", "accept", "charset"}
_NUMERIC = {"US": int, "UL": int, "SS": int, "SL": int, "UV": int, "SV": int, "FL": float, "FD": float}


def parse_search(params: list[tuple[str, str]]) -> tuple[Dataset, int, int, list[str]]:
    """QIDO-style search parameters (PS3.18 8.3.4) as C-FIND matching keys, the offset, the limit and warnings.
    Raises UPSError (400) for an unknown attribute or a bad value."""
    keys, offset, limit, warnings = Dataset(), 0, SEARCH_LIMIT, []
    for name, value in params:
        if name in RESERVED:
            if name in ("limit", "offset"):
                if not value.isdigit() or (name == "limit" and not 1 <= int(value) <= SEARCH_LIMIT_MAX):
                    raise UPSError(Status.IDENTIFIER_MISMATCH, 400,
                                   f"{name} must be a whole number (limit 1..{SEARCH_LIMIT_MAX})")
                offset, limit = (int(value), limit) if name == "offset" else (offset, int(value))
            elif name == "includefield":  # every workitem attribute is returned anyway: only check the names
                for field in filter(None, value.split(",")):
                    if field != "all":
                        _tag(field)
            elif name == "fuzzymatching" and value.lower() == "true":
                warnings.append("The fuzzymatching parameter is not supported. Only literal matching has been "
                                "performed.")
            continue
        _add_key(keys, name.split("."), value)
    return keys, offset, limit, warnings


def _tag(name: str) -> Any:
    tag = tag_for_keyword(name)
    if tag is None and len(name) == 8:
        try:
            tag = Tag(int(name, 16))
            dictionary_VR(tag)
        except (ValueError, KeyError):
            tag = None
    if tag is None:
        raise UPSError(Status.IDENTIFIER_MISMATCH, 400, f"unknown attribute {name[:64]!r} in the search")
    return Tag(tag)


def _add_key(keys: Dataset, path: list[str], value: str) -> None:
    """Add one matching key; `path` names the sequences down to the attribute."""
    tag = _tag(path[0])
    vr = dictionary_VR(tag)
    if len(path) > 1:
        if vr != "SQ":
            raise UPSError(Status.IDENTIFIER_MISMATCH, 400, f"{path[0]} is not a sequence")
        if tag not in keys:
            keys.add(DataElement(tag, "SQ", [Dataset()]))
        _add_key(keys[tag].value[0], path[1:], value)
        return
    if vr == "SQ":
        if value:
            raise UPSError(Status.IDENTIFIER_MISMATCH, 400,
                           f"{path[0]} is a sequence: match its attributes as {path[0]}.Attribute")
        keys.add(DataElement(tag, "SQ", []))
        return
    parsed: Any = value or None
    try:
        if value and vr in _NUMERIC:
            parsed = _NUMERIC[vr](value)
        elif value and vr == "UI":
            parsed = [v for v in value.replace("\\", ",").split(",") if v]
            if not all(is_valid_uid(v) for v in parsed):
                raise ValueError("not a valid UID")
    except ValueError as exc:
        raise UPSError(Status.IDENTIFIER_MISMATCH, 400, f"{path[-1]}={value[:64]!r}: {exc}") from None
    keys.add(DataElement(tag, vr, parsed))
