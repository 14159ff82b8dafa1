"""Route step, dry run: what the rules would do with some DICOM files, without storing or sending anything.

`radnode rules test PATH` and the dashboard's study page use it to show an administrator the normalised
attributes of each series, which rules match and why the others do not, and the jobs that would be
queued (after the CT lung pixel check, as the router runs it).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.dicom.header import HeaderError, InstanceHeader, read_header
from node.route.lungs import LungCheck, check_lungs_in_files
from node.route.router import Match, RuleCheck, SeriesAttrs, explain, header_attrs, pixel_checks
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
        a = self.attrs
        return {
            "Modality": a.modality, "BodyPart": sorted(a.body_parts), "SOPClassUID": a.sop_class_uid,
            "CallingAE": a.calling_ae, "Manufacturer": a.manufacturer, "SeriesDescription": a.series_description,
            "StudyDescription": a.study_description, "ProtocolName": a.protocol_name,
            "SliceThickness": a.slice_thickness, "SliceCount": a.slice_count, "ImageType": list(a.image_type),
        }

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
            "destinations": list(m.destinations) if m.destinations is not None else None}


@dataclass
class Refused:
    """A file radnode would refuse (not DICOM, or a required UID missing or malformed)."""

    path: Path
    reason: str


def series_report(attrs: SeriesAttrs, series_uid: str, series_number: int | None, paths: Sequence[Path],
                  rules: RuleSet, manifests: Mapping[str, Manifest],
                  lung_check: Callable[[Sequence[Path]], LungCheck] = check_lungs_in_files,
                  unavailable: Callable[[Manifest], str | None] = lambda m: None) -> SeriesReport:
    """Apply the rules and the pixel check to one series; `paths` are its files (for the pixel check)."""
    checks = explain(attrs, rules, manifests)
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
               ) -> tuple[list[SeriesReport], list[Refused]]:
    """Group `files` by series as the node would store them and report on each series (in order of first
    file). Files radnode would refuse are listed with the reason. Reads headers and, for chest-CT models,
    pixels; writes nothing."""
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
    reports = []
    for uid, items in by_series.items():
        unique = {h.sop_instance_uid: p for p, h in items}  # a re-sent instance is stored once
        first = items[0][1]
        attrs = header_attrs(first, len(unique), calling_ae)
        reports.append(series_report(attrs, uid, first.series_number, list(unique.values()), rules, manifests,
                                     lung_check, unavailable))
    return reports, refused
