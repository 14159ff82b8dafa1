"""Dispatch step, HL7 v2: a job's result as an HL7 v2.5.1 ORU^R01 over MLLP (optionally TLS) to a RIS.

Mapping (one ORDER_OBSERVATION per job; codes are the SR's own):
- PID-3 Patient ID with the Issuer of Patient ID as assigning authority, PID-5 the DICOM PN as XPN, PID-7, PID-8:
  only what the source carries.
- ORC-2/OBR-2 placer order number and OBR-18 the accession number; ORC-3/OBR-3 filler order number
  `<job id>^<sending application>`: the flag-only message and the full result share it, so the full one replaces
  the flag (the SR does not exist yet when the flag goes out, and a 64-character UID does not fit EI's 22).
- OBR-4 the plugin (`99RADNODE`), OBR-7 the study date/time (else the result time), OBR-25 and every OBX-11 the
  destination's result status, P for a flag-only message. The full message after a flag sends P or F, never C:
  C corrects a final result, and the flag was preliminary.
- Priority in TQ1-9 (`S^Stat^HL70485` for a positive triage flag, else R): TQ1 is v2.5.1's place for it; OBR-27
  (retained for backward compatibility only) mirrors it in component 6 for receivers built for v2.3/2.4.
- A classification is an OBX group (OBX-4 sub-ID) as the SR's TID 1500 group: CWE OBX-3 = the finding concept,
  OBX-5 = Present/Absent (SCT), OBX-8 A / N / AA (positive triage flag); an NM OBX Probability (DCM 122157, UCUM 1).
- Measurements: one group per segment, led by an ST Tracking Identifier (DCM 112039) = the segment label, then an
  NM OBX per measurement with its concept and OBX-6 `unit^unit^UCUM`.
- A TX OBX with the summary (LN 18782-3), warnings as NTE.
- DICOM references as IHE RAD does (RAD TF-2 Table 4.7-7, RAD-128): ST `113014^DICOM Study^DCM` = Study Instance
  UID; per referenced object (dest.objects) a group of ST OBX: Series Instance UID (DCM 112002), SOP Class UID
  (DCM 110181) and SOP Instance UID (99RADNODE SOPINSTANCEUID: DICOM has no concept for it). RP would be
  the HL7 type for a pointer, but its pointer component (ST 15) cannot hold a UID.
- Every OBX: OBX-14 and OBX-19 the result time, OBX-18 `plugin^version`.
- A flag-only message (sent ahead of the results): OBR-25 P, the positive triage groups and the study UID only.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import ssl
import threading
import time
from datetime import UTC, datetime
from decimal import Decimal

from node.dispatch.errors import DeliveryError
from node.dispatch.net import tls_context
from node.dispatch.report import Concept, JobReport
from node.logs import uid_hash
from node.results import sr
from node.settings import Hl7v2Destination

log = logging.getLogger("radnode.dispatch")

START, END = b"\x0b", b"\x1c\x0d"
STUDY = "113014^DICOM Study^DCM"
SERIES = "112002^Series Instance UID^DCM"
SOP_CLASS = "110181^SOP Class UID^DCM"
SOP_INSTANCE = "SOPINSTANCEUID^SOP Instance UID^99RADNODE"
TRACKING = "112039^Tracking Identifier^DCM"
# the SR's own codes for a classification (node.results.sr)
PRESENT, ABSENT, PROBABILITY = (Concept(c.value, c.scheme_designator, c.meaning)
                                for c in (sr.PRESENT, sr.ABSENT, sr.PROBABILITY))
SUMMARY = "18782-3^Radiology Study observation (narrative)^LN"
_lock, _last_us = threading.Lock(), 0
_ESCAPES = str.maketrans({"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"})


def esc(value: object) -> str:
    """`value` as text for one HL7 component: delimiters escaped, control characters (line breaks) as spaces."""
    return re.sub(r"[\x00-\x1f\x7f]+", " ", str(value)).translate(_ESCAPES)


def _ce(c: Concept) -> str:
    return f"{esc(c.value)}^{esc(c.meaning)}^{esc(c.scheme)}"


def _nm(value: float) -> str:
    if not math.isfinite(value):
        raise DeliveryError(f"a non-finite value ({value}) cannot be sent as HL7 NM", permanent=True)
    return format(Decimal(repr(float(value))), "f")


def _ts(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def _xpn(pn: str) -> str:
    """DICOM PN (Family^Given^Middle^Prefix^Suffix, alphabetic group) -> XPN (Family^Given^Middle^Suffix^Prefix)."""
    family, given, middle, prefix, suffix = (pn.split("=")[0].split("^") + [""] * 5)[:5]
    return "^".join(esc(p.strip()) for p in (family, given, middle, suffix, prefix)).rstrip("^")


def _seg(*fields: str) -> str:
    return "|".join(fields).rstrip("|")


def oru_message(report: JobReport, dest: Hl7v2Destination, control_id: str) -> str:
    """The ORU^R01 (HL7 v2.5.1, ER7, segments ended by CR) of `report` for `dest`, with MSH-10 `control_id`.

    Raises DeliveryError (permanent) when the source carries no Patient ID, a value is not finite, or the
    control id is empty or longer than 20 characters.
    """
    if not report.patient_id:
        raise DeliveryError(f"job {report.job_id}: the source carries no Patient ID, which PID-3 needs",
                            permanent=True)
    if not 0 < len(control_id) <= 20:
        raise DeliveryError(f"MSH-10 control id must have 1-20 characters, not {len(control_id)}", permanent=True)
    status = "P" if report.flag_only else dest.result_status
    now, observed = _ts(datetime.now(UTC)), _ts(report.observed_at)
    date, hms = report.study_date, re.sub(r"\D", "", report.study_time.split(".")[0])[:6]
    study_time = date + hms if re.fullmatch(r"\d{8}", date) else observed
    issuer = f"^^^{esc(report.issuer_of_patient_id)}" if report.issuer_of_patient_id else ""
    birth = report.patient_birth_date if re.fullmatch(r"\d{8}", report.patient_birth_date) else ""
    sex = report.patient_sex if report.patient_sex in ("M", "F", "O") else ""
    accession = esc(report.accession_number)
    filler = f"{report.job_id}^{esc(dest.sending_application)}"
    priority = "S" if report.flagged else "R"
    segments = [
        _seg("MSH", "^~\\&", esc(dest.sending_application), esc(dest.sending_facility),
             esc(dest.receiving_application), esc(dest.receiving_facility), now, "", "ORU^R01^ORU_R01", control_id,
             "P", "2.5.1", "", "", "", "", "", "UNICODE UTF-8"),
        _seg("PID", "1", "", f"{esc(report.patient_id)}{issuer}", "", _xpn(report.patient_name), "", birth, sex),
        _seg("ORC", "RE", accession, filler),
        _seg("OBR", "1", accession, filler, f"{esc(report.plugin)}^AI {esc(report.plugin)} "
             f"{esc(report.plugin_version)}^99RADNODE", "", "", study_time, *[""] * 10, accession, "", "", "",
             now, "", "RAD", status, "", f"^^^^^{priority}"),
        _seg("TQ1", "1", *[""] * 7, f"{priority}^{'Stat' if priority == 'S' else 'Routine'}^HL70485"),
    ]
    equipment = f"{esc(report.plugin)}^{esc(report.plugin_version)}"
    tail = ["", "", status, "", "", observed, "", "", "", equipment, observed]  # OBX-9 .. OBX-19

    def obx(kind: str, ident: str, sub: str, value: str, units: str = "", flag: str = "") -> None:
        segments.append(_seg("OBX", str(sum(s.startswith("OBX") for s in segments) + 1), kind, ident, sub, value,
                             units, "", flag, *tail))

    groups = 0
    for c in report.flags if report.flag_only else report.classifications:
        groups += 1
        flag = "" if c.positive is None else ("AA" if c.positive and c.triage else "A" if c.positive else "N")
        obx("CWE", _ce(c.concept), str(groups), _ce(PRESENT if c.positive else ABSENT), flag=flag)  # as the SR has it
        obx("NM", _ce(PROBABILITY), str(groups), _nm(c.probability), "1^1^UCUM")
    if not report.flag_only:
        for segment in dict.fromkeys(m.segment for m in report.measurements):
            groups += 1
            if segment is not None:
                obx("ST", TRACKING, str(groups), esc(segment))
            for m in (m for m in report.measurements if m.segment == segment):
                obx("NM", _ce(m.concept), str(groups), _nm(m.value), f"{esc(m.unit)}^{esc(m.unit)}^UCUM")
        if report.summary or report.warnings:
            obx("TX", SUMMARY, "", esc(report.summary))
            segments += [_seg("NTE", str(i), "L", esc(w)) for i, w in enumerate(report.warnings, 1)]
    if report.study_uid:
        obx("ST", STUDY, "", esc(report.study_uid))
    for o in (o for o in report.objects if o.kind in dest.objects and not report.flag_only):
        groups += 1
        for ident, uid in ((SERIES, o.series_uid), (SOP_CLASS, o.sop_class_uid), (SOP_INSTANCE, o.sop_instance_uid)):
            obx("ST", ident, str(groups), esc(uid))
    return "\r".join(segments) + "\r"


def control_id(report: JobReport) -> str:
    """A message control id unique per attempt: the job id and the time in microseconds (base 36, strictly
    increasing in this process), at most 20 characters."""
    global _last_us
    with _lock:
        _last_us = n = max(time.time_ns() // 1000, _last_us + 1)
    digits = ""
    while n:
        n, r = divmod(n, 36)
        digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"[r] + digits
    return f"{report.job_id}{'F' if report.flag_only else '-'}{digits}"[-20:]


def _ack(frame: bytes) -> tuple[str, str, str]:
    """(MSA-1 code, MSA-2 control id, the peer's error text) of an ACK; raises DeliveryError without an MSA."""
    segments = [s.split("|") for s in re.split(r"[\r\n]+", frame.decode("utf-8", "replace")) if s]
    msa = next((s for s in segments if s[0] == "MSA"), None)
    if msa is None or len(msa) < 3:
        raise DeliveryError("the peer answered without an MSA segment")
    err = [f for s in segments if s[0] == "ERR" for f in (s[8:9] + s[3:4]) if f]  # ERR-8 user message, ERR-3 code
    text = "; ".join(t for t in [msa[3] if len(msa) > 3 else "", *err] if t)
    return msa[1].strip(), msa[2].strip(), re.sub(r"\\[A-Z]\\|[\^&~]", " ", text)[:300]


def send_hl7v2(report: JobReport, dest: Hl7v2Destination) -> int:
    """Send `report` as one ORU^R01 over MLLP and wait for the ACK. Returns 1 when accepted (AA or CA).

    Raises DeliveryError: permanent for a report that cannot be sent and for AR/CR; retryable for AE/CE, an ACK
    for another control id, a refused, reset or dropped connection, a TLS failure, or no ACK within
    dest.ack_timeout_seconds.
    """
    cid = control_id(report)
    message = oru_message(report, dest, cid).encode("utf-8")
    where = f"HL7 v2 peer {dest.host}:{dest.port}"
    deadline = time.monotonic() + dest.ack_timeout_seconds
    try:
        with socket.create_connection((dest.host, dest.port), timeout=dest.ack_timeout_seconds) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = tls_context(dest.tls_ca, dest.tls_cert, dest.tls_key) if dest.tls else None
            with tls.wrap_socket(raw, server_hostname=dest.host) if tls is not None else raw as sock:
                sock.sendall(START + message + END)
                frame = b""
                while END not in frame:
                    sock.settimeout(max(deadline - time.monotonic(), 0.001))
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise DeliveryError(f"{where} closed the connection before the ACK")
                    frame += chunk
    except TimeoutError:
        raise DeliveryError(f"{where}: no ACK within {dest.ack_timeout_seconds:g} s") from None
    except (OSError, ssl.SSLError) as exc:
        raise DeliveryError(f"{where}: {type(exc).__name__}: {exc}") from None
    code, acked, text = _ack(frame[frame.find(START) + 1:frame.find(END)])
    text = report.redact(text)  # a RIS may quote the patient in its error text
    if acked != cid:
        raise DeliveryError(f"{where} acknowledged message {acked!r}, not {cid!r}")
    if code in ("AR", "CR"):
        raise DeliveryError(f"{where} rejected the message ({code}): {text}", permanent=True)
    if code not in ("AA", "CA"):
        raise DeliveryError(f"{where} answered {code or 'no code'}: {text}")
    log.info("hl7v2: job %s: ORU %s (%s, study %s) accepted by %s", report.job_id, cid,
             "flag" if report.flag_only else "result", uid_hash(report.study_uid), where)
    return 1
