"""The HTTP service against a running node with a real job table (SQLite + embedded broker, and PostgreSQL +
Redis with an external worker): every endpoint, authentication, 4xx with a message for bad input, STOW-RS
of the shared chest CT (same job and outputs as by C-STORE), POST /v1/infer, and /metrics moving."""

from __future__ import annotations

import io
import json
import re
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from node.dispatch.scu import send
from plugins.reference_threshold import MANIFEST as REFERENCE
from plugins.reference_threshold.model import write_weights
from plugins.registry import weights_path
from tests.conftest import free_port
from tests.dicom_checks import assert_valid
from tests.test_pipeline import Stack, embedded_stack, stack  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow

RULES = """
rules:
  - name: reference-ct
    when: {Modality: CT}
    plugins: [reference-threshold]
"""
FINISHED = {"encoded", "delivered", "failed", "skipped"}


def _self_destination(port: int) -> str:
    """Results go back to the node itself by C-STORE (a real destination; SR/SEG/OT match no rule)."""
    return json.dumps([{"name": "self", "kind": "dicom", "ae_title": "RADNODE", "host": "127.0.0.1", "port": port}])


def _start(stack: Stack, worker_metrics_port: int = 0, **settings: str):
    write_weights(weights_path(REFERENCE, stack.models), 300.0)
    port = free_port()
    return stack.start(RULES, dicom_port=str(port), destinations=_self_destination(port),
                       worker_metrics_port=worker_metrics_port, **settings)


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        sample, _, value = line.rpartition(" ")
        metric, _, label_text = sample.partition("{")
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if metric == name and all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return 0.0


def _wait_job(node, job_id: int, states: set[str] = FINISHED, timeout: float = 120) -> dict:
    import time

    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = node.api("GET", f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} never reached {states}: {job}\n{node.logs()[-4000:]}")


def test_every_endpoint_auth_and_errors(stack: Stack, ct_dir: Path, tmp_path: Path):
    worker_metrics = free_port() if stack.kind == "redis" else 0  # an external worker serves its own metrics
    node = _start(stack, worker_metrics_port=worker_metrics)
    files = sorted(ct_dir.glob("*.dcm"))
    assert send(files, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 64
    rows = stack.wait_jobs(lambda r: len(r) == 1 and r[0]["state"] == "delivered", timeout=120)
    job_id = rows[0]["id"]

    # liveness and readiness need no token; ready once a worker is alive
    assert node.api("GET", "/healthz", token=None).json()["status"] == "ok"
    ready = node.api("GET", "/readyz", token=None)
    assert ready.status_code == 200, ready.text
    assert set(ready.json()["checks"]) == {"database", "broker", "storage", "workers"}

    # reads need a token; a wrong token is refused too
    for path in ("/v1/studies", "/v1/jobs", f"/v1/jobs/{job_id}", "/v1/plugins", "/v1/workers", "/metrics"):
        r = node.api("GET", path, token=None)
        assert r.status_code == 401 and "token" in r.json()["detail"] and r.headers["www-authenticate"].startswith(
            "Bearer"), (path, r.text)
        assert node.api("GET", path, token="rn_wrong").status_code == 401
    for path in (f"/v1/jobs/{job_id}/retry", f"/v1/jobs/{job_id}/redeliver", "/dicomweb/studies",
                 "/v1/infer?plugin=reference-threshold"):
        assert node.api("POST", path, token=None).status_code == 401, path

    studies = node.api("GET", "/v1/studies").json()
    study_uid = studies[0]["study_uid"]
    assert [s["series_uid"] for s in studies[0]["series"] if s["modality"] == "CT"] == [rows[0]["series_uid"]]
    one = node.api("GET", f"/v1/studies/{study_uid}").json()
    assert one["study_uid"] == study_uid and any(s["instances"] == 64 for s in one["series"])
    assert node.api("GET", "/v1/studies/1.2.3.4").status_code == 404
    bad = node.api("GET", "/v1/studies/not-a-uid")
    assert bad.status_code == 422 and "UID" in bad.json()["detail"]

    job = node.api("GET", f"/v1/jobs/{job_id}").json()
    assert job["plugin"] == "reference-threshold" and job["state"] == "delivered"
    assert {"queue_wait", "image_load", "infer", "encode", "deliver:self"} <= set(job["timings"])
    assert job["deliveries"][0]["destination"] == "self" and job["deliveries"][0]["state"] == "sent"
    assert job["findings"]["measurements"] and len(job["outputs"]) >= 3
    assert [j["id"] for j in node.api("GET", "/v1/jobs", params={"state": "delivered"}).json()] == [job_id]
    assert node.api("GET", "/v1/jobs", params={"state": "failed"}).json() == []
    assert [j["id"] for j in node.api("GET", "/v1/jobs", params={"plugin": "reference-threshold"}).json()] == [job_id]
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert node.api("GET", "/v1/jobs", params={"since": future}).json() == []
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    assert len(node.api("GET", "/v1/jobs", params={"since": past}).json()) == 1
    for params, word in (({"state": "bogus"}, "state"), ({"since": "yesterday"}, "since"),
                         ({"since": "2026-11-24T10:00:00"}, "zone"), ({"limit": "0"}, "limit")):
        r = node.api("GET", "/v1/jobs", params=params)
        assert r.status_code == 422 and word in r.text, (params, r.text)
    missing = node.api("GET", "/v1/jobs/999999")
    assert missing.status_code == 404 and missing.json()["detail"] == "no job 999999"

    plugins = {p["name"]: p for p in node.api("GET", "/v1/plugins").json()}
    assert plugins["reference-threshold"]["available"] and not plugins["ct-organ-seg"]["available"]
    assert "model unavailable" in plugins["ct-organ-seg"]["reason"]
    assert node.api("GET", "/v1/workers").json(), "a worker is alive"
    if worker_metrics:
        text = httpx.get(f"http://127.0.0.1:{worker_metrics}/metrics").text
        assert _metric(text, "radnode_stage_duration_seconds_count", stage="infer", plugin="reference-threshold") == 1
        assert _metric(text, "radnode_delivery_attempts_total", destination="self", result="sent") == 1

    # results as a zip: the DICOM objects dciodvfy-clean, and findings.json
    z = node.api("GET", f"/v1/jobs/{job_id}/results.zip")
    assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(z.content)).namelist()
    assert "findings.json" in names and "SR.dcm" in names and "SEG.dcm" in names
    out = tmp_path / "zip"
    zipfile.ZipFile(io.BytesIO(z.content)).extractall(out)
    assert_valid(out / "SR.dcm")

    # redeliver: malformed JSON and unknown fields are 422; all=true sends again; unknown job 404
    r = node.api("POST", f"/v1/jobs/{job_id}/redeliver", content=b"{bad", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.text
    r = node.api("POST", f"/v1/jobs/{job_id}/redeliver", json={"everything": True})
    assert r.status_code == 422 and "everything" in r.text
    r = node.api("POST", f"/v1/jobs/{job_id}/redeliver")
    assert r.status_code == 409 and "delivered everywhere" in r.json()["detail"]
    r = node.api("POST", f"/v1/jobs/{job_id}/redeliver", json={"all": True})
    assert r.status_code == 202 and len(r.json()["deliveries"]) == 1
    job = _wait_job(node, job_id, {"delivered"})
    assert job["deliveries"][0]["attempts"] == 1 and job["deliveries"][0]["state"] == "sent"
    assert node.api("POST", "/v1/jobs/999999/redeliver").status_code == 404

    # retry: the job runs again with the same output UIDs
    first_sr = pydicom.dcmread(out / "SR.dcm").SOPInstanceUID
    r = node.api("POST", f"/v1/jobs/{job_id}/retry")
    assert r.status_code == 202 and r.json()["state"] == "queued"
    again = node.api("POST", f"/v1/jobs/{job_id}/retry")
    assert again.status_code in (202, 409)  # 409 while queued/running, 202 if it finished meanwhile
    job = _wait_job(node, job_id, {"delivered"})
    z = zipfile.ZipFile(io.BytesIO(node.api("GET", f"/v1/jobs/{job_id}/results.zip").content))
    assert pydicom.dcmread(io.BytesIO(z.read("SR.dcm"))).SOPInstanceUID == first_sr
    assert node.api("POST", "/v1/jobs/999999/retry").status_code == 404
    assert node.api("POST", "/v1/jobs/0/retry").status_code == 422

    # a read-only token may read, not change state
    ro = node.cli("token", "new", "viewer", "--read-only").stdout.strip()
    assert node.api("GET", "/v1/jobs", token=ro).status_code == 200
    r = node.api("POST", f"/v1/jobs/{job_id}/retry", token=ro)
    assert r.status_code == 403 and "read-only" in r.json()["detail"]

    # STOW-RS input errors: wrong content type, malformed body, non-DICOM parts, wrong study
    r = node.api("POST", "/dicomweb/studies", content=b"hello", headers={"Content-Type": "application/dicom"})
    assert r.status_code == 415 and "multipart/related" in r.json()["detail"]
    r = node.api("POST", "/dicomweb/studies", content=b"--x\r\nContent-Type: application/dicom\r\n\r\nnot dicom\r\n--x--",
                 headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=x'})
    assert r.status_code == 409, r.text
    failed = r.json()["00081198"]["Value"]
    assert failed[0]["00081197"]["Value"] == [0xC210] and "part 1" in r.headers["warning"]
    r = node.api("POST", "/dicomweb/studies", content=b"garbage without boundary",
                 headers={"Content-Type": 'multipart/related; type="application/dicom"'})
    assert r.status_code == 400 and "boundary" in r.json()["detail"]
    r = node.api("POST", "/dicomweb/studies", content=b"\r\n", headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=x'})
    assert r.status_code == 400
    client = _stow_client(node)
    with pytest.raises(Exception) as exc_info:
        client.store_instances([pydicom.dcmread(files[0])], study_instance_uid="1.2.3.999")
    assert "409" in str(exc_info.value)

    # /v1/infer input errors
    r = node.api("POST", "/v1/infer", params={"plugin": "nope"}, content=b"x",
                 headers={"Content-Type": "application/zip"})
    assert r.status_code == 404 and "reference-threshold" in r.json()["detail"]
    r = node.api("POST", "/v1/infer", params={"plugin": "ct-organ-seg"}, content=b"x",
                 headers={"Content-Type": "application/zip"})
    assert r.status_code == 409 and "model unavailable" in r.json()["detail"]
    r = node.api("POST", "/v1/infer", params={"plugin": "reference-threshold"}, content=b"not a zip",
                 headers={"Content-Type": "application/zip"})
    assert r.status_code == 400 and "zip" in r.json()["detail"]
    r = node.api("POST", "/v1/infer", params={"plugin": "reference-threshold"}, content=b"x",
                 headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    r = node.api("POST", "/v1/infer", content=b"x", headers={"Content-Type": "application/zip"})
    assert r.status_code == 422 and "plugin" in r.text
    r = node.api("POST", "/v1/infer", params={"plugin": "reference-threshold"}, content=_zip({"a.txt": b"hello"}),
                 headers={"Content-Type": "application/zip"})
    assert r.status_code == 422 and "no DICOM" in r.json()["detail"]

    assert node.api("GET", "/healthz", token=None).status_code == 200, "the service keeps running"
    errors = [line for line in node.logs().splitlines() if re.search(r"ERROR radnode\.(api|stow)", line)]
    assert not errors, "bad input is answered with a 4xx, not an internal error"


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _stow_client(node) -> DICOMwebClient:
    return DICOMwebClient(url=f"{node.url}/dicomweb", headers={"Authorization": f"Bearer {node.token}"})


def test_upload_limit_gives_413(tmp_path: Path):
    with embedded_stack(tmp_path) as stack:
        node = _start(stack, max_upload_bytes="100000")
        r = node.api("POST", "/v1/infer", params={"plugin": "reference-threshold"}, content=b"x" * 200_000,
                     headers={"Content-Type": "application/zip"})
        assert r.status_code == 413 and "max_upload_bytes" in r.json()["detail"]

        def chunks():  # no Content-Length: the limit applies while streaming
            # a well-formed start: junk alone was refused as malformed (400) when its first chunk arrived alone
            yield b"--x\r\nContent-Type: application/dicom\r\n\r\n"
            for _ in range(20):
                yield b"y" * 10_000

        r = node.api("POST", "/dicomweb/studies", content=chunks(),
                     headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=x'})
        assert r.status_code == 413
        assert node.api("GET", "/healthz", token=None).status_code == 200


def test_stow_gives_the_same_job_and_outputs_as_c_store_and_metrics_move(ct_dir: Path, tmp_path: Path):
    files = sorted(ct_dir.glob("*.dcm"))
    results = {}
    for how in ("c-store", "stow"):
        with embedded_stack(tmp_path / how) as stack:
            node = _start(stack)
            before = node.api("GET", "/metrics").text
            assert _metric(before, "radnode_instances_received_total") == 0
            if how == "c-store":
                assert send(files, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 64
            else:
                datasets = [pydicom.dcmread(f) for f in files]
                response = _stow_client(node).store_instances(datasets)
                assert len(response.ReferencedSOPSequence) == 64 and "FailedSOPSequence" not in response
            rows = stack.wait_jobs(lambda r: len(r) == 1 and r[0]["state"] == "delivered", timeout=120)
            job = node.api("GET", f"/v1/jobs/{rows[0]['id']}").json()
            z = zipfile.ZipFile(io.BytesIO(node.api("GET", f"/v1/jobs/{job['id']}/results.zip").content))
            objects = {n: pydicom.dcmread(io.BytesIO(z.read(n))) for n in z.namelist() if n.endswith(".dcm")}
            metrics = node.api("GET", "/metrics").text
            source = "dimse" if how == "c-store" else "stow"
            ae = "CT1" if how == "c-store" else "-"
            assert _metric(metrics, "radnode_instances_received_total", source=source, calling_ae=ae,
                           status="0x0000") == 64
            assert _metric(metrics, "radnode_received_bytes_total", source=source, calling_ae=ae) >= sum(
                f.stat().st_size for f in files) * 0.9
            assert _metric(metrics, "radnode_jobs", plugin="reference-threshold", state="delivered") == 1
            assert _metric(metrics, "radnode_stage_duration_seconds_count", stage="infer",
                           plugin="reference-threshold") == 1
            assert _metric(metrics, "radnode_stage_duration_seconds_count", stage="deliver",
                           plugin="reference-threshold") == 1
            assert _metric(metrics, "radnode_delivery_attempts_total", destination="self", result="sent") == 1
            assert _metric(metrics, "radnode_deliveries", destination="self", state="sent") == 1
            assert _metric(metrics, "radnode_workers_alive") >= 1
            assert _metric(metrics, "radnode_disk_free_bytes") > 0
            assert "radnode_queue_depth" in metrics
            results[how] = (job, objects)
    (a, a_objects), (b, b_objects) = results["c-store"], results["stow"]
    assert (a["plugin"], a["series_uid"], a["study_uid"]) == (b["plugin"], b["series_uid"], b["study_uid"])
    assert a["findings"] == b["findings"] and a["warnings"] == b["warnings"]
    assert sorted(a_objects) == sorted(b_objects)
    for name, ds in a_objects.items():
        other = b_objects[name]
        assert ds.SOPInstanceUID == other.SOPInstanceUID and ds.SeriesInstanceUID == other.SeriesInstanceUID
        if "PixelData" in ds:
            assert ds.PixelData == other.PixelData


def test_infer_returns_a_zip_of_results(tmp_path: Path, ct_dir: Path):
    files = sorted(ct_dir.glob("*.dcm"))
    with embedded_stack(tmp_path) as stack:
        node = _start(stack)
        upload = _zip({f"ct/{f.name}": f.read_bytes() for f in files} | {"README.txt": b"not dicom"})
        r = node.api("POST", "/v1/infer", params={"plugin": "reference-threshold", "wait": "120"}, content=upload,
                     headers={"Content-Type": "application/zip"}, timeout=180)
        assert r.status_code == 200, r.text
        z = zipfile.ZipFile(io.BytesIO(r.content))
        summary = json.loads(z.read("findings.json"))
        assert len(summary) == 1 and summary[0]["state"] == "encoded"
        job_id = summary[0]["job"]
        assert {f"job-{job_id}/SR.dcm", f"job-{job_id}/SEG.dcm", f"job-{job_id}/findings.json"} <= set(z.namelist())
        z.extractall(tmp_path / "out")
        assert_valid(tmp_path / "out" / f"job-{job_id}" / "SEG.dcm")
        job = node.api("GET", f"/v1/jobs/{job_id}").json()
        assert job["rule"] == "api:infer" and job["deliveries"] == [] and job["destinations"] == []
        series = node.api("GET", "/v1/studies").json()[0]["series"][0]
        assert series["state"] == "routed" and "POST /v1/infer" in series["route_note"]
        # the router does not add the rule's job: still exactly one job after the stability window
        import time

        time.sleep(3)
        assert len(node.api("GET", "/v1/jobs").json()) == 1
        # wait=0: answered at once with the job to poll (the finished job is reused)
        r = node.api("POST", "/v1/infer", params={"plugin": "reference-threshold", "wait": "0"}, content=upload,
                     headers={"Content-Type": "application/zip"})
        assert r.status_code in (200, 202)
        if r.status_code == 202:
            assert r.json()["jobs"] == [job_id] and r.headers["location"] == f"/v1/jobs/{job_id}"
        assert not [line for line in node.logs().splitlines() if re.search(r"ERROR radnode\.(api|stow)", line)]


def test_first_start_makes_one_token_and_https_for_radnode_api(tmp_path: Path):
    """Without any configured token `radnode run` makes one and shows it once; `radnode api` alone serves
    HTTPS with uvicorn's certificate settings."""
    import select
    import ssl
    import subprocess
    import sys
    import time

    from tests.conftest import NodeProcess
    from tests.test_scp import _make_pki

    node = NodeProcess(tmp_path / "data", f"sqlite:///{tmp_path / 'radnode.db'}", api_tokens="[]").start()
    try:
        lines = []
        while not any("API token" in line for line in lines) and len(lines) < 40:
            lines.append(node.proc.stdout.readline())
        token = lines[-1].rsplit(": ", 1)[1].strip()
        assert token.startswith("rn_") and token not in (tmp_path / "data" / "api-tokens.json").read_text()
        assert node.api("GET", "/v1/jobs", token=token).status_code == 200
        assert node.api("GET", "/v1/jobs", token=None).status_code == 401
        listed = node.cli("token", "list").stdout
        assert "admin\tread-write" in listed and token not in listed
    finally:
        node.stop()
    node = NodeProcess(tmp_path / "data", f"sqlite:///{tmp_path / 'radnode.db'}", api_tokens="[]",
                       http_port=node.http_port).start()
    try:
        later = []
        while select.select([node.proc.stdout], [], [], 3)[0]:
            line = node.proc.stdout.readline()
            if not line:
                break
            later.append(line)
        assert later and not [line for line in later if "API token" in line], "a token is made on the first start"
    finally:
        node.stop()

    pki = _make_pki(tmp_path)
    env = node.env | {"RADNODE_HTTP_TLS_CERT": str(pki["server"]), "RADNODE_HTTP_TLS_KEY": str(pki["server_key"])}
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "api"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert "HTTP service on https://" in proc.stdout.readline()
        url = f"https://127.0.0.1:{node.http_port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {token}"}, verify=ssl.create_default_context(cafile=str(pki["ca"])))
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert r.status_code == 200 and r.json() == []
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(f"http://127.0.0.1:{node.http_port}/healthz")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_node_restarts_its_http_service_after_a_crash(tmp_path: Path):
    import time

    import psutil

    from tests.conftest import NodeProcess

    node = NodeProcess(tmp_path / "data", f"sqlite:///{tmp_path / 'radnode.db'}").start()
    try:
        def http_process() -> psutil.Process | None:
            for child in psutil.Process(node.proc.pid).children():
                try:
                    if any(c.laddr.port == node.http_port and c.status == psutil.CONN_LISTEN
                           for c in child.net_connections()):
                        return child
                except psutil.NoSuchProcess:
                    continue
            return None

        first = http_process()
        assert first is not None and node.api("GET", "/healthz", token=None).status_code == 200
        first.kill()
        deadline = time.monotonic() + 60
        while True:
            second = http_process()
            if second is not None and second.pid != first.pid:
                try:
                    if node.api("GET", "/v1/jobs").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
            assert time.monotonic() < deadline, node.logs()[-3000:]
            time.sleep(0.3)
        assert "HTTP service exited" in node.logs()
    finally:
        node.stop()
