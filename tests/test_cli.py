"""CLI: `studies --json` shape, `send` and `echo` exit codes, configuration errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import free_port


def radnode(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env or os.environ.copy())


def test_send_and_studies_json(node, ct_dir):
    out = node.cli("send", str(ct_dir), "--to", f"127.0.0.1:{node.port}", "--aec", node.ae_title)
    assert "sent 64, failed 0, skipped 0" in out.stdout  # PROVENANCE.md and licences are left out
    studies = node.studies()
    assert isinstance(studies, list) and len(studies) == 1
    series = studies[0]["series"]
    assert {"series_uid", "modality", "instances", "state"} <= set(series[0])
    assert series[0]["instances"] == 64 and series[0]["modality"] == "CT"
    node.wait_series_state(series[0]["series_uid"], "complete")
    table = node.cli("studies").stdout
    assert studies[0]["study_uid"] in table and "no new instance for" in table  # why the series is complete


def test_send_to_nowhere_fails_cleanly(ct_dir):
    out = radnode("send", str(ct_dir / "1-01.dcm"), "--to", f"127.0.0.1:{free_port()}")
    assert out.returncode == 1 and "failed" in out.stderr
    out = radnode("echo", "127.0.0.1", str(free_port()))
    assert out.returncode == 1


def test_bad_configuration_exits_2(tmp_path):
    env = {**os.environ, "RADNODE_AE_TITLE": "WAY_TOO_LONG_AE_TITLE", "RADNODE_DATA_DIR": str(tmp_path)}
    out = radnode("run", env=env)
    assert out.returncode == 2 and "ae_title" in out.stderr


def test_port_in_use_is_a_clear_startup_error(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        env = {**os.environ, "RADNODE_DICOM_PORT": str(port), "RADNODE_DATA_DIR": str(tmp_path)}
        out = radnode("run", env=env)
    assert out.returncode == 1 and "cannot listen" in out.stderr


def test_studies_json_empty(tmp_path):
    env = {**os.environ, "RADNODE_DATA_DIR": str(tmp_path)}
    out = radnode("studies", "--json", env=env)
    assert out.returncode == 0 and json.loads(out.stdout) == []
