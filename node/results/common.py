"""Encode step, shared: our provenance on every output object and deterministic output UIDs."""

from __future__ import annotations

import copy
import hashlib
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import highdicom as hd
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import validate_value

from node import __version__
from plugins.base import Code, Image, Manifest

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


# Lossy Image Compression Method (0028,2114) Defined Terms for the lossy transfer syntaxes a source may arrive in.
_LOSSY_METHODS = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG Extended
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",  # JPEG 2000
    "1.2.840.10008.1.2.4.93": "ISO_15444_15",  # HTJ2K
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",  # HTJ2K
    "1.2.840.10008.1.2.4.100": "ISO_13818_2",  # MPEG2
    "1.2.840.10008.1.2.4.101": "ISO_13818_2",
    "1.2.840.10008.1.2.4.102": "ISO_14496_10",  # H.264
    "1.2.840.10008.1.2.4.103": "ISO_14496_10",
    "1.2.840.10008.1.2.4.104": "ISO_14496_10",
    "1.2.840.10008.1.2.4.105": "ISO_14496_10",
    "1.2.840.10008.1.2.4.106": "ISO_14496_10",
    "1.2.840.10008.1.2.4.107": "ISO_23008_2",  # HEVC
    "1.2.840.10008.1.2.4.108": "ISO_23008_2",
}


def complete_lossy_compression(ds: Dataset, sources: list[Dataset]) -> None:
    """Lossy Image Compression of a derived object: "01" when a source was lossy compressed (its own
    attribute says so, or it arrived in a lossy transfer syntax), with the Method (Type 1C) and Ratio taken
    from the source or, for the method, from the source's transfer syntax. Where the source says "01" but no
    method can be known, the method stays absent (inventing one would misinform)."""
    methods: list[str] = []
    ratios: list[str] = []
    lossy = ds.get("LossyImageCompression") == "01"
    for source in sources:
        syntax = str(getattr(getattr(source, "file_meta", None), "TransferSyntaxUID", "") or "")
        from_syntax = _LOSSY_METHODS.get(syntax)
        if source.get("LossyImageCompression") == "01" or from_syntax:
            lossy = True
            methods += _values(source.get("LossyImageCompressionMethod")) or ([from_syntax] if from_syntax else [])
            ratios += _values(source.get("LossyImageCompressionRatio"))
    if not lossy:
        return
    ds.LossyImageCompression = "01"
    if methods and "LossyImageCompressionMethod" not in ds:
        ds.LossyImageCompressionMethod = list(dict.fromkeys(methods))
        if ratios and len(ratios) == len(ds.LossyImageCompressionMethod):
            ds.LossyImageCompressionRatio = ratios


def _values(value: Any) -> list[str]:
    """The values of a possibly multi-valued element as strings; none for an absent or empty one."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    try:
        return [str(v) for v in value]
    except TypeError:
        return [str(value)]


# Normalised body parts (node.route.rules.BODY_PARTS, also BodyPartExamined Defined Terms) of unpaired structures.
UNPAIRED_BODY_PARTS = frozenset({"CHEST", "HEAD", "NECK", "ABDOMEN", "PELVIS", "PROSTATE", "HEART", "WHOLEBODY",
                                 "SPINE"})


def body_parts(image: Image, prov: Provenance) -> frozenset[str]:
    """What the output shows: the body parts radnode recognised for the source series, else the one body part
    the plugin's manifest is made for (a chest model's output is of the chest), else none."""
    if image.body_parts:
        return frozenset(image.body_parts)
    wanted = {part.upper() for part in prov.manifest.series.body_parts}
    return frozenset(wanted) if len(wanted) == 1 else frozenset()


def set_laterality(ds: Dataset, source: Dataset, parts: frozenset[str], unknown: str) -> None:
    """Laterality of a derived object, per the IOD rules (General Series Laterality is Type 2C: required for
    a paired body part unless Image Laterality is sent): the source's Laterality or Image Laterality; else,
    for a body part known to be unpaired (the source's BodyPartExamined or `parts`), BodyPartExamined and
    Image Laterality "U" (unpaired); else, with nothing known, `unknown` "empty" sends Laterality empty (Type 2
    unknown; what dciodvfy asks of a Secondary Capture) and "absent" leaves it out (what it asks of a SEG)."""
    for keyword in ("Laterality", "ImageLaterality"):
        if keyword in ds:
            delattr(ds, keyword)
    if source.get("Laterality") in ("R", "L"):
        ds.Laterality = source.Laterality
        return
    if source.get("ImageLaterality") in ("R", "L", "U", "B"):
        ds.ImageLaterality = source.ImageLaterality
        return
    examined = str(source.get("BodyPartExamined") or "").strip().upper()
    if not examined and len(parts) == 1:
        examined = next(iter(parts))
    if examined:
        ds.BodyPartExamined = examined[:16]
    if examined in UNPAIRED_BODY_PARTS:
        ds.ImageLaterality = "U"
    elif examined or unknown == "empty":
        ds.Laterality = None  # a paired or unrecognised body part whose side nobody recorded: unknown


def walk_items(ds: Dataset) -> Iterator[Dataset]:
    """The data set and every item of every sequence in it, at any depth."""
    stack = [ds]
    while stack:
        item = stack.pop()
        yield item
        stack.extend(nested for element in item if element.VR == "SQ" for nested in element.value)


def declare_private_schemes(ds: Dataset) -> None:
    """Add a Coding Scheme Identification item for every private coding scheme (designator "99...")
    the object's codes use, so a reader can tell where a code such as 99RADNODE LAA950 comes from."""
    found = {str(item.CodingSchemeDesignator) for item in walk_items(ds)
             if str(item.get("CodingSchemeDesignator", "")).startswith("99")}
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


def derive_uid(source_series_uid: str, plugin: str, plugin_version: str, kind: str, index: int | str,
               revision: int = 0) -> str:
    """A UID fixed by (source series, plugin, version, object kind, index, revision): a re-run reproduces it.
    Revision 0 is the first result of a series; a series that got new instances after its results were
    made gets revision 1, 2, ... and so new objects that supersede the earlier ones.

    Form 2.25.<128-bit integer> (ITU-T X.667 / DICOM PS3.5 B.2), from SHA-256 of the inputs.
    """
    parts = [source_series_uid, plugin, plugin_version, kind, str(index)]
    if revision:  # revision 0 keeps the UIDs radnode always derived
        parts.append(f"revision {revision}")
    key = "\x1f".join(parts).encode()
    return "2.25." + str(int.from_bytes(hashlib.sha256(key).digest()[:16], "big"))


def series_number(plugin: str, kind: str, source: Dataset | None = None) -> int:
    """A stable SeriesNumber per (plugin, kind, source series), never random: 9000-9899 names the plugin and
    kind, and the source series number (0-99999) leads, so the results of source series 3 are 3xxxx and those
    of series 4 are 4xxxx. A source without a usable SeriesNumber gives the bare 9000-9899."""
    base = 9000 + (zlib.crc32(plugin.encode()) % 300) * 3 + KINDS.index(kind)
    number = _source_series_number(source)
    return base if number is None else number * 10000 + base


def _source_series_number(source: Dataset | None) -> int | None:
    try:
        number = int(source.get("SeriesNumber")) if source is not None else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and 0 <= number <= 99999 else None


def _ascii(text: str) -> str:
    """`text` with anything outside printable ASCII replaced, so that it needs no Specific Character Set."""
    return "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in text)


@dataclass(frozen=True)
class ObjectRef:
    """An output object as the job table keeps it: what a later revision needs to reference it."""

    kind: str  # SEG, SR or SC
    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "study_uid": self.study_uid, "series_uid": self.series_uid,
                "sop_class_uid": self.sop_class_uid, "sop_instance_uid": self.sop_instance_uid}

    @classmethod
    def from_json(cls, data: Mapping[str, str]) -> ObjectRef:
        return cls(data["kind"], data["study_uid"], data["series_uid"], data["sop_class_uid"],
                   data["sop_instance_uid"])

    @classmethod
    def of(cls, ds: Dataset, kind: str) -> ObjectRef:
        return cls(kind, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPClassUID),
                   str(ds.SOPInstanceUID))

    def as_dataset(self) -> Dataset:
        """The four identifying attributes, which is what highdicom's `previous_versions` reads."""
        ds = Dataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = self.study_uid, self.series_uid
        ds.SOPClassUID, ds.SOPInstanceUID = self.sop_class_uid, self.sop_instance_uid
        return ds


# Contributing Equipment (IHE AI Results): the algorithm is the processing equipment, CID 7005.
PROCESSING_EQUIPMENT = codes.DCM.ProcessingEquipment


@dataclass(frozen=True)
class Provenance:
    """Who made an output object: radnode (settings) + the plugin (manifest)."""

    manifest: Manifest
    manufacturer: str = "radnode"
    model_name: str = "radnode AI node"
    device_serial_number: str = "RADNODE"
    institution_name: str | None = None
    revision: int = 0  # > 0: the series changed after earlier results; new UIDs that supersede them
    predecessors: tuple[ObjectRef, ...] = ()  # the SR(s) this revision supersedes (Predecessor Documents)

    @property
    def software_versions(self) -> str:
        return f"radnode {__version__}; {self.manifest.name} {self.manifest.version}"

    def series_description(self, kind: str, source: Dataset | None = None) -> str:
        """SeriesDescription of an output series (<= 64 characters, ASCII): says it is AI-generated, by which
        model, and of which source series (its number and description), e.g.
        "AI-generated lung-quant 1.0.0 SEG - src 3 B40f", so two source series of a study give two names."""
        text = f"AI-generated {self.manifest.name} {self.manifest.version} {kind}"
        if source is not None:
            number = _source_series_number(source)
            described = _ascii(str(source.get("SeriesDescription") or "").strip())
            origin = " ".join(x for x in (str(number) if number is not None else "", described) if x)
            if origin:
                text += f" - src {origin}"
        return text[:64].rstrip()

    def uid(self, source_series_uid: str, kind: str, index: int | str) -> str:
        return derive_uid(source_series_uid, self.manifest.name, self.manifest.version, kind, index, self.revision)

    def identity(self, kind: str, source_series_uid: str, source: Dataset, index: int | str = 0) -> dict[str, Any]:
        """The highdicom constructor arguments every output object shares: its series and instance UIDs (derived
        from source series, plugin and version, so a retried job writes the same objects), its series number
        and the equipment that made it (radnode and the plugin)."""
        return {
            "series_instance_uid": self.uid(source_series_uid, kind, "series"),
            "series_number": series_number(self.manifest.name, kind, source),
            "sop_instance_uid": self.uid(source_series_uid, kind, index),
            "manufacturer": self.manufacturer,
            "manufacturer_model_name": self.model_name,
            "software_versions": self.software_versions,
            "device_serial_number": self.device_serial_number,
            "institution_name": self.institution_name,
        }

    @property
    def device_uid(self) -> str:
        """The algorithm as a device: derived from the plugin's name and version only, so it is the same on
        every output of that model version, on every node."""
        return derive_uid("algorithm", self.manifest.name, self.manifest.version, "device", 0)

    def contributing_equipment(self) -> Dataset:
        """A Contributing Equipment item for the algorithm, per the IHE AI Results profile: purpose of reference
        DCM 109102 "Processing Equipment" (CID 7005 has no narrower code), manufacturer, model name = plugin,
        software version = plugin version, Device UID from plugin name + version."""
        item = hd.ContributingEquipment(
            manufacturer=self.manufacturer,
            purpose_of_reference=PROCESSING_EQUIPMENT,
            manufacturer_model_name=self.manifest.name,
            software_versions=self.manifest.version,
            device_serial_number=self.device_serial_number,
            institution_name=self.institution_name,
            contribution_description=_ascii(
                f"Processing Algorithm: {self.manifest.title or self.manifest.name} {self.manifest.version}, "
                f"run by radnode {__version__}"
            )[:1024],
        )
        item.DeviceUID = self.device_uid
        return item

    def add_contributing_equipment(self, ds: Dataset) -> None:
        """Append the algorithm to the object's Contributing Equipment Sequence (after any copied from a source)."""
        items = [it for it in ds.get("ContributingEquipmentSequence", []) if it.get("DeviceUID") != self.device_uid]
        ds.ContributingEquipmentSequence = [*items, self.contributing_equipment()]
