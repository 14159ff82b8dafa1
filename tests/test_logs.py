"""Structured logs: JSON lines carry the job id of the job being worked on, and UIDs only hashed."""

from __future__ import annotations

import json
import logging

from node.logs import job_context, setup_logging, uid_hash


def test_json_lines_carry_the_job_id(capsys):
    setup_logging("INFO", json_lines=True, salt="s")
    log = logging.getLogger("radnode.test")
    with job_context(42):
        log.info("job started on series %s", uid_hash("1.2.3.4"))
    log.info("outside any job")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0]["job_id"] == 42 and lines[0]["logger"] == "radnode.test" and "1.2.3.4" not in lines[0]["msg"]
    assert "job_id" not in lines[1] and lines[1]["msg"] == "outside any job"
    setup_logging("INFO")
