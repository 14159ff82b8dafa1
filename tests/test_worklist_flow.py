"""Issue 17 end to end on the shared chest CT: an AIW-I orchestrator puts a lung-quant task on radnode's own UPS
worklist (plain UPS-RS over HTTP); radnode's performer claims it, fetches the CT from the PACS (a real Orthanc),
runs lung-quant, sends the SR/SEG/SC to the PACS, a FHIR Bundle to the EHR and an ORU^R01 to the RIS, and completes
the workitem with the result objects. With RADNODE_TEST_ARTIFACTS=<folder> the Bundle, the ORU and the final
workitem are written there."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import pydicom
import pytest

from tests.conftest import free_port
from tests.fhir_server import FhirServer
from tests.mllp_server import MllpServer
from tests.orthanc import AE as ORTHANC_AE
from tests.orthanc import Orthanc
from tests.test_pipeline import embedded_stack
from tests.test_ups_performer import Worklist, workitem

pytestmark = pytest.mark.slow


def test_a_lung_quant_workitem_on_the_shared_ct_reaches_pacs_ehr_and_ris(ct_dir: Path, tmp_path: Path):
    files = sorted(ct_dir.glob("*.dcm"))
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study_uid, series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    dicom_port, http_port = free_port(), free_port()
    token = "rn_test_aiw_" + uuid.uuid4().hex
    tokens = json.dumps([{"name": "orchestrator", "sha256": hashlib.sha256(token.encode()).hexdigest()}])
    orthanc = Orthanc(tmp_path / "orthanc", dicom_port).start()
    try:
        with FhirServer() as ehr, MllpServer() as ris, embedded_stack(tmp_path) as stack:
            orthanc.upload(files)
            dest = [{"name": "pacs", "kind": "dicom", "ae_title": ORTHANC_AE, "host": "127.0.0.1",
                     "port": orthanc.dicom_port},
                    {"name": "ehr", "kind": "fhir", "url": ehr.url},
                    {"name": "ris", "kind": "hl7v2", "host": "127.0.0.1", "port": ris.port,
                     "receiving_application": "RIS"}]
            url = f"http://127.0.0.1:{http_port}/dicomweb"
            worklist_settings = {"url": url, "token": token, "poll_seconds": 0.5, "retrieve_from": "pacs"}
            stack.start("rules: []\n", dicom_port=str(dicom_port), http_port=str(http_port), api_tokens=tokens,
                        destinations=json.dumps(dest), ups_worklist=json.dumps(worklist_settings))
            worklist = Worklist(url, token)
            uid = worklist.create(workitem("lung-quant", study_uid, series_uid, ae=ORTHANC_AE,
                                           sops=[pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
                                                 for f in files]))
            done = worklist.wait(uid, {"COMPLETED", "CANCELED"}, timeout=300)
            assert done.ProcedureStepState == "COMPLETED", done
            [pps] = done.UnifiedProcedureStepPerformedProcedureSequence
            outputs = {r.ReferencedSOPInstanceUID for o in pps.OutputInformationSequence
                       for r in o.ReferencedSOPSequence}
            in_pacs = {i["SOPInstanceUID"] for i in orthanc.study_instances(study_uid)}
            assert len(outputs) >= 3 and outputs <= in_pacs  # SR, SEG, SC: in the PACS, in the source study

            [job] = stack.jobs()
            assert (job["plugin"], job["state"]) == ("lung-quant", "delivered")
            sr_uid = next(o["sop_instance_uid"] for o in job["objects"] if o["kind"] == "SR")
            [report] = ehr.resources("DiagnosticReport")
            assert {"system": "urn:dicom:uid", "value": f"urn:oid:{sr_uid}"} in report["identifier"]
            observations = ehr.resources("Observation")
            volumes = [o for o in observations if o["code"]["coding"][0]["code"] == "118565006"]
            assert volumes and all(o["valueQuantity"]["system"] == "http://unitsofmeasure.org" for o in volumes)
            assert len(ehr.resources("Patient")) == 1 and not ris.invalid
            [oru] = ris.messages
            assert str(oru.segment("MSH")[9]) == "ORU^R01^ORU_R01" and str(oru.segment("PID")[3]).startswith(
                str(first.PatientID))
            assert sr_uid in str(oru)
            artifacts = os.environ.get("RADNODE_TEST_ARTIFACTS")
            if artifacts:
                folder = Path(artifacts)
                folder.mkdir(parents=True, exist_ok=True)
                bundle = next(r.body for r in ehr.requests if r.method == "POST" and isinstance(r.body, dict))
                (folder / "bundle.json").write_text(json.dumps(bundle, indent=2))
                (folder / "oru.hl7").write_text(ris.raw[0].replace("\r", "\n"))
                (folder / "workitem.json").write_text(json.dumps(done.to_json_dict(), indent=2))
    finally:
        orthanc.stop()
