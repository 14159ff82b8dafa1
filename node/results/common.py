"""Encode step, shared: our provenance on every output object and deterministic output UIDs."""

from __future__ import annotations

import copy
import hashlib
import zlib
from dataclasses import dataclass

import highdicom as hd
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

from node import __version__
from plugins.base import Code, Manifest

KINDS = ("SR", "SEG", "SC")
_PIXEL_KEYWORDS = frozenset({"PixelData", "FloatPixelData", "DoubleFloatPixelData"})
# Type 2 attributes of the Patient and General Study modules that highdicom copies from a source.
TYPE2_PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)  # fmt: skip
# Optional (Type 3) patient attributes that real archives sometimes hold in an invalid form.
TYPE3_PATIENT = ("PatientAge", "PatientSize", "PatientWeight", "PatientBirthTime", "EthnicGroup")


def warm_up() -> None:
    """Load highdicom's tables of the standard (about 0.3 s) in a worker before its first job needs them.

    These loaders are highdicom internals: if they move, the first encode simply pays the cost itself."""
    try:
        from highdicom import _standard_utils as standard

        standard.get_sop_class_iod_map()
        standard.get_iod_module_map()
        standard.get_module_attribute_map()
    except (ImportError, AttributeError):
        pass


def coded(code: Code) -> hd.sr.CodedConcept:
    """A plugin's Code as highdicom's CodedConcept."""
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def source_header(source: Dataset, sequences: bool = True) -> Dataset:
    """A copy of a source's header (no pixel data) that highdicom can copy the patient/study module
    from: absent Type 2 attributes added empty (unknown), Type 3 patient values invalid for their VR
    (an Age String "81" where "081Y" is meant) left out. The caller's dataset is never changed.
    `sequences` False leaves out every sequence (single-frame sources other than the first, whose
    sequences no encoder reads)."""
    header = Dataset()
    for element in source:
        if element.keyword not in _PIXEL_KEYWORDS and (sequences or element.VR != "SQ"):
            # sequences are edited by the encoders (referenced SOP classes): deep copies; other values are
            # only read, and a shallow copy is 20x cheaper on a 500-slice series
            header.add(copy.deepcopy(element) if element.VR == "SQ" else copy.copy(element))
    header.file_meta = getattr(source, "file_meta", Dataset())
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in header:
            setattr(header, keyword, None)
    for keyword in TYPE3_PATIENT:
        if keyword in header:
            try:
                validate_value(header[keyword].VR, header[keyword].value, config.RAISE)
            except ValueError:
                del header[keyword]
    return header


def drop_incomplete_references(ds: Dataset) -> None:
    """Drop items of the (Type 3) study/patient references highdicom copied from a source that lack a
    Type 1 UID (seen in real archives: a Referenced Study Sequence without a SOP Class): dciodvfy errors."""
    for keyword in ("ReferencedStudySequence", "ReferencedPatientSequence"):
        if keyword not in ds:
            continue
        items = [
            it for it in ds[keyword].value if it.get("ReferencedSOPClassUID") and it.get("ReferencedSOPInstanceUID")
        ]
        if items:
            setattr(ds, keyword, items)
        else:
            del ds[keyword]


def declare_private_schemes(ds: Dataset) -> None:
    """Add a Coding Scheme Identification item for every private coding scheme (designator "99...")
    the object's codes use, so a reader can tell where a code such as 99RADNODE LAA950 comes from."""
    found: set[str] = set()
    stack = [ds]
    while stack:
        current = stack.pop()
        for element in current:
            if element.VR == "SQ":
                stack.extend(element.value)
            elif element.keyword == "CodingSchemeDesignator" and str(element.value).startswith("99"):
                found.add(str(element.value))
    if not found:
        return
    items = list(ds.get("CodingSchemeIdentificationSequence", []))
    known = {str(it.get("CodingSchemeDesignator")) for it in items}
    for designator in sorted(found - known):
        item = Dataset()
        item.CodingSchemeDesignator = designator
        item.CodingSchemeName = f"{designator} private codes of the radnode AI node and its plugins"
        item.CodingSchemeResponsibleOrganization = "radnode project"
        items.append(item)
    ds.CodingSchemeIdentificationSequence = items


def derive_uid(source_series_uid: str, plugin: str, plugin_version: str, kind: str, index: int | str) -> str:
    """A UID fixed by (source series, plugin, version, object kind, index): a re-run reproduces it.

    Form 2.25.<128-bit integer> (ITU-T X.667 / DICOM PS3.5 B.2), from SHA-256 of the inputs.
    """
    key = "\x1f".join([source_series_uid, plugin, plugin_version, kind, str(index)]).encode()
    return "2.25." + str(int.from_bytes(hashlib.sha256(key).digest()[:16], "big"))


def series_number(plugin: str, kind: str) -> int:
    """A stable SeriesNumber per (plugin, kind) in 9000-9999, never random."""
    return 9000 + (zlib.crc32(plugin.encode()) % 300) * 3 + KINDS.index(kind)


@dataclass(frozen=True)
class Provenance:
    """Who made an output object: radnode (settings) + the plugin (manifest)."""

    manifest: Manifest
    manufacturer: str = "radnode"
    model_name: str = "radnode AI node"
    device_serial_number: str = "RADNODE"
    institution_name: str | None = None

    @property
    def software_versions(self) -> str:
        return f"radnode {__version__}; {self.manifest.name} {self.manifest.version}"

    def series_description(self, kind: str) -> str:
        """SeriesDescription of an output series: says it is AI-generated and by which model (<= 64 chars)."""
        return f"AI-generated {kind} - {self.manifest.name} {self.manifest.version}"[:64]

    def uid(self, source_series_uid: str, kind: str, index: int | str) -> str:
        return derive_uid(source_series_uid, self.manifest.name, self.manifest.version, kind, index)
