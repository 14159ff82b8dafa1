"""Deployment files: docker-compose.yml and deploy/ (validated by Compose v2 and read for structure), the
Orthanc configuration and its auto-routing script (run in a real Orthanc), the Caddyfile and the
container healthcheck."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from node.settings import Settings
from tests.conftest import REPO, free_port, need

COMPOSE_FILE = REPO / "docker-compose.yml"
GPU_HOST_FILE = REPO / "deploy" / "compose.gpu-host.yml"
ENV_EXAMPLE = REPO / ".env.example"
ORTHANC_JSON = REPO / "deploy" / "orthanc.json"
AUTOROUTE_LUA = REPO / "deploy" / "orthanc-autoroute.lua"
CADDYFILE = REPO / "deploy" / "Caddyfile"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
HEALTHCHECK = REPO / "deploy" / "healthcheck.py"
# The GPU host's variables that the central .env does not hold.
GPU_HOST_ENV = {"CENTRAL_HOST": "radnode-central.example", "DATA_VOLUME": "/srv/radnode-data",
                "MODELS_DIR": "/srv/radnode-models"}

SERVICES = {"orthanc", "postgres", "redis", "migrate", "radnode", "worker-gpu", "worker-cpu", "flower", "proxy"}
ONE_SHOT = {"migrate"}
RADNODE_SERVICES = {"migrate", "radnode", "worker-gpu", "worker-cpu"}  # built from deploy/Dockerfile
# Settings of the HTTP API step, accepted here before node/settings.py has them.
API_FIELDS = {"api_tokens", "api_read_open", "http_tls_cert", "http_tls_key", "max_upload_bytes"}


# --- Compose v2 -------------------------------------------------------------------------------------


def _compose_major(cmd: list[str]) -> int:
    try:
        out = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
    except OSError:
        return 0
    match = re.search(r"version v?(\d+)\.", out.stdout)
    return int(match.group(1)) if out.returncode == 0 and match else 0


def _find_compose() -> list[str] | None:
    """Compose v2 or later: the binary beside this interpreter (scripts/test.sh puts it in .venv/bin),
    the docker CLI plugin, or docker-compose on PATH."""
    candidates = [[str(Path(sys.executable).parent / "docker-compose")], ["docker", "compose"], ["docker-compose"]]
    for cmd in candidates:
        if shutil.which(cmd[0]) and _compose_major(cmd) >= 2:
            return cmd
    return None


@pytest.fixture(scope="module")
def compose() -> list[str]:
    cmd = _find_compose()
    need(cmd is not None, "Compose v2 not found (scripts/test.sh installs it as .venv/bin/docker-compose)")
    assert cmd is not None
    return cmd


def _run_compose(compose: list[str], tmp_path: Path, compose_file: Path, *args: str, env_file: Path = ENV_EXAMPLE,
                 extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Compose with a clean environment: only PATH, a private HOME and `extra_env`, so nothing from the
    caller's shell (a POSTGRES_PASSWORD, COMPOSE_* variables) changes what is validated."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **(extra_env or {})}
    return subprocess.run([*compose, "-f", str(compose_file), "--env-file", str(env_file), *args],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)


def test_compose_file_validates(compose, tmp_path):
    result = _run_compose(compose, tmp_path, COMPOSE_FILE, "config", "-q")
    assert result.returncode == 0, result.stderr


def test_gpu_host_compose_file_validates(compose, tmp_path):
    result = _run_compose(compose, tmp_path, GPU_HOST_FILE, "config", "-q", extra_env=GPU_HOST_ENV)
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_run_without_the_secrets(compose, tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = _run_compose(compose, tmp_path, COMPOSE_FILE, "config", "-q", env_file=empty)
    assert result.returncode != 0
    # Compose names the first missing one it meets, in no fixed order
    assert re.search(r"set (POSTGRES|REDIS|ORTHANC|FLOWER)_PASSWORD in \.env|set RADNODE_UID_HASH_SALT in \.env",
                     result.stderr), result.stderr


def test_a_schema_error_is_caught(compose, tmp_path):
    """The validator really checks the Compose specification (not only YAML syntax)."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("stop_grace_period: 5m", "stop_grace_periodd: 5m", 1))
    result = _run_compose(compose, tmp_path, broken, "--project-directory", str(REPO), "config", "-q")
    assert result.returncode != 0
    assert "stop_grace_periodd" in result.stderr


@pytest.mark.parametrize("compose_file", [COMPOSE_FILE, GPU_HOST_FILE], ids=["central", "gpu-host"])
def test_the_radnode_environment_is_valid_settings(compose, tmp_path, monkeypatch, compose_file):
    """Every radnode container's RADNODE_* environment, as Compose resolves it with .env.example, is
    accepted by the settings model."""
    result = _run_compose(compose, tmp_path, compose_file, "config", "--format", "json", extra_env=GPU_HOST_ENV)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    checked = 0
    for name, service in services.items():
        env = service.get("environment") or {}
        if not any(k.startswith("RADNODE_") for k in env):
            continue
        for key in list(os.environ):
            if key.startswith("RADNODE_"):
                monkeypatch.delenv(key)
        for key, value in env.items():
            if key.startswith("RADNODE_") and key[len("RADNODE_"):].lower() in Settings.model_fields:
                monkeypatch.setenv(key, value)
        settings = Settings()
        assert settings.data_dir == Path("/data"), name
        assert settings.database_url and settings.database_url.startswith("postgresql://"), name
        assert settings.broker_url and settings.broker_url.startswith("redis://"), name
        assert [d.name for d in settings.destinations] == ["pacs"], name
        checked += 1
    assert checked == (len(RADNODE_SERVICES) if compose_file == COMPOSE_FILE else 1)


# --- structure of docker-compose.yml ----------------------------------------------------------------


@pytest.fixture(scope="module")
def stack() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _command(service: dict) -> list[str]:
    command = service["command"]
    return command if isinstance(command, list) else command.split()


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def _depends(service: dict) -> dict[str, str]:
    return {name: dep["condition"] for name, dep in service.get("depends_on", {}).items()}


def test_every_service_is_there(stack):
    assert SERVICES <= set(stack["services"])


def test_long_running_services_have_healthchecks(stack):
    for name, service in stack["services"].items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no"
            continue
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in {"CMD", "CMD-SHELL"}, f"{name} has no healthcheck"
        assert service.get("restart") == "unless-stopped", name


def test_start_order_waits_for_health_and_migrations(stack):
    services = stack["services"]
    assert _command(services["migrate"]) == ["radnode", "db", "upgrade"]
    assert _depends(services["migrate"]) == {"postgres": "service_healthy"}
    for name in ("radnode", "worker-gpu", "worker-cpu"):
        assert _depends(services[name]) == {"migrate": "service_completed_successfully", "redis": "service_healthy"}
    assert _depends(services["flower"]) == {"redis": "service_healthy"}


def test_the_node_runs_without_an_embedded_worker(stack):
    node = stack["services"]["radnode"]
    assert _command(node) == ["radnode", "run"]
    assert node["environment"]["RADNODE_EMBEDDED_WORKER"] == "false"
    assert "11112:11112" in node["ports"]


def test_gpu_worker_takes_the_gpu_queue_on_nvidia_devices(stack):
    for service in (stack["services"]["worker-gpu"], yaml.safe_load(GPU_HOST_FILE.read_text())["services"]["worker-gpu"]):
        command = _command(service)
        assert command[:2] == ["radnode", "worker"]
        assert _option(command, "--queues") in {"gpu", "${GPU_QUEUES:-gpu}"}
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
        assert service["environment"]["RADNODE_DEVICE"] == "cuda"
        # the healthcheck pings the worker by the name it was given
        assert _option(command, "--name") == "gpu@%h"
        assert service["healthcheck"]["test"][-2:] == ["worker", "gpu"]


def test_cpu_worker_takes_the_cpu_and_dispatch_queues(stack):
    worker = stack["services"]["worker-cpu"]
    command = _command(worker)
    assert command[:2] == ["radnode", "worker"]
    assert _option(command, "--queues") == "cpu,dispatch"
    assert "deploy" not in worker
    assert _option(command, "--name") == "cpu@%h"
    assert worker["healthcheck"]["test"][-2:] == ["worker", "cpu"]


def test_the_radnode_services_share_one_image_and_settings(stack):
    services = stack["services"]
    first = services["radnode"]
    for name in RADNODE_SERVICES:
        assert services[name]["image"] == first["image"]
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
        env = services[name]["environment"]
        for key in ("RADNODE_DATABASE_URL", "RADNODE_BROKER_URL", "RADNODE_DESTINATIONS", "RADNODE_DATA_DIR"):
            assert env[key] == first["environment"][key], (name, key)
    assert first["environment"]["RADNODE_BROKER_URL"].startswith("redis://")
    assert "@postgres:5432/radnode" in first["environment"]["RADNODE_DATABASE_URL"]


def _mounts(service: dict) -> dict[str, str]:
    """target -> source of a service's short-syntax volumes, with each ${VAR:-default} at its default."""
    mounts = {}
    for volume in service["volumes"]:
        source, target = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", volume).split(":")[:2]
        mounts[target] = source
    return mounts


def test_volumes_for_storage_and_database(stack):
    services = stack["services"]
    named = set(stack["volumes"])
    data_dir = services["radnode"]["environment"]["RADNODE_DATA_DIR"]
    for name in ("radnode", "worker-gpu", "worker-cpu"):  # one storage for the node and every worker
        assert _mounts(services[name])[data_dir] == "radnode-data", name
        assert _mounts(services[name])["/models"] == "./models", name
    assert _mounts(services["postgres"])["/var/lib/postgresql/data"] == "pg-data"
    assert _mounts(services["orthanc"])["/var/lib/orthanc/db"] == "orthanc-db"
    assert {"radnode-data", "pg-data", "orthanc-db"} <= named


def test_secrets_come_from_the_env_file(stack):
    text = COMPOSE_FILE.read_text()
    env = _env_file(ENV_EXAMPLE)
    for secret in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "ORTHANC_PASSWORD", "FLOWER_PASSWORD",
                   "RADNODE_UID_HASH_SALT"):
        assert f"${{{secret}:?" in text, f"{secret} must be required (${{{secret}:?...}})"
        assert env[secret].startswith("change-me"), secret
    assert "RADNODE_API_TOKENS" in env
    for name in re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text):
        assert name in env, f"{name} is used in docker-compose.yml but not set in .env.example"
    documented = ENV_EXAMPLE.read_text()
    for name in re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", GPU_HOST_FILE.read_text()):
        assert re.search(rf"^#? ?{name}=", documented, re.M), f"{name} (GPU host) is not documented in .env.example"


def _env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def test_radnode_variables_are_real_settings():
    known = set(Settings.model_fields) | API_FIELDS
    for path in (COMPOSE_FILE, GPU_HOST_FILE, ENV_EXAMPLE):
        used = {m.lower() for m in re.findall(r"\bRADNODE_([A-Z0-9_]+)", path.read_text())}
        unknown = sorted(used - known)
        assert not unknown, f"{path.name}: RADNODE_ variables that are no setting: {unknown}"


def test_the_dockerfile_copies_what_exists():
    lines = DOCKERFILE.read_text().splitlines()
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    assert copies
    for sources in copies:
        for source in (s for s in sources if not s.startswith("--")):
            assert (REPO / source).exists(), source
    assert 'CMD ["radnode", "run"]' in lines
    ignore = (REPO / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
    for sources in copies:
        for source in (s for s in sources if not s.startswith("--")):
            assert f"!{source}" in ignore or f"!{source}/" in ignore, f"{source} is left out of the build context"


# --- Orthanc ------------------------------------------------------------------------------------------


def test_orthanc_config_registers_radnode_and_dicomweb(stack):
    config = json.loads(ORTHANC_JSON.read_text())
    node_env = stack["services"]["radnode"]["environment"]
    ae, host, port = config["DicomModalities"]["radnode"]
    assert (ae, host, port) == (node_env["RADNODE_AE_TITLE"], "radnode", 11112)
    assert config["DicomWeb"]["Enable"] is True
    assert config["OverwriteInstances"] is True
    assert config["DicomAlwaysAllowStore"] is True and config["DicomCheckCalledAet"] is False
    assert config["AuthenticationEnabled"] is True
    orthanc = stack["services"]["orthanc"]
    assert orthanc["environment"]["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    assert orthanc["environment"]["TCP_NODELAY"] == "1"
    assert "ORTHANC__REGISTERED_USERS" in orthanc["environment"]
    sources = {source: target for target, source in _mounts(orthanc).items()}
    assert sources["./deploy/orthanc.json"] == "/etc/orthanc/orthanc.json"
    assert config["LuaScripts"] == [sources["./deploy/orthanc-autoroute.lua"]]
    # radnode sends results back to this Orthanc by C-STORE
    dest = json.loads(node_env["RADNODE_DESTINATIONS"])[0]
    assert (dest["ae_title"], dest["host"], dest["port"]) == (config["DicomAet"], "orthanc", config["DicomPort"])


def _dicom(folder: Path, name: str, study_uid: str, *, sop_class: str, modality: str, manufacturer: str,
           description: str) -> str:
    """A small single-frame instance in its own series; returns its SOP Instance UID."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.PatientID, ds.PatientName, ds.StudyID = "DEPLOY-TEST", "Test^Deploy", "1"
    ds.Modality, ds.Manufacturer, ds.SeriesDescription = modality, manufacturer, description
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    if modality not in {"SR", "SEG"}:
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = bytes(8 * 8 * 2)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, ds.SOPInstanceUID
    ds.save_as(folder / f"{name}.dcm", enforce_file_format=True)
    return ds.SOPInstanceUID


CT, SC, SR, SEG = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.22",
                   "1.2.840.10008.5.1.4.1.1.66.4")


def test_orthanc_autoroutes_stable_series_to_radnode_but_not_radnode_results(tmp_path):
    """deploy/orthanc.json and deploy/orthanc-autoroute.lua in a real Orthanc: a stable CT series goes to
    the modality "radnode" (a DCMTK storescp here); radnode's own SR/SC, non-image objects and AI-generated
    series do not."""
    import requests
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    orthanc_bin = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    dicomweb = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    need(os.access(orthanc_bin, os.X_OK), "Orthanc not installed (Debian package orthanc)")
    need(dicomweb.is_file(), "Orthanc DICOMweb plugin not installed (Debian package orthanc-dicomweb)")
    need(shutil.which("storescp") is not None, "storescp not installed (Debian package dcmtk)")

    received = tmp_path / "received"
    received.mkdir()
    scp_port, http_port, dicom_port = free_port(), free_port(), free_port()
    config = json.loads(ORTHANC_JSON.read_text())
    ae, _, _ = config["DicomModalities"]["radnode"]
    config.update({
        "HttpPort": http_port, "DicomPort": dicom_port, "RemoteAccessAllowed": False,
        "StorageDirectory": str(tmp_path / "db"), "IndexDirectory": str(tmp_path / "db"),
        "StableAge": 1, "RegisteredUsers": {"admin": "test-password"},
        "DicomModalities": {"radnode": [ae, "127.0.0.1", scp_port]},
        "LuaScripts": [str(AUTOROUTE_LUA)], "Plugins": [str(dicomweb)],
    })
    config_path = tmp_path / "orthanc.json"
    config_path.write_text(json.dumps(config))

    folder = tmp_path / "in"
    folder.mkdir()
    study = generate_uid()
    routed = _dicom(folder, "ct", study, sop_class=CT, modality="CT", manufacturer="ACME", description="Chest")
    for name, kwargs in {
        "sr": dict(sop_class=SR, modality="SR", manufacturer="radnode", description="AI-generated SR - lung-quant 1.0"),
        "sc": dict(sop_class=SC, modality="OT", manufacturer="RadNode", description="AI-generated SC - lung-quant 1.0"),
        "seg": dict(sop_class=SEG, modality="SEG", manufacturer="OtherAI", description="Lungs"),
        "renamed": dict(sop_class=SC, modality="OT", manufacturer="site-ai", description="AI-generated SC - x 1"),
    }.items():
        _dicom(folder, name, study, **kwargs)

    env = {**os.environ, "TCP_NODELAY": "1"}
    logs = tmp_path / "logs"
    logs.mkdir()
    scp = subprocess.Popen(["storescp", "-aet", ae, "-od", str(received), str(scp_port)],
                           stdout=open(logs / "storescp.log", "w"), stderr=subprocess.STDOUT, env=env)
    orthanc = subprocess.Popen([orthanc_bin, str(config_path)], stdout=open(logs / "orthanc.log", "w"),
                               stderr=subprocess.STDOUT, env=env, start_new_session=True)
    auth = ("admin", "test-password")
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert orthanc.poll() is None, (logs / "orthanc.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/system", auth=auth, timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "Orthanc did not start"
            time.sleep(0.2)
        assert requests.get(f"{url}/system", timeout=5).status_code == 401  # authentication is on
        assert requests.get(f"{url}/dicom-web/studies", auth=auth, timeout=5).ok  # the DICOMweb plugin is on
        for path in sorted(folder.iterdir()):
            requests.post(f"{url}/instances", data=path.read_bytes(), auth=auth, timeout=30).raise_for_status()

        deadline = time.monotonic() + 60
        while True:
            series = requests.get(f"{url}/series?expand", auth=auth, timeout=5).json()
            jobs = requests.get(f"{url}/jobs?expand", auth=auth, timeout=5).json()
            done = all(s["IsStable"] for s in series) and jobs and all(j["State"] in {"Success", "Failure"} for j in jobs)
            if done:
                break
            assert time.monotonic() < deadline, (series, jobs, (logs / "orthanc.log").read_text()[-3000:])
            time.sleep(0.3)
        time.sleep(1.5)  # a wrongly routed series would have its job by now
        jobs = requests.get(f"{url}/jobs?expand", auth=auth, timeout=5).json()
    finally:
        orthanc.terminate()
        scp.terminate()
        orthanc.wait(timeout=30)
        scp.wait(timeout=30)

    assert len(series) == 5
    assert [(j["Type"], j["State"]) for j in jobs] == [("DicomModalityStore", "Success")], jobs
    got = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in received.iterdir()}
    assert got == {routed}


# --- proxy and healthcheck -----------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [None, "/certs/cert.pem /certs/key.pem"], ids=["internal", "own-certificate"])
def test_caddyfile_adapts(tls, tmp_path):
    """The proxy's Caddyfile is valid with Caddy's internal CA and with mounted certificates (`caddy adapt`)."""
    caddy = shutil.which("caddy", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    need(caddy is not None, "caddy not installed (scripts/test.sh puts Debian's binary in the venv)")
    env = {**os.environ, "HOME": str(tmp_path), "PROXY_HOSTNAME": "radnode.example"}
    if tls:
        env["PROXY_TLS"] = tls
    result = subprocess.run([caddy, "adapt", "--adapter", "caddyfile", "--config", str(CADDYFILE)],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    route = config["apps"]["http"]["servers"]["srv0"]
    assert route["listen"] == [":443"]
    assert "radnode:8080" in result.stdout and "radnode.example" in result.stdout
    policies = json.dumps(config["apps"]["tls"])
    assert ("/certs/cert.pem" in policies) if tls else ('"internal"' in policies)


def _healthcheck(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True,
                          env=env or dict(os.environ), timeout=timeout, cwd=REPO)


def test_healthcheck_http():
    status = {"code": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(status["code"] if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        env = {**os.environ, "RADNODE_HTTP_PORT": str(port)}
        env.pop("RADNODE_HTTP_TLS_CERT", None)
        assert _healthcheck("http", env=env).returncode == 0  # default: this node's /healthz
        status["code"] = 503
        result = _healthcheck("http", f"http://127.0.0.1:{port}/healthz")
        assert result.returncode == 1 and "HTTP 503" in result.stderr
    finally:
        server.shutdown()
    result = _healthcheck("http", f"http://127.0.0.1:{free_port()}/healthz")
    assert result.returncode == 1 and "unhealthy" in result.stderr
    assert _healthcheck("nonsense").returncode == 2


def test_healthcheck_worker_pings_the_named_worker(tmp_path):
    """`radnode-healthcheck worker cpu` is healthy exactly while `radnode worker --name cpu@%h` runs on
    this host and answers on the broker."""
    import redis

    url = os.environ.get("RADNODE_TEST_REDIS_HEALTHCHECK", "redis://127.0.0.1:6379/14")
    try:
        up = bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except redis.RedisError:
        up = False
    need(up, f"Redis not reachable at {url}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADNODE_")}
    env |= {"RADNODE_BROKER_URL": url, "RADNODE_DATA_DIR": str(tmp_path / "data"),
            "RADNODE_EMBEDDED_WORKER": "false"}
    subprocess.run([sys.executable, "-m", "node.cli", "db", "upgrade"], env=env, check=True, capture_output=True,
                   timeout=120)
    assert _healthcheck("worker", "hc", "1", env=env).returncode == 1  # no such worker yet
    log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen([sys.executable, "-m", "node.cli", "worker", "--queues", "cpu.deploy-healthcheck",
                               "--name", "hc@%h"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while _healthcheck("worker", "hc", "2", env=env).returncode != 0:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.5)
        result = _healthcheck("worker", "other", "1", env=env)  # another name on this host: not this worker
        assert result.returncode == 1 and "did not answer" in result.stderr
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        log.close()
