"""Faults injected into real processes. Each case checks that nothing acknowledged is lost, every job ends
once, and the node keeps serving. (More faults live beside the code they exercise: the worker killed mid-job
and the node killed mid-job in test_pipeline/test_supervision, the database refusing connections in
test_scp, Orthanc down during delivery in test_dispatch.)"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from pydicom import dcmread
from pynetdicom import AE, build_context

from node.dispatch.scu import echo, send
from tests.conftest import NodeProcess, free_port, need
from tests.synthetic import write_ct_series
from tests.test_pipeline import Stack, embedded_stack
from tests.test_scp import instance_uids, stored_files

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def test_a_corrupt_file_in_the_store_at_startup_is_skipped(start_node, tmp_path: Path, ct_dir: Path):
    data = tmp_path / "data"
    broken = data / "instances" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 300)  # a power cut in the middle of a copy
    (data / "tmp").mkdir()
    (data / "tmp" / "half.dcm.0123456789abcdef.part").write_bytes(b"partial")
    node = start_node(data)
    assert "reconcile: unreadable stored file skipped" in node.logs()
    assert not list((data / "tmp").glob("*.part"))
    assert echo("127.0.0.1", node.port, node.ae_title, "TESTSCU") == 0
    files = sorted(ct_dir.glob("*.dcm"))[:4]
    assert send(files, "127.0.0.1", node.port, node.ae_title).sent == 4
    assert len(instance_uids(node)) == 4 and broken.exists()  # kept for a person to look at, never indexed


def _receiver_serving(node: NodeProcess) -> psutil.Process:
    """The receiver process holding the established association to the node's DICOM port."""
    for child in psutil.Process(node.proc.pid).children():
        for conn in child.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == node.port:
                return child
    raise AssertionError("no receiver holds the association")


def test_a_receiver_killed_mid_association_loses_nothing_acknowledged(node: NodeProcess, ct_dir: Path):
    files = sorted(ct_dir.glob("*.dcm"))
    contexts = sorted({str(dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files})
    ae = AE(ae_title="FAULTS")
    ae.requested_contexts = [build_context(c) for c in contexts]
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    acknowledged: list[str] = []
    for i, f in enumerate(files):
        if i == 20:
            _receiver_serving(node).kill()  # kill -9 in the middle of the association
        ds = dcmread(f)
        try:
            status = assoc.send_c_store(ds)
        except Exception:
            break
        if status is None or "Status" not in status:
            break  # the association is gone: the sender keeps what it has not been told was stored
        if status.Status == 0:
            acknowledged.append(str(ds.SOPInstanceUID))
    assoc.release() if assoc.is_established else assoc.abort()
    assert 20 <= len(acknowledged) < len(files)
    assert set(acknowledged) <= instance_uids(node) and set(acknowledged) <= set(stored_files(node))
    # the node restarts the receiver and the sender sends the rest (and the rest again: idempotent)
    deadline = time.monotonic() + 20
    while len(psutil.Process(node.proc.pid).children()) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    report = send(files, "127.0.0.1", node.port, node.ae_title)
    assert report.sent == len(files), report.failed
    assert len(instance_uids(node)) == len(files) == len(stored_files(node))
    assert "receiver" in node.logs() and "restarting" in node.logs()


def test_a_redis_restart_loses_no_queued_job(tmp_path: Path):
    """Redis without persistence restarts while a job's task waits in it: the task is gone from the broker,
    the job table still says queued, and the sweeper sends it again; it runs once."""
    import redis as redis_client

    from tests.conftest import _pg_available, create_pg_database, drop_pg_database

    need(_pg_available(), "PostgreSQL not reachable")
    need(bool(subprocess.run(["sh", "-c", "command -v redis-server"], capture_output=True).stdout), "no redis-server")
    port = free_port()
    redis_cmd = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    redis = subprocess.Popen(redis_cmd, stdout=subprocess.DEVNULL, start_new_session=True)
    name, url = create_pg_database()
    stack = Stack("redis", tmp_path, url)
    try:
        _wait_port(port)
        node = stack.start("rules:\n  - name: ct\n    when: {Modality: CT}\n    plugins: [test-slow]\n",
                           worker=False, stable_seconds="1", broker_url=f"redis://127.0.0.1:{port}/0",
                           job_resend_seconds="3")
        files = write_ct_series(tmp_path / "series", kind="chest", slices=6, size=48)
        assert send(files, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 6
        stack.wait_jobs(lambda rows: bool(rows) and rows[0]["state"] == "queued")
        broker = redis_client.Redis(port=port)
        deadline = time.monotonic() + 30
        while not any(broker.llen(k) for k in broker.keys() if broker.type(k) == b"list"):
            assert time.monotonic() < deadline, "the task never reached the broker"
            time.sleep(0.2)
        redis.kill()  # the task waiting in the broker is lost with it
        redis.wait(timeout=10)
        redis = subprocess.Popen(redis_cmd, stdout=subprocess.DEVNULL, start_new_session=True)
        _wait_port(port)
        stack.start_worker()
        [job] = stack.wait_jobs(lambda rows: rows[0]["state"] in {"encoded", "failed"}, timeout=90)
        assert (job["state"], job["attempts"]) == ("encoded", 1), job
        assert len(stack.jobs()) == 1
    finally:
        stack.close()
        drop_pg_database(name)
        if redis.poll() is None:
            os.killpg(redis.pid, signal.SIGTERM)
            redis.wait(timeout=10)


def _wait_port(port: int, timeout: float = 10) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port}")


def test_kill9_of_the_node_while_routing_makes_each_job_once(tmp_path: Path):
    """Twenty series complete together and the node dies (kill -9 of its whole process tree) while it routes
    them; after a restart every series has exactly one job, and each job runs to the end once or twice."""
    with embedded_stack(tmp_path) as stack:
        node = stack.start("rules:\n  - name: ct\n    when: {Modality: CT}\n    plugins: [test-slow]\n",
                           stable_seconds="1")
        study = "1.2.826.0.1.3680043.8.498.777"
        files = []
        for i in range(20):
            files += write_ct_series(tmp_path / f"s{i}", kind="chest", slices=4, size=32, study_uid=study,
                                     series_uid=f"{study}.{i + 1}")
        assert send(files, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 80
        stack.wait_jobs(lambda rows: len(rows) >= 1, timeout=60)
        node.kill9()
        stack.start("rules:\n  - name: ct\n    when: {Modality: CT}\n    plugins: [test-slow]\n", stable_seconds="1",
                    dicom_port=str(node.port), http_port=str(node.http_port))
        rows = stack.wait_jobs(lambda rows: len(rows) == 20 and all(r["state"] == "encoded" for r in rows), 180)
        assert len({r["series_uid"] for r in rows}) == 20
        assert all(r["attempts"] in (1, 2) for r in rows), [r["attempts"] for r in rows]


class PrivatePostgres:
    """A throw-away PostgreSQL cluster of our own (trust auth) that a test may restart."""

    def __init__(self) -> None:
        import glob
        import tempfile

        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        need(bool(found), "PostgreSQL server binaries not installed")
        self.bin = Path(found[-1]).parent
        # outside pytest's private tmp folder: as root, the server runs as the postgres user
        self.root = Path(tempfile.mkdtemp(prefix="radnode-test-pg-"))
        self.dir, self.port = self.root / "pgdata", free_port()
        self.dir.mkdir()
        if os.getuid() == 0:  # initdb and pg_ctl refuse to run as root
            os.chown(self.root, *_postgres_ids())
            os.chown(self.dir, *_postgres_ids())
        self._run("initdb", "-D", str(self.dir), "-U", "postgres", "--auth=trust")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin / tool), *args]
        if os.getuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        # no pipes: the server started by pg_ctl would inherit and hold them open
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir), "-o", f"-p {self.port} -k /tmp -c listen_addresses=127.0.0.1",
                  "-l", str(self.dir / "log"), "-w", "start")

    def restart(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir), "-l", str(self.dir / "log"), "-m", "fast", "-w", "restart")

    def stop(self, keep: bool = False) -> None:
        """Stop the server at once; remove its files unless `keep`."""
        import shutil

        try:
            self._run("pg_ctl", "-D", str(self.dir), "-m", "immediate", "-w", "stop")
        finally:
            if not keep:
                shutil.rmtree(self.root, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"


def _postgres_ids() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam("postgres")
    return entry.pw_uid, entry.pw_gid


def test_a_postgresql_restart_during_ingest_and_during_a_job(tmp_path: Path, ct_dir: Path):
    """The job table's server restarts while instances arrive and again while a job runs: every instance
    acknowledged is recorded (the rest were answered 0xA700 and are sent again), and the job ends once."""
    from db.migrate import upgrade

    pg = PrivatePostgres()
    stack = Stack("embedded", tmp_path, pg.url)  # the embedded broker and worker, the job table on PostgreSQL
    try:
        upgrade(stack.engine)
        marker = tmp_path / "runs.txt"
        node = stack.start("rules:\n  - name: ct\n    when: {Modality: CT}\n    plugins: [test-slow]\n",
                           env={"TESTPLUGIN_SLOW_SECONDS": "4", "TESTPLUGIN_SLOW_MARKER": str(marker)},
                           stable_seconds="2")
        files = sorted(ct_dir.glob("*.dcm"))
        answered = 0

        def restart_midway(_: Path, status: int) -> None:  # down after the 10th answer, up after the 20th
            nonlocal answered
            answered += 1
            if answered == 10:
                pg.stop(keep=True)
            elif answered == 20:
                pg.start()

        report = send(files, "127.0.0.1", node.port, node.ae_title, "CT1", progress=restart_midway)
        assert report.sent + len(report.failed) == len(files)
        assert 10 <= len(report.failed) < len(files) - 10, report.failed  # refused while the server was down
        assert all("0xA700" in why for _, why in report.failed), report.failed
        sent = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files} - {
            str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f, _ in report.failed}
        assert sent <= instance_uids(node)
        assert send(files, "127.0.0.1", node.port, node.ae_title, "CT1").sent == len(files)  # the sender retries
        assert len(instance_uids(node)) == len(files)
        stack.wait_jobs(lambda rows: bool(rows) and rows[0]["state"] == "running" and marker.exists(), 120)
        pg.restart()  # while the worker holds the job
        [job] = stack.wait_jobs(lambda rows: rows[0]["state"] in {"encoded", "failed"}, timeout=120)
        assert job["state"] == "encoded" and job["attempts"] in (1, 2), job
        assert len(stack.jobs()) == 1
    finally:
        stack.close()
        pg.stop()


def test_disk_full_while_encoding_fails_the_job_with_its_reason_then_a_retry_succeeds(tmp_path: Path):
    """The outputs' file system fills up during encoding: the job fails at the encode stage saying why, no
    half-written file is left, the node keeps serving, and once there is room a retry encodes it."""
    need(os.getuid() == 0, "mounting a small file system for the outputs needs root")
    outputs = tmp_path / "data" / "outputs"
    outputs.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(outputs)], check=True)
    try:
        with embedded_stack(tmp_path) as stack:
            node = stack.start("rules:\n  - name: ct\n    when: {Modality: CT}\n    plugins: [test-slow]\n",
                               stable_seconds="1")
            files = write_ct_series(tmp_path / "series", kind="chest", slices=12, size=64)
            assert send(files, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 12
            [job] = stack.wait_jobs(lambda rows: bool(rows) and rows[0]["state"] in {"encoded", "failed"})
            assert (job["state"], job.get("fail_stage")) == ("failed", "encode"), {k: job.get(k) for k in ("state", "fail_stage", "error", "reason", "outputs")}
            assert "No space left on device" in job["error"], job
            assert not list(outputs.rglob("*.part"))
            assert echo("127.0.0.1", node.port, node.ae_title, "TESTSCU") == 0
            subprocess.run(["mount", "-o", "remount,size=64m", str(outputs)], check=True)
            assert node.cli("jobs", "retry", str(job["id"])).returncode == 0
            [job] = stack.wait_jobs(lambda rows: rows[0]["state"] == "encoded")
            assert job["outputs"] and not job["error"], job  # a manual retry starts the attempts over
    finally:
        subprocess.run(["umount", "-l", str(outputs)], check=False)
