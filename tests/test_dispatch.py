"""Results back to the PACS, end to end against a real Orthanc: Orthanc C-STOREs the shared chest CT to
radnode, a real worker runs the reference plugin, and SR, SEG and SC come back into the same study by
C-STORE, return to sender, STOW-RS and Orthanc's REST API; outages are retried; retries add no duplicates."""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from node.dispatch.scu import send
from plugins.reference_threshold import MANIFEST as REFERENCE
from plugins.reference_threshold.model import write_weights
from plugins.registry import weights_path
from tests.conftest import free_port
from tests.dicom_checks import assert_valid
from tests.orthanc import AE as ORTHANC_AE
from tests.orthanc import Orthanc
from tests.synthetic import write_ct_series
from tests.test_pipeline import REFERENCE_RULES, Stack, embedded_stack, redis_stack

pytestmark = pytest.mark.slow

SEG, SR, SC = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"
FAST_RETRY = {"delivery_backoff_seconds": "0.5", "delivery_backoff_max_seconds": "1", "job_heartbeat_seconds": "0.5"}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with embedded_stack(tmp_path) as s:
        write_weights(weights_path(REFERENCE, s.models), 300.0)
        yield s


@pytest.fixture(params=["embedded", "redis"])
def any_stack(request, tmp_path: Path) -> Iterator[Stack]:
    """Both brokers: with Redis + PostgreSQL the dispatch task runs on an external `radnode worker`."""
    with (embedded_stack if request.param == "embedded" else redis_stack)(tmp_path) as s:
        write_weights(weights_path(REFERENCE, s.models), 300.0)
        yield s


@pytest.fixture
def orthanc_for(tmp_path: Path):
    started: list[Orthanc] = []

    def make(radnode_port: int) -> Orthanc:
        o = Orthanc(tmp_path / f"orthanc-{len(started)}", radnode_port).start()
        started.append(o)
        return o

    yield make
    for o in started:
        o.stop()


def start_node(stack: Stack, destinations: list[dict], port: int, **settings: str):
    return stack.start(REFERENCE_RULES, destinations=json.dumps(destinations), dicom_port=str(port), **settings)


def orthanc_sends_study(orthanc: Orthanc, files: list[Path]) -> str:
    """Upload the files to Orthanc, then have Orthanc C-STORE the study to radnode; returns the Study UID."""
    study = orthanc.upload(files)
    answer = orthanc.post("/modalities/radnode/store", study)
    assert answer.get("FailedInstancesCount", 0) == 0 and answer["InstancesCount"] == len(files), answer
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def result_counts(orthanc: Orthanc, study_uid: str) -> Counter:
    return Counter(i["SOPClassUID"] for i in orthanc.study_instances(study_uid))


def expected_counts(job: dict, ct: int = 64) -> Counter:
    """The source CT plus exactly one copy of each object the job wrote."""
    sc = sum(1 for p in job["outputs"] if Path(p).name.startswith("SC-"))
    return Counter({"1.2.840.10008.5.1.4.1.1.2": ct, SEG: 1, SR: 1, SC: sc})


def wait_for(what: str, check, timeout: float = 90, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def test_orthanc_sends_the_chest_ct_and_gets_sr_seg_sc_back(stack: Stack, orthanc_for, ct_dir: Path):
    from dicomweb_client import DICOMwebClient

    port = free_port()
    orthanc = orthanc_for(port)
    destinations = [
        {"name": "pacs", "kind": "dicom", "ae_title": ORTHANC_AE, "host": "127.0.0.1", "port": orthanc.dicom_port},
        {"name": "sender", "kind": "return-to-sender"},
    ]
    node = start_node(stack, destinations, port,
                      peers=json.dumps([{"ae_title": ORTHANC_AE, "host": "127.0.0.1", "port": orthanc.dicom_port}]))
    files = sorted(ct_dir.glob("*.dcm"))
    study_uid = orthanc_sends_study(orthanc, files)
    [job] = stack.wait_jobs(lambda rows: bool(rows) and rows[0]["state"] in {"delivered", "failed", "skipped"})
    assert job["state"] == "delivered", job
    assert {d["destination"]: (d["state"], d["attempts"]) for d in job["deliveries"]} == {
        "pacs": ("sent", 1), "sender": ("sent", 1)}
    assert job["delivered_at"] >= job["encoded_at"] and "deliver:pacs" in job["timings"]
    dcm_outputs = [Path(p) for p in job["outputs"] if p.endswith(".dcm")]
    assert all(d["instances"] == len(dcm_outputs) for d in job["deliveries"])

    # the objects are in the same study in Orthanc (REST), under the source patient ...
    counts = result_counts(orthanc, study_uid)
    assert counts == expected_counts(job), counts
    assert counts[SC] == 3  # sc_max_images
    patients = orthanc.get(f"/studies/{orthanc.study_id(study_uid)}")["ParentPatient"]
    assert len(orthanc.get("/patients")) == 1 and orthanc.get("/patients")[0] == patients
    # ... element for element what radnode wrote and checked with dciodvfy (Orthanc rewrites the file meta) ...
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in dcm_outputs}
    returned = [i for i in orthanc.study_instances(study_uid) if i["SOPInstanceUID"] in by_uid]
    assert len(returned) == len(by_uid)
    for inst in returned:
        stored = pydicom.dcmread(io.BytesIO(orthanc.file(inst["id"])))
        assert stored == pydicom.dcmread(by_uid[inst["SOPInstanceUID"]])
    for p in dcm_outputs:
        assert_valid(p)
    # ... and listed by QIDO-RS
    client = DICOMwebClient(url=orthanc.dicomweb_url)
    series = client.search_for_series(study_instance_uid=study_uid)
    modalities = Counter(pydicom.Dataset.from_json(s).Modality for s in series)
    assert modalities == Counter({"CT": 1, "SEG": 1, "SR": 1, "OT": 1}), modalities
    sr = client.search_for_instances(study_instance_uid=study_uid, search_filters={"Modality": "SR"})
    assert len(sr) == 1

    # a job retry re-creates the same UIDs: Orthanc holds no duplicate
    node.cli("jobs", "retry", str(job["id"]))
    [again] = stack.wait_jobs(lambda rows: rows[0]["state"] == "delivered" and rows[0]["attempts"] == 1
                              and (rows[0]["started_at"] or "") > job["delivered_at"])
    assert result_counts(orthanc, study_uid) == counts
    assert sorted(Path(p).name for p in again["outputs"]) == sorted(Path(p).name for p in job["outputs"])
    # and an operator's redelivery of everything sends again without duplicates either
    out = node.cli("jobs", "redeliver", str(job["id"]), "--all").stdout
    assert "2 delivery(ies) due again" in out
    wait_for("redelivery", lambda: stack.jobs()[0]["state"] == "delivered"
             and (stack.jobs()[0]["delivered_at"] or "") > again["delivered_at"])
    assert result_counts(orthanc, study_uid) == counts
    listed = node.cli("jobs").stdout
    assert "pacs: sent" in listed and "sender: sent" in listed
    logs = node.logs()  # hashed UIDs only, also from the libraries that encode and send
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    for identifier in (study_uid, str(header.SOPInstanceUID), str(header.PatientID), str(header.PatientName)):
        assert identifier not in logs


def test_stow_rs_destination(any_stack: Stack, orthanc_for, ct_dir: Path):
    stack = any_stack
    from dicomweb_client import DICOMwebClient

    port = free_port()
    orthanc = orthanc_for(port)
    stack.start(REFERENCE_RULES, dicom_port=str(port),
                destinations=json.dumps([{"name": "web", "kind": "dicomweb", "url": orthanc.dicomweb_url}]))
    study_uid = orthanc_sends_study(orthanc, sorted(ct_dir.glob("*.dcm")))
    [job] = stack.wait_jobs(lambda rows: bool(rows) and rows[0]["state"] in {"delivered", "failed", "skipped"})
    assert job["state"] == "delivered", job
    assert job["deliveries"][0]["instances"] == 5
    assert result_counts(orthanc, study_uid) == expected_counts(job)
    client = DICOMwebClient(url=orthanc.dicomweb_url)
    found = Counter(pydicom.Dataset.from_json(s).Modality for s in client.search_for_series(study_instance_uid=study_uid))
    assert found == Counter({"CT": 1, "SEG": 1, "SR": 1, "OT": 1}), found


def test_orthanc_down_during_delivery_is_retried_until_it_is_back(stack: Stack, orthanc_for, ct_dir: Path):
    port = free_port()
    orthanc = orthanc_for(port)
    stack.start(REFERENCE_RULES, dicom_port=str(port), delivery_max_attempts="50", **FAST_RETRY,
                destinations=json.dumps([{"name": "pacs-rest", "kind": "orthanc", "url": orthanc.url}]))
    study_uid = orthanc_sends_study(orthanc, sorted(ct_dir.glob("*.dcm")))
    orthanc.stop()  # the PACS goes away before the results are ready
    [job] = stack.wait_jobs(lambda rows: bool(rows) and rows[0]["deliveries"]
                            and rows[0]["deliveries"][0]["attempts"] >= 3, timeout=120)
    d = job["deliveries"][0]
    assert (job["state"], d["state"]) == ("encoded", "pending") and "Orthanc" in d["last_error"], job
    orthanc.start()
    [job] = stack.wait_jobs(lambda rows: rows[0]["state"] in {"delivered", "failed"}, timeout=60)
    assert job["state"] == "delivered", job
    assert job["deliveries"][0]["attempts"] >= 3 and job["deliveries"][0]["last_error"] is None
    assert result_counts(orthanc, study_uid) == expected_counts(job)


def test_delivery_gives_up_at_the_cap_and_redeliver_sends_it(stack: Stack, orthanc_for, tmp_path: Path):
    port = free_port()
    orthanc = orthanc_for(port)
    orthanc.stop()  # down for the whole first round
    destinations = [{"name": "pacs", "kind": "dicom", "ae_title": ORTHANC_AE, "host": "127.0.0.1",
                     "port": orthanc.dicom_port},
                    {"name": "nobody", "kind": "return-to-sender"}]
    node = stack.start(REFERENCE_RULES, dicom_port=str(port), delivery_max_attempts="2", **FAST_RETRY,
                       destinations=json.dumps(destinations))
    files = write_ct_series(tmp_path / "series", kind="chest", slices=12, size=64)
    assert send(files, "127.0.0.1", node.port, node.ae_title, "CT-UNKNOWN").sent == 12
    [job] = stack.wait_jobs(lambda rows: bool(rows) and rows[0]["state"] in {"delivered", "failed", "skipped"})
    assert (job["state"], job["fail_stage"]) == ("failed", "dispatch"), job
    by_name = {d["destination"]: d for d in job["deliveries"]}
    assert (by_name["pacs"]["state"], by_name["pacs"]["attempts"]) == ("failed", 2)
    assert "association with ORTHANC@127.0.0.1" in by_name["pacs"]["last_error"]
    assert (by_name["nobody"]["state"], by_name["nobody"]["attempts"]) == ("failed", 1)  # permanent: no retry
    assert "calling AE 'CT-UNKNOWN' is not among the configured peers" in by_name["nobody"]["last_error"]
    assert "delivery to pacs failed after 2 attempt(s)" in job["reason"]
    listed = node.cli("jobs", "--state", "failed").stdout
    assert "dispatch:" in listed and "pacs: failed" in listed
    orthanc.start()
    assert node.cli("jobs", "redeliver", "999999", check=False).returncode == 1
    out = node.cli("jobs", "redeliver", str(job["id"]))
    assert "2 delivery(ies) due again" in out.stdout
    [job] = stack.wait_jobs(lambda rows: rows[0]["state"] == "failed" and (rows[0]["finished_at"] or "") > job["finished_at"])
    by_name = {d["destination"]: d for d in job["deliveries"]}
    assert by_name["pacs"]["state"] == "sent" and by_name["nobody"]["state"] == "failed"
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert result_counts(orthanc, study_uid)[SR] == 1


def test_each_destination_receives_the_objects_of_its_profile(stack: Stack, orthanc_for, tmp_path: Path):
    """`objects` per destination: a PACS without SEG support gets SR + SC, a SEG viewer gets the SEG only."""
    port = free_port()
    pacs, viewer = orthanc_for(port), orthanc_for(port)
    destinations = [{"name": "pacs", "kind": "dicom", "ae_title": ORTHANC_AE, "host": "127.0.0.1",
                     "port": pacs.dicom_port, "objects": ["SR", "SC"]},
                    {"name": "viewer", "kind": "orthanc", "url": viewer.url, "objects": ["SEG"]}]
    node = stack.start(REFERENCE_RULES, dicom_port=str(port), destinations=json.dumps(destinations))
    files = write_ct_series(tmp_path / "series", kind="chest", slices=12, size=64)
    assert send(files, "127.0.0.1", node.port, node.ae_title, "CT").sent == 12
    [job] = stack.wait_jobs(lambda rows: bool(rows) and rows[0]["state"] in {"delivered", "failed", "skipped"})
    assert job["state"] == "delivered", job
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    sc = sum(1 for p in job["outputs"] if Path(p).name.startswith("SC-"))
    assert sc >= 1
    assert result_counts(pacs, study_uid) == Counter({SR: 1, SC: sc})
    assert result_counts(viewer, study_uid) == Counter({SEG: 1})
    by_name = {d["destination"]: d for d in job["deliveries"]}
    assert (by_name["pacs"]["instances"], by_name["viewer"]["instances"]) == (1 + sc, 1)


def test_a_destination_profile_is_validated():
    from pydantic import ValidationError

    from node.settings import Settings

    with pytest.raises(ValidationError, match="objects"):
        Settings(destinations=[{"name": "pacs", "kind": "orthanc", "url": "http://x", "objects": []}])
    with pytest.raises(ValidationError, match="twice"):
        Settings(destinations=[{"name": "pacs", "kind": "orthanc", "url": "http://x", "objects": ["SR", "SR"]}])
    with pytest.raises(ValidationError, match="objects"):
        Settings(destinations=[{"name": "pacs", "kind": "orthanc", "url": "http://x", "objects": ["PDF"]}])
