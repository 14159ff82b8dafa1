"""API step, REST: studies, jobs (retry, redeliver, results), plugins and workers under /v1."""

from __future__ import annotations

import io
import json
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from db.models import JobState, utcnow
from node.api.auth import Reader, Writer
from node.api.models import Accepted, JobOut, PluginOut, Redelivered, RedeliverIn, StudyOut, WorkerOut
from node.dicom.header import is_valid_uid
from node.metrics import WORKER_ALIVE_PERIODS

router = APIRouter(prefix="/v1")
Limit = Annotated[int, Query(ge=1, le=1000, description="at most this many, newest first")]
Offset = Annotated[int, Query(ge=0, le=10_000_000, description="skip this many")]
JobId = Annotated[int, PathParam(ge=1, le=2**31 - 1, description="job id")]
FINISHED = {JobState.ENCODED, JobState.DELIVERED, JobState.FAILED, JobState.SKIPPED}


def _session(request: Request):
    return request.app.state.sessionmaker()


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise HTTPException(422, "since needs a time zone (e.g. 2026-11-24T10:00:00Z)")
    return value


@router.get("/studies", response_model=list[StudyOut], tags=["studies"], responses={422: {}})
def studies(request: Request, _: Reader, limit: Limit = 100, offset: Offset = 0,
            since: Annotated[datetime | None, Query(description="received at or after (ISO 8601 with zone)")] = None,
            after: Annotated[str | None, Query(max_length=64, description="the next page: studies listed after this "
                                               "Study Instance UID (the last of the previous page)")] = None,
            ) -> list[dict[str, Any]]:
    """Received studies with their series, state and instance counts, newest first. Page with `after` (the
    last study UID of the previous page): a deep page is as fast as the first; `offset` still works."""
    from db.records import list_studies

    if after is not None and not is_valid_uid(after):
        raise HTTPException(422, "after is not a valid DICOM UID")
    with _session(request) as session:
        try:
            return list_studies(session, limit=limit, offset=offset, since=_aware(since), after=after)
        except LookupError:
            raise HTTPException(422, "after: no such study") from None


@router.get("/studies/{study_uid}", response_model=StudyOut, tags=["studies"], responses={404: {}, 422: {}})
def study(request: Request, _: Reader, study_uid: str) -> dict[str, Any]:
    """One study with its series."""
    from db.records import list_studies

    if not is_valid_uid(study_uid):
        raise HTTPException(422, "study_uid is not a valid DICOM UID")
    with _session(request) as session:
        rows = list_studies(session, study_uid)
    if not rows:
        raise HTTPException(404, "no such study")
    return rows[0]


@router.get("/jobs", response_model=list[JobOut], tags=["jobs"])
def jobs(request: Request, _: Reader, state: JobState | None = None,
         plugin: Annotated[str | None, Query(max_length=64)] = None,
         study_uid: Annotated[str | None, Query(max_length=64)] = None,
         since: Annotated[datetime | None, Query(description="changed at or after (ISO 8601 with zone)")] = None,
         limit: Limit = 100, offset: Offset = 0,
         after: Annotated[int | None, Query(ge=1, le=2**63 - 1, description="the next page: jobs older than this "
                                            "job id (the last of the previous page)")] = None,
         ) -> list[dict[str, Any]]:
    """Jobs newest first, filtered by state, plugin, study or time of the last change. Page with `after` (the
    last job id of the previous page): a deep page is as fast as the first; `offset` still works."""
    from db.jobs import list_jobs

    with _session(request) as session:
        return list_jobs(session, state=state, plugin=plugin, study_uid=study_uid, since=_aware(since), limit=limit,
                         offset=offset, after=after)


def job_or_404(request: Request, job_id: int) -> dict[str, Any]:
    """The job as JSON. Raises HTTPException 404."""
    from db.jobs import list_jobs

    with _session(request) as session:
        rows = list_jobs(session, job_id=job_id, limit=1)
    if not rows:
        raise HTTPException(404, f"no job {job_id}")
    return rows[0]


@router.get("/jobs/{job_id}", response_model=JobOut, tags=["jobs"], responses={404: {}})
def job(request: Request, _: Reader, job_id: JobId) -> dict[str, Any]:
    """One job: state, timings per stage, warnings, findings, outputs and deliveries."""
    return job_or_404(request, job_id)


def retry_job(request: Request, job_id: int) -> None:
    """Requeue a finished job (the node's sweeper sends it). Raises HTTPException 404 or 409."""
    from db.jobs import InputsRemoved, requeue

    with request.app.state.sessionmaker.begin() as session:
        try:
            moved = requeue(session, job_id)
        except LookupError:
            raise HTTPException(404, f"no job {job_id}") from None
        except InputsRemoved as exc:
            raise HTTPException(409, str(exc)) from None
    if not moved:
        raise HTTPException(409, f"job {job_id} is queued or running already")


@router.post("/jobs/{job_id}/retry", response_model=Accepted, status_code=202, tags=["jobs"],
             responses={401: {}, 403: {}, 404: {}, 409: {}})
def retry(request: Request, who: Writer, job_id: JobId) -> dict[str, Any]:
    """Run a finished job again (failed, skipped, encoded or delivered), with the same output UIDs."""
    retry_job(request, job_id)
    return {"id": job_id, "state": JobState.QUEUED, "message": "queued again; a worker runs it shortly"}


def redeliver_job(request: Request, job_id: int, everything: bool) -> list[int]:
    """Make a job's failed (or all) deliveries due again. Raises HTTPException 404 or 409."""
    from db.deliveries import NotRedeliverable, redeliver

    with request.app.state.sessionmaker.begin() as session:
        try:
            return redeliver(session, job_id, utcnow(), everything=everything)
        except LookupError:
            raise HTTPException(404, f"no job {job_id}") from None
        except NotRedeliverable as exc:
            raise HTTPException(409, str(exc.args[0])) from None


@router.post("/jobs/{job_id}/redeliver", response_model=Redelivered, status_code=202, tags=["jobs"],
             responses={401: {}, 403: {}, 404: {}, 409: {}})
def redeliver(request: Request, who: Writer, job_id: JobId,
              body: Annotated[RedeliverIn | None, Body()] = None) -> dict[str, Any]:
    """Send a job's results again: the failed deliveries, or every destination with `{"all": true}`."""
    ids = redeliver_job(request, job_id, bool(body and body.all))
    return {"id": job_id, "deliveries": ids, "message": f"{len(ids)} delivery(ies) due again"}


def results_zip(job: dict[str, Any]) -> bytes:
    """The job's result objects and a findings.json in one zip. Raises HTTPException 409 or 410."""
    if job["state"] not in FINISHED:
        raise HTTPException(409, f"job {job['id']} is {job['state']}: no results yet")
    if job["outputs_removed_at"]:
        raise HTTPException(410, f"job {job['id']}'s outputs were removed (retention); retry the job to make them "
                                 "again")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        add_job_to_zip(archive, job, "")
    return buffer.getvalue()


def add_job_to_zip(archive: zipfile.ZipFile, job: dict[str, Any], prefix: str) -> None:
    """Write one job's DICOM outputs and its findings.json under `prefix` in `archive`."""
    for output in job["outputs"]:
        path = Path(output)
        if path.suffix == ".dcm" and path.is_file():
            archive.write(path, prefix + path.name)
    summary = {k: job[k] for k in ("id", "series_uid", "plugin", "plugin_version", "state", "reason", "warnings",
                                   "findings", "timings", "weights_sha256")}
    archive.writestr(prefix + "findings.json", json.dumps(summary, indent=2))


@router.get("/jobs/{job_id}/results.zip", tags=["jobs"], response_class=Response,
            responses={200: {"content": {"application/zip": {}}}, 404: {}, 409: {}, 410: {}})
def results(request: Request, _: Reader, job_id: JobId) -> Response:
    """The job's result objects (SR, SEG, SC) and findings.json as a zip."""
    data = results_zip(job_or_404(request, job_id))
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="radnode-job-{job_id}.zip"'})


def plugin_rows(request: Request) -> list[dict[str, Any]]:
    from plugins.registry import unavailable_reason

    discovery, models_path = request.app.state.discovery, request.app.state.settings.models_path
    rows = []
    for name, m in sorted(discovery.manifests.items()):
        why = unavailable_reason(m, models_path)
        rows.append({"name": name, "version": m.version, "queue": m.queue, "modalities": list(m.modalities),
                     "outputs": [str(o) for o in m.outputs], "reference_only": m.reference_only,
                     "available": why is None, "reason": why})
    for name, error in sorted(discovery.errors.items()):
        rows.append({"name": name, "available": False, "reason": f"excluded: {error}"})
    return rows


@router.get("/plugins", response_model=list[PluginOut], tags=["plugins"])
def plugins(request: Request, _: Reader) -> list[dict[str, Any]]:
    """Installed plugins and whether each can run here (or why not)."""
    return plugin_rows(request)


def alive_workers_from(app: Any) -> list[dict[str, Any]]:
    """Workers seen within three heartbeat periods."""
    from db.workers import alive

    with app.state.sessionmaker() as session:
        return alive(session, utcnow(), WORKER_ALIVE_PERIODS * app.state.settings.job_heartbeat_seconds)


def alive_workers(request: Request) -> list[dict[str, Any]]:
    return alive_workers_from(request.app)


@router.get("/workers", response_model=list[WorkerOut], tags=["plugins"])
def workers(request: Request, _: Reader) -> list[dict[str, Any]]:
    """Worker processes alive now (seen within three heartbeat periods) and the queues they serve."""
    return alive_workers(request)


# --- roll-out: modes per plugin or rule, and the review of results ------------------------------------------


class ModeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["live", "silent", "review"] | None = Field(description="null removes the override")
    review_hours: float | None = Field(None, gt=0, description="review mode: how long a result may wait")
    on_timeout: Literal["deliver", "discard"] | None = Field(None, description="review mode: after review_hours")


class ReviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    accept: bool = Field(description="true: deliver the result now; false: never send it")
    note: str | None = Field(None, max_length=2000)


@router.get("/rollout", tags=["rollout"])
def rollout_modes(request: Request, _: Reader) -> dict[str, Any]:
    """The operators' run-time overrides (a rule's override wins over its plugin's, both over the rules file)."""
    from db import review

    with _session(request) as session:
        return {"overrides": review.overrides(session), "pending_reviews": review.pending_count(session)}


@router.put("/rollout/{scope}/{name}", tags=["rollout"], responses={401: {}, 403: {}, 404: {}, 422: {}})
def set_rollout(request: Request, who: Writer, scope: Literal["plugin", "rule"],
                name: Annotated[str, PathParam(max_length=64)], body: ModeIn) -> dict[str, Any]:
    """Set (or with `mode: null` remove) the roll-out mode of a plugin or rule for the jobs that start from now
    on; no restart. Modes: live, silent (results kept here, never delivered), review (delivered after a reader
    accepts them)."""
    from db import review

    if scope == "plugin" and name not in request.app.state.discovery.manifests:
        raise HTTPException(404, f"no plugin {name!r} on this node")
    with request.app.state.sessionmaker.begin() as session:
        try:
            review.set_mode(session, scope, name, body.mode, utcnow(), review_hours=body.review_hours,
                            on_timeout=body.on_timeout, who=who.name)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return {"overrides": review.overrides(session)}


def review_job(request: Request, job_id: int, accept: bool, reader: str, note: str | None) -> list[int]:
    """Accept or reject a result waiting for review. Returns the deliveries made due. Raises HTTPException."""
    from db import review

    with request.app.state.sessionmaker.begin() as session:
        try:
            return review.decide(session, job_id, accept, reader, note, utcnow())
        except LookupError:
            raise HTTPException(404, f"no job {job_id}") from None
        except review.NotPending as exc:
            raise HTTPException(409, str(exc)) from None


@router.post("/jobs/{job_id}/review", response_model=Redelivered, status_code=202, tags=["jobs"],
             responses={401: {}, 403: {}, 404: {}, 409: {}})
def review_result(request: Request, who: Writer, job_id: JobId, body: ReviewIn) -> dict[str, Any]:
    """A reader's decision on a result held in review mode: accepted results are delivered now, rejected ones
    are never sent."""
    ids = review_job(request, job_id, body.accept, who.name, body.note)
    what = f"accepted: {len(ids)} delivery(ies) due now" if body.accept else "rejected: it will never be sent"
    return {"id": job_id, "deliveries": ids, "message": what}
