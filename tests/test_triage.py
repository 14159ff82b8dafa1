"""Triage flags: a plugin declares which positive classifications are urgent; their results go first on the broker
and, to FHIR/HL7 destinations that ask for it, a short flag message goes ahead of the full results."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from node.dispatch.scu import send
from node.queueing.broker import DISPATCH_QUEUE, Enqueuer
from node.settings import Settings
from plugins.base import Code, Manifest
from tests.conftest import free_port, need
from tests.fhir_server import FhirServer
from tests.mllp_server import MllpServer
from tests.synthetic import write_ct_series
from tests.test_faults import _wait_port
from tests.test_pipeline import embedded_stack

PNEUMONIA = Code(value="233604007", scheme="SCT", meaning="Pneumonia")
EFFUSION = Code(value="60046008", scheme="SCT", meaning="Pleural effusion")


def test_a_triage_flag_must_be_one_of_the_findings():
    m = Manifest(name="cxr", version="1", factory="a:b", modalities=["CR"], findings=[PNEUMONIA, EFFUSION],
                 triage=[PNEUMONIA])
    assert m.is_triage(PNEUMONIA) and not m.is_triage(EFFUSION)
    with pytest.raises(ValidationError, match="triage flags must be among the findings: Pleural effusion"):
        Manifest(name="cxr", version="1", factory="a:b", modalities=["CR"], findings=[PNEUMONIA], triage=[EFFUSION])


def test_seed_triage_plugins_declare_their_flag():
    from plugins.ct_chest_triage import MANIFEST as CT_TRIAGE
    from plugins.cxr_pneumonia import MANIFEST as PNEUMONIA_CXR

    assert [c.meaning for c in CT_TRIAGE.triage] == ["Imaging result abnormal"]
    assert [c.meaning for c in PNEUMONIA_CXR.triage] == ["Pneumonia"]


def test_flagged_deliveries_leave_the_redis_broker_first():
    """Routine deliveries wait on a real Redis; a flagged one sent after them is the first a worker receives."""
    need(bool(subprocess.run(["sh", "-c", "command -v redis-server"], capture_output=True).stdout), "no redis-server")
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL, start_new_session=True)
    enqueuer = None
    try:
        _wait_port(port)
        enqueuer = Enqueuer(Settings(broker_url=f"redis://127.0.0.1:{port}/0"))
        assert enqueuer.send_dispatch([1, 2, 3]) == [1, 2, 3]
        assert enqueuer.send_dispatch([4], "stat") == [4]
        order = []
        with enqueuer.app.connection_for_read() as conn:
            queue = conn.SimpleQueue(DISPATCH_QUEUE)
            for _ in range(4):
                message = queue.get(timeout=5)
                order.append(message.headers["argsrepr"])
                message.ack()
            queue.close()
        assert order == ["[4]", "[1]", "[2]", "[3]"]
    finally:
        if enqueuer is not None:
            enqueuer.close()
        redis.kill()
        redis.wait(timeout=10)


FLAG_RULES = """
rules:
  - name: triage
    when: {Modality: CT}
    plugins: [test-flag]
"""


@pytest.mark.slow
def test_a_positive_flag_reaches_the_ris_and_the_ehr_before_the_results(tmp_path: Path):
    """A real node, a FHIR server and an MLLP listener: while the job still encodes (4 s), the flag is already at
    both (preliminary, critical); then the full results update it, nothing duplicated; a normal series sends no
    flag and stays routine."""
    with FhirServer() as ehr, MllpServer() as ris, embedded_stack(tmp_path) as stack:
        dest = [{"name": "ehr", "kind": "fhir", "url": ehr.url, "flag_first": True},
                {"name": "ris", "kind": "hl7v2", "host": "127.0.0.1", "port": ris.port, "flag_first": True,
                 "receiving_application": "RIS"}]
        node = stack.start(FLAG_RULES, destinations=json.dumps(dest), env={"TESTPLUGIN_ENCODE_SECONDS": "4"})
        files = write_ct_series(tmp_path / "abnormal", slices=6, size=32, series_description="Thorax")
        assert send(files, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 6
        deadline = time.monotonic() + 60
        while not (ehr.resources("DiagnosticReport") and ris.messages):
            assert time.monotonic() < deadline, f"no flag arrived: {stack.jobs()}"
            time.sleep(0.05)
        [job] = stack.jobs()
        assert (job["state"], job["priority"]) == ("running", "stat")  # the flag went ahead of the encoding
        flag = ris.messages[0]
        assert str(flag.segment("OBR")[25]) == "P"
        assert [str(s[8]) for s in flag.segments("OBX") if str(s[8])] == ["AA"]
        [report] = ehr.resources("DiagnosticReport")
        assert report["status"] == "preliminary"
        [observation] = ehr.resources("Observation")
        assert observation["interpretation"][0]["coding"][0]["code"] == "AA"

        [job] = stack.wait_jobs(lambda rows: rows[0]["state"] in ("delivered", "failed"))
        assert job["state"] == "delivered", job
        states = {d["destination"]: d["state"] for d in job["deliveries"]}
        assert states == {"ehr": "sent", "ehr:flag": "sent", "ris": "sent", "ris:flag": "sent"}
        assert len(ris.messages) == 2 and not ris.invalid
        full = ris.messages[1]
        assert str(full.segment("OBR")[3]) == str(flag.segment("OBR")[3])  # the same order: replaces the flag
        assert "AA" in [str(s[8]) for s in full.segments("OBX")] and len(full.segments("OBX")) > 1
        assert len(ehr.resources("DiagnosticReport")) == 1 and len(ehr.resources("Observation")) == 2
        assert len(ehr.resources("Patient")) == len(ehr.resources("ImagingStudy")) == 1

        normal = write_ct_series(tmp_path / "normal", slices=6, size=32, series_description="NORMAL chest")
        assert send(normal, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 6
        rows = stack.wait_jobs(lambda rows: len(rows) == 2 and all(r["state"] in ("delivered", "failed")
                                                                     for r in rows))
        second = next(r for r in rows if r["id"] != job["id"])
        assert second["priority"] == "routine" and second["findings"]["flags"] == []
        assert sorted(d["destination"] for d in second["deliveries"]) == ["ehr", "ris"]
        assert len(ris.messages) == 3 and "AA" not in [str(s[8]) for s in ris.messages[2].segments("OBX")]
