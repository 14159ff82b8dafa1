"""Route step, dry run: what the rules would do with some DICOM files, without storing or sending anything.

`radnode rules test PATH` and the dashboard's study page use it to show an administrator the normalised
attributes of each series, which rules match and why the others do not, and the jobs that would be
queued (after the CT lung pixel check, as the router runs it).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.dicom.header import HeaderError, InstanceHeader, read_header
from node.route.lungs import LungCheck, check_lungs_in_files
from node.route.router import (
    ATTRIBUTES,
    Match,
    RuleCheck,
    SeriesAttrs,
    StudyRuleCheck,
    explain,
    explain_study,
    header_attrs,
    pixel_checks,
)
from node.route.rules import RuleSet
from plugins.base import Manifest


@dataclass
class SeriesReport:
    """One series: its attributes as the rules see them, each rule's verdict, and what would be queued."""

    series_uid: str
    series_number: int | None
    files: int
    attrs: SeriesAttrs
    checks: list[RuleCheck]
    queued: list[Match]
    notes: list[str] = field(default_factory=list)

    def attributes(self) -> dict[str, Any]:
        """The normalised attributes, keyed like a rule's `when`."""
        out: dict[str, Any] = {}
        for key, name in ATTRIBUTES.items():
            value = getattr(self.attrs, name)
            out[key] = sorted(value) if isinstance(value, frozenset) else list(value) if isinstance(value, tuple) \
                else value
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "series_uid": self.series_uid,
            "series_number": self.series_number,
            "files": self.files,
            "attributes": self.attributes(),
            "rules": [
                {"rule": c.rule, "matched": c.matched, "failed": list(c.failed),
                 "plugins": [m.plugin for m in c.matches],
                 "left_out": [{"plugin": p, "reason": why} for p, why in c.left_out]}
                for c in self.checks
            ],
            "queued": [_match_json(m) for m in self.queued],
            "notes": self.notes,
        }


def _match_json(m: Match) -> dict[str, Any]:
    return {"plugin": m.plugin, "rule": m.rule, "queue": m.queue, "priority": m.priority,
            "destinations": list(m.destinations) if m.destinations is not None else None,
            "hours": str(m.hours) if m.hours is not None else None, "urgent": m.urgent}


@dataclass
class StudyReport:
    """The study-level rules on one study of the input: per rule, the series chosen (by SeriesInstanceUID)
    and the plugins to run on each, or what is missing."""

    study_uid: str
    checks: list[StudyRuleCheck]
    series_uids: dict[int, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "rules": [
                {"rule": c.rule, "matched": c.matched, "missing": list(c.missing),
                 "candidates": [self.series_uids[k] for k in c.candidates],
                 "chosen": [{"series_uid": self.series_uids[k], "queued": [_match_json(m) for m in ms]}
                            for k, ms in c.chosen],
                 "left_out": [{"series_uid": self.series_uids[k], "plugin": p, "reason": why}
                              for k, p, why in c.left_out]}
                for c in self.checks
            ],
        }


def study_reports(reports: Sequence[SeriesReport], study_uids: Sequence[str], rules: RuleSet,
                  manifests: Mapping[str, Manifest], stat_called_aes: Collection[str] = ()) -> list[StudyReport]:
    """The study-level rules applied to the series of each study (`study_uids[i]` is the study of
    `reports[i]`); none when the rules have no study-level rule."""
    if not any(r.level == "study" for r in rules.rules):
        return []
    out = []
    for study_uid in dict.fromkeys(study_uids):
        members = {i: r for i, r in enumerate(reports) if study_uids[i] == study_uid}
        checks = explain_study({i: r.attrs for i, r in members.items()}, rules, manifests, stat_called_aes)
        out.append(StudyReport(study_uid, checks, {i: r.series_uid for i, r in members.items()}))
    return out


@dataclass
class Refused:
    """A file radnode would refuse (not DICOM, or a required UID missing or malformed)."""

    path: Path
    reason: str


def series_report(attrs: SeriesAttrs, series_uid: str, series_number: int | None, paths: Sequence[Path],
                  rules: RuleSet, manifests: Mapping[str, Manifest],
                  lung_check: Callable[[Sequence[Path]], LungCheck] = check_lungs_in_files,
                  unavailable: Callable[[Manifest], str | None] = lambda m: None,
                  stat_called_aes: Collection[str] = ()) -> SeriesReport:
    """Apply the rules and the pixel check to one series; `paths` are its files (for the pixel check)."""
    checks = explain(attrs, rules, manifests, stat_called_aes)
    matches = [m for c in checks for m in c.matches]
    queued, notes = pixel_checks(matches, attrs, paths, manifests, lung_check) if matches else ([], [])
    for m in queued:
        why = unavailable(manifests[m.plugin])
        if why:
            notes.append(f"{m.plugin}: its job would be skipped: {why}")
    return SeriesReport(series_uid, series_number, len(paths), attrs, checks, queued, notes)


def dry_run(files: Sequence[Path], rules: RuleSet, manifests: Mapping[str, Manifest],
               calling_ae: str | None = None,
               lung_check: Callable[[Sequence[Path]], LungCheck] = check_lungs_in_files,
               unavailable: Callable[[Manifest], str | None] = lambda m: None,
               called_ae: str | None = None, stat_called_aes: Collection[str] = (),
               ) -> tuple[list[SeriesReport], list[Refused], list[StudyReport]]:
    """Group `files` by series as the node would store them and report on each series (in order of first
    file), then the study-level rules on each study. Files radnode would refuse are listed with the reason.
    Reads headers and, for chest-CT models, pixels; writes nothing. The study-level verdicts leave out the
    pixel check (they name the series the router would check)."""
    by_series: dict[str, list[tuple[Path, InstanceHeader]]] = {}
    refused: list[Refused] = []
    for path in files:
        try:
            with warnings.catch_warnings():  # pydicom warns about the very values that make a file refused
                warnings.simplefilter("ignore")
                header = read_header(path)
        except HeaderError as exc:
            refused.append(Refused(path, str(exc)))
            continue
        except OSError as exc:
            refused.append(Refused(path, f"cannot read: {exc.strerror or exc}"))
            continue
        by_series.setdefault(header.series_uid, []).append((path, header))
    reports, studies = [], []
    for uid, items in by_series.items():
        unique = {h.sop_instance_uid: p for p, h in items}  # a re-sent instance is stored once
        first = items[0][1]
        attrs = header_attrs(first, len(unique), calling_ae, called_ae)
        reports.append(series_report(attrs, uid, first.series_number, list(unique.values()), rules, manifests,
                                     lung_check, unavailable, stat_called_aes))
        studies.append(first.study_uid)
    return reports, refused, study_reports(reports, studies, rules, manifests, stat_called_aes)
