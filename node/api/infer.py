"""API step, on-demand inference: `POST /v1/infer` takes a zip of DICOM files, stores them like any received
instance, creates a job per series for the named plugin (results stay local) and answers with a zip of the
result objects and findings.json when they are ready in time, or with the job ids to poll."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from db.models import JobState, utcnow
from node.api.auth import Writer
from node.api.models import InferAccepted
from node.api.v1 import FINISHED, add_job_to_zip, job_or_404
from node.dicom.files import ZipTooLarge, zip_members

log = logging.getLogger("radnode.api")
router = APIRouter(prefix="/v1", tags=["infer"])
RULE = "api:infer"


def _ingest_zip(request: Request, path: Path) -> tuple[dict[str, str | None], int]:
    """Store every DICOM member of the zip. Returns ({series UID: modality}, members skipped as not DICOM).
    Raises HTTPException 400 (not a zip, too large when expanded) or 507 (storage full)."""
    ingest = request.app.state.ingest
    series: dict[str, str | None] = {}
    skipped = 0
    try:
        with zipfile.ZipFile(path) as archive:
            try:
                members = zip_members(archive)
            except ZipTooLarge as exc:
                raise HTTPException(400, f"the zip {exc}") from None
            for m in members:
                if m.file_size > ingest.max_bytes:
                    skipped += 1
                    continue
                stored = ingest.store(archive.read(m), None, source="upload")
                if stored.ok:
                    series[stored.header.series_uid] = stored.header.modality
                elif stored.header is None:
                    skipped += 1  # not DICOM (a README, a DICOMDIR without an image...)
                else:
                    raise HTTPException(507, f"could not store the upload: {stored.reason}")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as exc:
        raise HTTPException(400, f"the body is not a readable zip: {exc}") from None
    return series, skipped


def _create_jobs(request: Request, manifest: Any, series: dict[str, str | None]) -> list[int]:
    """One job per applicable series (results local: no destinations). An existing job of this plugin on
    the series is reused: finished ones with results are answered as they are, failed or skipped ones rerun."""
    from db.jobs import NewJob, claim_series, create_jobs, mark_enqueued, requeue, series_job
    from db.records import series_id_of

    ids: list[int] = []
    send: list[tuple[int, str, str]] = []
    now = utcnow()
    with request.app.state.sessionmaker.begin() as session:
        for uid in series:
            series_id = series_id_of(session, uid)
            claim_series(session, series_id, f"submitted to POST /v1/infer for {manifest.name}", now)
            new = create_jobs(session, series_id, [NewJob(manifest.name, manifest.version, RULE, manifest.queue,
                                                          "stat", destinations=[])], now)
            if new:
                job_id = new[0]
                send.append((job_id, manifest.queue, "stat"))
            else:
                job = series_job(session, series_id, manifest.name)
                job_id = job.id
                if job.state in (JobState.FAILED, JobState.SKIPPED) or (
                        job.state in FINISHED and job.outputs_removed_at is not None):
                    requeue(session, job_id, now)
                    send.append((job_id, job.queue, job.priority))
            ids.append(job_id)
    if send:
        sent = request.app.state.enqueuer.send(send)  # after the commit; the sweeper sends any refused
        with request.app.state.sessionmaker.begin() as session:
            mark_enqueued(session, sent, utcnow())
    return ids


async def _spool(request: Request) -> Path:
    """The request body in a temporary file on the data disk (the size limit is the app's middleware)."""
    tmp_dir = request.app.state.settings.tmp_dir
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="infer-", suffix=".zip", dir=tmp_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                f.write(chunk)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


@router.post(
    "/infer",
    responses={
        200: {"content": {"application/zip": {}}, "description": "result objects and findings.json, per job"},
        202: {"model": InferAccepted, "description": "not finished in time: poll /v1/jobs/{id}"},
        400: {}, 401: {}, 403: {}, 404: {}, 409: {}, 413: {}, 415: {}, 422: {},
    },
    response_class=Response,
)
async def infer(
    request: Request, _: Writer,
    plugin: Annotated[str, Query(min_length=1, max_length=64, description="plugin to run on every series")],
    wait: Annotated[float | None, Query(ge=0, le=3600, description="seconds to wait for the results "
                                               "(default: the infer_wait_seconds setting)")] = None,
) -> Response:
    """Run one plugin on the DICOM files of a zip (`Content-Type: application/zip`).

    Answers 200 with a zip (`job-<id>/SR.dcm`, `SEG.dcm`, `SC-*.dcm`, `findings.json`) when every job ends in
    time, else 202 with the job ids (results then at `/v1/jobs/{id}/results.zip`). Results are not sent to
    any destination."""
    state = request.app.state
    manifest = state.discovery.manifests.get(plugin)
    if manifest is None:
        known = ", ".join(sorted(state.discovery.manifests))
        raise HTTPException(404, f"no plugin {plugin!r}; installed: {known}")
    from plugins.registry import unavailable_reason

    why = unavailable_reason(manifest, state.settings.models_path)
    if why:
        raise HTTPException(409, f"plugin {plugin} cannot run: {why}")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("application/zip", "application/x-zip-compressed", "application/octet-stream"):
        raise HTTPException(415, "send the DICOM files as a zip with Content-Type: application/zip")
    path = await _spool(request)
    try:
        series, skipped = await run_in_threadpool(_ingest_zip, request, path)
    finally:
        path.unlink(missing_ok=True)
    if not series:
        raise HTTPException(422, f"no DICOM instance in the zip ({skipped} file(s) are not DICOM)")
    wanted = {uid: m for uid, m in series.items() if (m or "").upper() in manifest.modalities}
    if not wanted:
        found = ", ".join(sorted({m or "?" for m in series.values()}))
        raise HTTPException(422, f"plugin {plugin} takes {', '.join(manifest.modalities)}; the zip holds {found}")
    ids = await run_in_threadpool(_create_jobs, request, manifest, wanted)
    log.info("POST /v1/infer: %d series -> job(s) %s (%s)", len(wanted), ids, plugin)
    deadline = time.monotonic() + (state.settings.infer_wait_seconds if wait is None else wait)
    while True:
        rows = [await run_in_threadpool(job_or_404, request, i) for i in ids]
        if all(r["state"] in FINISHED for r in rows):
            return Response(_zip(rows), media_type="application/zip",
                            headers={"Content-Disposition": 'attachment; filename="radnode-results.zip"'})
        if time.monotonic() >= deadline:
            body = {"jobs": ids, "skipped_files": skipped,
                    "message": "still running: poll /v1/jobs/{id}; results at /v1/jobs/{id}/results.zip"}
            return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{ids[0]}"})
        await asyncio.sleep(0.2)


def _zip(rows: list[dict[str, Any]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for job in rows:
            add_job_to_zip(archive, job, f"job-{job['id']}/")
        archive.writestr("findings.json", json.dumps(
            [{"job": j["id"], "series_uid": j["series_uid"], "state": j["state"], "reason": j["reason"],
              "findings": j["findings"], "warnings": j["warnings"]} for j in rows], indent=2))
    return buffer.getvalue()
