"""HL7 v2 destination: the ORU^R01 built from a lung-quant / chest-triage job on the shared chest CT's header, parsed
with python-hl7 and validated with hl7apy, and sent over MLLP (plain and TLS) to a real listener that answers
AA / AE / AR, drops the connection, hangs, or acknowledges another message."""

from __future__ import annotations

import logging
import time

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from node.dispatch.errors import DeliveryError
from node.dispatch.hl7v2 import control_id, oru_message, send_hl7v2
from node.dispatch.report import build_report
from node.settings import Hl7v2Destination
from tests.conftest import free_port
from tests.mllp_server import MllpServer, validate

TRIAGE = {"value": "408574004", "scheme": "SCT", "meaning": "Imaging result abnormal"}
FINDINGS = {
    "plugin": "lung-quant", "plugin_version": "1.0.0", "weights_sha256": None,
    "summary": "Lungs 5210 mL; LAA-950 7.4 % | emphysema pattern",
    "warnings": ["2 slice positions missing"],
    "triage": [{"value": "408574004", "scheme": "SCT"}],
    "classifications": [
        {"concept": TRIAGE, "probability": 0.91, "threshold": 0.5, "positive": True},
        {"concept": {"value": "87433001", "scheme": "SCT", "meaning": "Pulmonary emphysema"}, "probability": 0.2,
         "threshold": 0.5, "positive": False},
    ],
    "measurements": [
        {"concept": {"value": "118565006", "scheme": "SCT", "meaning": "Volume"}, "value": 2480.25, "unit": "mL",
         "segment": "left lung"},
        {"concept": {"value": "118565006", "scheme": "SCT", "meaning": "Volume"}, "value": 2729.75, "unit": "mL",
         "segment": "right lung"},
        {"concept": {"value": "LAA950", "scheme": "99RADNODE",
                     "meaning": "Percent lung volume below -950 HU (LAA-950)"}, "value": 7.4, "unit": "%",
         "segment": "both lungs"},
        {"concept": {"value": "112181", "scheme": "DCM", "meaning": "Mean Attenuation Coefficient"},
         "value": -861.5, "unit": "[hnsf'U]", "segment": "both lungs"},
    ],
}


@pytest.fixture
def source(ct_dir) -> Dataset:
    """The shared chest CT's header, with the patient data a hospital's study carries."""
    ds = dcmread(sorted(ct_dir.glob("*.dcm"))[0], stop_before_pixels=True)
    ds.PatientName, ds.PatientID, ds.IssuerOfPatientID = "Doe^Jane^Q^Dr^Jr", "PAT-0042", "HOSP"
    ds.PatientBirthDate, ds.PatientSex, ds.AccessionNumber = "19580214", "F", "ACC123"
    return ds


def _sr(source: Dataset) -> Dataset:
    sr = Dataset()
    sr.SOPClassUID, sr.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.34", generate_uid()
    sr.SeriesInstanceUID, sr.StudyInstanceUID = generate_uid(), source.StudyInstanceUID
    sr.ContentDate, sr.ContentTime = "20261203", "101500.123"
    return sr


def _dest(port: int = 2575, **kw) -> Hl7v2Destination:
    return Hl7v2Destination(**({"name": "ris", "kind": "hl7v2", "host": "127.0.0.1", "port": port,
                                "sending_facility": "AI&CT", "receiving_application": "RIS",
                                "receiving_facility": "HOSP"} | kw))


def _parse(text: str):
    import hl7

    assert validate(text) is None, validate(text)
    return hl7.parse(text)


def _f(msg, segment: str, n: int) -> str:
    """Field n of the first `segment`, as sent (escaped)."""
    return str(msg.segment(segment)(n))


def _obx(msg) -> list[dict[str, str]]:
    """The OBX segments as {field number: text} (unescaped)."""
    return [{str(i): msg.unescape(str(s(i))) for i in range(1, 20)} for s in msg.segments("OBX")]


def test_oru_maps_the_job(source):
    sr = _sr(source)
    report = build_report(42, FINDINGS, source, [sr])
    text = oru_message(report, _dest(result_status="F"), "42-ABC")
    assert "\n" not in text and text.endswith("\r") and text.startswith("MSH|^~\\&|RADNODE|AI\\T\\CT|RIS|HOSP|")
    msg = _parse(text)
    assert [str(s(0)) for s in msg][:5] == ["MSH", "PID", "ORC", "OBR", "TQ1"]
    assert "PID_3" in validate(text.replace("PID|1||PAT-0042^^^HOSP|", "PID|1|||"))  # the validator does check
    assert (_f(msg, "MSH", 9), _f(msg, "MSH", 10), _f(msg, "MSH", 11), _f(msg, "MSH", 12),
            _f(msg, "MSH", 18)) == ("ORU^R01^ORU_R01", "42-ABC", "P", "2.5.1", "UNICODE UTF-8")
    assert len(_f(msg, "MSH", 7)) == 19  # YYYYMMDDHHMMSS+0000
    pid = msg.segment("PID")
    assert (str(pid(3)), str(pid(5)), str(pid(7)), str(pid(8))) == ("PAT-0042^^^HOSP", "Doe^Jane^Q^Jr^Dr",
                                                                     "19580214", "F")
    assert _f(msg, "ORC", 1) == "RE" and _f(msg, "ORC", 2) == "ACC123" and _f(msg, "ORC", 3) == "42^RADNODE"
    obr = msg.segment("OBR")
    assert str(obr(3)) == "42^RADNODE" and str(obr(4)) == "lung-quant^AI lung-quant 1.0.0^99RADNODE"
    assert str(obr(7)) == f"{source.StudyDate}{source.StudyTime[:6]}" and str(obr(18)) == "ACC123"
    assert str(obr(25)) == "F" and str(obr(27)) == "^^^^^S" and _f(msg, "TQ1", 9) == "S^Stat^HL70485"

    obx = _obx(msg)
    assert [o["1"] for o in obx] == [str(i) for i in range(1, len(obx) + 1)]
    assert {(o["11"], o["14"], o["18"], o["19"]) for o in obx} == {("F", "20261203101500+0000", "lung-quant^1.0.0",
                                                                     "20261203101500+0000")}
    # classifications: the SR's qualitative evaluation and probability, one group each
    assert [(o["2"], o["3"], o["4"], o["5"], o["6"], o["8"]) for o in obx[:4]] == [
        ("CWE", "408574004^Imaging result abnormal^SCT", "1", "52101004^Present^SCT", "", "AA"),
        ("NM", "122157^Probability^DCM", "1", "0.91", "1^1^UCUM", ""),
        ("CWE", "87433001^Pulmonary emphysema^SCT", "2", "2667000^Absent^SCT", "", "N"),
        ("NM", "122157^Probability^DCM", "2", "0.2", "1^1^UCUM", ""),
    ]
    # measurements: one group per segment, led by its tracking identifier
    assert [(o["2"], o["3"], o["4"], o["5"], o["6"]) for o in obx[4:11]] == [
        ("ST", "112039^Tracking Identifier^DCM", "3", "left lung", ""),
        ("NM", "118565006^Volume^SCT", "3", "2480.25", "mL^mL^UCUM"),
        ("ST", "112039^Tracking Identifier^DCM", "4", "right lung", ""),
        ("NM", "118565006^Volume^SCT", "4", "2729.75", "mL^mL^UCUM"),
        ("ST", "112039^Tracking Identifier^DCM", "5", "both lungs", ""),
        ("NM", "LAA950^Percent lung volume below -950 HU (LAA-950)^99RADNODE", "5", "7.4", "%^%^UCUM"),
        ("NM", "112181^Mean Attenuation Coefficient^DCM", "5", "-861.5", "[hnsf'U]^[hnsf'U]^UCUM"),
    ]
    assert (obx[11]["2"], obx[11]["3"], obx[11]["5"]) == ("TX", "18782-3^Radiology Study observation (narrative)^LN",
                                                          FINDINGS["summary"])
    assert str(msg.segment("NTE")(3)) == "2 slice positions missing"
    # the DICOM references: the study (IHE RAD), then the SR's series, SOP class and instance
    assert [(o["2"], o["3"], o["4"], o["5"]) for o in obx[12:]] == [
        ("ST", "113014^DICOM Study^DCM", "", str(source.StudyInstanceUID)),
        ("ST", "112002^Series Instance UID^DCM", "6", sr.SeriesInstanceUID),
        ("ST", "110181^SOP Class UID^DCM", "6", sr.SOPClassUID),
        ("ST", "SOPINSTANCEUID^SOP Instance UID^99RADNODE", "6", sr.SOPInstanceUID),
    ]
    # a destination that takes no SR reference gets none; the default result status is preliminary
    plain = _parse(oru_message(report, _dest(objects=["SEG"]), "42-ABD"))
    assert len(_obx(plain)) == 13 and _f(plain, "OBR", 25) == "P" and {o["11"] for o in _obx(plain)} == {"P"}


def test_delimiters_and_names_are_escaped(source):
    source.PatientName = "O'Hara|Smith^Ann&Marie~Lou=オハラ^アン"  # a backslash would separate two PN values
    source.PatientID, source.IssuerOfPatientID = "P|1^2", "HOSP&CO"
    findings = FINDINGS | {"summary": "a|b^c&d~e\\f\r\nnext line", "warnings": ["x~y"],
                           "measurements": [FINDINGS["measurements"][0] | {"segment": "lobe ^1|&"}]}
    text = oru_message(build_report(1, findings, source), _dest(sending_application="AI|NODE"), "1-X")
    assert "|O'Hara\\F\\Smith^Ann\\T\\Marie\\R\\Lou|" in text  # family = the alphabetic group's first part
    assert "P\\F\\1\\S\\2^^^HOSP\\T\\CO" in text and "AI\\F\\NODE" in text
    msg = _parse(text)
    assert msg.unescape(str(msg["PID.F5.R1.C1"])) == "O'Hara|Smith"
    assert msg.unescape(str(msg["PID.F5.R1.C2"])) == "Ann&Marie~Lou"
    assert msg.unescape(str(msg["PID.F3.R1.C1"])) == "P|1^2"
    obx = _obx(msg)
    assert "lobe ^1|&" in [o["5"] for o in obx]
    assert [o["5"] for o in obx if o["2"] == "TX"] == ["a|b^c&d~e\\f next line"]
    assert msg.unescape(str(msg.segment("NTE")(3))) == "x~y"


def test_a_source_without_patient_id_is_refused(source):
    with pytest.raises(DeliveryError, match="1-20 characters"):
        oru_message(build_report(3, FINDINGS, source), _dest(), "X" * 21)
    del source.PatientID
    with pytest.raises(DeliveryError, match="no Patient ID") as err:
        oru_message(build_report(3, FINDINGS, source), _dest(), "3-X")
    assert err.value.permanent


def test_flag_first_then_full_result_replaces_it(source):
    dest = _dest(result_status="F")
    flag = _parse(oru_message(build_report(9, FINDINGS, source, [_sr(source)], flag_only=True), dest, "9F-1"))
    full = _parse(oru_message(build_report(9, FINDINGS, source, [_sr(source)]), dest, "9-2"))
    assert _f(flag, "OBR", 25) == "P" and _f(full, "OBR", 25) == "F"  # preliminary flag, then the final result
    assert _f(flag, "OBR", 3) == _f(full, "OBR", 3) == "9^RADNODE"
    assert _f(flag, "OBR", 4) == _f(full, "OBR", 4)
    assert _f(flag, "TQ1", 9) == "S^Stat^HL70485"
    # the flag: only the positive triage finding (and its probability) and the study to flag
    assert [(o["3"], o["8"], o["11"]) for o in _obx(flag)] == [
        ("408574004^Imaging result abnormal^SCT", "AA", "P"), ("122157^Probability^DCM", "", "P"),
        ("113014^DICOM Study^DCM", "", "P")]
    # a report without a positive triage flag is routine, its positive findings "A"
    calm = FINDINGS | {"classifications": [FINDINGS["classifications"][0] | {"positive": False},
                                           FINDINGS["classifications"][1] | {"positive": True}]}
    routine = _parse(oru_message(build_report(10, calm, source), dest, "10-1"))
    assert _f(routine, "TQ1", 9) == "R^Routine^HL70485" and _f(routine, "OBR", 27) == "^^^^^R"
    assert [o["8"] for o in _obx(routine)[:4]] == ["N", "", "A", ""]


def test_control_ids_are_unique_and_short(source):
    report = build_report(123456789, FINDINGS, source)
    ids = {control_id(report) for _ in range(200)}
    assert len(ids) == 200 and all(len(i) <= 20 and i.startswith("123456789-") for i in ids)
    assert control_id(build_report(2**62, FINDINGS, source)).__len__() == 20


def test_accepted_message_reaches_the_listener(source):
    report = build_report(42, FINDINGS, source, [_sr(source)])
    with MllpServer() as ris:
        assert send_hl7v2(report, _dest(ris.port)) == 1
        assert send_hl7v2(report, _dest(ris.port)) == 1
        ris.mode = "CA"
        assert send_hl7v2(report, _dest(ris.port)) == 1
    assert len(ris.messages) == 3 and ris.invalid == []
    ids = [_f(m, "MSH", 10) for m in ris.messages]
    assert len(set(ids)) == 3 and all(len(i) <= 20 for i in ids)
    assert _f(ris.messages[0], "PID", 3) == "PAT-0042^^^HOSP"


@pytest.mark.parametrize(("mode", "permanent", "match"), [
    ("AE", False, "answered AE: test listener answers AE"),
    ("CE", False, "answered CE"),
    ("AR", True, "rejected the message \\(AR\\): test listener answers AR"),
    ("CR", True, "rejected the message \\(CR\\)"),
    ("wrong-id", False, "acknowledged message 'NOT-"),
    ("drop", False, "closed the connection before the ACK"),
])
def test_negative_answers(source, mode, permanent, match):
    with MllpServer(mode) as ris, pytest.raises(DeliveryError, match=match) as err:
        send_hl7v2(build_report(5, FINDINGS, source), _dest(ris.port))
    assert err.value.permanent is permanent
    assert len(ris.messages) == 1 and ris.invalid == []


def test_no_ack_in_time_and_no_listener_are_retried(source):
    report = build_report(6, FINDINGS, source)
    with MllpServer("hang") as ris:
        t0 = time.monotonic()
        with pytest.raises(DeliveryError, match="no ACK within 0.5 s") as err:
            send_hl7v2(report, _dest(ris.port, ack_timeout_seconds=0.5))
        assert 0.4 < time.monotonic() - t0 < 3 and not err.value.permanent
    with pytest.raises(DeliveryError, match="ConnectionRefusedError") as err:
        send_hl7v2(report, _dest(free_port()))
    assert not err.value.permanent


def test_tls_round_trip(source, tmp_path):
    from tests.test_scp import _make_pki

    pki = _make_pki(tmp_path)
    report = build_report(8, FINDINGS, source, [_sr(source)])
    with MllpServer(tls=pki) as ris:
        tls = dict(tls=True, tls_ca=pki["ca"])
        assert send_hl7v2(report, _dest(ris.port, **tls, tls_cert=pki["client"], tls_key=pki["client_key"])) == 1
        assert len(ris.messages) == 1 and ris.invalid == []
        with pytest.raises(DeliveryError) as no_cert:  # the listener asks for a client certificate
            send_hl7v2(report, _dest(ris.port, **tls))
        with pytest.raises(DeliveryError, match="before the ACK") as plain:  # plain MLLP to the TLS port
            send_hl7v2(report, _dest(ris.port))
        with pytest.raises(DeliveryError, match="CERTIFICATE_VERIFY_FAILED"):  # a peer the CA did not sign
            send_hl7v2(report, _dest(ris.port, tls=True, tls_ca=pki["client"]))
    assert not no_cert.value.permanent and not plain.value.permanent and len(ris.messages) == 1


def test_logs_carry_no_patient_data(source, caplog):
    report = build_report(11, FINDINGS, source, [_sr(source)])
    phi = ["PAT-0042", "Doe", "Jane", "19580214", "ACC123"]
    caplog.set_level(logging.DEBUG)
    with MllpServer() as ris:
        send_hl7v2(report, _dest(ris.port))
        ris.mode = "AE"
        with pytest.raises(DeliveryError) as err:
            send_hl7v2(report, _dest(ris.port))
    assert "accepted by HL7 v2 peer" in caplog.text and "job 11" in caplog.text
    assert not [p for p in phi if p in caplog.text or p in str(err.value)]
    assert str(source.StudyInstanceUID) not in caplog.text
