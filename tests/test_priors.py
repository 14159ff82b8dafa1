"""Priors against a real Orthanc: find_priors by C-FIND and QIDO-RS, fetch_prior by C-GET and WADO-RS, and the
errors of a source that refuses, rejects, stays silent or answers HTTP errors."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ComputedRadiographyImageStorage, SecondaryCaptureImageStorage

from node.pipeline.priors import PriorError, PriorStudy, fetch_prior, find_priors
from node.settings import DicomDestination, DicomwebDestination, OrthancDestination
from tests.conftest import free_port
from tests.orthanc import AE as ORTHANC_AE
from tests.orthanc import Orthanc
from tests.synthetic import write_ct_series

pytestmark = pytest.mark.timeout(120)

BEFORE = date(2026, 6, 1)
PATIENT, OTHER_PATIENT = "PRIOR-TEST-0001", "PRIOR-TEST-0002"
DESCRIPTION = "CT CHEST WITHOUT CONTRAST"


@dataclass
class Pacs:
    orthanc: Orthanc
    studies: dict[str, str]  # name -> Study Instance UID
    files: dict[str, list[Path]]  # name -> files uploaded

    @property
    def dicom(self) -> DicomDestination:
        return DicomDestination(name="pacs", kind="dicom", ae_title=ORTHANC_AE, host="127.0.0.1",
                                port=self.orthanc.dicom_port)

    @property
    def dicomweb(self) -> DicomwebDestination:
        return DicomwebDestination(name="pacs-web", kind="dicomweb", url=self.orthanc.dicomweb_url)

    def source(self, kind: str) -> DicomDestination | DicomwebDestination:
        return self.dicom if kind == "dicom" else self.dicomweb


def _retag(files: list[Path], patient_id: str, study_date: date, modality: str | None = None,
           sop_class: str | None = None) -> list[Path]:
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientID, ds.StudyDate = patient_id, f"{study_date:%Y%m%d}"
        if modality is not None:
            ds.Modality = modality
        if sop_class is not None:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.save_as(f)
    return files


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    """One Orthanc holding: the current CT study, a CT prior 200 days before (with an OT series beside its CT
    series), an older CT 900 days before, a CR study of the same patient, another patient's CT, and a CT
    after the current one."""
    root = tmp_path_factory.mktemp("priors")
    plan = {  # name: (patient, days before BEFORE, modality)
        "current": (PATIENT, 0, "CT"), "prior": (PATIENT, 200, "CT"), "older": (PATIENT, 900, "CT"),
        "cr": (PATIENT, 50, "CR"), "other-patient": (OTHER_PATIENT, 100, "CT"), "later": (PATIENT, -30, "CT"),
    }
    files: dict[str, list[Path]] = {}
    for name, (patient, days, modality) in plan.items():
        when = BEFORE - timedelta(days=days)
        if modality == "CR":
            files[name] = _retag(write_ct_series(root / name, slices=1, size=32), patient, when, "CR",
                                 ComputedRadiographyImageStorage)
        else:
            files[name] = _retag(write_ct_series(root / name, slices=4, size=32, study_description=DESCRIPTION),
                                 patient, when)
    study = str(pydicom.dcmread(files["prior"][0]).StudyInstanceUID)
    files["prior-ot"] = _retag(write_ct_series(root / "prior-ot", slices=1, size=32, study_uid=study,
                                               series_number=3), PATIENT, BEFORE - timedelta(days=200), "OT",
                               SecondaryCaptureImageStorage)
    orthanc = Orthanc(root / "orthanc", free_port()).start()
    try:
        studies = {}
        for name, fs in files.items():
            orthanc.upload(fs)
            studies[name] = str(pydicom.dcmread(fs[0], stop_before_pixels=True).StudyInstanceUID)
        yield Pacs(orthanc, studies, files)
    finally:
        orthanc.stop()


def _find(source, within_days: int = 365, modality: str = "CT", max_studies: int = 5, **kwargs) -> list[PriorStudy]:
    args = {"patient_id": PATIENT, "modality": modality, "before": BEFORE, "within_days": within_days,
            "exclude_study_uid": "9.9.9", "max_studies": max_studies} | kwargs
    return find_priors(source, **args)


@pytest.mark.parametrize("kind", ["dicom", "dicomweb"])
def test_find_priors_returns_the_patients_studies_of_the_modality_in_the_window(pacs: Pacs, kind: str, caplog):
    source = pacs.source(kind)
    caplog.set_level(logging.DEBUG, logger="radnode")
    prior = PriorStudy(pacs.studies["prior"], BEFORE - timedelta(days=200), ("CT", "OT"), DESCRIPTION)
    older = PriorStudy(pacs.studies["older"], BEFORE - timedelta(days=900), ("CT",), DESCRIPTION)
    current = PriorStudy(pacs.studies["current"], BEFORE, ("CT",), DESCRIPTION)

    # not the older one, another patient's, the CR study, the later one nor the current one
    assert _find(source, exclude_study_uid=pacs.studies["current"]) == [prior]
    assert _find(source) == [current, prior]  # the same day counts; newest first
    assert _find(source, within_days=1000, exclude_study_uid=current.study_uid) == [prior, older]
    assert _find(source, within_days=1000, exclude_study_uid=current.study_uid, max_studies=1) == [prior]
    assert _find(source, within_days=199, exclude_study_uid=current.study_uid) == []
    [cr] = _find(source, modality="CR")
    assert (cr.study_uid, cr.modalities) == (pacs.studies["cr"], ("CR",))
    assert _find(source, modality="MR") == []
    assert _find(source, patient_id="NOBODY") == []
    radnode_lines = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("radnode"))
    assert "priors: 1 matching CT stud(ies) on" in radnode_lines
    assert PATIENT not in radnode_lines and pacs.studies["prior"] not in radnode_lines


def _contents(path: Path) -> pydicom.Dataset:
    """The dataset without its file meta (Orthanc may send another transfer syntax)."""
    return pydicom.dcmread(path)


@pytest.mark.parametrize("kind", ["dicom", "dicomweb"])
def test_fetch_prior_writes_the_series_of_the_modality(pacs: Pacs, kind: str, tmp_path: Path):
    source = pacs.source(kind)
    [prior] = _find(source, exclude_study_uid=pacs.studies["current"])
    started = time.monotonic()
    paths = fetch_prior(source, prior, "CT", tmp_path)
    elapsed = time.monotonic() - started
    originals = {str(pydicom.dcmread(f).SOPInstanceUID): f for f in pacs.files["prior"]}  # the OT series stays out
    series_uid = str(pydicom.dcmread(pacs.files["prior"][0]).SeriesInstanceUID)
    assert paths == sorted(tmp_path / prior.study_uid / series_uid / f"{sop}.dcm" for sop in originals)
    for path in paths:
        got, original = _contents(path), _contents(originals[path.stem])
        assert got.SOPInstanceUID == path.stem
        assert got.PixelData == original.PixelData
        assert got == original, kind  # every element of the dataset, whatever the transfer syntax
    assert not list(tmp_path.rglob("*.part")), "temporary files left behind"
    assert elapsed < 20, elapsed

    again = fetch_prior(source, prior, "CT", tmp_path)  # a second fetch replaces the cached files
    assert again == paths
    assert fetch_prior(source, prior, "MR", tmp_path / "mr") == []  # no series of the modality
    cr = PriorStudy(pacs.studies["cr"], None, ("CR",), None)
    assert fetch_prior(source, cr, "CT", tmp_path / "cr") == []
    # the prior was fetched outside Orthanc's own records: still exactly the studies uploaded
    assert len(pacs.orthanc.get("/studies")) == len(set(pacs.studies.values()))


@pytest.mark.parametrize(("change", "message"), [
    ({"patient_id": ""}, "patient_id must be"),
    ({"patient_id": "PRIOR*"}, "patient_id must be"),
    ({"modality": "ct"}, "not a DICOM modality"),
    ({"modality": ""}, "not a DICOM modality"),
    ({"within_days": -1}, "within_days must be"),
    ({"max_studies": 0}, "max_studies must be"),
])
def test_find_priors_refuses_bad_arguments(change: dict, message: str):
    source = DicomDestination(name="pacs", kind="dicom", ae_title="PACS", host="127.0.0.1", port=free_port())
    with pytest.raises(ValueError, match=message):
        _find(source, **change)


def test_fetch_prior_refuses_a_bad_uid_or_modality(tmp_path: Path):
    source = DicomDestination(name="pacs", kind="dicom", ae_title="PACS", host="127.0.0.1", port=free_port())
    with pytest.raises(ValueError, match="not a DICOM UID"):
        fetch_prior(source, PriorStudy("../../etc", None, (), None), "CT", tmp_path)
    with pytest.raises(ValueError, match="not a DICOM modality"):
        fetch_prior(source, PriorStudy("1.2.3", None, (), None), "C T\\", tmp_path)


def _quick_error(call, *messages: str) -> str:
    started = time.monotonic()
    with pytest.raises(PriorError) as caught:
        call()
    assert time.monotonic() - started < 5
    text = str(caught.value)
    for message in messages:
        assert message in text, text
    assert PATIENT not in text
    return text


def test_a_dicom_source_that_refuses_rejects_or_stays_silent_raises_prior_error(tmp_path: Path):
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    closed = DicomDestination(name="pacs", kind="dicom", ae_title="PACS", host="127.0.0.1", port=free_port())
    _quick_error(lambda: _find(closed, timeout=2), "'pacs' (PACS@127.0.0.1:", "connection refused")
    _quick_error(lambda: fetch_prior(closed, PriorStudy("1.2.3", None, (), None), "CT", tmp_path, timeout=2),
                 "connection refused")

    ae = AE(ae_title="PACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.require_calling_aet = ["SOMEONE-ELSE"]
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        rejecting = closed.model_copy(update={"port": port})
        _quick_error(lambda: _find(rejecting, timeout=2), "association rejected")
    finally:
        server.shutdown()

    def failing_find(event):
        yield 0xA700, None

    ae = AE(ae_title="PACS")  # answers C-FIND with a failure status and offers no C-GET
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, failing_find)])
    try:
        failing = closed.model_copy(update={"port": port})
        _quick_error(lambda: _find(failing, timeout=2), "C-FIND at STUDY level refused: status 0xA700")
        _quick_error(lambda: fetch_prior(failing, PriorStudy("1.2.3", None, (), None), "CT", tmp_path, timeout=2),
                     "the PACS does not support Study Root Query/Retrieve Information Model - GET")
    finally:
        server.shutdown()

    no_ca = closed.model_copy(update={"tls": True, "tls_ca": tmp_path / "missing-ca.pem"})
    _quick_error(lambda: _find(no_ca, timeout=2), "TLS set-up failed: FileNotFoundError")

    with socket.socket() as silent:  # accepts the connection (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        quiet = closed.model_copy(update={"port": silent.getsockname()[1]})
        _quick_error(lambda: _find(quiet, timeout=1), "'pacs'", "timed out")


def test_orthanc_refuses_an_unknown_calling_ae(pacs: Pacs, tmp_path: Path):
    stranger = pacs.dicom.model_copy(update={"calling_ae": "STRANGER"})
    _quick_error(lambda: _find(stranger, timeout=5), "'pacs'", "C-FIND at STUDY level",
                 "aborted or timed out", "'STRANGER'")
    prior = PriorStudy(pacs.studies["prior"], None, (), None)
    _quick_error(lambda: fetch_prior(stranger, prior, "CT", tmp_path, timeout=5), "C-FIND at SERIES level",
                 "aborted or timed out")


def test_a_dicomweb_source_that_fails_raises_prior_error(pacs: Pacs, tmp_path: Path):
    down = DicomwebDestination(name="web", kind="dicomweb", url=f"http://127.0.0.1:{free_port()}/dicom-web")
    _quick_error(lambda: _find(down, timeout=2), "'web' (http://127.0.0.1:", "ConnectionError")
    wrong = DicomwebDestination(name="web", kind="dicomweb", url=f"{pacs.orthanc.url}/no-such-root")
    _quick_error(lambda: _find(wrong), "QIDO-RS study search: HTTP 404")
    prior = PriorStudy(pacs.studies["prior"], None, (), None)
    _quick_error(lambda: fetch_prior(wrong, prior, "CT", tmp_path), "QIDO-RS series search: HTTP 404")


def test_only_dicom_and_dicomweb_sources(tmp_path: Path):
    orthanc = OrthancDestination(name="rest", kind="orthanc", url="http://127.0.0.1:1")
    _quick_error(lambda: _find(orthanc), "'dicom' or 'dicomweb' destination only")
    _quick_error(lambda: fetch_prior(orthanc, PriorStudy("1.2.3", None, (), None), "CT", tmp_path),
                 "destination only")
