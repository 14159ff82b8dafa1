"""Dashboard: pages, login, retry/redeliver forms and heatmap previews through the real FastAPI app on a
migrated SQLite job table; then headless Chromium against a running node after a real job (log in, see the
job, its measurements and heatmaps, click Retry, watch it run again)."""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import convert_color_space
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from sqlalchemy import select, update

from db.deliveries import prepare, settle
from db.jobs import NewJob, create_jobs, fail, start, transition
from db.migrate import upgrade
from db.models import Delivery, DeliveryState, FailStage, Job, JobState, Series, utcnow
from db.records import ReceivedInstance, record_instance
from db.session import make_engine, make_sessionmaker
from node.api.app import create_app
from node.api.auth import COOKIE, new_token
from node.api.dashboard import preview_png, safe_next, stage_timings, with_flash
from node.settings import Settings
from tests.conftest import need

STUDY = "1.2.826.0.1.3680043.8.498.4242"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EVIL = "<script>alert(1)</script>"
FINDINGS = {
    "not_applicable": None, "summary": "bone volume 123.4 mL", "warnings": [],
    "classifications": [{"concept": {"value": "RID5352", "scheme": "RADLEX", "meaning": "Nodule"},
                         "probability": 0.91, "threshold": 0.5, "positive": True}],
    "measurements": [
        {"concept": {"value": "118565006", "scheme": "SCT", "meaning": "Volume"}, "value": 123.456789, "unit": "mL",
         "segment": "above-threshold", "frame": None},
        {"concept": {"value": "373098007", "scheme": "SCT", "meaning": "Mean"}, "value": 512.25, "unit": "[hnsf'U]",
         "segment": "above-threshold", "frame": 3},
    ],
    "segmentations": [], "heatmaps": [{"name": "above-threshold", "max": 1.0, "quantity": "HU above threshold / 1000", "unit": "1"}],
}


# --- fixtures and helpers ---------------------------------------------------------------------------------------


def write_image(path: Path, pixels: np.ndarray, photometric: str, bits: int = 8, **extra) -> Path:
    """A minimal secondary capture with these pixels (RGB/YBR: (y, x, 3) uint8; grey: (y, x))."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation = photometric
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def node(tmp_path: Path) -> Iterator[SimpleNamespace]:
    """The HTTP app on a fresh data folder with a writing and a read-only token, and its job table."""
    yield from _node(tmp_path)


@pytest.fixture
def open_node(tmp_path: Path) -> Iterator[SimpleNamespace]:
    """The same with api_read_open: reading needs no token."""
    yield from _node(tmp_path, api_read_open=True)


def _node(tmp_path: Path, **settings) -> Iterator[SimpleNamespace]:
    s = Settings(data_dir=tmp_path / "data", **settings)
    engine = make_engine(s.db_url)
    upgrade(engine)
    writer, _ = new_token(s, "ops")
    reader, _ = new_token(s, "viewer", read_only=True)
    with TestClient(create_app(s)) as client:
        yield SimpleNamespace(settings=s, client=client, maker=make_sessionmaker(engine), writer=writer,
                              reader=reader, series=iter(range(1, 1000)))
    engine.dispose()


def login(n: SimpleNamespace, token: str | None = None) -> None:
    r = n.client.post("/login", data={"token": token or n.writer, "next": "/"}, follow_redirects=False)
    assert r.status_code == 303, r.text


def add_job(n: SimpleNamespace, plugin: str = "reference-threshold", description: str = "CT CHEST") -> int:
    """A study with one CT series and a queued job for `plugin`; returns the job id."""
    number = next(n.series)
    series_uid = f"{STUDY}.{number}"
    now = utcnow()
    rec = ReceivedInstance(study_uid=STUDY, series_uid=series_uid, sop_instance_uid=f"{series_uid}.1",
                           sop_class_uid=CT_IMAGE, transfer_syntax_uid=ExplicitVRLittleEndian,
                           path=f"instances/{number}.dcm", size_bytes=1, calling_ae="CT1", modality="CT",
                           study_description=description, series_description="Chest 2.5mm")
    with n.maker.begin() as s:
        record_instance(s, rec, now)
        series_id = s.execute(select(Series.id).where(Series.series_uid == series_uid)).scalar_one()
        [job_id] = create_jobs(s, series_id, [NewJob(plugin, "1.0.0", "chest", "cpu", "routine")], now)
    return job_id


def failed_job(n: SimpleNamespace, reason: str = "RuntimeError: boom") -> int:
    job_id = add_job(n)
    with n.maker.begin() as s:
        assert start(s, job_id, "worker-1")
        assert fail(s, job_id, JobState.RUNNING, FailStage.INFER, reason, timings={"queue_wait": 0.02, "infer": 1.5})
    return job_id


def encoded_job(n: SimpleNamespace, outputs: list[str]) -> int:
    """An encoded job with findings, timings, a warning and these output files (SC-NNN written as real images)."""
    job_id = add_job(n)
    out_dir = n.settings.outputs_dir / str(job_id)
    paths = []
    for name in outputs:
        path = out_dir / name
        if name.startswith("SC-"):
            rgb = np.zeros((300, 200, 3), np.uint8)
            rgb[..., 0] = 220
            write_image(path, rgb, "RGB")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"not an image")
        paths.append(str(path))
    with n.maker.begin() as s:
        assert start(s, job_id, "worker-1")
        assert transition(s, job_id, JobState.RUNNING, JobState.ENCODED, outputs=paths, findings=FINDINGS,
                          warnings=["slice thickness 5.0 mm"],
                          timings={"encode": 0.4, "infer": 2.25, "queue_wait": 0.01, "deliver:pacs": 0.3,
                                   "encode:SR": 0.1, "image_load": 0.2, "model_load": 0.05})
    return job_id


def job_row(n: SimpleNamespace, job_id: int) -> Job:
    with n.maker() as s:
        return s.get(Job, job_id)


def location(r) -> str:
    assert r.status_code == 303, (r.status_code, r.text)
    return r.headers["location"]


# --- logging in ------------------------------------------------------------------------------------------------


def test_pages_redirect_to_login_without_a_token(node):
    c = node.client
    assert location(c.get("/", follow_redirects=False)) == "/login?next=%2F"
    assert location(c.get("/jobs/7?refresh=0", follow_redirects=False)) == "/login?next=%2Fjobs%2F7%3Frefresh%3D0"
    assert c.get("/ui/jobs/7/preview/SC-001.png").status_code == 401
    r = c.post("/ui/jobs/7/retry", data={"next": "/"}, follow_redirects=False)
    assert r.status_code == 401 and "log in" in r.text
    page = c.get("/login?next=/jobs/7")
    assert page.status_code == 200 and 'name="token"' in page.text and 'value="/jobs/7"' in page.text
    assert c.get("/ui/static/dashboard.css").status_code == 200  # the login page's style needs no login
    assert c.get("/ui/static/auth.py").status_code == 404
    assert c.get("/favicon.ico").status_code == 204


def test_login_sets_the_cookie_only_for_a_known_token(node):
    c = node.client
    r = c.post("/login", data={"token": "rn_wrong", "next": "/"}, follow_redirects=False)
    assert r.status_code == 401 and "token not accepted" in r.text and COOKIE not in r.cookies
    assert c.post("/login", data={"token": "x" * 600}).status_code == 401
    r = c.post("/login", data={"token": f"  {node.writer} ", "next": "/jobs/1"}, follow_redirects=False)
    assert location(r) == "/jobs/1"
    cookie = r.headers["set-cookie"]
    assert f"{COOKIE}={node.writer}" in cookie
    flags = {p.strip() for p in cookie.split(";")}
    assert {"HttpOnly", "Path=/", "SameSite=strict"} <= flags and "Secure" not in flags
    page = c.get("/")
    assert page.status_code == 200 and ">ops<" in page.text and 'href="/logout"' in page.text
    assert page.headers["cache-control"] == "no-store"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    # somewhere else after logging in: only local paths
    for evil in ("//evil.example/", "https://evil.example/", "/\\evil.example", "javascript:alert(1)"):
        r = c.post("/login", data={"token": node.writer, "next": evil}, follow_redirects=False)
        assert location(r) == "/", evil
    r = c.post("/login", data={"token": node.writer}, headers={"X-Forwarded-Proto": "https"}, follow_redirects=False)
    assert "Secure" in r.headers["set-cookie"]  # HTTPS ends at the proxy in front (deploy/Caddyfile)
    assert location(c.get("/logout", follow_redirects=False)) == "/login"
    c.cookies.clear()
    assert c.get("/", follow_redirects=False).status_code == 303


def test_a_bearer_token_works_too_and_a_bad_cookie_does_not(node):
    c = node.client
    assert c.get("/", headers={"Authorization": f"Bearer {node.reader}"}).status_code == 200
    c.cookies.set(COOKIE, "rn_forged")
    assert c.get("/", follow_redirects=False).status_code == 303


def test_read_open_shows_the_pages_without_buttons(open_node):
    n = open_node
    job_id = failed_job(n)
    page = n.client.get("/")
    assert page.status_code == 200 and f'id="job-{job_id}"' in page.text
    assert "anonymous (read only)" in page.text and "/retry" not in page.text and 'href="/login' in page.text
    assert n.client.get(f"/jobs/{job_id}").status_code == 200
    r = n.client.post(f"/ui/jobs/{job_id}/retry", follow_redirects=False)
    assert r.status_code == 401 and job_row(n, job_id).state == JobState.FAILED


# --- the pages -------------------------------------------------------------------------------------------------


def test_overview_lists_jobs_and_studies_escaped(node):
    failed = failed_job(node, reason=f"ValueError: {EVIL}")
    queued = add_job(node, plugin="lung-quant", description=f"CT {EVIL}")
    login(node)
    page = node.client.get(f"/?msg={EVIL}").text
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.index(f'id="job-{queued}"') < page.index(f'id="job-{failed}"')  # newest first
    row = re.search(rf'<tr id="job-{failed}".*?</tr>', page, re.S).group(0)
    assert f'href="/jobs/{failed}"' in row and 'class="state state-failed"' in row
    assert f'title="{STUDY}.1"' in row and "reference-threshold" in row and "1.0.0" in row
    assert "infer: ValueError" in row  # fail stage: reason
    assert "infer</span> 1.5 s" in row and "queue_wait</span> 20 ms" in row  # times per stage
    assert re.search(r'<button type="submit" class="retry">Retry</button>', row)  # failed: may be retried
    queued_row = re.search(rf'<tr id="job-{queued}".*?</tr>', page, re.S).group(0)
    assert re.search(r'class="retry" disabled', queued_row) and "Redeliver" not in queued_row
    assert "CT CHEST" in page and 'class="note"' in page  # studies with their series
    assert "No worker alive" in page and "lung-quant" in page  # the side section


def test_overview_filters(node):
    failed = failed_job(node)
    queued = add_job(node, plugin="lung-quant")
    login(node)
    page = node.client.get("/?state=failed").text
    assert f'id="job-{failed}"' in page and f'id="job-{queued}"' not in page
    assert '<option value="failed" selected>' in page
    page = node.client.get("/?plugin=lung-quant").text
    assert f'id="job-{queued}"' in page and f'id="job-{failed}"' not in page
    page = node.client.get("/?state=bogus").text
    assert "unknown state &#39;bogus&#39;" in page and f'id="job-{failed}"' in page
    page = node.client.get(f"/?study={STUDY}").text
    assert f'id="job-{failed}"' in page
    assert f'id="job-{failed}"' not in node.client.get("/?study=1.2.3").text


def test_job_page_shows_findings_measurements_and_previews(node):
    job_id = encoded_job(node, ["SR.dcm", "SC-001.dcm", "SC-002.dcm", "findings.json"])
    login(node)
    r = node.client.get(f"/jobs/{job_id}")
    assert r.status_code == 200
    page = r.text
    measurements = re.search(r'<table class="measurements">.*?</table>', page, re.S).group(0)
    cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", measurements, re.S)]
    assert cells == ["Volume", "123.457", "mL", "above-threshold", "", "Mean", "512.25", "HU", "above-threshold", "4"]
    assert "Nodule" in page and "0.910" in page and 'class="positive"' in page
    assert f'<img class="preview" src="/ui/jobs/{job_id}/preview/SC-001.png"' in page
    assert f"/ui/jobs/{job_id}/preview/SC-002.png" in page and "preview/SR.png" not in page
    assert f'href="/v1/jobs/{job_id}/results.zip"' in page and "findings.json" in page
    assert "/tmp" not in page.split("<main>")[1]  # output names, not the server's folders
    table = re.search(r'<table class="timings">.*?</table>', page, re.S).group(0)
    timings = re.findall(r"<tr><th>([\w:]+)</th>", table)
    assert timings == ["queue_wait", "model_load", "image_load", "infer", "encode", "encode:SR", "deliver:pacs"]
    assert "slice thickness 5.0 mm" in page and 'data-refresh="0"' in page  # settled: no reloading
    assert node.client.get(f"/v1/jobs/{job_id}/results.zip").status_code == 200  # the cookie reads the API too
    missing = node.client.get("/jobs/999999")
    assert missing.status_code == 404 and "no job 999999" in missing.text


def test_preview_is_a_png_of_an_sc_output_only(node):
    job_id = encoded_job(node, ["SR.dcm", "SC-001.dcm"])
    login(node)
    r = node.client.get(f"/ui/jobs/{job_id}/preview/SC-001.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["cache-control"] == "private, max-age=60"
    picture = Image.open(io.BytesIO(r.content))
    assert picture.size == (200, 300) and picture.mode == "RGB" and picture.getpixel((5, 5)) == (220, 0, 0)
    for name in ("SC-002", "SR", "SC-1%0A", "..%2FSC-001", "SC-001.dcm"):  # not among its outputs, or not an SC
        assert node.client.get(f"/ui/jobs/{job_id}/preview/{name}.png").status_code == 404, name
    assert node.client.get("/ui/jobs/999999/preview/SC-001.png").status_code == 404
    (node.settings.outputs_dir / str(job_id) / "SC-001.dcm").unlink()  # retention removed it
    assert node.client.get(f"/ui/jobs/{job_id}/preview/SC-001.png").status_code == 404


def test_preview_png_converts_ybr_grey_and_large_images(tmp_path: Path):
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[...] = (200, 30, 90)
    ybr = write_image(tmp_path / "ybr.dcm", convert_color_space(rgb, "RGB", "YBR_FULL"), "YBR_FULL")
    pixel = Image.open(io.BytesIO(preview_png(ybr))).getpixel((0, 0))
    assert all(abs(a - b) <= 2 for a, b in zip(pixel, (200, 30, 90), strict=True)), pixel
    ramp = np.tile(np.arange(0, 4096, 2, dtype=np.uint16), (1000, 1))  # 1000 x 2048, 12-bit
    for photometric, left in (("MONOCHROME2", 0), ("MONOCHROME1", 255)):
        path = write_image(tmp_path / f"{photometric}.dcm", ramp, photometric, bits=16, BitsStored=12, HighBit=11)
        picture = Image.open(io.BytesIO(preview_png(path)))
        assert picture.mode == "L" and picture.size == (1024, 500)
        assert picture.getpixel((0, 10)) == left and picture.getpixel((1023, 10)) == 255 - left
    palette = write_image(tmp_path / "palette.dcm", np.zeros((4, 4), np.uint8), "PALETTE COLOR")
    with pytest.raises(ValueError, match="no preview for PALETTE COLOR"):
        preview_png(palette)


# --- the forms -------------------------------------------------------------------------------------------------


def test_retry_requeues_a_failed_job_and_comes_back(node):
    job_id = failed_job(node)
    login(node)
    r = node.client.post(f"/ui/jobs/{job_id}/retry", data={"next": "/?state=failed&msg=old"}, follow_redirects=False)
    assert location(r) == f"/?state=failed&msg=job+{job_id}+queued+again%3B+a+worker+runs+it+shortly"
    row = job_row(node, job_id)
    assert (row.state, row.attempts, row.reason, row.fail_stage) == (JobState.QUEUED, 0, None, None)
    page = node.client.get(location(r)).text
    assert f"job {job_id} queued again" in page and 'class="flash ok"' in page
    # a bearer token serves scripts the same way; without `next` it comes back to the job's page
    with node.maker.begin() as s:
        assert start(s, job_id, "worker-1")
    r = node.client.post(f"/ui/jobs/{job_id}/retry", headers={"Authorization": f"Bearer {node.writer}"},
                         follow_redirects=False)
    assert location(r).startswith(f"/jobs/{job_id}?err=")


def test_retry_of_a_running_job_shows_the_conflict(node):
    job_id = add_job(node)
    with node.maker.begin() as s:
        assert start(s, job_id, "worker-1")
    login(node)
    r = node.client.post(f"/ui/jobs/{job_id}/retry", data={"next": f"/jobs/{job_id}"})
    assert r.status_code == 200 and r.url.path == f"/jobs/{job_id}"
    assert f"job {job_id} is queued or running already" in r.text and 'class="flash err"' in r.text
    assert 'data-refresh="5"' in r.text and "/ui/static/dashboard.js" in r.text  # running: the page reloads itself
    assert job_row(node, job_id).state == JobState.RUNNING
    r = node.client.post("/ui/jobs/999999/retry", data={"next": "//evil.example/"}, follow_redirects=False)
    assert location(r) == "/jobs/999999?err=no+job+999999"


def test_a_read_only_token_cannot_retry(node):
    job_id = failed_job(node)
    login(node, node.reader)
    page = node.client.get("/").text
    assert "viewer (read only)" in page and "/retry" not in page
    r = node.client.post(f"/ui/jobs/{job_id}/retry", data={"next": "/"}, follow_redirects=False)
    assert r.status_code == 403 and "read-only" in r.text and job_row(node, job_id).state == JobState.FAILED


def test_a_cross_site_form_post_is_refused(node):
    job_id = failed_job(node)
    login(node)
    for origin in ("http://evil.example", "null", "http://testserver.evil.example"):
        r = node.client.post(f"/ui/jobs/{job_id}/retry", data={"next": "/"}, headers={"Origin": origin},
                             follow_redirects=False)
        assert r.status_code == 403 and "cross-site" in r.text, origin
        r = node.client.post("/login", data={"token": node.writer}, headers={"Origin": origin}, follow_redirects=False)
        assert r.status_code == 403 and "set-cookie" not in r.headers
    assert job_row(node, job_id).state == JobState.FAILED
    r = node.client.post(f"/ui/jobs/{job_id}/retry", data={"next": "/"}, headers={"Origin": "http://testserver"},
                         follow_redirects=False)
    assert r.status_code == 303 and job_row(node, job_id).state == JobState.QUEUED


def test_redeliver_makes_failed_deliveries_due_again(node):
    job_id = encoded_job(node, ["SR.dcm"])
    now = utcnow()
    with node.maker.begin() as s:
        prepare(s, job_id, ["archive", "pacs"], now)
        s.execute(update(Delivery).where(Delivery.job_id == job_id, Delivery.destination == "pacs")
                  .values(state=DeliveryState.FAILED, attempts=8, last_error=f"association rejected {EVIL}"))
        s.execute(update(Delivery).where(Delivery.job_id == job_id, Delivery.destination == "archive")
                  .values(state=DeliveryState.SENT, attempts=1, sent_at=now))
        assert settle(s, job_id, now) == JobState.FAILED
    login(node)
    page = node.client.get("/").text
    row = re.search(rf'<tr id="job-{job_id}".*?</tr>', page, re.S).group(0)
    assert "pacs: " in row and "8 attempts" in row and "&lt;script&gt;" in row and "<script>" not in row
    assert f'action="/ui/jobs/{job_id}/redeliver"' in row
    detail = node.client.get(f"/jobs/{job_id}").text
    assert "Redeliver all" in detail and 'name="all" value="1"' in detail
    r = node.client.post(f"/ui/jobs/{job_id}/redeliver", data={"next": f"/jobs/{job_id}"}, follow_redirects=False)
    assert location(r) == f"/jobs/{job_id}?msg=job+{job_id}%3A+1+delivery%28ies%29+due+again"
    with node.maker() as s:
        states = dict(s.execute(select(Delivery.destination, Delivery.state).where(Delivery.job_id == job_id)).all())
    assert states == {"archive": DeliveryState.SENT, "pacs": DeliveryState.PENDING}
    assert job_row(node, job_id).state == JobState.ENCODED
    r = node.client.post(f"/ui/jobs/{job_id}/redeliver", data={"all": "1", "next": "/"}, follow_redirects=False)
    assert location(r) == f"/?msg=job+{job_id}%3A+2+delivery%28ies%29+due+again"
    queued = add_job(node)
    r = node.client.post(f"/ui/jobs/{queued}/redeliver", data={"next": "/"}, follow_redirects=False)
    assert "results+are+not+written+yet" in location(r)


# --- small pieces ----------------------------------------------------------------------------------------------


def test_safe_next_and_flash_urls():
    assert safe_next("/jobs/3?x=1") == "/jobs/3?x=1"
    for bad in ("", None, "jobs", "//evil", "/\\evil", "https://evil", "/a\r\nSet-Cookie: x", "/" + "a" * 2001):
        assert safe_next(bad, "/d") == "/d", bad
    assert with_flash("/?state=failed&msg=old&err=older", "err", "no <job>") == "/?state=failed&err=no+%3Cjob%3E"


def test_stage_timings_in_the_order_stages_happen():
    timings = {"deliver:b": 1, "encode:SEG": 2, "x": 3, "infer": 4, "queue_wait": 5, "deliver:a": 6, "encode": 7}
    assert [k for k, _ in stage_timings(timings)] == ["queue_wait", "infer", "encode", "encode:SEG", "deliver:a",
                                                       "deliver:b", "x"]
    assert "encode:SEG" not in dict(stage_timings(timings, main_only=True))


# --- headless Chromium against a running node ------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
BROWSER_RULES = "rules:\n  - name: reference-ct\n    when: {Modality: CT}\n    plugins: [reference-threshold]\n"


def chromium():
    """Headless Debian Chromium through its own chromedriver (Selenium Manager never downloads anything)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


@pytest.mark.slow
def test_browser_login_job_previews_and_retry(tmp_path: Path, monkeypatch):
    need(CHROMIUM.exists() and CHROMEDRIVER.exists(), f"{CHROMIUM} and {CHROMEDRIVER} are needed (Debian chromium, "
                                                       "chromium-driver)")
    import httpx
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from node.dispatch.scu import send
    from plugins.reference_threshold import MANIFEST as REFERENCE
    from plugins.reference_threshold.model import write_weights
    from plugins.registry import weights_path
    from tests.synthetic import write_ct_series
    from tests.test_pipeline import embedded_stack

    monkeypatch.setenv("SE_OFFLINE", "true")
    t0 = time.monotonic()
    with embedded_stack(tmp_path) as stack:
        write_weights(weights_path(REFERENCE, stack.models), 300.0)
        node = stack.start(BROWSER_RULES, stable_seconds="1")  # an HTTP port and a writing token of its own
        base = node.url
        files = write_ct_series(tmp_path / "ct", kind="chest", slices=12, size=64)
        assert send(files, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 12
        [job] = stack.wait_jobs(lambda rows: bool(rows) and rows[0]["state"] in {"encoded", "failed", "skipped"})
        assert job["state"] == "encoded", job
        sc = sorted(Path(p).stem for p in job["outputs"] if Path(p).name.startswith("SC-"))
        assert sc, job["outputs"]
        try:
            assert node.api("GET", "/healthz", token=None).status_code == 200
        except httpx.HTTPError as exc:
            pytest.fail(f"the node's HTTP port {node.http_port} does not answer: {exc}\n{node.logs()[-3000:]}")
        t_job = time.monotonic() - t0

        driver = chromium()
        try:
            wait = WebDriverWait(driver, 30, ignored_exceptions=[StaleElementReferenceException])
            driver.get(f"{base}/")  # not logged in: the login form
            wait.until(lambda d: d.current_url.startswith(f"{base}/login"))
            driver.find_element(By.ID, "token").send_keys(node.token)
            driver.find_element(By.CSS_SELECTOR, "section.login button[type=submit]").click()
            wait.until(lambda d: d.current_url == f"{base}/")
            cookie = driver.get_cookie(COOKIE)
            assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict"

            row = wait.until(lambda d: d.find_element(By.ID, f"job-{job['id']}"))
            assert "reference-threshold" in row.text and "encoded" in row.text, row.text

            driver.get(f"{base}/jobs/{job['id']}")
            table = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "table.measurements"))
            cells = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                     for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
            measured = {(c[0], c[3]): (float(c[1]), c[2]) for c in cells}
            expected = {(m["concept"]["meaning"], m["segment"] or ""): m["value"]
                        for m in job["findings"]["measurements"]}
            assert measured.keys() == expected.keys() and measured[("Volume", "above-threshold")][1] == "mL", cells
            for key, value in expected.items():
                assert measured[key][0] == pytest.approx(value, rel=1e-5)
            widths = wait.until(lambda d: d.execute_script(
                "const imgs = Array.from(document.querySelectorAll('img.preview'));"
                "return imgs.every(i => i.complete) ? imgs.map(i => i.naturalWidth) : null;"))
            assert len(widths) == len(sc) and all(w > 0 for w in widths), widths

            driver.get(f"{base}/")

            def click_retry(d):
                d.find_element(By.CSS_SELECTOR, f"#job-{job['id']} button.retry").click()
                return True

            wait.until(click_retry)  # the page reloads itself every 5 s: a stale button is looked up again
            flash = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".flash.ok"))
            assert f"job {job['id']} queued again" in flash.text
        finally:
            driver.quit()

        first_run_ended = datetime.fromisoformat(job["encoded_at"])
        deadline = time.monotonic() + 60
        seen = []
        while time.monotonic() < deadline:
            again = node.api("GET", f"/v1/jobs/{job['id']}").json()
            seen.append(again["state"])
            rerun = again["started_at"] and datetime.fromisoformat(again["started_at"]) > first_run_ended
            if rerun and again["state"] in {"encoded", "failed", "skipped"}:
                break
            time.sleep(0.2)
        assert rerun and (again["state"], again["attempts"]) == ("encoded", 1), (again, seen)
        assert sorted(Path(p).stem for p in again["outputs"] if Path(p).name.startswith("SC-")) == sc
        print(json.dumps({"job_ready_s": round(t_job, 1), "total_s": round(time.monotonic() - t0, 1),
                          "states_after_retry": sorted(set(seen))}))
