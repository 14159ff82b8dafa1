"""Triage flags: a plugin declares which positive classifications are urgent; their results go first on the broker
and, to FHIR/HL7 destinations that ask for it, a short flag message goes ahead of the full results."""

from __future__ import annotations

import subprocess

import pytest
from pydantic import ValidationError

from node.queueing.broker import DISPATCH_QUEUE, Enqueuer
from node.settings import Settings
from plugins.base import Code, Manifest
from tests.conftest import free_port, need
from tests.test_faults import _wait_port

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
