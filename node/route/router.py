"""Route step: decide which plugins a completed series goes to (rules + body-part check).

The top of this module is pure: `match` applies a validated RuleSet to a series' attributes (body parts
normalised by node.dicom.bodypart); it touches no disk, database or network and evaluates no expressions.
Below it, `Router` applies the rules to complete series in the job table, runs the CT lung pixel check,
creates the jobs and enqueues them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from sqlalchemy.orm import Session, sessionmaker

from db.jobs import (
    NewJob,
    create_jobs,
    mark_enqueued,
    mark_routed,
    queue_items,
    requeue_series_jobs,
    series_and_paths,
    series_to_route,
)
from db.models import Series, Study, utcnow
from node.dicom.bodypart import normalise_body_part
from node.dicom.header import InstanceHeader
from node.imaging import ImageLoadError
from node.logs import uid_hash
from node.route.lungs import LungCheck, check_lungs_in_files
from node.route.rules import ContainsCondition, NumCondition, RuleSet, StrCondition
from plugins.base import Manifest

log = logging.getLogger("radnode.router")


@dataclass(frozen=True, kw_only=True)
class SeriesAttrs:
    """What `match` looks at for one series: header values, no patient data."""

    modality: str | None = None
    body_parts: frozenset[str] = frozenset()
    sop_class_uid: str | None = None
    calling_ae: str | None = None
    manufacturer: str | None = None
    series_description: str | None = None
    study_description: str | None = None
    protocol_name: str | None = None
    slice_thickness: float | None = None
    slice_count: int
    image_type: tuple[str, ...] = ()


@dataclass(frozen=True)
class Match:
    """One plugin to run on the series, with the rule that chose it."""

    rule: str
    plugin: str
    queue: str
    priority: Literal["stat", "routine"]
    destinations: tuple[str, ...] | None = None  # None: every configured destination


@dataclass(frozen=True)
class Decision:
    """The plugins to run, and human-readable reasons why nothing (or less) matched."""

    matches: tuple[Match, ...]
    reasons: tuple[str, ...]


# `when` key -> SeriesAttrs field.
ATTRIBUTES: Mapping[str, str] = {
    "Modality": "modality",
    "BodyPart": "body_parts",
    "SOPClassUID": "sop_class_uid",
    "CallingAE": "calling_ae",
    "Manufacturer": "manufacturer",
    "SeriesDescription": "series_description",
    "StudyDescription": "study_description",
    "ProtocolName": "protocol_name",
    "SliceThickness": "slice_thickness",
    "SliceCount": "slice_count",
    "ImageType": "image_type",
}
_FREE_TEXT = frozenset({"SeriesDescription", "StudyDescription", "ProtocolName"})  # never echoed in reasons


def _miss(key: str, cond: StrCondition | NumCondition | ContainsCondition, series: SeriesAttrs) -> str | None:
    """Why `series` fails the condition on `key`, or None when it passes."""
    value = getattr(series, ATTRIBUTES[key])
    if isinstance(cond, ContainsCondition):
        ok, shown = cond.test(value), "\\".join(value)
    elif isinstance(cond, StrCondition) and key == "BodyPart":
        ok, shown = cond.test_any(value), ", ".join(sorted(value))
    else:
        ok, shown = cond.test(value), "" if value is None else str(value)
    if ok:
        return None
    if not shown:
        return f"{key} missing, wanted {cond.expect()}"
    if key in _FREE_TEXT:
        return f"{key} does not match, wanted {cond.expect()}"
    return f"{key} is {shown}, wanted {cond.expect()}"


def _unsuitable(series: SeriesAttrs, manifest: Manifest) -> str | None:
    """Why the plugin's manifest rules the series out (modality, slice count, body part), or None."""
    if series.modality is None or series.modality.strip().upper() not in manifest.modalities:
        return f"modality {series.modality or 'missing'} not in {', '.join(manifest.modalities)}"
    if series.slice_count < manifest.series.min_slices:
        return f"{series.slice_count} slice(s) < min_slices {manifest.series.min_slices}"
    wanted = {part.upper() for part in manifest.series.body_parts}
    if wanted and not wanted & series.body_parts:
        found = ", ".join(sorted(series.body_parts)) or "unknown"
        return f"body part {found} not in {', '.join(sorted(wanted))}"
    return None


@dataclass(frozen=True)
class RuleCheck:
    """One rule applied to one series: the conditions it failed (none: it matched), the plugins it chose
    and the plugins it left out with the reason (a manifest ruled the series out, already chosen, ...)."""

    rule: str
    failed: tuple[str, ...]
    matches: tuple[Match, ...] = ()
    left_out: tuple[tuple[str, str], ...] = ()

    @property
    def matched(self) -> bool:
        return not self.failed


def explain(series: SeriesAttrs, rules: RuleSet, manifests: Mapping[str, Manifest]) -> list[RuleCheck]:
    """Apply every rule in order to one series and say, per rule, why it matched or not.

    A matching rule yields a Match per plugin (queue = the rule's or the manifest's, priority = the
    rule's); a plugin already chosen by an earlier rule is not repeated, and a plugin whose manifest
    rules the series out (modality, min_slices, body parts) is left out with a reason. Pure.
    """
    checks: list[RuleCheck] = []
    seen: set[str] = set()
    for rule in rules.rules:
        failed = tuple(m for key, cond in rule.when.conditions() if (m := _miss(key, cond, series)) is not None)
        if failed:
            checks.append(RuleCheck(rule.name, failed))
            continue
        chosen: list[Match] = []
        left_out: list[tuple[str, str]] = []
        for plugin in rule.plugins:
            if plugin in seen:
                left_out.append((plugin, "already chosen by an earlier rule"))
                continue
            seen.add(plugin)
            manifest = manifests.get(plugin)
            why = "not installed" if manifest is None else _unsuitable(series, manifest)
            if manifest is None or why is not None:
                left_out.append((plugin, why or "not installed"))
                continue
            dests = tuple(rule.destinations) if rule.destinations is not None else None
            chosen.append(Match(rule.name, plugin, rule.queue or manifest.queue, rule.priority, dests))
        checks.append(RuleCheck(rule.name, (), tuple(chosen), tuple(left_out)))
    return checks


def match(series: SeriesAttrs, rules: RuleSet, manifests: Mapping[str, Manifest]) -> Decision:
    """Apply the rules in order to one series (see `explain`): the plugins to run, with the reasons
    for plugins left out and, when no rule matched, why each rule missed. Pure; raises nothing."""
    checks = explain(series, rules, manifests)
    matches = tuple(m for check in checks for m in check.matches)
    reasons = [f"rule {c.rule}: plugin {plugin} left out: {why}" for c in checks for plugin, why in c.left_out
               if why != "already chosen by an earlier rule"]
    if not any(c.matched for c in checks):
        misses = [f"rule {c.rule}: {'; '.join(c.failed)}" for c in checks]
        reasons = ["no rule matched" if rules.rules else "no rules configured", *misses, *reasons]
    return Decision(matches, tuple(reasons))


# --- the route step: complete series -> job rows (reads the job table and pixels; not pure) -------


def series_attrs(series: Series, study: Study) -> SeriesAttrs:
    """What `match` looks at, from the job table's series and study rows."""
    return _attrs(series, study.study_description, series.calling_ae, series.instance_count)


def header_attrs(first: InstanceHeader, count: int, calling_ae: str | None = None) -> SeriesAttrs:
    """What `match` would look at once the series is stored: its first instance's header (the job table
    keeps the first instance's values) and the number of instances."""
    return _attrs(first, first.study_description, calling_ae, count)


def _attrs(source: Series | InstanceHeader, study_description: str | None, calling_ae: str | None,
           count: int) -> SeriesAttrs:
    return SeriesAttrs(
        modality=source.modality,
        body_parts=normalise_body_part(
            source.body_part_examined, study_description, source.series_description, source.protocol_name
        ),
        sop_class_uid=source.sop_class_uid,
        calling_ae=calling_ae,
        manufacturer=source.manufacturer,
        series_description=source.series_description,
        study_description=study_description,
        protocol_name=source.protocol_name,
        slice_thickness=source.slice_thickness,
        slice_count=count,
        image_type=tuple(p.strip().upper() for p in (source.image_type or "").split("\\") if p.strip()),
    )


def needs_lung_check(manifest: Manifest, attrs: SeriesAttrs) -> bool:
    """A chest-CT model runs only when the pixels show air-filled lungs inside the body."""
    return (attrs.modality or "").upper() == "CT" and "CHEST" in manifest.series.body_parts


def pixel_checks(matches: list[Match], attrs: SeriesAttrs, paths: Sequence[Path], manifests: Mapping[str, Manifest],
                 lung_check: Callable[[Sequence[Path]], LungCheck] = check_lungs_in_files
                 ) -> tuple[list[Match], list[str]]:
    """The matches that survive the pixel checks (the CT lung check for chest-CT models), and notes."""
    checked = [m for m in matches if needs_lung_check(manifests[m.plugin], attrs)]
    if not checked:
        return matches, []
    try:
        result = lung_check(paths)
    except ImageLoadError as exc:
        result = LungCheck(found=False, volume_ml=0.0, reason=f"pixels unreadable ({exc})")
    names = ", ".join(m.plugin for m in checked)
    if result.found:
        return matches, [f"CT pixel check for {names}: {result.reason}"]
    return [m for m in matches if m not in checked], [f"{names} not run: CT pixel check: {result.reason}"]


class JobSender(Protocol):
    """What the router needs of the queue (node.queueing.broker.Enqueuer): send (job id, queue, priority)
    tasks in order after the commit, and say which were sent."""

    def send(self, items: list[tuple[int, str, str]]) -> list[int]: ...


class Router:
    """Turns complete series into queued jobs, records why (or why not), then enqueues after commit."""

    def __init__(self, maker: sessionmaker[Session], rules: RuleSet, manifests: Mapping[str, Manifest],
                 enqueuer: JobSender, instances_dir: Path,
                 lung_check: Callable[[Sequence[Path]], LungCheck] = check_lungs_in_files) -> None:
        self.maker = maker
        self.rules = rules
        self.manifests = manifests
        self.enqueuer = enqueuer
        self.instances_dir = instances_dir
        self.lung_check = lung_check

    def route_pending(self) -> int:
        """Route every complete series. Returns how many were routed. Raises SQLAlchemyError."""
        with self.maker() as session:
            pending = series_to_route(session)
        for series_id in pending:
            self.route_series(series_id)
        return len(pending)

    def route_series(self, series_id: int) -> list[int]:
        """Route one complete series: match the rules, run the pixel check, create the jobs and
        mark the series routed in one transaction, then send the tasks. Returns the job ids sent
        (the sweeper sends any the broker refused). Raises SQLAlchemyError."""
        with self.maker() as session:
            series, study, rel_paths = series_and_paths(session, series_id)
        attrs = series_attrs(series, study)
        decision = match(attrs, self.rules, self.manifests)
        matches, notes = pixel_checks(list(decision.matches), attrs, [self.instances_dir / p for p in rel_paths],
                                      self.manifests, self.lung_check)
        if matches:
            note = "jobs: " + ", ".join(f"{m.plugin} (rule {m.rule})" for m in matches)
            note = "; ".join([note, *notes, *decision.reasons])
        else:
            note = "; ".join([*notes, *decision.reasons]) or "no rule matched"
        now = utcnow()
        with self.maker.begin() as session:
            if not mark_routed(session, series_id, note, now):
                return []  # reopened by a late instance meanwhile: routed again once complete
            new = [
                NewJob(m.plugin, self.manifests[m.plugin].version, m.rule, m.queue, m.priority,
                       list(m.destinations) if m.destinations is not None else None)
                for m in matches
            ]
            ids = create_jobs(session, series_id, new, now)
            if series.reopened_count:
                ids += requeue_series_jobs(session, series_id, [m.plugin for m in matches], now)
            items = queue_items(session, ids)
        log.info("series %s routed: %s", uid_hash(series.series_uid), ", ".join(m.plugin for m in matches) or "no job")
        sent = self.enqueuer.send(items)
        if sent:
            with self.maker.begin() as session:
                mark_enqueued(session, sent, utcnow())
        return sent
