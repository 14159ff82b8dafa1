"""Receive step over HTTP: DICOMweb STOW-RS (`POST /dicomweb/studies[/{study}]`, PS3.18 10.5) into the same
durable storage path as C-STORE, answered with the standard Store Instances Response."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from node.api.auth import Writer
from node.dicom.header import is_valid_uid
from node.dicom.status import Status

log = logging.getLogger("radnode.stow")
router = APIRouter(tags=["DICOMweb"])
DICOM_JSON = "application/dicom+json"


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    too_large: bool = False


class _Parts:
    """Streaming multipart/related parser: collects each part in memory (bounded by the instance limit)."""

    def __init__(self, boundary: bytes, max_part_bytes: int) -> None:
        self.max_part_bytes = max_part_bytes
        self.done: list[_Part] = []
        self._part: _Part | None = None
        self._field = b""
        self._value = b""
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end,
            "on_header_field": self._hfield, "on_header_value": self._hvalue, "on_header_end": self._hend,
        })

    def _begin(self) -> None:
        self._part = _Part()

    def _hfield(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _hvalue(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _hend(self) -> None:
        assert self._part is not None
        self._part.headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field = self._value = b""

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        assert part is not None
        part.size += end - start
        if part.size > self.max_part_bytes:
            part.too_large, part.chunks = True, []
        elif not part.too_large:
            part.chunks.append(data[start:end])

    def _end(self) -> None:
        assert self._part is not None
        self.done.append(self._part)
        self._part = None

    def feed(self, chunk: bytes) -> list[_Part]:
        """Parse a chunk; return the parts completed by it. Raises MultipartParseError."""
        self.parser.write(chunk)
        done, self.done = self.done, []
        return done


def _element(vr: str, value: Any = None) -> dict[str, Any]:
    return {"vr": vr, "Value": [value]} if value not in (None, "") else {"vr": vr}


def _sop_item(sop_class: str | None, sop_uid: str | None, reason: int | None = None) -> dict[str, Any]:
    item = {"00081150": _element("UI", sop_class), "00081155": _element("UI", sop_uid)}
    if reason is not None:
        item["00081197"] = _element("US", reason)
    return item


@dataclass
class StoreResult:
    stored: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


def _store_part(request: Request, part: _Part, study_uid: str | None, index: int, result: StoreResult) -> None:
    """Store one part (in a thread: file and database I/O) and add it to the response."""
    ingest = request.app.state.ingest
    content_type, _ = parse_options_header(part.headers.get("content-type", "application/dicom"))
    name = f"part {index}"
    data = b"".join(part.chunks)
    if content_type != b"application/dicom":
        stored = ingest.refused("stow", None, Status.CANNOT_UNDERSTAND,
                                f"content type {content_type.decode()!r} is not application/dicom", part.size)
    elif part.too_large:
        stored = ingest.refused("stow", None, Status.TOO_LARGE, "instance larger than the configured maximum",
                                part.size)
    else:
        stored = ingest.store(data, None, source="stow", study_uid=study_uid)
    header = stored.header
    sop_class, sop_uid = (header.sop_class_uid, header.sop_instance_uid) if header is not None else (None, None)
    if stored.ok:
        result.stored.append(_sop_item(sop_class, sop_uid))
    else:
        result.failed.append(_sop_item(sop_class, sop_uid, stored.status))
        result.messages.append(f"{name}: {stored.reason}")


async def _stow(request: Request, study_uid: str | None) -> JSONResponse:
    settings = request.app.state.settings
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/related":
        raise HTTPException(415, "STOW-RS needs Content-Type: multipart/related; type=\"application/dicom\"")
    kind = params.get(b"type", b"application/dicom").strip(b'"')
    if kind != b"application/dicom":
        raise HTTPException(415, f"multipart/related type {kind.decode(errors='replace')!r} is not supported: "
                                 "send application/dicom parts")
    boundary = params.get(b"boundary")
    if not boundary:
        raise HTTPException(400, "multipart/related without a boundary parameter")
    parts = _Parts(boundary.strip(b'"'), settings.max_instance_bytes)
    result = StoreResult()
    index = 0
    try:
        async for chunk in request.stream():
            for part in parts.feed(chunk):
                index += 1
                await run_in_threadpool(_store_part, request, part, study_uid, index, result)
    except MultipartParseError as exc:
        if not result.stored:
            raise HTTPException(400, f"malformed multipart/related body: {exc}") from None
        result.messages.append(f"body malformed after part {index}: {exc}")
    if index == 0:
        raise HTTPException(400, "the multipart/related body holds no parts")
    body: dict[str, Any] = {}
    if result.stored:
        body["00081199"] = {"vr": "SQ", "Value": result.stored}
    if result.failed:
        body["00081198"] = {"vr": "SQ", "Value": result.failed}
    status = 200 if not result.failed else (202 if result.stored else 409)
    headers = {}
    if result.messages:
        # PS3.18 8.6.2: warnings as HTTP Warning headers; one line that says why each part was refused
        text = "; ".join(result.messages)[:1000].replace('"', "'")
        headers["Warning"] = f'299 radnode "{text}"'
    log.info("STOW-RS: %d instance(s) stored, %d refused", len(result.stored), len(result.failed))
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON, headers=headers)


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "every instance stored (Store Instances Response, DICOM JSON)"},
    202: {"description": "some instances stored; the Failed SOP Sequence and a Warning header say which not"},
    400: {"description": "malformed multipart body"},
    409: {"description": "no instance stored; the Failed SOP Sequence and a Warning header say why"},
    413: {"description": "request body larger than max_upload_bytes"},
    415: {"description": "not multipart/related with application/dicom parts"},
}


@router.post("/dicomweb/studies", responses=_RESPONSES, summary="STOW-RS: store instances")
async def stow(request: Request, _: Writer) -> JSONResponse:
    """Store DICOM instances sent as `multipart/related; type="application/dicom"` (DICOMweb STOW-RS)."""
    return await _stow(request, None)


@router.post("/dicomweb/studies/{study_uid}", responses=_RESPONSES, summary="STOW-RS: store instances of one study")
async def stow_study(study_uid: str, request: Request, _: Writer) -> JSONResponse:
    """STOW-RS to one study: instances of another study are refused (failure reason 0xA900)."""
    if not is_valid_uid(study_uid):
        raise HTTPException(422, "study_uid is not a valid DICOM UID")
    return await _stow(request, study_uid)
