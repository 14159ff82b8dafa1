"""Shared fixtures: shared data, databases (SQLite and a PostgreSQL database per test), a live node."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
PG_ADMIN_URL = os.environ.get("RADNODE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _head_revision() -> str:
    from alembic.script import ScriptDirectory

    from db.migrate import alembic_config

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


HEAD_REVISION = _head_revision()


def _data_root() -> Path:
    return Path(os.environ.get("RADNODE_TEST_DATA", REPO.parent / "shared" / "data")).resolve()


def need(condition: bool, reason: str) -> None:
    """Skip when a prerequisite is missing — but in CI a missing prerequisite is a failure."""
    if not condition:
        if IN_CI:
            pytest.fail(f"CI prerequisite missing: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _data_root()
    need(root.is_dir(), f"shared data not found at {root} (set RADNODE_TEST_DATA)")
    return root


@pytest.fixture(scope="session")
def ct_dir(data_root: Path) -> Path:
    return data_root / "ct_chest_philips_lungdx_a0001"


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port nothing listens on, never handed out before in this process, and below the kernel's ephemeral
    range: outgoing connections (every C-STORE, HTTP request) take their local port from that range, so a port
    picked there can be taken by one before the server binds it ("Address already in use")."""
    pick = random.SystemRandom()
    high = min(_ephemeral_low(), 65536) - 1
    for _ in range(200):
        port = pick.randint(max(1024, high - 12000), high)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:  # a crowded range: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- databases ----------------------------------------------------------------------------------


def _pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return True
    except Exception:
        return False


def create_pg_database() -> tuple[str, str]:
    """Create an empty PostgreSQL database for one test; returns (name, SQLAlchemy URL)."""
    import psycopg

    name = f"radnode_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return name, f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)


def drop_pg_database(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each kind the node supports."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'radnode-test.db'}"
        return
    need(_pg_available(), f"PostgreSQL not reachable at {PG_ADMIN_URL}")
    name, url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(name)


@pytest.fixture
def sessionmaker(db_url: str):
    from db.migrate import upgrade
    from db.session import make_engine, make_sessionmaker

    engine = make_engine(db_url)
    upgrade(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


# --- a live node ----------------------------------------------------------------------------------


class NodeProcess:
    """`radnode run` in its own process group, configured through RADNODE_* variables."""

    def __init__(self, data_dir: Path, db_url: str, default_rules: bool = False, **settings: str) -> None:
        """`default_rules`: route with the packaged rules; otherwise with `rules_file`, or with none at all."""
        self.data_dir = data_dir
        self.port = int(settings.pop("dicom_port", free_port()))
        self.http_port = int(settings.pop("http_port", free_port()))
        self.ae_title = settings.get("ae_title", "RADNODE")
        self.token = "rn_test_" + uuid.uuid4().hex
        token_entry = {"name": "test", "sha256": hashlib.sha256(self.token.encode()).hexdigest()}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RADNODE_")}
        self.env.update(
            {
                "RADNODE_DATA_DIR": str(data_dir),
                "RADNODE_DATABASE_URL": db_url,
                "RADNODE_DICOM_PORT": str(self.port),
                "RADNODE_HTTP_PORT": str(self.http_port),
                "RADNODE_API_TOKENS": json.dumps([token_entry]),
                "RADNODE_STABLE_SECONDS": "1.5",
                "RADNODE_SWEEP_SECONDS": "0.25",
                "RADNODE_RECEIVERS": "2",
                "RADNODE_LOG_LEVEL": "DEBUG",
            }
        )
        if not default_rules:
            self.env["RADNODE_RULES_FILE"] = str(Path(__file__).parent / "fixtures" / "no_rules.yaml")
        self.env.update({f"RADNODE_{k.upper()}": str(v) for k, v in settings.items()})
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir.parent / f"node-{uuid.uuid4().hex[:6]}.log"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "node.cli", *args], env=self.env, capture_output=True, text=True, check=check,
            timeout=120,
        )

    def start(self, timeout: float = 60) -> NodeProcess:
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "run"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if "running" in line:
                return self
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError(f"node did not start; log:\n{self.log_path.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()
        self.log.close()

    def kill9(self) -> None:
        """SIGKILL the node and its receivers at once (a power cut for the process tree)."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def studies(self) -> list[dict]:
        return json.loads(self.cli("studies", "--json").stdout)

    def wait_series_state(self, series_uid: str, state: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        series: dict = {}
        while time.monotonic() < deadline:
            for st in self.studies():
                for series in st["series"]:
                    # a complete series is routed at once: routed implies complete
                    ok = {state, "routed"} if state == "complete" else {state}
                    if series["series_uid"] == series_uid and series["state"] in ok:
                        return series
            time.sleep(0.3)
        raise AssertionError(f"series never reached {state}: {series}")

    def logs(self) -> str:
        return self.log_path.read_text()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def api(self, method: str, path: str, token: str | None = "default", **kwargs) -> Any:
        """An HTTP request to the node's API (with its test token unless `token` says otherwise)."""
        import httpx

        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {self.token if token == 'default' else token}"
        return httpx.request(method, self.url + path, headers=headers, timeout=kwargs.pop("timeout", 60), **kwargs)


@pytest.fixture
def start_node(tmp_path: Path, db_url: str):
    """Factory: start_node(**settings) -> a running NodeProcess (stopped after the test)."""
    nodes: list[NodeProcess] = []

    def _start(data_dir: Path | None = None, **settings: str) -> NodeProcess:
        node = NodeProcess(data_dir or tmp_path / "data", db_url, **settings)
        if db_url.startswith("postgresql"):  # production databases are migrated explicitly
            assert f"database at revision {HEAD_REVISION}" in node.cli("db", "upgrade").stdout
        nodes.append(node)
        return node.start()

    yield _start
    for node in nodes:
        node.stop()


@pytest.fixture
def node(start_node) -> NodeProcess:
    return start_node()


def have(tool: str) -> bool:
    from shutil import which

    return which(tool) is not None
