"""Route step (pure part): body-part normalisation and `match` over a table of series and rules."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import pytest
import yaml

from node.dicom import bodypart
from node.dicom.bodypart import BODY_PARTS, normalise_body_part
from node.route import router
from node.route.router import Decision, Match, SeriesAttrs, match
from node.route.rules import WHEN_KEYS, RuleSet, parse_rules
from plugins.base import Manifest


def manifest(name: str, modalities: list[str], **kw: Any) -> Manifest:
    return Manifest(name=name, version="1.0", factory="pkg.mod:build", modalities=modalities, **kw)


MANIFESTS = {
    m.name: m
    for m in (
        manifest("lung-quant", ["CT"], queue="gpu", series={"body_parts": ["CHEST"], "min_slices": 10}),
        manifest("brain-bleed", ["CT"], queue="gpu", series={"body_parts": ["HEAD"]}),
        manifest("ct-any", ["CT"]),
        manifest("cxr-triage", ["CR", "DX"]),
        manifest("mr-any", ["MR"]),
        manifest("multi", ["CT", "MR"]),
    )
}

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"


def chest_ct(**kw: Any) -> SeriesAttrs:
    """A routine chest CT; keyword arguments replace attributes."""
    attrs: dict[str, Any] = {
        "modality": "CT",
        "body_parts": frozenset({"CHEST"}),
        "sop_class_uid": CT_IMAGE,
        "calling_ae": "CT1",
        "manufacturer": "SIEMENS",
        "series_description": "Thorax 1.0 Br40",
        "study_description": "CT Chest",
        "protocol_name": "Chest routine",
        "slice_thickness": 1.0,
        "slice_count": 300,
        "image_type": ("ORIGINAL", "PRIMARY", "AXIAL"),
    }
    return SeriesAttrs(**(attrs | kw))


def ruleset(*rules: dict[str, Any]) -> RuleSet:
    return parse_rules(yaml.safe_dump({"rules": list(rules)}, allow_unicode=True), MANIFESTS, source="test")


def rule(when: dict[str, Any], plugins: tuple[str, ...] = ("ct-any",), name: str = "r", **kw: Any) -> dict[str, Any]:
    return {"name": name, "when": when, "plugins": list(plugins), **kw}


def hit(plugin: str = "ct-any", rule: str = "r", queue: str = "cpu", priority: str = "routine") -> Match:
    return Match(rule, plugin, queue, priority)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Case:
    id: str
    series: SeriesAttrs
    rules: tuple[dict[str, Any], ...]
    matches: tuple[Match, ...]
    reasons: tuple[str, ...] = field(default=())  # substrings expected among the reasons


CASES = [
    # exact, case-insensitive, lists
    Case("exact", chest_ct(), (rule({"Modality": "CT"}),), (hit(),)),
    Case(
        "case-insensitive",
        chest_ct(manufacturer="Siemens"),
        (rule({"Manufacturer": "SIEMENS", "Modality": "ct"}),),
        (hit(),),
    ),
    Case(
        "exact-is-not-substring",
        chest_ct(),
        (rule({"Manufacturer": "SIEM"}),),
        (),
        ("no rule matched", "rule r: Manufacturer is SIEMENS, wanted SIEM"),
    ),
    Case("list-or", chest_ct(), (rule({"Modality": ["MR", "CT"]}),), (hit(),)),
    Case(
        "list-or-miss",
        chest_ct(),
        (rule({"Modality": ["MR", "PT"]}, ("multi",)),),
        (),
        ("rule r: Modality is CT, wanted MR or PT",),
    ),
    Case(
        "and-across-keys",
        chest_ct(),
        (rule({"Modality": "CT", "Manufacturer": "GE"}),),
        (),
        ("rule r: Manufacturer is SIEMENS, wanted GE",),
    ),
    Case(
        "missing-never-matches",
        chest_ct(manufacturer=None),
        (rule({"Manufacturer": {"regex": ".*"}}),),
        (),
        ("rule r: Manufacturer missing, wanted /.*/",),
    ),
    # regex
    Case("regex", chest_ct(), (rule({"SeriesDescription": {"regex": "lung|thorax"}}),), (hit(),)),
    Case(
        "regex-miss",
        chest_ct(series_description="Bone 1.0"),
        (rule({"SeriesDescription": {"regex": "lung|thorax"}}),),
        (),
        ("rule r: SeriesDescription does not match, wanted /lung|thorax/",),
    ),
    Case("regex-protocol", chest_ct(), (rule({"ProtocolName": {"regex": "^chest"}}),), (hit(),)),
    Case("study-description-exact", chest_ct(), (rule({"StudyDescription": "ct chest"}),), (hit(),)),
    # numbers
    Case("le", chest_ct(slice_thickness=3.0), (rule({"SliceThickness": {"le": 3.0}}),), (hit(),)),
    Case(
        "le-miss",
        chest_ct(slice_thickness=5.0),
        (rule({"SliceThickness": {"le": 3.0}}),),
        (),
        ("rule r: SliceThickness is 5.0, wanted <= 3",),
    ),
    Case(
        "le-missing",
        chest_ct(slice_thickness=None),
        (rule({"SliceThickness": {"le": 3.0}}),),
        (),
        ("rule r: SliceThickness missing, wanted <= 3",),
    ),
    Case("ge", chest_ct(), (rule({"SliceCount": {"ge": 20}}),), (hit(),)),
    Case(
        "ge-miss",
        chest_ct(slice_count=12),
        (rule({"SliceCount": {"ge": 20}}),),
        (),
        ("rule r: SliceCount is 12, wanted >= 20",),
    ),
    Case("range", chest_ct(slice_thickness=0.625), (rule({"SliceThickness": {"ge": 0.5, "le": 1.5}}),), (hit(),)),
    Case("number-exact", chest_ct(slice_thickness=1.25), (rule({"SliceThickness": 1.25}),), (hit(),)),
    # ImageType contains
    Case("contains", chest_ct(), (rule({"ImageType": {"contains": "axial"}}),), (hit(),)),
    Case("contains-all", chest_ct(), (rule({"ImageType": {"contains": ["ORIGINAL", "AXIAL"]}}),), (hit(),)),
    Case(
        "contains-miss",
        chest_ct(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
        (rule({"ImageType": {"contains": ["ORIGINAL", "AXIAL"]}}),),
        (),
        ("rule r: ImageType is ORIGINAL\\PRIMARY\\LOCALIZER, wanted containing ORIGINAL and AXIAL",),
    ),
    Case("contains-scalar", chest_ct(), (rule({"ImageType": "PRIMARY"}),), (hit(),)),
    Case(
        "contains-empty", chest_ct(image_type=()), (rule({"ImageType": "PRIMARY"}),), (), ("rule r: ImageType missing",)
    ),
    # calling AE, SOP class, manufacturer
    Case("calling-ae", chest_ct(calling_ae="ct2"), (rule({"CallingAE": ["CT1", "CT2"]}),), (hit(),)),
    Case(
        "calling-ae-miss",
        chest_ct(calling_ae="CT3"),
        (rule({"CallingAE": ["CT1", "CT2"]}),),
        (),
        ("rule r: CallingAE is CT3, wanted CT1 or CT2",),
    ),
    Case("calling-ae-missing", chest_ct(calling_ae=None), (rule({"CallingAE": "CT1"}),), (), ("CallingAE missing",)),
    Case("sop-class", chest_ct(), (rule({"SOPClassUID": CT_IMAGE}),), (hit(),)),
    Case("sop-class-miss", chest_ct(), (rule({"SOPClassUID": CR_IMAGE}),), (), (f"SOPClassUID is {CT_IMAGE}",)),
    Case(
        "manufacturer-regex",
        chest_ct(manufacturer="Philips Medical Systems"),
        (rule({"Manufacturer": {"regex": "^philips"}}),),
        (hit(),),
    ),
    # body parts from BodyPartExamined and descriptions (English and Russian)
    Case(
        "ru-ogk",
        chest_ct(body_parts=normalise_body_part(None, "КТ ОГК")),
        (rule({"BodyPart": "CHEST"}, ("lung-quant",)),),
        (hit("lung-quant", queue="gpu"),),
    ),
    Case(
        "ru-long",
        chest_ct(body_parts=normalise_body_part(None, "Компьютерная томография органов грудной клетки")),
        (rule({"BodyPart": "CHEST"}, ("lung-quant",)),),
        (hit("lung-quant", queue="gpu"),),
    ),
    Case(
        "ru-head",
        chest_ct(body_parts=normalise_body_part(None, "КТ головного мозга")),
        (rule({"BodyPart": "CHEST"}, ("lung-quant",)), rule({"BodyPart": "HEAD"}, ("brain-bleed",), name="head")),
        (hit("brain-bleed", "head", queue="gpu"),),
    ),
    Case(
        "study-description-chest",
        chest_ct(body_parts=normalise_body_part(None, "Chest", None, None)),
        (rule({"BodyPart": "CHEST"}, ("lung-quant",)),),
        (hit("lung-quant", queue="gpu"),),
    ),
    Case(
        "head-ct-chest-rule",
        chest_ct(body_parts=normalise_body_part("HEAD", "Chest")),
        (rule({"Modality": "CT", "BodyPart": "CHEST"}, ("lung-quant",)),),
        (),
        ("no rule matched", "rule r: BodyPart is HEAD, wanted CHEST"),
    ),
    Case(
        "head-ct-chest-plugin",
        chest_ct(body_parts=normalise_body_part("HEAD", "Chest")),
        (rule({"Modality": "CT"}, ("lung-quant", "ct-any")),),
        (hit(),),
        ("rule r: plugin lung-quant left out: body part HEAD not in CHEST",),
    ),
    Case(
        "unknown-body-part-chest-plugin",
        chest_ct(body_parts=frozenset()),
        (rule({"Modality": "CT"}, ("lung-quant",)),),
        (),
        ("plugin lung-quant left out: body part unknown not in CHEST",),
    ),
    Case(
        "body-part-set",
        chest_ct(body_parts=normalise_body_part("CHEST_TO_PELVIS")),
        (rule({"BodyPart": ["ABDOMEN"]}),),
        (hit(),),
    ),
    # manifest checks after a rule matched
    Case(
        "single-slice",
        chest_ct(slice_count=1),
        (rule({"Modality": "CT"}, ("lung-quant", "ct-any")),),
        (hit(),),
        ("rule r: plugin lung-quant left out: 1 slice(s) < min_slices 10",),
    ),
    Case(
        "wrong-modality",
        chest_ct(modality="MR"),
        (rule({}, ("lung-quant", "mr-any")),),
        (hit("mr-any"),),
        ("rule r: plugin lung-quant left out: modality MR not in CT",),
    ),
    Case(
        "modality-missing",
        chest_ct(modality=None),
        (rule({"BodyPart": "CHEST"}, ("ct-any",)),),
        (),
        ("plugin ct-any left out: modality missing not in CT",),
    ),
    Case("multi-modality-plugin", chest_ct(modality="mr"), (rule({"Modality": "MR"}, ("multi",)),), (hit("multi"),)),
    # queue, priority, order, dedupe
    Case(
        "queue-default-from-manifest",
        chest_ct(),
        (rule({}, ("lung-quant", "ct-any")),),
        (hit("lung-quant", queue="gpu"), hit("ct-any", queue="cpu")),
    ),
    Case(
        "queue-override",
        chest_ct(),
        (rule({}, ("lung-quant",), queue="gpu.ct-organ-seg"),),
        (hit("lung-quant", queue="gpu.ct-organ-seg"),),
    ),
    Case("priority", chest_ct(), (rule({}, priority="stat"),), (hit(priority="stat"),)),
    Case(
        "dedupe-first-rule-wins",
        chest_ct(),
        (
            rule({"Modality": "CT"}, ("ct-any",), name="first", priority="stat"),
            rule({"BodyPart": "CHEST"}, ("ct-any", "lung-quant"), name="second", queue="cpu.slow"),
        ),
        (hit("ct-any", "first", priority="stat"), hit("lung-quant", "second", queue="cpu.slow")),
    ),
    Case(
        "later-rule-matches",
        chest_ct(),
        (rule({"Modality": "MR"}, ("mr-any",), name="mr"), rule({"Modality": "CT"})),
        (hit(),),
    ),
    Case("catch-all", chest_ct(), (rule({}),), (hit(),)),
    Case("no-rules", chest_ct(), (), (), ("no rules configured",)),
    Case(
        "every-rule-missed",
        chest_ct(modality="CR", body_parts=frozenset({"CHEST"})),
        (
            rule({"Modality": "CT", "SliceCount": {"ge": 500}}, name="ct"),
            rule({"Modality": "MR"}, ("mr-any",), name="mr"),
        ),
        (),
        (
            "no rule matched",
            "rule ct: Modality is CR, wanted CT; SliceCount is 300, wanted >= 500",
            "rule mr: Modality is CR, wanted MR",
        ),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_match(case: Case):
    decision = match(case.series, ruleset(*case.rules), MANIFESTS)
    assert decision.matches == case.matches
    for expected in case.reasons:
        assert any(expected in reason for reason in decision.reasons), (expected, decision.reasons)
    if case.matches and not case.reasons:
        assert decision.reasons == ()


def test_no_rule_matched_comes_first():
    decision = match(chest_ct(), ruleset(rule({"Modality": "MR"}, ("mr-any",))), MANIFESTS)
    assert decision == Decision((), ("no rule matched", "rule r: Modality is CT, wanted MR"))


def test_reasons_never_echo_free_text():
    secret = "Ivanov I.I. chest"
    series = chest_ct(series_description=secret, study_description=secret, protocol_name=secret)
    rules = ruleset(
        rule({"SeriesDescription": "x"}, name="a"),
        rule({"StudyDescription": {"regex": "^x"}}, name="b"),
        rule({"ProtocolName": "x"}, name="c"),
    )
    decision = match(series, rules, MANIFESTS)
    assert decision.matches == () and len(decision.reasons) == 4
    assert not any("Ivanov" in reason for reason in decision.reasons)


def test_plugin_uninstalled_after_validation_is_left_out():
    rules = ruleset(rule({}, ("lung-quant", "ct-any")))
    decision = match(chest_ct(), rules, {"ct-any": MANIFESTS["ct-any"]})
    assert decision.matches == (hit(),)
    assert decision.reasons == ("rule r: plugin lung-quant left out: not installed",)


def test_every_when_key_reads_a_series_attribute():
    assert set(router.ATTRIBUTES) == set(WHEN_KEYS)
    assert set(router.ATTRIBUTES.values()) == {f.name for f in fields(SeriesAttrs)}


# --- body-part normalisation --------------------------------------------------------------------------------

BODY_PART_CASES = [
    # (BodyPartExamined, descriptions, expected)
    ("CHEST", (), {"CHEST"}),
    ("chest", (), {"CHEST"}),
    ("THORAX", (), {"CHEST"}),
    ("LUNG", (), {"CHEST"}),
    ("CHEST_TO_PELVIS", (), {"CHEST", "ABDOMEN", "PELVIS"}),
    ("CHESTABDPELVIS", (), {"CHEST", "ABDOMEN", "PELVIS"}),
    ("CHESTABDOMEN", (), {"CHEST", "ABDOMEN"}),
    ("ABDOMENPELVIS", (), {"ABDOMEN", "PELVIS"}),
    ("BRAIN", (), {"HEAD"}),
    ("SKULL", (), {"HEAD"}),
    ("HEADNECK", (), {"HEAD", "NECK"}),
    ("HEAD", ("Chest",), {"HEAD"}),  # a recognised BodyPartExamined wins alone
    ("CSPINE", (), {"SPINE"}),
    ("KNEE", (), {"EXTREMITY"}),
    ("BREAST", (), {"BREAST"}),
    ("HEART", (), {"HEART"}),
    ("WHOLE BODY", (), {"WHOLEBODY"}),
    ("PROSTATE", (), {"PROSTATE"}),
    # descriptions (StudyDescription, SeriesDescription, ProtocolName), English
    (None, ("Chest",), {"CHEST"}),
    ("", ("CT THORAX W/O",), {"CHEST"}),
    (None, ("Lung screening",), {"CHEST"}),
    (None, ("CT_CHEST_LOW_DOSE",), {"CHEST"}),
    (None, ("CT Chest Abdomen Pelvis w contrast",), {"CHEST", "ABDOMEN", "PELVIS"}),
    (None, ("Head", "Brain 5mm"), {"HEAD"}),
    (None, ("CT thoracic spine",), {"SPINE"}),
    (None, ("MR prostate mpMRI",), {"PROSTATE"}),
    (None, ("Mammography screening",), {"BREAST"}),
    (None, ("Cardiac CTA",), {"HEART"}),
    # Russian
    (None, ("КТ ОГК",), {"CHEST"}),
    (None, ("Компьютерная томография органов грудной клетки",), {"CHEST"}),
    (None, ("МСКТ лёгких",), {"CHEST"}),
    (None, ("КТ легких низкодозовая",), {"CHEST"}),
    (None, ("Торакс 1.0",), {"CHEST"}),
    (None, ("КТ головного мозга",), {"HEAD"}),
    (None, ("МРТ ГМ",), {"HEAD"}),
    (None, ("КТ органов брюшной полости",), {"ABDOMEN"}),
    (None, ("МСКТ ОГК+ОБП",), {"CHEST", "ABDOMEN"}),
    (None, ("МРТ ОМТ",), {"PELVIS"}),
    (None, ("КТ малого таза",), {"PELVIS"}),
    (None, ("УЗИ шеи",), {"NECK"}),
    (None, ("МРТ предстательной железы",), {"PROSTATE"}),
    (None, ("МРТ шейного отдела позвоночника",), {"SPINE"}),
    (None, ("МРТ грудного отдела позвоночника",), {"SPINE"}),
    (None, ("УЗИ молочных желез",), {"BREAST"}),
    (None, ("УЗИ грудных желез",), {"BREAST"}),
    (None, ("OГK",), {"CHEST"}),  # Latin O and K typed into the Cyrillic abbreviation
    (None, ("OMT",), {"PELVIS"}),  # all-Latin lookalike of ОМТ
    ("ОГК", (), {"CHEST"}),  # unrecognised BodyPartExamined is searched like a description
    # false positives and nothing recognised
    (None, ("CHESTER protocol",), set()),
    (None, ("поиск метастазов",), set()),  # "таз" inside a word
    (None, ("показ",), set()),
    (None, ("КТ головки бедренной кости",), set()),  # femoral head is not the head
    (None, ("ГМО",), set()),
    (None, ("Headache",), set()),
    ("FOO", ("Scout", None), set()),
    (None, (), set()),
    (None, (None, ""), set()),
]


@pytest.mark.parametrize(("examined", "descriptions", "expected"), BODY_PART_CASES)
def test_normalise_body_part(examined: str | None, descriptions: tuple[str | None, ...], expected: set[str]):
    assert normalise_body_part(examined, *descriptions) == frozenset(expected)


def test_body_parts_are_the_rules_vocabulary():
    assert all(parts <= BODY_PARTS for parts in bodypart._EXAMINED.values())
    assert all(kw.parts | kw.unless <= BODY_PARTS for kw in bodypart._KEYWORDS)
