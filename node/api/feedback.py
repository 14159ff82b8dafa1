"""API step, feedback and monitoring: radiologists' verdicts on a job's results (REST and the job page's forms),
the review decision form, the monitoring report (JSON and the dashboard page) and the feedback export."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from db.models import utcnow
from node.api.auth import Reader, Writer
from node.api.dashboard import _writer_or_refusal, login_redirect, page, safe_next, viewer, with_flash
from node.api.v1 import JobId, _aware

log = logging.getLogger("radnode.api")

router = APIRouter(prefix="/v1")
ui = APIRouter(include_in_schema=False)
DRIFT_CACHE_SECONDS = 60.0  # /metrics computes the drift check at most this often


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target_kind: Literal["result", "finding", "segment"]
    target: str = Field("", max_length=128, description='"" for the result, "<scheme>:<code>" for a finding (e.g. '
                        '"SCT:233604007"), the segment label for a segment')
    verdict: Literal["agree", "disagree", "accept", "reject", "edited"] = Field(
        description="agree | disagree on a result or finding; accept | reject | edited on a segment")
    comment: str | None = Field(None, max_length=4000)

    @field_validator("target", "comment")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and any(ord(c) < 0x20 and c not in "\n\r\t" for c in value):
            raise ValueError("control characters are not allowed")
        return value


class FeedbackOut(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: int
    job_id: int
    reader: str = Field(description="the token's name (or the dashboard login's)")
    target_kind: str
    target: str
    verdict: str
    comment: str | None
    created_at: str


def store_feedback(request: Request, job_id: int, reader: str, body: FeedbackIn) -> dict[str, Any]:
    """Store one verdict. Raises HTTPException 404 (no such job) or 422 (target or verdict does not fit)."""
    from db.feedback import add_feedback

    with request.app.state.sessionmaker.begin() as session:
        try:
            row = add_feedback(session, job_id, reader, body.target_kind, body.target, body.verdict, body.comment,
                               utcnow())
        except LookupError:
            raise HTTPException(404, f"no job {job_id}") from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
    log.info("feedback %s on job %d (%s) by %s", body.verdict, job_id, body.target_kind, reader)
    return row


@router.post("/jobs/{job_id}/feedback", response_model=FeedbackOut, status_code=201, tags=["jobs"],
             responses={401: {}, 403: {}, 404: {}, 422: {}})
def add(request: Request, who: Writer, job_id: JobId, body: FeedbackIn) -> dict[str, Any]:
    """A reader's verdict on the job's result, one finding or one segment. Earlier verdicts are kept (history)."""
    return store_feedback(request, job_id, who.name, body)


@router.get("/jobs/{job_id}/feedback", response_model=list[FeedbackOut], tags=["jobs"], responses={404: {}})
def feedback_history(request: Request, _: Reader, job_id: JobId) -> list[dict[str, Any]]:
    """Every verdict given on the job, oldest first."""
    from db.feedback import history

    with request.app.state.sessionmaker() as session:
        try:
            return history(session, job_id)
        except LookupError:
            raise HTTPException(404, f"no job {job_id}") from None


@router.get("/monitoring", tags=["plugins"])
def monitoring(request: Request, _: Reader,
               plugin: Annotated[str | None, Query(max_length=64)] = None) -> dict[str, Any]:
    """Per plugin: drift of each input/output statistic (last window against the reference), weekly statistics
    per scanner model and station, agreement, sensitivity and specificity from feedback."""
    from node.monitor import report

    with request.app.state.sessionmaker() as session:
        return report(session, request.app.state.settings, utcnow(), plugin)


@router.get("/feedback/export", tags=["jobs"], response_class=Response,
            responses={200: {"content": {"text/csv": {}, "application/json": {}}}, 422: {}})
def export(request: Request, _: Reader, format: Literal["csv", "json"] = "csv",
           plugin: Annotated[str | None, Query(max_length=64)] = None,
           since: Annotated[datetime | None, Query(description="given at or after (ISO 8601 with zone)")] = None,
           ) -> Response:
    """Every verdict with its job (plugin, version, rollout, study/series UIDs, no patient data), the finding it
    judged and the job's findings: CSV (one line per verdict) or JSON."""
    from node.monitor import export_text

    with request.app.state.sessionmaker() as session:
        text = export_text(session, format, plugin, _aware(since))
    return Response(text, media_type="text/csv" if format == "csv" else "application/json",
                    headers={"Content-Disposition": f'attachment; filename="radnode-feedback.{format}"'})


def drift_gauges(app: Any) -> Any:
    """A function for the /metrics collector: the drift gauges, computed at most every DRIFT_CACHE_SECONDS."""
    import time

    from node.monitor import gauges

    cache: dict[str, Any] = {"at": -DRIFT_CACHE_SECONDS, "rows": []}

    def read() -> list[tuple[str, str, str, float, bool]]:
        if time.monotonic() - cache["at"] >= DRIFT_CACHE_SECONDS:
            with app.state.sessionmaker() as session:
                cache["rows"] = gauges(session, app.state.settings, utcnow())
            cache["at"] = time.monotonic()
        return cache["rows"]

    return read


# --- dashboard ------------------------------------------------------------------------------------


@ui.get("/monitoring")
def monitoring_page(request: Request, plugin: Annotated[str, Query(max_length=64)] = "") -> Response:
    """Per plugin: drift warnings first, charts of the distributions and weekly lines, tables per scanner."""
    from node.monitor import charts, report

    who = viewer(request)
    if who is None:
        return login_redirect(request)
    with request.app.state.sessionmaker() as session:
        data = report(session, request.app.state.settings, utcnow(), plugin or None)
    for p in data["plugins"]:
        p["charts"] = [charts.bars(f"{d['statistic']} (PSI {d['score']:.2f})", d["detail"]["labels"],
                                   d["detail"]["reference"], d["detail"]["recent"], d["warning"])
                       for d in p["drift"] if d["kind"] == "psi" and d["detail"].get("recent")
                       and (d["warning"] or d["statistic"] in ("intensity_histogram", "slice_thickness", "kernel"))]
        weeks = sorted({w["week"] for w in p["weeks"]})
        per_week = {wk: [w for w in p["weeks"] if w["week"] == wk] for wk in weeks}
        findings = sorted({f for w in p["weeks"] for f in w["positive_rate"]})
        p["charts"].append(charts.lines("series per week", weeks, {"series": [
            float(sum(w["series"] for w in per_week[wk])) for wk in weeks]}))
        if findings:
            p["charts"].append(charts.lines("positive rate per week", weeks, {f: [_weighted(
                per_week[wk], lambda w, f=f: w["positive_rate"].get(f)) for wk in weeks] for f in findings},
                percent=True))
        p["charts"].append(charts.lines("mean intensity per week", weeks, {"mean": [_weighted(
            per_week[wk], lambda w: w["intensity_mean"]) for wk in weeks]}))
    return page(request, "monitoring.html", {"who": who, "report": data, "plugin": plugin})


def _weighted(rows: list[dict[str, Any]], value: Any) -> float | None:
    """The series-weighted mean of value(row) over rows that have one."""
    pairs = [(value(r), r["series"]) for r in rows if value(r) is not None]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None


@ui.post("/ui/jobs/{job_id}/feedback")
def feedback_form(request: Request, job_id: JobId, target_kind: Annotated[str, Form(max_length=16)] = "",
                  target: Annotated[str, Form(max_length=128)] = "", verdict: Annotated[str, Form(max_length=16)] = "",
                  comment: Annotated[str, Form(max_length=4000)] = "",
                  next: Annotated[str, Form(max_length=2000)] = "") -> Response:
    """Store a verdict given on the job page, then back with what happened."""
    from pydantic import ValidationError

    who = _writer_or_refusal(request)
    if isinstance(who, Response):
        return who
    back = safe_next(next, f"/jobs/{job_id}")
    try:
        body = FeedbackIn(target_kind=target_kind, target=target, verdict=verdict, comment=comment or None)
        store_feedback(request, job_id, who.name, body)
    except ValidationError as exc:
        return RedirectResponse(with_flash(back, "err", "; ".join(e["msg"] for e in exc.errors())), status_code=303)
    except HTTPException as exc:
        return RedirectResponse(with_flash(back, "err", str(exc.detail)), status_code=303)
    what = "the result" if target_kind == "result" else f"{target_kind} {target}"
    return RedirectResponse(with_flash(back, "msg", f"{verdict} on {what} recorded"), status_code=303)


@ui.post("/ui/jobs/{job_id}/review")
def review_form(request: Request, job_id: JobId, decision: Annotated[str, Form(max_length=8)] = "",
                note: Annotated[str, Form(max_length=4000)] = "",
                next: Annotated[str, Form(max_length=2000)] = "") -> Response:
    """Accept (deliver) or reject (never deliver) a job's results held for review, then back with what happened.
    The deliveries an acceptance makes due are sent by the node's sweeper, as redelivered ones are."""
    from db.review import decide

    who = _writer_or_refusal(request)
    if isinstance(who, Response):
        return who
    back = safe_next(next, f"/jobs/{job_id}")
    if decision not in ("accept", "reject"):
        return RedirectResponse(with_flash(back, "err", "decision must be accept or reject"), status_code=303)
    try:
        with request.app.state.sessionmaker.begin() as session:
            ids = decide(session, job_id, decision == "accept", who.name, note.strip() or None, utcnow())
    except (LookupError, ValueError) as exc:
        return RedirectResponse(with_flash(back, "err", str(exc.args[0] if exc.args else exc)), status_code=303)
    log.info("dashboard: job %d %sed by %s; %d delivery(ies) due", job_id, decision, who.name, len(ids))
    text = (f"job {job_id} accepted: {len(ids)} delivery(ies) due" if decision == "accept"
            else f"job {job_id} rejected: its results are never delivered")
    return RedirectResponse(with_flash(back, "msg", text), status_code=303)
