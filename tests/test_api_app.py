"""The HTTP application in process (TestClient) on a migrated SQLite job table: readiness, token storage
and permissions, open reads, STOW-RS to one study."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient

from db.migrate import upgrade
from db.models import utcnow
from db.session import make_engine, make_sessionmaker
from db.workers import beat
from node.api.app import create_app
from node.api.auth import new_token, saved_tokens, tokens_path
from node.settings import ApiToken, Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(data_dir=tmp_path / "data", job_heartbeat_seconds=1.0, job_lost_seconds=2.0)
    upgrade(make_engine(s.db_url))
    return s


def test_readyz_needs_a_live_worker(settings: Settings):
    client = TestClient(create_app(settings))
    r = client.get("/readyz")
    assert r.status_code == 503
    checks = r.json()["checks"]
    assert checks["workers"] == {"ok": False, "detail": "0 alive"}
    assert checks["database"]["ok"] and checks["broker"]["ok"] and checks["storage"]["ok"]
    maker = make_sessionmaker(make_engine(settings.db_url))
    with maker.begin() as session:
        beat(session, "w1@host", "host", 1, ["cpu"], utcnow())
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["ready"] is True


def test_tokens_are_stored_hashed_and_checked(settings: Settings):
    token, entry = new_token(settings, "admin")
    stored = tokens_path(settings).read_text()
    assert token not in stored and entry.sha256 in stored
    assert oct(tokens_path(settings).stat().st_mode & 0o777) == "0o600"
    with pytest.raises(ValueError, match="exists already"):
        new_token(settings, "admin")
    client = TestClient(create_app(settings))
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    # a token made while the service runs is accepted without a restart
    viewer, _ = new_token(settings, "viewer", read_only=True)
    assert [t.name for t in saved_tokens(settings)] == ["admin", "viewer"]
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {viewer}"}).status_code == 200
    r = client.post("/v1/jobs/1/retry", headers={"Authorization": f"Bearer {viewer}"})
    assert r.status_code == 403 and "read-only" in r.json()["detail"]
    assert client.get("/v1/jobs", headers={"Authorization": "Basic YTpi"}).status_code == 401


def test_bad_token_settings_are_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="64 hex digits"):
        ApiToken(name="x", sha256="rn_plaintext")
    with pytest.raises(ValueError, match="each name may be used once"):
        Settings(data_dir=tmp_path, api_tokens=[ApiToken(name="a", sha256="0" * 64), ApiToken(name="a", sha256="1" * 64)])
    with pytest.raises(ValueError, match="set together"):
        Settings(data_dir=tmp_path, http_tls_cert=tmp_path / "c.pem")


def test_open_reads_still_need_a_token_to_change_state(settings: Settings):
    s = settings.model_copy(update={"api_read_open": True})
    client = TestClient(create_app(s))
    assert client.get("/v1/jobs").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/v1/jobs/1/retry").status_code == 401


def test_stow_to_one_study_refuses_other_studies(settings: Settings, ct_dir: Path):
    token, _ = new_token(settings, "admin")
    client = TestClient(create_app(settings))
    f = sorted(ct_dir.glob("*.dcm"))[0]
    study = str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
    boundary = "radnode-boundary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").encode() + f.read_bytes() + (
        f"\r\n--{boundary}--\r\n").encode()
    headers = {"Authorization": f"Bearer {token}",
               "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    r = client.post("/dicomweb/studies/1.2.3", content=body, headers=headers)
    assert r.status_code == 409 and r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
    r = client.post(f"/dicomweb/studies/{study}", content=body, headers=headers)
    assert r.status_code == 200 and len(r.json()["00081199"]["Value"]) == 1
    assert client.get(f"/v1/studies/{study}", headers={"Authorization": f"Bearer {token}"}).json()["series"][0][
        "instances"] == 1
    r = client.post("/dicomweb/studies", content=body, headers=headers | {
        "Content-Type": f'multipart/related; type="application/dicom+json"; boundary={boundary}'})
    assert r.status_code == 415 and "not supported" in r.json()["detail"]
    assert json.loads(client.get("/openapi.json").text)["paths"]["/dicomweb/studies"]["post"]


def test_readyz_names_an_unreachable_broker_without_its_address(settings: Settings):
    s = settings.model_copy(update={"broker_url": "redis://:secret@127.0.0.1:1/0"})
    r = TestClient(create_app(s)).get("/readyz")
    assert r.status_code == 503
    broker = r.json()["checks"]["broker"]
    assert broker["ok"] is False and "secret" not in broker["detail"] and "127.0.0.1" not in broker["detail"]
