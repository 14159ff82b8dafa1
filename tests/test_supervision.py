"""Supervision: the node's children (receivers, HTTP service, embedded worker and its pool) never outlive it,
however it stops, and a restarted node binds its ports and finishes what was left."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from node.dispatch.scu import echo, send
from tests.synthetic import write_ct_series
from tests.test_pipeline import Stack, embedded_stack

pytestmark = pytest.mark.slow

SLOW_RULES = "rules:\n  - name: slow\n    when: {Modality: CT}\n    plugins: [test-slow]\n"


def _alive(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{pid} {' '.join(proc.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_gone(pids: list[int], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _alive(pids)


def _running_slow_job(stack: Stack, tmp_path: Path, **settings: str) -> tuple[int, list[int]]:
    """A node whose embedded worker is inside a 60 s job: (job id, pids of every child of the node)."""
    marker = tmp_path / "runs.txt"
    node = stack.start(SLOW_RULES, env={"TESTPLUGIN_SLOW_SECONDS": "60", "TESTPLUGIN_SLOW_MARKER": str(marker)},
                       stable_seconds="1", **settings)
    files = write_ct_series(tmp_path / "series", kind="chest", slices=12, size=64)
    assert send(files, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 12
    [job] = stack.wait_jobs(lambda rows: bool(rows) and rows[0]["state"] == "running" and marker.exists())
    children = [p.pid for p in psutil.Process(node.proc.pid).children(recursive=True)]
    names = " ".join(" ".join(psutil.Process(pid).cmdline()) for pid in children)
    assert "workers" in names and "multiprocessing" in names  # the worker (and its pool), receivers, HTTP
    return job["id"], children


def test_kill9_of_the_node_leaves_no_child_and_a_restart_binds_its_ports(tmp_path: Path):
    with embedded_stack(tmp_path) as stack:
        job_id, children = _running_slow_job(stack, tmp_path)
        old = stack.node
        old.proc.send_signal(signal.SIGKILL)  # the node alone: its children are not signalled by anyone else
        old.proc.wait(timeout=10)
        assert not _wait_gone(children, timeout=20), f"orphans left: {_alive(children)}"

        node = stack.start(SLOW_RULES, env={"TESTPLUGIN_SLOW_SECONDS": "0"}, stable_seconds="1",
                           dicom_port=str(old.port), http_port=str(old.http_port))
        assert echo("127.0.0.1", node.port, node.ae_title, "TESTSCU") == 0
        assert node.api("GET", "/healthz", token=None).status_code == 200
        # the job the killed worker held is recovered from the job table and ends once
        [job] = stack.wait_jobs(lambda rows: rows[0]["state"] in {"encoded", "failed"}, timeout=120)
        assert (job["id"], job["state"], job["attempts"]) == (job_id, "encoded", 2), job


def test_a_stop_hands_back_a_job_that_outlasts_the_grace_time(tmp_path: Path):
    with embedded_stack(tmp_path) as stack:
        job_id, children = _running_slow_job(stack, tmp_path, stop_grace_seconds="1")
        node = stack.node
        started = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        node.proc.wait(timeout=60)
        assert time.monotonic() - started < 20  # bounded: grace 1 s, receivers and HTTP 10 s at most
        assert not _wait_gone(children, timeout=10), f"orphans left: {_alive(children)}"
        assert "handed back to the queue" in node.logs() and f"job(s) {job_id} handed back" in node.logs()
        [job] = stack.jobs()
        assert job["state"] == "queued", job

        stack.start(SLOW_RULES, env={"TESTPLUGIN_SLOW_SECONDS": "0"}, stable_seconds="1")
        [job] = stack.wait_jobs(lambda rows: rows[0]["state"] in {"encoded", "failed"}, timeout=120)
        assert (job["state"], job["attempts"]) == ("encoded", 2), job


def test_a_stop_lets_a_short_job_finish(tmp_path: Path):
    with embedded_stack(tmp_path) as stack:
        marker = tmp_path / "runs.txt"
        node = stack.start(SLOW_RULES, env={"TESTPLUGIN_SLOW_SECONDS": "3", "TESTPLUGIN_SLOW_MARKER": str(marker)},
                           stable_seconds="1")
        files = write_ct_series(tmp_path / "series", kind="chest", slices=12, size=64)
        assert send(files, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 12
        stack.wait_jobs(lambda rows: bool(rows) and rows[0]["state"] == "running" and marker.exists())
        node.proc.send_signal(signal.SIGTERM)
        node.proc.wait(timeout=60)
        assert "embedded worker stopped (any running job finished)" in node.logs()
        [job] = stack.jobs()
        assert (job["state"], job["attempts"]) == ("encoded", 1), job
