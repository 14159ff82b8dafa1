"""Dashboard step: the server-rendered pages of the HTTP service (Jinja2, no build toolchain): studies and jobs
with states, stage timings, warnings and errors; a job's findings, measurements and heatmap previews; retry and
redeliver forms; log in with an API token (kept in an HttpOnly, SameSite=Strict cookie)."""

from __future__ import annotations

import io
import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from db.models import DeliveryState, JobState
from node import __version__
from node.api.auth import COOKIE, Authenticator, Principal
from node.api.v1 import FINISHED, alive_workers, job_or_404, plugin_rows, redeliver_job, retry_job
from node.dicom.header import is_valid_uid

log = logging.getLogger("radnode.api")

router = APIRouter(include_in_schema=False)
HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
STATIC_TYPES = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}
templates = Jinja2Templates(directory=HERE / "templates")  # autoescape is on for .html

JobId = Annotated[int, PathParam(ge=1, le=2**31 - 1)]
REFRESH_SECONDS = 5  # pages reload themselves this often (?refresh=0 stops it)
PREVIEW_MAX_PX = 1024  # longest side of a heatmap preview
SC_NAME = re.compile(r"SC-[0-9]{1,6}")  # the only outputs previewed: the encoders' SC-NNN.dcm
STAGES = ("queue_wait", "model_load", "image_load", "infer", "encode")  # timing keys in the order they happen
UNIT_LABELS = {"[hnsf'U]": "HU", "1": "", "mm2": "mm²", "mm3": "mm³", "cm2": "cm²", "cm3": "cm³"}
FLASH_KEYS = ("msg", "err")
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


# --- helpers for templates ------------------------------------------------------------------------


def when(value: str | None) -> str:
    """An ISO timestamp as `YYYY-MM-DD HH:MM:SS` in UTC (naive values are UTC already); "" for none."""
    if not value:
        return ""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def short_uid(uid: str | None, keep: int = 10) -> str:
    """A UID shortened to its last `keep` characters for tables (the full one goes in a title attribute)."""
    if not uid:
        return ""
    return uid if len(uid) <= keep + 1 else "…" + uid[-keep:]


def seconds(value: float | None) -> str:
    """Seconds for a timings cell: 3 significant digits, ms below one second."""
    if value is None:
        return ""
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.3g} s"


def number(value: float | None) -> str:
    """A measurement value with up to 6 significant digits."""
    return "" if value is None else f"{value:.6g}"


def unit_label(ucum: str | None) -> str:
    """A UCUM unit as radiologists write it (`[hnsf'U]` -> HU)."""
    return UNIT_LABELS.get(ucum or "", ucum or "")


templates.env.filters.update(when=when, short_uid=short_uid, seconds=seconds, number=number, unit=unit_label)


def stage_timings(timings: dict[str, float], main_only: bool = False) -> list[tuple[str, float]]:
    """(stage, seconds) in the order stages happen: queue wait, model load, image load, infer, encode, the encoders'
    parts (`encode:SR`...), then each delivery (`deliver:<dest>`) and anything else. `main_only` leaves out the
    encoders' parts."""

    def rank(name: str) -> tuple[int, str]:
        if name in STAGES:
            return STAGES.index(name), ""
        if name.startswith("encode:"):
            return len(STAGES), name
        return (len(STAGES) + 1 if name.startswith("deliver:") else len(STAGES) + 2), name

    return [(k, v) for k, v in sorted(timings.items(), key=lambda kv: rank(kv[0]))
            if not (main_only and k.startswith("encode:"))]


def settled(job: dict[str, Any]) -> bool:
    """Nothing more will happen to the job without an operator: no reason to keep reloading its page."""
    if job["state"] in (JobState.QUEUED, JobState.RUNNING):
        return False
    return not any(d["state"] == DeliveryState.PENDING for d in job["deliveries"])


def can_retry(job: dict[str, Any]) -> bool:
    """A job may be run again once no worker holds it (encoded, delivered, failed, skipped)."""
    return job["state"] in FINISHED


# --- who is looking -------------------------------------------------------------------------------


def viewer(request: Request) -> Principal | None:
    """Who may read this page: the token's principal, "anonymous" when reading is open, else None."""
    auth: Authenticator = request.app.state.auth
    who = auth.identify(request)
    if who is None and auth.settings.api_read_open:
        return Principal("anonymous", False)
    return who


def safe_next(value: str | None, default: str = "/") -> str:
    """A local path to go back to (starts with one "/", no scheme or host, no backslash); else `default`."""
    if (not value or not value.startswith("/") or value.startswith("//") or "\\" in value
            or any(ord(c) < 0x20 or c == "\x7f" for c in value) or len(value) > 2000):
        return default
    return value


def with_flash(url: str, key: str, text: str) -> str:
    """`url` with its earlier flash message replaced by `text` under `key` (msg or err)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in FLASH_KEYS]
    query.append((key, text[:300]))
    return urlunsplit(("", "", parts.path, urlencode(query), ""))


def here(request: Request) -> str:
    """This page's path and query without a flash message: where its forms come back to."""
    query = [(k, v) for k, v in request.query_params.multi_items() if k not in FLASH_KEYS]
    return request.url.path + (f"?{urlencode(query)}" if query else "")


def same_origin(request: Request) -> bool:
    """False when the request carries an Origin header naming another host (a cross-site form post)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return bool(host) and urlsplit(origin).netloc.lower() == host.lower()


def secure_cookie(request: Request) -> bool:
    """The cookie is Secure when the browser talks HTTPS: to uvicorn itself, or to a proxy in front that says so
    (X-Forwarded-Proto; a false claim could only make the cookie stricter)."""
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https"


def login_redirect(request: Request) -> RedirectResponse:
    """To the login form, coming back to this page afterwards."""
    return RedirectResponse("/login?" + urlencode({"next": here(request)}), status_code=303)


def page(request: Request, template: str, context: dict[str, Any], status_code: int = 200) -> Response:
    """Render a page with the common context (viewer, flash messages, refresh) and the security headers."""
    base = {
        "version": __version__,
        "who": None,
        "signed_in": request.app.state.auth.identify(request) is not None,
        "refresh": 0,
        "msg": request.query_params.get("msg", "")[:300],
        "err": request.query_params.get("err", "")[:300],
        "here": here(request),
    }
    return templates.TemplateResponse(request, template, base | context, status_code=status_code,
                                      headers=PAGE_HEADERS)


def refresh_seconds(request: Request) -> int:
    """The page's reload period: `?refresh=N` (0 stops it, at most an hour), else REFRESH_SECONDS."""
    raw = request.query_params.get("refresh")
    if raw is None:
        return REFRESH_SECONDS
    return min(int(raw), 3600) if raw.isdigit() else REFRESH_SECONDS


# --- pages ----------------------------------------------------------------------------------------


@router.get("/")
def overview(request: Request, state: Annotated[str, Query(max_length=16)] = "",
             plugin: Annotated[str, Query(max_length=64)] = "",
             study: Annotated[str, Query(max_length=64)] = "",
             limit: Annotated[int, Query(ge=1, le=1000)] = 100,
             after: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None) -> Response:
    """Jobs (newest first, filtered by state, plugin and study; `after`: the page of jobs older than that id) and
    studies, workers alive and plugins."""
    from db.jobs import list_jobs
    from db.records import list_studies

    who = viewer(request)
    if who is None:
        return login_redirect(request)
    problems = []
    if state and state not in set(JobState):
        problems.append(f"unknown state {state!r}: not filtered by state")
        state = ""
    if study and not is_valid_uid(study):
        problems.append("study is not a valid DICOM UID: not filtered by study")
        study = ""
    with request.app.state.sessionmaker() as session:
        jobs = list_jobs(session, state=state or None, plugin=plugin or None, study_uid=study or None, limit=limit,
                         after=after)
        studies = list_studies(session, study or None, limit=50)
    plugins = plugin_rows(request)
    context = {
        "who": who, "jobs": jobs, "studies": studies, "workers": alive_workers(request), "plugins": plugins,
        "states": list(JobState), "plugin_names": sorted({p["name"] for p in plugins} | {j["plugin"] for j in jobs}),
        "filters": {"state": state, "plugin": plugin, "study": study}, "problems": problems,
        "refresh": refresh_seconds(request), "can_retry": can_retry, "stage_timings": stage_timings,
        "older": older_page(request, jobs, limit),
    }
    return page(request, "overview.html", context)


def older_page(request: Request, jobs: list[dict[str, Any]], limit: int) -> str | None:
    """The link to the next page of jobs (keyset: `after` the last one shown), or None after a short page."""
    if len(jobs) < limit:
        return None
    query = [(k, v) for k, v in request.query_params.multi_items() if k not in (*FLASH_KEYS, "after")]
    return "/?" + urlencode([*query, ("after", str(jobs[-1]["id"]))])


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: JobId) -> Response:
    """One job: states and times, stage timings, warnings, error, deliveries, findings, outputs, previews, the review
    buttons and the feedback forms with the feedback history."""
    from db.feedback import history

    who = viewer(request)
    if who is None:
        return login_redirect(request)
    try:
        job = job_or_404(request, job_id)
    except HTTPException as exc:
        return page(request, "error.html", {"who": who, "status": exc.status_code, "detail": exc.detail},
                    exc.status_code)
    names = [Path(o).name for o in job["outputs"]]
    with request.app.state.sessionmaker() as session:
        feedback = history(session, job_id)
    context = {
        "who": who, "job": job, "findings": job["findings"] or {}, "feedback": feedback,
        "outputs": names, "previews": [n[:-4] for n in names if n.endswith(".dcm") and SC_NAME.fullmatch(n[:-4])],
        "downloadable": job["state"] in FINISHED and not job["outputs_removed_at"] and bool(names),
        "timings": stage_timings(job["timings"]), "refresh": 0 if settled(job) else refresh_seconds(request),
        "can_retry": can_retry,
    }
    return page(request, "job.html", context)


@router.get("/ui/jobs/{job_id}/preview/{name}.png")
def preview(request: Request, job_id: JobId, name: str) -> Response:
    """A heatmap secondary capture of the job (`SC-NNN`, one of its outputs) as a PNG of at most 1024 px."""
    if viewer(request) is None:
        return Response("log in first", status_code=401, media_type="text/plain")
    if not SC_NAME.fullmatch(name):
        return Response("no such preview", status_code=404, media_type="text/plain")
    job = job_or_404(request, job_id)
    if f"{name}.dcm" not in {Path(o).name for o in job["outputs"]}:
        return Response("no such preview", status_code=404, media_type="text/plain")
    path = request.app.state.settings.outputs_dir / str(job_id) / f"{name}.dcm"
    try:
        data = preview_png(path)
    except FileNotFoundError:
        return Response("the outputs were removed", status_code=404, media_type="text/plain")
    return Response(data, media_type="image/png",
                    headers={"Cache-Control": "private, max-age=60", "X-Content-Type-Options": "nosniff"})


def preview_png(path: Path, max_px: int = PREVIEW_MAX_PX) -> bytes:
    """A DICOM image (its first frame) as PNG bytes, longest side at most `max_px`, drawn by the image loader's
    display conversion (node.imaging.display_pixels): RGB (YBR_* converted) or grayscale (modality and VOI LUT
    applied, MONOCHROME1 inverted), scaled to 8 bits.
    Raises FileNotFoundError, pydicom's InvalidDicomError, or ValueError for pixel data it cannot show."""
    import numpy as np
    import pydicom
    from PIL import Image

    from node.imaging import display_pixels

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise ValueError(f"{path.name} has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    samples = int(ds.get("SamplesPerPixel", 1))
    if not (samples == 3 or (samples == 1 and photometric in ("MONOCHROME1", "MONOCHROME2"))):
        raise ValueError(f"{path.name}: no preview for {photometric} with {samples} samples per pixel")
    pixels = display_pixels(ds, colour=True)  # float32 in [0, 1]: (y, x) grey or (y, x, 3) RGB
    picture = Image.fromarray(np.round(pixels.astype(np.float64) * 255.0).astype(np.uint8),
                              mode="RGB" if pixels.ndim == 3 else "L")
    picture.thumbnail((max_px, max_px))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


# --- forms ----------------------------------------------------------------------------------------


def _writer_or_refusal(request: Request) -> Principal | Response:
    """The writing principal of a form post, or the page that refuses it (403 cross-site or read-only, 401)."""
    if not same_origin(request):
        log.warning("dashboard: cross-site form post to %s refused", request.url.path)
        return page(request, "error.html", {"status": 403, "detail": "cross-site form post refused"}, 403)
    who = request.app.state.auth.identify(request)
    if who is None:
        return page(request, "error.html", {"status": 401, "detail": "log in with a token that may write"}, 401)
    if not who.can_write:
        return page(request, "error.html", {"who": who, "status": 403, "detail": f"token {who.name!r} is read-only"},
                    403)
    return who


@router.post("/ui/jobs/{job_id}/retry")
def retry_form(request: Request, job_id: JobId, next: Annotated[str, Form(max_length=2000)] = "") -> Response:
    """Run a finished job again, then back to the page the form came from with what happened."""
    who = _writer_or_refusal(request)
    if isinstance(who, Response):
        return who
    back = safe_next(next, f"/jobs/{job_id}")
    try:
        retry_job(request, job_id)
    except HTTPException as exc:
        return RedirectResponse(with_flash(back, "err", str(exc.detail)), status_code=303)
    log.info("dashboard: job %d queued again by %s", job_id, who.name)
    return RedirectResponse(with_flash(back, "msg", f"job {job_id} queued again; a worker runs it shortly"),
                            status_code=303)


@router.post("/ui/jobs/{job_id}/redeliver")
def redeliver_form(request: Request, job_id: JobId, next: Annotated[str, Form(max_length=2000)] = "",
                   all: Annotated[str, Form(max_length=8)] = "") -> Response:
    """Send a job's results again (the failed deliveries, or all with `all=1`), then back with what happened."""
    who = _writer_or_refusal(request)
    if isinstance(who, Response):
        return who
    back = safe_next(next, f"/jobs/{job_id}")
    try:
        ids = redeliver_job(request, job_id, all.lower() in ("1", "true", "on", "yes"))
    except HTTPException as exc:
        return RedirectResponse(with_flash(back, "err", str(exc.detail)), status_code=303)
    log.info("dashboard: %d delivery(ies) of job %d due again, by %s", len(ids), job_id, who.name)
    return RedirectResponse(with_flash(back, "msg", f"job {job_id}: {len(ids)} delivery(ies) due again"),
                            status_code=303)


# --- logging in and out ---------------------------------------------------------------------------


@router.get("/login")
def login_page(request: Request, next: Annotated[str, Query(max_length=2000)] = "/") -> Response:
    """The token form."""
    return page(request, "login.html", {"next": safe_next(next)})


@router.post("/login")
def login(request: Request, token: Annotated[str, Form(max_length=4096)] = "",
          next: Annotated[str, Form(max_length=2000)] = "/") -> Response:
    """Accept an API token: set the dashboard cookie and go on, or show the form again (401)."""
    if not same_origin(request):
        log.warning("dashboard: cross-site login post refused")
        return page(request, "error.html", {"status": 403, "detail": "cross-site form post refused"}, 403)
    who = request.app.state.auth.check(token.strip())
    if who is None:
        log.warning("dashboard: a login with an unknown token was refused")
        return page(request, "login.html", {"next": safe_next(next), "refused": True}, 401)
    log.info("dashboard: %s logged in", who.name)
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(COOKIE, token.strip(), httponly=True, samesite="strict", path="/",
                        secure=secure_cookie(request))
    return response


@router.get("/logout")
def logout(request: Request) -> Response:
    """Forget the dashboard cookie."""
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=secure_cookie(request))
    return response


@router.get("/favicon.ico")
def favicon() -> Response:
    """No icon (browsers ask for one on every page)."""
    return Response(status_code=204, headers={"Cache-Control": "public, max-age=86400"})


@router.get("/ui/static/{name}")
def static_file(name: str) -> Response:
    """The dashboard's stylesheet and script (no login needed: the login page uses them)."""
    if name not in STATIC_TYPES:
        return Response("not found", status_code=404, media_type="text/plain")
    return FileResponse(STATIC / name, media_type=STATIC_TYPES[name],
                        headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"})

