"""End to end through real processes: C-STORE -> complete -> routed -> job on a real Celery worker.

Both brokers: the embedded one (kombu SQLAlchemy transport on SQLite, embedded worker, SQLite job
table) and production's (Redis broker, external `radnode worker` processes, PostgreSQL job table).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pydicom
import pytest

from db.jobs import list_jobs
from db.session import make_engine, make_sessionmaker
from node.dispatch.scu import send
from plugins.reference_threshold import MANIFEST as REFERENCE
from plugins.reference_threshold.model import write_weights
from plugins.registry import sha256_file, weights_path
from tests.conftest import PG_ADMIN_URL, NodeProcess, _pg_available, create_pg_database, drop_pg_database, need
from tests.dicom_checks import assert_valid
from tests.synthetic import write_ct_series

FIXTURE_SITE = Path(__file__).parent / "fixtures" / "plugin_site"
REDIS_URL = os.environ.get("RADNODE_TEST_REDIS", "redis://127.0.0.1:6379/13")

pytestmark = pytest.mark.slow


def _redis_available() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


class Stack:
    """A node plus workers on one broker/database pair, with direct read access to the job table."""

    def __init__(self, kind: str, tmp_path: Path, db_url: str) -> None:
        self.kind, self.tmp_path, self.db_url = kind, tmp_path, db_url
        self.models = tmp_path / "models"
        self.nodes: list[NodeProcess] = []
        self.workers: list[subprocess.Popen] = []
        self.engine = make_engine(db_url)
        self.maker = make_sessionmaker(self.engine)

    def rules(self, text: str) -> Path:
        path = self.tmp_path / "rules.yaml"
        path.write_text(text)
        return path

    def start(self, rules: str | None, env: dict[str, str] | None = None, worker: bool = True,
              worker_metrics_port: int = 0, **settings: str) -> NodeProcess:
        """Start the node with these rules (None: the packaged default rules)."""
        base = {
            "models_dir": str(self.models),
            **({"rules_file": str(self.rules(rules))} if rules is not None else {}),
            "job_heartbeat_seconds": "0.5",
            "job_lost_seconds": "3",
            "job_resend_seconds": "30",
        }
        if self.kind == "redis":
            base |= {"broker_url": REDIS_URL, "embedded_worker": "false"}
        node = NodeProcess(self.tmp_path / "data", self.db_url, default_rules=rules is None, **(base | settings))
        node.env["PYTHONPATH"] = os.pathsep.join([str(FIXTURE_SITE), os.environ.get("PYTHONPATH", "")])
        node.env["TESTPLUGIN_SLOW_SECONDS"] = "0"
        node.env.update(env or {})
        if self.kind == "redis":
            assert "database at revision" in node.cli("db", "upgrade").stdout
        self.nodes.append(node)
        node.start()
        if self.kind == "redis" and worker:
            self.start_worker(metrics_port=worker_metrics_port)
        return node

    @property
    def node(self) -> NodeProcess:
        return self.nodes[-1]

    def start_worker(self, queues: str = "gpu,cpu,dispatch", concurrency: int = 1,
                     metrics_port: int = 0) -> subprocess.Popen:
        log = open(self.tmp_path / f"worker-{len(self.workers)}.log", "a")
        proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "worker", "--queues", queues, "--concurrency", str(concurrency),
             "--metrics-port", str(metrics_port)],
            env=self.node.env, stdout=log, stderr=log, start_new_session=True,
        )
        self.workers.append(proc)
        return proc

    def worker_pids(self) -> list[int]:
        """The worker processes now alive (embedded: children of the node; else ours), parents first."""
        roots = [psutil.Process(p.pid) for p in self.workers if p.poll() is None]
        if self.kind == "embedded":
            node = psutil.Process(self.node.proc.pid)
            roots = [c for c in node.children() if "workers" in c.cmdline()]
        return [p.pid for r in roots for p in [r, *r.children(recursive=True)]]

    def kill_workers(self) -> None:
        for pid in self.worker_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.workers:
            p.wait(timeout=10)

    def jobs(self, **filters) -> list[dict]:
        with self.maker() as session:
            return list_jobs(session, **filters)

    def wait_jobs(self, done: Callable[[list[dict]], bool], timeout: float = 90) -> list[dict]:
        deadline = time.monotonic() + timeout
        rows: list[dict] = []
        while time.monotonic() < deadline:
            rows = self.jobs()
            if done(rows):
                return rows
            time.sleep(0.3)
        logs = "\n".join(p.read_text()[-3000:] for p in self.tmp_path.glob("*.log"))
        raise AssertionError(f"jobs never reached the expected state: {rows}\n{logs}\n{self.node.logs()[-5000:]}")

    def close(self) -> None:
        for p in self.workers:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.workers:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for node in self.nodes:
            node.stop()
        self.engine.dispose()


@contextmanager
def redis_stack(tmp_path: Path) -> Iterator[Stack]:
    """Production's pair: a Redis broker (our own, emptied database number) and a fresh PostgreSQL database."""
    need(_pg_available(), f"PostgreSQL not reachable at {PG_ADMIN_URL}")
    need(_redis_available(), f"Redis not reachable at {REDIS_URL}")
    import redis

    broker = redis.Redis.from_url(REDIS_URL)
    broker.flushdb()
    name, url = create_pg_database()
    s = Stack("redis", tmp_path, url)
    try:
        yield s
    finally:
        s.close()
        drop_pg_database(name)
        broker.flushdb()


@contextmanager
def embedded_stack(tmp_path: Path) -> Iterator[Stack]:
    """The embedded pair: SQLite job table, SQLite broker, the node's own worker."""
    s = Stack("embedded", tmp_path, f"sqlite:///{tmp_path / 'radnode.db'}")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(params=["embedded", "redis"])
def stack(request, tmp_path: Path) -> Iterator[Stack]:
    with (embedded_stack if request.param == "embedded" else redis_stack)(tmp_path) as s:
        yield s


REFERENCE_RULES = """
rules:
  - name: reference-ct
    when: {Modality: CT}
    plugins: [reference-threshold]
"""


def test_chest_ct_becomes_an_encoded_job(stack: Stack, ct_dir: Path, data_root: Path):
    weights = write_weights(weights_path(REFERENCE, stack.models), 300.0)
    node = stack.start(REFERENCE_RULES)
    report = send(sorted(ct_dir.glob("*.dcm")), "127.0.0.1", node.port, node.ae_title, "CT1")
    assert report.sent == 64 and not report.failed
    cr = sorted((data_root / "cxr_nih_google_dicom").rglob("*.dcm"))[:1]
    assert send(cr, "127.0.0.1", node.port, node.ae_title, "CR1").sent == 1
    seen: list[str] = []

    def encoded(rows):
        seen.extend(r["state"] for r in rows if not seen or seen[-1] != r["state"])
        return bool(rows) and rows[0]["state"] in {"encoded", "failed", "skipped"}

    [job] = stack.wait_jobs(encoded)
    assert job["state"] == "encoded", job
    assert set(seen) <= {"queued", "running", "encoded"}
    assert (job["plugin"], job["plugin_version"], job["attempts"], job["error"]) == ("reference-threshold", "1.0.0", 1,
                                                                                     None)
    assert job["weights_sha256"] == sha256_file(weights)
    assert job["started_at"] <= job["encoded_at"] and job["queued_at"] <= job["started_at"]
    assert {"image_load", "infer", "encode"} <= set(job["timings"])
    assert any("findings.json" in p for p in job["outputs"]) and all(Path(p).is_file() for p in job["outputs"])
    names = sorted(Path(p).name for p in job["outputs"])
    assert names[:2] == ["SC-001.dcm", "SC-002.dcm"] and {"SEG.dcm", "SR.dcm"} <= set(names)
    for p in job["outputs"]:
        if p.endswith(".dcm"):
            assert_valid(Path(p))
    measured = {m["concept"]["meaning"]: m["value"] for m in job["findings"]["measurements"]}
    assert measured["Volume"] > 50  # bone of a chest CT, mL
    studies = {se["modality"] == "CT": se for st in node.studies() for se in st["series"]}
    assert studies[True]["state"] == "routed" and "reference-threshold" in studies[True]["route_note"]
    assert studies[False]["state"] == "routed" and "no rule matched" in studies[False]["route_note"]
    listed = node.cli("jobs").stdout
    assert "reference-threshold" in listed and "encoded" in listed
    header = pydicom.dcmread(sorted(ct_dir.glob("*.dcm"))[0], stop_before_pixels=True)
    logs = node.logs() + "".join(p.read_text() for p in stack.tmp_path.glob("*.log"))
    for identifier in (str(header.PatientName), str(header.PatientID)):  # no PHI in node or worker logs
        assert identifier and identifier not in logs


def test_worker_killed_mid_job_completes_exactly_once(stack: Stack, tmp_path: Path):
    marker = tmp_path / "runs.txt"
    node = stack.start("rules:\n  - name: slow\n    when: {Modality: CT}\n    plugins: [test-slow]\n",
                       env={"TESTPLUGIN_SLOW_SECONDS": "4", "TESTPLUGIN_SLOW_MARKER": str(marker)}, stable_seconds="1")
    files = write_ct_series(tmp_path / "series", kind="chest", slices=12, size=64)
    assert send(files, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 12
    stack.wait_jobs(lambda rows: bool(rows) and rows[0]["state"] == "running" and marker.exists())
    stack.kill_workers()
    if stack.kind == "redis":
        stack.start_worker()  # the embedded worker is restarted by the node itself
    [job] = stack.wait_jobs(lambda rows: rows[0]["state"] in {"encoded", "failed"}, timeout=120)
    assert (job["state"], job["attempts"]) == ("encoded", 2), job
    assert len(marker.read_text().split()) == 2  # ran twice, recorded once
    assert len(stack.jobs()) == 1
    assert "requeued" in node.logs()


def test_failures_skips_and_the_chest_pixel_check(tmp_path: Path, ct_dir: Path):
    with embedded_stack(tmp_path) as stack:
        node = stack.start(
            "rules:\n"
            "  - name: everything-ct\n    when: {Modality: CT}\n    plugins: [test-raises, reference-threshold]\n"
            "  - name: chest-ct\n    when: {Modality: CT, BodyPart: CHEST}\n    plugins: [test-chest]\n"
        )
        head = write_ct_series(tmp_path / "head", kind="head", slices=12, size=64, study_description="Chest")
        assert send(head, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 12
        rows = stack.wait_jobs(lambda rows: len(rows) == 2 and all(r["state"] in {"failed", "skipped"} for r in rows))
        by_plugin = {r["plugin"]: r for r in rows}
        raises = by_plugin["test-raises"]
        assert (raises["state"], raises["fail_stage"]) == ("failed", "infer")
        assert "RuntimeError: synthetic failure in run" in raises["error"]
        ref = by_plugin["reference-threshold"]
        assert ref["state"] == "skipped" and ref["reason"].startswith("model unavailable: weights file")
        assert "test-chest" not in by_plugin  # a HEAD CT labelled "Chest" never reaches a chest model
        [series] = node.studies()[0]["series"]
        assert "test-chest not run: CT pixel check" in series["route_note"]

        # the worker keeps serving: the real chest CT reaches the chest model
        assert send(sorted(ct_dir.glob("*.dcm")), "127.0.0.1", node.port, node.ae_title, "CT1").sent == 64
        rows = stack.wait_jobs(lambda rows: len(rows) == 5 and all(r["state"] != "queued" and r["state"] != "running"
                                                                   for r in rows))
        chest = [r for r in rows if r["plugin"] == "test-chest"]
        assert [r["state"] for r in chest] == ["encoded"]

        # plugins: broken ones are listed, not fatal; weights appear -> retry runs the job
        plugins = {p["name"]: p for p in json.loads(node.cli("plugins", "--json").stdout)}
        assert plugins["reference-threshold"]["available"] is False
        assert "DOES_NOT_EXIST" in plugins["test-broken"]["reason"]
        write_weights(weights_path(REFERENCE, stack.models), 300.0)
        assert node.cli("jobs", "retry", str(ref["id"])).returncode == 0
        assert node.cli("jobs", "retry", "999999", check=False).returncode == 1
        stack.wait_jobs(lambda rows: any(r["id"] == ref["id"] and r["state"] == "encoded" for r in rows))


def test_two_workers_twenty_series_no_duplicates(tmp_path: Path):
    with redis_stack(tmp_path) as stack:
        write_weights(weights_path(REFERENCE, stack.models), 300.0)
        node = stack.start(
            "rules:\n"
            "  - name: all-ct\n    when: {Modality: CT}\n    plugins: [reference-threshold]\n"
            "  - name: thin\n    when: {Modality: CT, SliceCount: {ge: 4}}\n"
            "    plugins: [test-slow, reference-threshold]\n"
            "  - name: never\n    when: {Modality: CT, BodyPart: HEAD}\n    plugins: [test-raises]\n",
            stable_seconds="1",
        )
        stack.start_worker()  # a second worker
        study = "1.2.826.0.1.3680043.8.498.999"
        files = []
        for i in range(20):
            files += write_ct_series(tmp_path / f"s{i}", kind="chest", slices=6, size=48, study_uid=study,
                                     series_uid=f"{study}.{i + 1}")
        assert send(files, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 120
        rows = stack.wait_jobs(lambda rows: len(rows) == 40 and all(r["state"] == "encoded" for r in rows), 180)
        pairs = [(r["series_uid"], r["plugin"]) for r in rows]
        assert len(set(pairs)) == 40 and {p for _, p in pairs} == {"reference-threshold", "test-slow"}
        assert all(r["attempts"] == 1 for r in rows)
        assert len({r["worker"] for r in rows}) >= 2  # both workers served



def test_redis_honours_priority_and_dedicated_queues(tmp_path: Path):
    with redis_stack(tmp_path) as stack:
        node = stack.start(
            "rules:\n"
            "  - name: urgent\n    when: {Modality: CT, SeriesDescription: STAT}\n    plugins: [test-slow]\n"
            "    priority: stat\n"
            "  - name: routine\n    when: {Modality: CT, SeriesDescription: ROUTINE}\n    plugins: [test-slow]\n"
            "  - name: dedicated\n    when: {Modality: CT, SeriesDescription: SEG}\n    plugins: [test-slow]\n"
            "    queue: gpu.dedicated\n",
            worker=False, stable_seconds="1",
        )
        files = []
        for i, description in enumerate(["ROUTINE"] * 4 + ["STAT", "SEG"]):
            files += write_ct_series(tmp_path / f"s{i}", kind="chest", slices=4, size=32,
                                     series_description=description)
        assert send(files, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 24
        # every task is in the broker before any worker runs
        rows = stack.wait_jobs(lambda rows: len(rows) == 6)
        with stack.maker() as session:
            from db.models import Job

            deadline = time.monotonic() + 30
            while session.query(Job).filter(Job.enqueued_at.is_(None)).count() and time.monotonic() < deadline:
                time.sleep(0.2)
                session.expire_all()
        stack.start_worker(queues="gpu,cpu")
        rows = stack.wait_jobs(lambda rows: sum(r["state"] == "encoded" for r in rows) == 5)
        by_rule = {r["rule"]: r for r in rows}
        started = sorted((r for r in rows if r["started_at"]), key=lambda r: r["started_at"])
        assert started[0]["rule"] == "urgent"  # queued last, run first
        assert by_rule["dedicated"]["queue"] == "gpu.dedicated" and by_rule["dedicated"]["state"] == "queued"
        stack.start_worker(queues="gpu.dedicated")  # a host dedicated to that model
        stack.wait_jobs(lambda rows: all(r["state"] == "encoded" for r in rows))
