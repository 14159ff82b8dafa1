"""Faults injected into real processes. Each case checks that nothing acknowledged is lost, every job ends
once, every delivery arrives once (counted by SOP Instance UID in a real Orthanc), and the node keeps serving.
(More faults live beside the code they exercise: the worker killed mid-job and the node killed mid-job in
test_pipeline/test_supervision, the database refusing connections and the disk filling up while receiving in
test_scp, Orthanc down during delivery in test_dispatch.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
from pydicom import dcmread
from pynetdicom import AE, build_context

from node.dicom.association import keep_responses_for_their_caller
from node.dispatch.scu import echo, send
from tests.conftest import NodeProcess, free_port, need
from tests.orthanc import Orthanc
from tests.synthetic import write_ct_series
from tests.test_dispatch import wait_for
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
    (broken.parent / "1.2.3.4.6.dcm.0123456789abcdef.part").write_bytes(b"partial")  # beside the instances
    node = start_node(data)
    assert "reconcile: unreadable stored file skipped" in node.logs()
    assert not list(data.rglob("*.part"))
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
    keep_responses_for_their_caller(assoc)  # pynetdicom's requestor race (node/dicom/association.py)
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
    # the supervisor notices the dead receiver on its next pass: under load that can come after the send
    deadline = time.monotonic() + 30
    while "restarting" not in node.logs() and time.monotonic() < deadline:
        time.sleep(0.2)
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


def test_a_task_that_meets_postgresql_down_is_retried_not_left_for_the_resend(tmp_path: Path):
    """Job B's task reaches the worker while the job table's server is down (the worker was busy with job A
    when it stopped). The task is sent again with backoff, so B runs soon after the server is back, not after
    the sweeper's resend (10 minutes here)."""
    from db.migrate import upgrade

    pg = PrivatePostgres()
    stack = Stack("embedded", tmp_path, pg.url)
    try:
        upgrade(stack.engine)
        marker = tmp_path / "runs.txt"
        node = stack.start("rules:\n  - name: ct\n    when: {Modality: CT}\n    plugins: [test-slow]\n",
                           env={"TESTPLUGIN_SLOW_SECONDS": "6", "TESTPLUGIN_SLOW_MARKER": str(marker)},
                           stable_seconds="1", job_resend_seconds="600", job_lost_seconds="10")
        for name in ("a", "b"):
            files = write_ct_series(tmp_path / name, slices=12, size=64)
            assert send(files, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 12
        rows = stack.wait_jobs(lambda rows: sorted(r["state"] for r in rows) == ["queued", "running"]
                               and marker.exists(), timeout=90)
        b = next(r["id"] for r in rows if r["state"] == "queued")
        before = len(node.logs())
        pg.stop(keep=True)  # job A is running; job B's task waits in the broker
        time.sleep(12)  # A ends (its result cannot be recorded), B's task meets the server down
        pg.start()
        from sqlalchemy.exc import OperationalError

        deadline, rows = time.monotonic() + 120, []
        while time.monotonic() < deadline and not (rows and all(r["state"] == "encoded" for r in rows)):
            try:
                rows = stack.jobs()
            except OperationalError:  # the server may still be finishing its start
                rows = []
            time.sleep(0.5)
        assert len(rows) == 2 and all(r["state"] == "encoded" for r in rows), (rows, node.logs()[-3000:])
        logs = node.logs()[before:]
        assert "retry: Retry in" in logs and "OperationalError" in logs, logs[-3000:]  # the task was sent again
        resent = [line for line in logs.splitlines() if "queued job(s) to the broker" in line]
        assert not any(line.rstrip().endswith((f": {b}", f", {b}")) or f" {b}," in line for line in resent), resent
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


SLOW_RULES = "rules:\n  - name: ct\n    when: {Modality: CT}\n    plugins: [test-slow]\n"


@contextmanager
def orthanc_pacs(tmp_path: Path) -> Iterator[Orthanc]:
    """A real Orthanc (OverwriteInstances on) as the destination; stopped after the test."""
    orthanc = Orthanc(tmp_path / "orthanc", free_port()).start()
    try:
        yield orthanc
    finally:
        orthanc.stop()


def result_uids(job: dict) -> Counter:
    """SOP Instance UID of each DICOM object the job wrote (each once)."""
    return Counter(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in job["outputs"]
                   if p.endswith(".dcm"))


def in_orthanc(orthanc: Orthanc, files: list[Path]) -> Counter:
    """How many copies of each result object Orthanc holds, by SOP Instance UID (the source series is not
    in this Orthanc: everything in the study is a result)."""
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    return Counter(i["SOPInstanceUID"] for i in orthanc.study_instances(study_uid))


def test_a_worker_killed_during_encode_is_recovered_and_delivered_once(tmp_path: Path):
    """kill -9 of the worker while it writes SR.dcm (SEG.dcm written, half of SR.dcm in a temporary file): the
    sweeper requeues the job, the second run writes every object again under the same UIDs and leaves no
    partial file, the job is encoded once and Orthanc receives each object once."""
    hold = tmp_path / "encoding.pid"
    with orthanc_pacs(tmp_path) as orthanc, embedded_stack(tmp_path) as stack:
        node = stack.start(SLOW_RULES, env={"TESTPLUGIN_ENCODE_HOLD": str(hold)}, stable_seconds="1",
                           destinations=json.dumps([{"name": "pacs", "kind": "orthanc", "url": orthanc.url}]))
        files = write_ct_series(tmp_path / "series", kind="chest", slices=12, size=64)
        assert send(files, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 12
        wait_for("the worker to stop half-way through SR.dcm", lambda: hold.exists() and hold.read_text(), 90, 0.1)
        [job] = stack.jobs()
        out = tmp_path / "data" / "outputs" / str(job["id"])
        assert job["state"] == "running" and int(hold.read_text()) in stack.worker_pids(), job
        assert list(out.glob("SR.dcm.*.part")) and not (out / "SR.dcm").exists()
        seg_uid = str(dcmread(out / "SEG.dcm", stop_before_pixels=True).SOPInstanceUID)
        stack.kill_workers()  # kill -9 in the middle of the encode step
        [job] = stack.wait_jobs(lambda rows: rows[0]["state"] in {"delivered", "failed"}, timeout=120)
        assert (job["state"], job["attempts"]) == ("delivered", 2), job
        [delivery] = job["deliveries"]
        assert (delivery["state"], delivery["attempts"]) == ("sent", 1), delivery
        assert not list(out.glob("*.part"))  # the killed run's temporary file is gone
        names = {Path(p).name for p in job["outputs"]}
        assert {"SEG.dcm", "SR.dcm", "SC-001.dcm", "findings.json"} <= names, names
        uids = result_uids(job)
        assert seg_uid in uids and delivery["instances"] == len(uids)
        for p in job["outputs"]:  # complete and readable, pixels included
            if p.endswith(".dcm") and Path(p).name != "SR.dcm":
                assert dcmread(p).pixel_array.size
        assert in_orthanc(orthanc, files) == uids  # every object once
        assert "requeued" in node.logs()


class HoldingProxy(ThreadingHTTPServer):
    """An HTTP proxy in front of Orthanc's REST API. The `hold_on`-th POST is passed on to Orthanc (it stores
    the object) but its answer is held back until `release` is set: a worker killed meanwhile never learns
    that the object arrived."""

    daemon_threads = True

    def __init__(self, upstream: str, hold_on: int) -> None:
        self.upstream, self.hold_on = upstream, hold_on
        self.posts = 0
        self.holding, self.release = threading.Event(), threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _forward(self, method: str) -> None:
                import requests

                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                answer = requests.request(method, proxy.upstream + self.path, data=body, timeout=60)
                if method == "POST":
                    proxy.posts += 1
                    if proxy.posts == proxy.hold_on:
                        proxy.holding.set()
                        proxy.release.wait(120)
                try:
                    self.send_response(answer.status_code)
                    self.send_header("Content-Type", answer.headers.get("Content-Type", "application/json"))
                    self.send_header("Content-Length", str(len(answer.content)))
                    self.end_headers()
                    self.wfile.write(answer.content)
                except OSError:
                    pass  # the client is gone

            def do_GET(self) -> None:
                self._forward("GET")

            def do_POST(self) -> None:
                self._forward("POST")

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


def test_a_worker_killed_during_dispatch_is_retried_and_orthanc_holds_each_object_once(tmp_path: Path):
    """kill -9 of the worker in the middle of a delivery: Orthanc has stored the first two objects, the answer
    for the second never reached the worker. The sweeper releases the attempt (no heartbeat), the retry sends
    every object again, and Orthanc holds each SOP Instance UID once; the job ran once and is delivered."""
    with orthanc_pacs(tmp_path) as orthanc, embedded_stack(tmp_path) as stack:
        proxy = HoldingProxy(orthanc.url, hold_on=2)
        try:
            node = stack.start(SLOW_RULES, stable_seconds="1",
                               destinations=json.dumps([{"name": "pacs", "kind": "orthanc", "url": proxy.url}]))
            files = write_ct_series(tmp_path / "series", kind="chest", slices=12, size=64)
            assert send(files, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 12
            wait_for("the second object to reach Orthanc", proxy.holding.is_set, 90, 0.1)
            [job] = stack.jobs()
            assert job["state"] == "encoded" and job["deliveries"][0]["state"] == "pending", job
            assert sum(in_orthanc(orthanc, files).values()) == 2  # stored, not acknowledged to the sender
            stack.kill_workers()  # kill -9 while the worker waits for Orthanc's answer
            proxy.release.set()
            [job] = stack.wait_jobs(lambda rows: rows[0]["state"] in {"delivered", "failed"}, timeout=120)
            assert (job["state"], job["attempts"]) == ("delivered", 1), job
            [delivery] = job["deliveries"]
            assert delivery["state"] == "sent" and delivery["attempts"] >= 2, delivery
            uids = result_uids(job)
            assert proxy.posts >= len(uids) + 2  # sent again in full
            assert in_orthanc(orthanc, files) == uids  # each object once, the re-sent ones included
            assert "worker lost while sending; released" in node.logs()
        finally:
            proxy.close()


def test_orthanc_down_longer_than_the_backoff_cap_then_back(tmp_path: Path):
    """The PACS is down for several retries past the backoff cap: the waits grow (base, 2 x base, ...) up to
    the cap and then stay there, the delivery stays pending (not failed) while attempts remain, and it arrives
    once when Orthanc is back."""
    from sqlalchemy import select

    from db.models import Delivery

    base, cap = 0.75, 3.0
    with orthanc_pacs(tmp_path) as orthanc, embedded_stack(tmp_path) as stack:
        node = stack.start(SLOW_RULES, stable_seconds="1", delivery_max_attempts="30",
                           delivery_backoff_seconds=str(base), delivery_backoff_max_seconds=str(cap),
                           job_heartbeat_seconds="0.5",
                           destinations=json.dumps([{"name": "pacs", "kind": "orthanc", "url": orthanc.url}]))
        orthanc.stop()
        files = write_ct_series(tmp_path / "series", kind="chest", slices=12, size=64)
        assert send(files, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 12
        seen: list[tuple[int, float]] = []  # (attempts, when the test saw that count first)
        deadline = time.monotonic() + 90
        while not seen or seen[-1][0] < 7:
            assert time.monotonic() < deadline, seen
            with stack.maker() as session:
                attempts = session.execute(select(Delivery.attempts)).scalar_one_or_none()
            if attempts and (not seen or attempts > seen[-1][0]):
                seen.append((attempts, time.monotonic()))
            time.sleep(0.05)
        [job] = stack.jobs()
        [delivery] = job["deliveries"]
        assert (job["state"], delivery["state"]) == ("encoded", "pending"), job  # not failed: attempts remain
        assert "Orthanc" in delivery["last_error"]
        # the waits the dispatcher chose: base, 2 x base, then the cap and never more
        waits = [float(w) for w in _retry_waits(node.logs())]
        assert waits[:4] == [base, 2 * base, cap, cap], waits
        assert max(waits) == cap
        # and the time between attempts (the wait, plus the failing attempt itself and a sweep period) stops
        # growing at the cap: without it the last three would be 6, 12 and 24 s
        gaps = [b - a for (_, a), (_, b) in zip(seen, seen[1:], strict=False)]
        assert all(cap - 0.3 <= g < 2 * cap for g in gaps[-3:]), gaps
        orthanc.start()
        [job] = stack.wait_jobs(lambda rows: rows[0]["state"] in {"delivered", "failed"}, timeout=60)
        assert job["state"] == "delivered", job
        assert job["deliveries"][0]["attempts"] >= 7 and job["deliveries"][0]["last_error"] is None
        assert in_orthanc(orthanc, files) == result_uids(job)


def _retry_waits(logs: str) -> list[str]:
    import re

    return re.findall(r"delivery to pacs failed \(attempt \d+ of \d+\), retry in ([0-9.]+) s", logs)


WALLCLOCK_SITE = Path(__file__).parent / "fixtures" / "wallclock"


class WallClock:
    """The wall clock of the node's Python processes (tests/fixtures/wallclock/sitecustomize.py): `jump()` steps
    it at run time for the whole process tree at once; the monotonic clock is left alone, as in a real step."""

    def __init__(self, folder: Path) -> None:
        from tests.test_pipeline import FIXTURE_SITE

        self.file, self.offset = folder / "clock-offset.txt", 0
        self.file.write_text("0\n")
        self.env = {"TESTCLOCK_OFFSET_FILE": str(self.file),
                    "PYTHONPATH": os.pathsep.join([str(WALLCLOCK_SITE), str(FIXTURE_SITE),
                                                   os.environ.get("PYTHONPATH", "")])}

    def jump(self, seconds: int) -> None:
        self.offset += seconds
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(f"{self.offset}\n")
        tmp.replace(self.file)


def _retry_waits_at(stack: Stack, attempts: int) -> bool:
    """A delivery has failed `attempts` times and waits for its next try (no attempt in progress)."""
    from sqlalchemy import select

    from db.models import Delivery

    with stack.maker() as session:
        row = session.execute(select(Delivery.attempts, Delivery.started_at, Delivery.next_attempt_at)).first()
    return row is not None and row[0] >= attempts and row[1] is None and row[2] is not None


def _series_rows(stack: Stack) -> dict[str, dict]:
    from sqlalchemy import select

    from db.models import Series

    with stack.maker() as session:
        return {s.series_uid: {"state": s.state, "instances": s.instance_count, "reopened": s.reopened_count}
                for s in session.execute(select(Series)).scalars()}


def test_wall_clock_jumps_forward_and_back(tmp_path: Path):
    """The wall clock steps +2 h while a series is received, +2 h again while its job runs, then -1 h while a
    second series is received and while a delivery waits for its retry: each series completes once with all
    its instances (never before the stability window), no job is taken from a worker that is alive, and the
    deliveries are not left waiting an hour; Orthanc gets each object once."""
    clock = WallClock(tmp_path)
    runs = tmp_path / "runs.txt"
    with orthanc_pacs(tmp_path) as orthanc, embedded_stack(tmp_path) as stack:
        node = stack.start(SLOW_RULES, env=clock.env | {"TESTPLUGIN_SLOW_SECONDS": "6",
                                                        "TESTPLUGIN_SLOW_MARKER": str(runs)},
                           stable_seconds="3", delivery_max_attempts="30", delivery_backoff_seconds="2",
                           delivery_backoff_max_seconds="4",
                           destinations=json.dumps([{"name": "pacs", "kind": "orthanc", "url": orthanc.url}]))
        first = write_ct_series(tmp_path / "s1", kind="chest", slices=12, size=48)
        second = write_ct_series(tmp_path / "s2", kind="chest", slices=12, size=48)
        uid = {name: str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
               for name, files in (("first", first), ("second", second))}

        # +2 h in a pause of 1.5 s in the middle of a series (the stability window is 3 s)
        assert send(first[:6], "127.0.0.1", node.port, node.ae_title, "CT1").sent == 6
        clock.jump(+2 * 3600)
        time.sleep(1.5)
        assert _series_rows(stack)[uid["first"]]["state"] == "receiving"
        assert send(first[6:], "127.0.0.1", node.port, node.ae_title, "CT1").sent == 6

        # +2 h again while its job runs (6 s, heartbeats every 0.5 s, lost after 3 s without one)
        wait_for("the first job to run", lambda: runs.exists(), 60, 0.1)
        time.sleep(0.5)
        clock.jump(+2 * 3600)
        orthanc.stop()  # the delivery that follows has to wait for retries
        wait_for("a failed delivery attempt waiting for its retry", lambda: _retry_waits_at(stack, 2), 60, 0.1)

        # -1 h while a retry is due in a few seconds, and in a pause in the middle of the second series
        assert send(second[:6], "127.0.0.1", node.port, node.ae_title, "CT1").sent == 6
        clock.jump(-3600)
        time.sleep(1.5)
        assert _series_rows(stack)[uid["second"]]["state"] == "receiving"
        assert send(second[6:], "127.0.0.1", node.port, node.ae_title, "CT1").sent == 6
        orthanc.start()
        rows = stack.wait_jobs(lambda rows: len(rows) == 2 and all(r["state"] in {"delivered", "failed"} for r in rows),
                               timeout=60)
        assert all((r["state"], r["attempts"]) == ("delivered", 1) for r in rows), rows
        assert len(runs.read_text().split()) == 2  # each job ran once: none was taken from its live worker
        series = _series_rows(stack)
        for name in ("first", "second"):
            assert series[uid[name]] == {"state": "routed", "instances": 12, "reopened": 0}, (name, series)
        logs = node.logs()
        assert "requeued" not in logs and "released" not in logs
        for files in (first, second):
            assert in_orthanc(orthanc, files) == result_uids(next(r for r in rows if r["series_uid"] == str(
                dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)))
