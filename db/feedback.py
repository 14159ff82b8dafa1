"""Feedback and monitoring queries: radiologists' verdicts on a job's results (insert-only history), the export
joined with each job's findings, and the job rows the monitoring statistics are computed from."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Feedback, Job, JobState, Series, Study

VERDICTS = {"result": ("agree", "disagree"), "finding": ("agree", "disagree"),
            "segment": ("accept", "reject", "edited")}
RAN = (JobState.ENCODED, JobState.DELIVERED)  # jobs whose plugin ran and gave findings


def finding_key(concept: dict[str, Any]) -> str:
    """A classification's target name: `<scheme>:<code>`, e.g. `SCT:233604007`."""
    return f"{concept['scheme']}:{concept['value']}"


def targets(findings: dict[str, Any] | None) -> dict[str, set[str]]:
    """What feedback may name in these findings: the result (""), each classification, each segment."""
    if not findings:
        return {"result": set(), "finding": set(), "segment": set()}
    return {"result": {""},
            "finding": {finding_key(c["concept"]) for c in findings.get("classifications") or []},
            "segment": {s["segment"] for s in findings.get("segmentations") or []}}


def check(findings: dict[str, Any] | None, target_kind: str, target: str, verdict: str) -> None:
    """Raises ValueError saying why this verdict cannot be given on these findings."""
    if target_kind not in VERDICTS:
        raise ValueError(f"target_kind must be one of {', '.join(VERDICTS)}, got {target_kind!r}")
    if verdict not in VERDICTS[target_kind]:
        raise ValueError(f"verdict on a {target_kind} must be one of {', '.join(VERDICTS[target_kind])}, "
                         f"got {verdict!r}")
    if not findings or findings.get("not_applicable"):
        raise ValueError("the job has no results to give feedback on")
    known = targets(findings)[target_kind]
    if target not in known:
        if target_kind == "result":
            raise ValueError('the target of a result verdict is "" (the whole result)')
        raise ValueError(f"the job's findings have no {target_kind} {target!r}; known: "
                         f"{', '.join(sorted(known)) or 'none'}")


def _row(f: Feedback) -> dict[str, Any]:
    return {"id": f.id, "job_id": f.job_id, "reader": f.reader, "target_kind": f.target_kind, "target": f.target,
            "verdict": f.verdict, "comment": f.comment, "created_at": f.created_at.isoformat()}


def add_feedback(session: Session, job_id: int, reader: str, target_kind: str, target: str, verdict: str,
                 comment: str | None, now: datetime) -> dict[str, Any]:
    """Store one verdict (never overwriting an earlier one) and return it as a dict. The caller commits.
    Raises LookupError for an unknown job, ValueError when the target or the verdict does not fit its findings."""
    findings = session.execute(select(Job.findings).where(Job.id == job_id)).first()
    if findings is None:
        raise LookupError(f"no job {job_id}")
    check(findings[0], target_kind, target, verdict)
    row = Feedback(job_id=job_id, reader=reader, target_kind=target_kind, target=target, verdict=verdict,
                   comment=(comment or "").strip() or None, created_at=now)
    session.add(row)
    session.flush()
    return _row(row)


def history(session: Session, job_id: int) -> list[dict[str, Any]]:
    """Every verdict given on the job, oldest first. Raises LookupError for an unknown job."""
    if session.get(Job, job_id) is None:
        raise LookupError(f"no job {job_id}")
    rows = session.execute(select(Feedback).where(Feedback.job_id == job_id).order_by(Feedback.id)).scalars()
    return [_row(f) for f in rows]


def _subject(findings: dict[str, Any] | None, kind: str, target: str) -> dict[str, Any]:
    """The model's answer the verdict was on: probability/threshold/positive of a classification, voxels of a
    segment; empty for the whole result."""
    for c in (findings or {}).get("classifications") or []:
        if kind == "finding" and finding_key(c["concept"]) == target:
            return {"meaning": c["concept"]["meaning"], "probability": c["probability"], "threshold": c["threshold"],
                    "positive": c["positive"]}
    for s in (findings or {}).get("segmentations") or []:
        if kind == "segment" and s["segment"] == target:
            return {"voxels": s["voxels"]}
    return {}


def export_rows(session: Session, plugin: str | None = None, since: datetime | None = None) -> list[dict[str, Any]]:
    """Every verdict (oldest first) with its job: plugin and version, rollout, study/series UIDs (no patient
    data), the model's answer it judged (`subject`) and the job's whole findings."""
    q = (select(Feedback, Job.plugin, Job.plugin_version, Job.rollout, Job.findings, Series.series_uid,
                Study.study_uid)
         .join(Job, Feedback.job_id == Job.id).join(Series, Job.series_id == Series.id)
         .join(Study, Series.study_id == Study.id).order_by(Feedback.id))
    if plugin:
        q = q.where(Job.plugin == plugin)
    if since is not None:
        q = q.where(Feedback.created_at >= since)
    return [_row(f) | {"plugin": p, "plugin_version": v, "rollout": r, "study_uid": st, "series_uid": se,
                       "subject": _subject(fi, f.target_kind, f.target), "findings": fi}
            for f, p, v, r, fi, se, st in session.execute(q)]


def monitoring_rows(session: Session, since: datetime, until: datetime,
                    plugin: str | None = None) -> list[dict[str, Any]]:
    """Jobs that ran (encoded or delivered) created in [since, until), oldest first: id, plugin, created_at,
    input_stats, findings and their verdicts (reader, target_kind, target, verdict, in the order given)."""
    q = (select(Job.id, Job.plugin, Job.created_at, Job.input_stats, Job.findings)
         .where(Job.created_at >= since, Job.created_at < until, Job.state.in_(RAN)).order_by(Job.id))
    if plugin:
        q = q.where(Job.plugin == plugin)
    jobs = [{"id": i, "plugin": p, "created_at": c, "input_stats": s, "findings": f, "feedback": []}
            for i, p, c, s, f in session.execute(q)]
    by_id = {j["id"]: j for j in jobs}
    if by_id:
        fq = (select(Feedback.job_id, Feedback.reader, Feedback.target_kind, Feedback.target, Feedback.verdict)
              .join(Job, Feedback.job_id == Job.id)
              .where(Job.created_at >= since, Job.created_at < until).order_by(Feedback.id))
        for job_id, reader, kind, target, verdict in session.execute(fq):
            if job_id in by_id:
                by_id[job_id]["feedback"].append({"reader": reader, "target_kind": kind, "target": target,
                                                  "verdict": verdict})
    return jobs
