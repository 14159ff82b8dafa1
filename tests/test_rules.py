"""Rules file: schema, loading, and one test per validation branch (each checks the line it names)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from node.route import rules as rules_module
from node.route.rules import (
    BODY_PARTS,
    WHEN_KEYS,
    ContainsCondition,
    CountCondition,
    NumCondition,
    RulesError,
    StrCondition,
    load_rules,
    parse_rules,
)
from plugins.base import Manifest


def manifest(name: str, modalities: list[str], **kw) -> Manifest:
    return Manifest(name=name, version="1.0", factory="pkg.mod:build", modalities=modalities, **kw)


MANIFESTS = {
    m.name: m
    for m in (
        manifest("lung-quant", ["CT"], queue="gpu", series={"body_parts": ["CHEST"], "min_slices": 10}),
        manifest("cxr-triage", ["CR", "DX"]),
        manifest("echo-ref", ["CT", "MR"], reference_only=True),
    )
}


def yml(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def line_of(text: str, marker: str) -> int:
    """1-based number of the only line containing `marker`."""
    lines = [n for n, line in enumerate(text.splitlines(), 1) if marker in line]
    assert len(lines) == 1, f"marker {marker!r} must be on exactly one line"
    return lines[0]


def error_of(text: str, manifests=MANIFESTS) -> str:
    with pytest.raises(RulesError) as info:
        parse_rules(text, manifests, source="rules.yaml")
    return str(info.value)


GOOD = yml(
    """
    rules:
      - name: chest-ct
        when:
          Modality: CT
          BodyPart: chest
          SliceCount: {ge: 20}
          SliceThickness: {le: 3.0}
          SeriesDescription: {regex: "lung|thorax"}
          ImageType: {contains: AXIAL}
          CallingAE: [CT1, CT2]
        plugins: [lung-quant]
        queue: gpu.ct-organ-seg
        priority: stat
      - name: chest-xray
        when: {Modality: [CR, DX], ImageType: ORIGINAL, SliceThickness: 1.25}
        plugins: [cxr-triage]
      - name: everything
        when: {}
        plugins: [echo-ref]
    """
)


# --- loading ------------------------------------------------------------------------------------------


def test_default_rules_route_to_the_shipped_plugins():
    from plugins.registry import discover

    ruleset = load_rules(None, discover().manifests)
    assert [(r.name, r.plugins, r.destinations) for r in ruleset.rules] == [
        ("chest-ct-lungs", ["lung-quant", "ct-chest-triage"], None),
        ("abdomen-ct-organs", ["ct-organ-seg"], None),
        ("chest-xray", ["cxr-pneumonia", "cxr-foundation"], None),
        ("prostate-us", ["us-prostate-seg"], None),
    ]
    assert ruleset.rules[0].when.Modality.test_any(["CT"])


def test_default_rules_file_documents_an_example():
    text = rules_module.DEFAULT_RULES_PATH.read_text(encoding="utf-8")
    assert "# rules:" in text and "BodyPart" in text


def test_load_rules_from_a_file(tmp_path: Path):
    path = tmp_path / "rules.yaml"
    path.write_text(GOOD, encoding="utf-8")
    ruleset = load_rules(path, MANIFESTS)
    assert [r.name for r in ruleset.rules] == ["chest-ct", "chest-xray", "everything"]


def test_load_rules_errors_name_the_file_path(tmp_path: Path):
    path = tmp_path / "site-rules.yaml"
    path.write_text(GOOD.replace("[lung-quant]", "[lung-qant]"), encoding="utf-8")
    with pytest.raises(RulesError, match=rf"^{re.escape(str(path))} line {line_of(GOOD, '[lung-quant]')}: "):
        load_rules(path, MANIFESTS)


def test_load_rules_missing_file(tmp_path: Path):
    with pytest.raises(RulesError, match="cannot read the rules file"):
        load_rules(tmp_path / "nope.yaml", MANIFESTS)


def test_parsed_conditions():
    ruleset = parse_rules(GOOD, MANIFESTS)
    chest, xray, everything = ruleset.rules
    assert chest.when.Modality == StrCondition.model_validate("CT")
    assert chest.when.CallingAE == StrCondition.model_validate(["CT1", "CT2"])
    assert chest.when.CallingAE.values == ("CT1", "CT2")
    assert chest.when.SeriesDescription is not None and chest.when.SeriesDescription.regex is not None
    assert chest.when.SeriesDescription.regex.flags & re.IGNORECASE
    assert chest.when.SliceCount == CountCondition.model_validate({"ge": 20})
    assert (chest.when.SliceThickness.le, chest.when.SliceThickness.ge) == (3.0, None)
    assert chest.when.ImageType == ContainsCondition.model_validate({"contains": "AXIAL"})
    assert (chest.queue, chest.priority) == ("gpu.ct-organ-seg", "stat")
    assert xray.when.ImageType is not None and xray.when.ImageType.contains == ("ORIGINAL",)
    assert xray.when.SliceThickness == NumCondition.model_validate(1.25)
    assert (xray.queue, xray.priority) == (None, "routine")
    assert everything.when.conditions() == []
    assert [key for key, _ in chest.when.conditions()] == [
        "Modality",
        "BodyPart",
        "CallingAE",
        "SeriesDescription",
        "SliceThickness",
        "SliceCount",
        "ImageType",
    ]


def test_when_keys_are_the_schema():
    assert set(WHEN_KEYS) == set(rules_module.When.model_fields)


def test_condition_semantics():
    assert StrCondition.model_validate("ct").test(" CT ")
    assert not StrCondition.model_validate("Lung").test("Lung 1.0")  # exact, not a search
    assert StrCondition.model_validate({"regex": "^lung"}).test("LUNG 1.0")
    assert not StrCondition.model_validate(["CT"]).test(None)
    assert NumCondition.model_validate({"ge": 1, "le": 3}).test(3.0)
    assert not NumCondition.model_validate({"ge": 1, "le": 3}).test(3.01)
    assert NumCondition.model_validate(1.25).test(1.2500000001)
    assert not NumCondition.model_validate(1.25).test(None)
    assert ContainsCondition.model_validate({"contains": ["original", "axial"]}).test(("ORIGINAL", "PRIMARY", "AXIAL"))
    assert not ContainsCondition.model_validate("AXIAL").test(())


def test_reference_only_plugins_are_allowed_in_a_site_file():
    ruleset = parse_rules(GOOD, MANIFESTS)
    assert ruleset.rules[2].plugins == ["echo-ref"]


def test_reference_only_plugins_are_refused_in_the_default_rules(tmp_path: Path, monkeypatch):
    default = tmp_path / "default_rules.yaml"
    default.write_text(GOOD, encoding="utf-8")
    monkeypatch.setattr(rules_module, "DEFAULT_RULES_PATH", default)
    with pytest.raises(RulesError) as info:
        load_rules(None, MANIFESTS)
    assert f"line {line_of(GOOD, '[echo-ref]')}: " in str(info.value)
    assert "plugin 'echo-ref' is reference-only" in str(info.value)


def test_the_shipped_default_rules_route_to_no_reference_only_plugin():
    from plugins.registry import discover

    manifests = discover().manifests
    ruleset = load_rules(None, manifests)
    assert not any(manifests[p].reference_only for rule in ruleset.rules for p in rule.plugins)


# --- every validation branch: the error and the line it names ---------------------------------------------

RULE = """
rules:
  - name: chest-ct
    when:
      Modality: CT
    plugins: [lung-quant]
"""


def rule_with(
    when: str = "Modality: CT", extra: str = "", plugins: str = "[lung-quant]", name: str = "chest-ct"
) -> str:
    """One rule; `when` and `extra` are YAML lines (several separated by '|')."""
    when_lines = "".join(f"      {line}\n" for line in when.split("|")) if when else ""
    extra_lines = "".join(f"    {line}\n" for line in extra.split("|")) if extra else ""
    return f"rules:\n  - name: {name}\n    when:\n{when_lines}    plugins: {plugins}\n{extra_lines}"


CASES = [
    # (id, YAML text, marker on the line the error must name, expected message part)
    (
        "yaml-syntax",
        "rules:\n  - name: a\n    when: {Modality: CT\n    plugins: [x]\n",
        "plugins: [x]",
        "not valid YAML",
    ),
    ("yaml-tab", "rules:\n\t- name: a\n", "\t- name", "not valid YAML"),
    ("two-documents", "rules: []\n---\nrules: []\n", "---", "not valid YAML"),
    (
        "duplicate-key",
        rule_with("Modality: CT|BodyPart: CHEST|Modality: MR"),
        "Modality: MR",
        "duplicate key 'Modality'",
    ),
    ("root-not-mapping", "- name: a\n", "- name: a", "a rules file must be a mapping with a 'rules' list"),
    ("unknown-top-key", "rules: []\ndestinations: [pacs]\n", "destinations", "unknown key 'destinations'"),
    ("misspelt-rules", "# nothing\nrulez: []\n", "rulez", "unknown key 'rulez'"),
    ("missing-rules", "# nothing\n{}\n", "{}", "missing the required key 'rules'"),
    ("rules-null", "# comment\nrules:\n", "rules:", "rules must be a list"),
    ("rule-not-mapping", "rules:\n  - chest-ct\n", "- chest-ct", "a rule must be a mapping"),
    (
        "unknown-rule-key",
        rule_with(extra="destination: [pacs]"),
        "destination:",
        "unknown key 'destination' in a rule",
    ),
    ("missing-plugins", "rules:\n  - name: a\n    when: {}\n", "- name: a", "missing the required key 'plugins'"),
    (
        "missing-when",
        "rules:\n  - name: a\n    plugins: [lung-quant]\n",
        "- name: a",
        "missing the required key 'when'",
    ),
    ("bad-name", rule_with(name="Chest_CT"), "Chest_CT", "bad rule name 'Chest_CT'"),
    ("name-not-string", rule_with(name="[a]"), "name: [a]", "rules[0].name: Input should be a valid string"),
    (
        "when-not-mapping",
        "rules:\n  - name: a\n    when: CT\n    plugins: [lung-quant]\n",
        "when: CT",
        "when must be a mapping",
    ),
    (
        "unknown-when-key",
        rule_with("Modality: CT|Modalty: MR"),
        "Modalty",
        "unknown key 'Modalty' in when (allowed: Modality,",
    ),
    ("when-value-null", rule_with("Modality:"), "Modality:", "Modality has no value"),
    ("str-empty-list", rule_with("Manufacturer: []"), "Manufacturer", "empty list"),
    (
        "str-number",
        rule_with("CallingAE: 104"),
        "CallingAE",
        "expected a string, a list of strings or {regex: ...}, got a number",
    ),
    (
        "str-list-item",
        rule_with("Modality:|  - CT|  - 5"),
        "- 5",
        "rules[0].when.Modality: expected a non-empty string",
    ),
    (
        "str-unknown-op",
        rule_with("SeriesDescription: {regexp: lung}"),
        "regexp",
        "unknown key 'regexp' in a string condition",
    ),
    ("str-empty-op", rule_with("ProtocolName: {}"), "ProtocolName", "missing the required key 'regex'"),
    (
        "regex-not-string",
        rule_with("SeriesDescription:|  regex: [lung]"),
        "regex: [lung]",
        "regex must be a non-empty string",
    ),
    ("bad-regex", rule_with("StudyDescription:|  regex: '(lung'"), "(lung", "bad regex '(lung'"),
    ("unknown-body-part", rule_with("BodyPart: CHST"), "CHST", "unknown body part 'CHST'"),
    ("unknown-body-part-in-list", rule_with("BodyPart:|  - CHEST|  - LUNGS"), "LUNGS", "unknown body part 'LUNGS'"),
    ("num-unknown-op", rule_with("SliceThickness: {lt: 3}"), "lt: 3", "unknown key 'lt' in a numeric condition"),
    ("num-empty", rule_with("SliceThickness: {}"), "SliceThickness", "empty numeric condition"),
    ("num-not-number", rule_with("SliceThickness:|  le: thin"), "le: thin", "expected a number >= 0, got a string"),
    ("num-bool", rule_with("SliceCount: true"), "SliceCount", "expected a number or {le: ..., ge: ...}, got a boolean"),
    ("num-negative", rule_with("SliceThickness: {ge: -1}"), "SliceThickness", "expected a number >= 0"),
    ("count-not-whole", rule_with("SliceCount:|  ge: 20.5"), "ge: 20.5", "expected a whole number >= 0"),
    ("ge-above-le", rule_with("SliceCount:|  le: 10|  ge: 20"), "ge: 20", "empty range: ge 20 is greater than le 10"),
    ("contains-plain-list", rule_with("ImageType: [ORIGINAL, AXIAL]"), "ImageType", "a plain list is ambiguous"),
    (
        "contains-unknown-op",
        rule_with("ImageType: {has: AXIAL}"),
        "has: AXIAL",
        "unknown key 'has' in an ImageType condition",
    ),
    ("contains-empty", rule_with("ImageType:|  contains: []"), "contains: []", "expected a value or a non-empty list"),
    (
        "contains-bad-item",
        rule_with("ImageType:|  contains:|    - AXIAL|    - 3"),
        "- 3",
        "expected a non-empty string",
    ),
    ("plugins-not-list", rule_with(plugins="lung-quant"), "plugins:", "plugins must be a list of plugin names"),
    ("plugins-empty", rule_with(plugins="[]"), "plugins:", "plugins is empty"),
    (
        "plugin-not-string",
        rule_with(plugins="\n      - lung-quant\n      - {a: b}"),
        "{a: b}",
        "expected a plugin name",
    ),
    ("plugin-twice", rule_with(plugins="\n      - lung-quant\n      - lung-quant # again"), "# again", "listed twice"),
    (
        "unknown-plugin",
        rule_with(plugins="\n      - lung-qant"),
        "- lung-qant",
        "unknown plugin 'lung-qant' (installed: cxr-triage, echo-ref, lung-quant); did you mean 'lung-quant'?",
    ),
    (
        "wrong-modality",
        rule_with("Modality: MR", plugins="\n      - echo-ref\n      - lung-quant"),
        "- lung-quant",
        "plugin 'lung-quant' takes CT, which Modality MR can never match",
    ),
    (
        "wrong-modality-regex",
        rule_with("Modality: {regex: '^[CD][RX]$'}", plugins="\n      - lung-quant"),
        "- lung-quant",
        "which Modality /^[CD][RX]$/ can never match",
    ),
    ("bad-queue", rule_with(extra="queue: gpu2"), "queue", "bad queue 'gpu2'"),
    ("bad-queue-suffix", rule_with(extra="queue: cpu.Heavy_1"), "queue", "bad queue 'cpu.Heavy_1'"),
    (
        "bad-priority",
        rule_with(extra="priority: urgent"),
        "priority",
        "rules[0].priority: Input should be 'stat' or 'routine'",
    ),
    (
        "duplicate-rule-name",
        rule_with() + rule_with(name="chest-ct  # again").removeprefix("rules:\n"),
        "# again",
        "duplicate rule name 'chest-ct' (first used by rules[0])",
    ),
]


@pytest.mark.parametrize(("text", "marker", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_validation_error_names_the_line(text: str, marker: str, message: str):
    error = error_of(text)
    expected_line = line_of(text, marker)
    assert error.startswith(f"rules.yaml line {expected_line}: "), (error, expected_line)
    assert message in error


def test_rules_name_destinations():
    text = rule_with(extra="destinations: [pacs, backup]")
    rules = parse_rules(text, MANIFESTS, destinations=["pacs", "backup", "other"])
    assert rules.rules[0].destinations == ["pacs", "backup"]
    assert parse_rules(rule_with(), MANIFESTS, destinations=["pacs"]).rules[0].destinations is None  # all
    assert parse_rules(rule_with(extra="destinations: []"), MANIFESTS, destinations=[]).rules[0].destinations == []


@pytest.mark.parametrize(
    ("extra", "configured", "message"),
    [
        ("destinations: [pcas]", ["pacs"], "unknown destination 'pcas' (configured: pacs); did you mean 'pacs'?"),
        ("destinations: [pacs]", [], "unknown destination 'pacs' (configured: none)"),
        ("destinations: pacs", ["pacs"], "destinations must be a list of destination names, got a string"),
        ("destinations: [pacs, pacs]", ["pacs"], "destination 'pacs' is listed twice"),
    ],
)
def test_destination_errors_name_the_line(extra: str, configured: list[str], message: str):
    text = rule_with(extra=extra)
    with pytest.raises(RulesError) as info:
        parse_rules(text, MANIFESTS, source="rules.yaml", destinations=configured)
    assert f"rules.yaml line {line_of(text, 'destinations')}:" in str(info.value)
    assert message in str(info.value)


def test_empty_file():
    assert (
        error_of("\n# only a comment\n")
        == "rules.yaml line 1: the rules file is empty (write `rules: []` for no rules)"
    )


def test_unknown_plugin_with_no_plugins_installed():
    assert "unknown plugin 'lung-quant' (installed: none)" in error_of(RULE, manifests={})


def test_all_errors_are_reported_in_line_order():
    text = rule_with("Modalty: CT", extra="queue: gpu2") + rule_with(name="Bad", plugins="[]").removeprefix("rules:\n")
    lines = error_of(text).splitlines()
    assert [int(line.split()[2].rstrip(":")) for line in lines] == [
        line_of(text, "Modalty"),
        line_of(text, "queue"),
        line_of(text, "Bad"),
        line_of(text, "plugins: []"),
    ]


def test_body_part_vocabulary_is_upper_case_defined_terms():
    assert all(part.isupper() and part.isalpha() for part in BODY_PARTS)


def test_the_shipped_example_rules_are_valid():
    from plugins.registry import discover

    example = Path(__file__).resolve().parent.parent / "deploy" / "rules.example.yaml"
    rules = load_rules(example, discover().manifests)
    assert [r.name for r in rules.rules] == ["try-reference"]
