"""Route step: decide which plugins a completed series goes to (rules + body-part check).

The top of this module is pure: `match` applies a validated RuleSet to a series' attributes (body parts
normalised by node.dicom.bodypart); it touches no disk, database or network and evaluates no expressions.
Below it, `Router` applies the rules to complete series in the job table, runs the CT lung pixel check,
creates the jobs and enqueues them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

from sqlalchemy.orm import Session, sessionmaker

from db.jobs import (
    NewJob,
    create_jobs,
    mark_enqueued,
    mark_routed,
    mark_study_routed,
    queue_items,
    requeue_series_jobs,
    series_and_paths,
    series_paths,
    series_to_route,
    studies_to_route,
    study_series,
)
from db.models import Series, Study, utcnow
from node.dicom.bodypart import normalise_body_part
from node.dicom.header import InstanceHeader
from node.imaging import ImageLoadError
from node.logs import uid_hash
from node.route.lungs import LungCheck, check_lungs_in_files
from node.route.rules import ContainsCondition, Hours, NumCondition, RuleSet, StrCondition, When
from plugins.base import Manifest

log = logging.getLogger("radnode.router")


@dataclass(frozen=True, kw_only=True)
class SeriesAttrs:
    """What `match` looks at for one series: header values, no patient data."""

    modality: str | None = None
    body_parts: frozenset[str] = frozenset()
    sop_class_uid: str | None = None
    calling_ae: str | None = None
    called_ae: str | None = None
    requested_priority: str | None = None
    manufacturer: str | None = None
    series_description: str | None = None
    study_description: str | None = None
    protocol_name: str | None = None
    slice_thickness: float | None = None
    slice_count: int
    image_type: tuple[str, ...] = ()
    series_number: int | None = None


@dataclass(frozen=True)
class Match:
    """One plugin to run on the series, with the rule that chose it."""

    rule: str
    plugin: str
    queue: str
    priority: Literal["stat", "routine"]
    destinations: tuple[str, ...] | None = None  # None: every configured destination
    hours: Hours | None = None  # run only within these daily hours
    urgent: str | None = None  # why the priority is stat although the rule says routine
    with_series: tuple[int, ...] = ()  # a plugin taking several series: the other chosen series (keys)
    rollout: str = "live"  # the rule's roll-out mode (an operator's override on the job table wins)
    review_hours: float | None = None
    review_timeout: str = "discard"


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
    "CalledAE": "called_ae",
    "RequestedProcedurePriority": "requested_priority",
    "Manufacturer": "manufacturer",
    "SeriesDescription": "series_description",
    "StudyDescription": "study_description",
    "ProtocolName": "protocol_name",
    "SliceThickness": "slice_thickness",
    "SliceCount": "slice_count",
    "ImageType": "image_type",
    "SeriesNumber": "series_number",
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


URGENT_PRIORITIES = frozenset({"STAT", "HIGH"})  # RequestedProcedurePriority values that make jobs stat


def urgency(series: SeriesAttrs, stat_called_aes: Collection[str] = ()) -> str | None:
    """Why the series is urgent whatever its rule says (called AE title, RequestedProcedurePriority), or None."""
    if series.called_ae and series.called_ae.strip().upper() in {t.strip().upper() for t in stat_called_aes}:
        return f"called AE {series.called_ae}"
    if series.requested_priority and series.requested_priority.strip().upper() in URGENT_PRIORITIES:
        return f"RequestedProcedurePriority {series.requested_priority.strip().upper()}"
    return None


def explain(series: SeriesAttrs, rules: RuleSet, manifests: Mapping[str, Manifest],
            stat_called_aes: Collection[str] = ()) -> list[RuleCheck]:
    """Apply every rule in order to one series and say, per rule, why it matched or not.

    A matching rule yields a Match per plugin (queue = the rule's or the manifest's, priority = the
    rule's, or stat when the series is urgent, see `urgency`; hours = the rule's); a plugin already
    chosen by an earlier rule is not repeated, and a plugin whose manifest rules the series out (modality,
    min_slices, body parts) is left out with a reason. Pure.
    """
    checks: list[RuleCheck] = []
    seen: set[str] = set()
    urgent = urgency(series, stat_called_aes)
    for rule in rules.rules:
        if rule.level == "study":
            continue  # applied to the whole study once it is complete: see explain_study
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
            raised = urgent if rule.priority != "stat" else None
            chosen.append(Match(rule.name, plugin, rule.queue or manifest.queue, "stat" if urgent else rule.priority,
                                dests, rule.hours, raised, **rule.rollout_fields))
        checks.append(RuleCheck(rule.name, (), tuple(chosen), tuple(left_out)))
    return checks


def match(series: SeriesAttrs, rules: RuleSet, manifests: Mapping[str, Manifest],
          stat_called_aes: Collection[str] = ()) -> Decision:
    """Apply the rules in order to one series (see `explain`): the plugins to run, with the reasons
    for plugins left out and, when no rule matched, why each rule missed. Pure; raises nothing."""
    checks = explain(series, rules, manifests, stat_called_aes)
    matches = tuple(m for check in checks for m in check.matches)
    reasons = [f"rule {c.rule}: plugin {plugin} left out: {why}" for c in checks for plugin, why in c.left_out
               if why != "already chosen by an earlier rule"]
    if not any(c.matched for c in checks):
        misses = [f"rule {c.rule}: {'; '.join(c.failed)}" for c in checks]
        if any(r.level == "study" for r in rules.rules):
            what = "no series-level rule matched (study-level rules apply once the study is complete)"
        else:
            what = "no rule matched" if rules.rules else "no rules configured"
        reasons = [what, *misses, *reasons]
    return Decision(matches, tuple(reasons))


@dataclass(frozen=True)
class StudyRuleCheck:
    """One study-level rule applied to a complete study: the series its `when` matched, the `require`
    conditions no series met, and per chosen series the plugins to run (and those left out, with why)."""

    rule: str
    candidates: tuple[int, ...]
    missing: tuple[str, ...]
    chosen: tuple[tuple[int, tuple[Match, ...]], ...] = ()
    left_out: tuple[tuple[int, str, str], ...] = ()

    @property
    def matched(self) -> bool:
        return bool(self.chosen)


def _passes(series: SeriesAttrs, when: When) -> bool:
    return all(_miss(key, cond, series) is None for key, cond in when.conditions())


def _describe(when: When) -> str:
    return "series with " + ", ".join(f"{key} {cond.expect()}" for key, cond in when.conditions())


def _select(how: str, keys: list[int], series: Mapping[int, SeriesAttrs]) -> list[int]:
    if how == "thinnest":
        return [min(keys, key=lambda k: (series[k].slice_thickness if series[k].slice_thickness is not None
                                         else math.inf, -series[k].slice_count, k))]
    if how == "largest":
        return [min(keys, key=lambda k: (-series[k].slice_count, k))]
    if how == "first":
        return [min(keys, key=lambda k: (series[k].series_number if series[k].series_number is not None
                                         else math.inf, k))]
    return sorted(keys)


def explain_study(series: Mapping[int, SeriesAttrs], rules: RuleSet, manifests: Mapping[str, Manifest],
                  stat_called_aes: Collection[str] = ()) -> list[StudyRuleCheck]:
    """Apply the study-level rules in order to the series of a complete study (keyed by any id). Pure.

    A plugin runs at most once per series, as with series-level rules (a series a series-level rule
    already gave the plugin gets no second job: the job table keeps one job per series and plugin)."""
    checks: list[StudyRuleCheck] = []
    for rule in rules.rules:
        if rule.level != "study":
            continue
        candidates = [k for k, attrs in series.items() if _passes(attrs, rule.when)]
        missing = tuple(_describe(w) for w in rule.require or () if not any(_passes(a, w) for a in series.values()))
        if not candidates or missing:
            checks.append(StudyRuleCheck(rule.name, tuple(candidates), missing or ("a series matching `when`",)
                                         if not candidates else missing))
            continue
        chosen: dict[int, list[Match]] = {}
        left_out = []
        selected = _select(rule.select or "all", candidates, series)
        for plugin in rule.plugins:
            manifest = manifests.get(plugin)
            suitable = []
            for key in selected:
                why = "not installed" if manifest is None else _unsuitable(series[key], manifest)
                if why is None:
                    suitable.append(key)
                else:
                    left_out.append((key, plugin, why))
            if manifest is None or not suitable:
                continue
            # a plugin taking several series runs once, on the first with the others; any other once per series
            runs = [(suitable[0], tuple(suitable[1:]))] if manifest.series.multiple else [(k, ()) for k in suitable]
            for key, others in runs:
                urgent = next((u for k in (key, *others) if (u := urgency(series[k], stat_called_aes))), None)
                dests = tuple(rule.destinations) if rule.destinations is not None else None
                chosen.setdefault(key, []).append(Match(
                    rule.name, plugin, rule.queue or manifest.queue, "stat" if urgent else rule.priority, dests,
                    rule.hours, urgent if rule.priority != "stat" else None, others, **rule.rollout_fields))
        checks.append(StudyRuleCheck(rule.name, tuple(candidates), (),
                                     tuple((k, tuple(ms)) for k, ms in sorted(chosen.items())), tuple(left_out)))
    return checks


# --- the route step: complete series -> job rows (reads the job table and pixels; not pure) -------


def series_attrs(series: Series, study: Study) -> SeriesAttrs:
    """What `match` looks at, from the job table's series and study rows."""
    return _attrs(series, study.study_description, series.calling_ae, series.called_ae, series.instance_count)


def header_attrs(first: InstanceHeader, count: int, calling_ae: str | None = None,
                 called_ae: str | None = None) -> SeriesAttrs:
    """What `match` would look at once the series is stored: its first instance's header (the job table
    keeps the first instance's values) and the number of instances."""
    return _attrs(first, first.study_description, calling_ae, called_ae, count)


def _attrs(source: Series | InstanceHeader, study_description: str | None, calling_ae: str | None,
           called_ae: str | None, count: int) -> SeriesAttrs:
    return SeriesAttrs(
        modality=source.modality,
        body_parts=normalise_body_part(
            source.body_part_examined, study_description, source.series_description, source.protocol_name
        ),
        sop_class_uid=source.sop_class_uid,
        calling_ae=calling_ae,
        called_ae=called_ae,
        requested_priority=source.requested_priority,
        manufacturer=source.manufacturer,
        series_description=source.series_description,
        study_description=study_description,
        protocol_name=source.protocol_name,
        slice_thickness=source.slice_thickness,
        slice_count=count,
        image_type=tuple(p.strip().upper() for p in (source.image_type or "").split("\\") if p.strip()),
        series_number=source.series_number,
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
                 lung_check: Callable[[Sequence[Path]], LungCheck] = check_lungs_in_files,
                 stat_called_aes: Collection[str] = (), clock: Callable[[], datetime] = utcnow) -> None:
        self.maker = maker
        self.stat_called_aes = tuple(stat_called_aes)
        self.clock = clock
        self.rules = rules
        self.manifests = manifests
        self.enqueuer = enqueuer
        self.instances_dir = instances_dir
        self.lung_check = lung_check

    def route_pending(self) -> int:
        """Route every complete series, then every complete study (study-level rules). Returns how many
        series and studies were routed. Raises SQLAlchemyError."""
        with self.maker() as session:
            pending = series_to_route(session)
        for series_id in pending:
            self.route_series(series_id)
        with self.maker() as session:
            studies = studies_to_route(session)
        if studies and not any(r.level == "study" for r in self.rules.rules):
            with self.maker.begin() as session:  # nothing to decide: one statement, however many
                mark_study_routed(session, None, "no study-level rule", self.clock())
        else:
            for study_id in studies:
                self.route_study(study_id)
        return len(pending) + len(studies)

    def _create_jobs(self, session: Session, series_id: int, matches: Sequence[Match], held: Mapping[str, datetime],
                     reopened: bool, now: datetime, uids: Mapping[int, str] | None = None) -> list[int]:
        new = [
            NewJob(m.plugin, self.manifests[m.plugin].version, m.rule, m.queue, m.priority,
                   list(m.destinations) if m.destinations is not None else None, held.get(m.plugin),
                   [uids[k] for k in m.with_series] if m.with_series and uids else None, m.rollout, m.review_hours,
                   m.review_timeout)
            for m in matches
        ]
        ids = create_jobs(session, series_id, new, now)
        if reopened:
            ids += requeue_series_jobs(session, series_id, [m.plugin for m in matches], now)
        return ids

    def _send(self, items: list[tuple[int, str, str]]) -> list[int]:
        sent = self.enqueuer.send(items)
        if sent:
            with self.maker.begin() as session:
                mark_enqueued(session, sent, utcnow())
        return sent

    def route_study(self, study_id: int) -> list[int]:
        """Apply the study-level rules to one complete study: choose series, run the pixel checks, create
        the jobs and mark the study routed in one transaction, then send the tasks. Raises SQLAlchemyError."""
        with self.maker() as session:
            study, rows = study_series(session, study_id)
            paths = {s.id: series_paths(session, s.id) for s in rows}
        attrs = {s.id: series_attrs(s, study) for s in rows}
        number = {s.id: f"#{s.series_number}" if s.series_number is not None else f"id {s.id}" for s in rows}
        checks = explain_study(attrs, self.rules, self.manifests, self.stat_called_aes)
        now = self.clock()
        chosen: dict[int, list[Match]] = {}
        notes: list[str] = []
        for c in checks:
            if not c.matched:
                notes.append(f"rule {c.rule}: " + (f"waiting for {'; '.join(c.missing)}" if c.missing
                                                   else "no plugin can run on the chosen series"))
            for sid, plugin, why in c.left_out:
                notes.append(f"rule {c.rule}: plugin {plugin} left out on series {number[sid]}: {why}")
            for sid, matches in c.chosen:
                kept, checked = pixel_checks(list(matches), attrs[sid], [self.instances_dir / p for p in paths[sid]],
                                             self.manifests, self.lung_check)
                notes += [f"series {number[sid]}: {n}" for n in checked]
                have = chosen.setdefault(sid, [])
                have += [m for m in kept if m.plugin not in {x.plugin for x in have}]  # once per series and plugin
        held = {m.plugin: opens for ms in chosen.values() for m in ms
                if m.hours is not None and (opens := m.hours.next_open(now))}
        jobs = [f"{m.plugin} on series {', '.join(number[k] for k in (sid, *m.with_series))} (rule {m.rule})"
                for sid, ms in chosen.items() for m in ms]
        note = "; ".join([("jobs: " + ", ".join(jobs)) if jobs else "no job", *notes])
        reopened = {s.id: bool(s.reopened_count) for s in rows}
        with self.maker.begin() as session:
            if not mark_study_routed(session, [study_id], note, now):
                return []  # reopened meanwhile: routed again once complete
            uids = {s.id: s.series_uid for s in rows}
            ids = [i for sid, ms in chosen.items()
                   for i in self._create_jobs(session, sid, ms, held, reopened[sid], now, uids)]
            items = queue_items(session, ids, now)
        log.info("study %s routed: %s", uid_hash(study.study_uid), f"{len(jobs)} job(s)" if jobs else "no job")
        return self._send(items)

    def route_series(self, series_id: int) -> list[int]:
        """Route one complete series: match the rules, run the pixel check, create the jobs and
        mark the series routed in one transaction, then send the tasks. Returns the job ids sent
        (the sweeper sends any the broker refused). Raises SQLAlchemyError."""
        with self.maker() as session:
            series, study, rel_paths = series_and_paths(session, series_id)
        attrs = series_attrs(series, study)
        decision = match(attrs, self.rules, self.manifests, self.stat_called_aes)
        matches, notes = pixel_checks(list(decision.matches), attrs, [self.instances_dir / p for p in rel_paths],
                                      self.manifests, self.lung_check)
        now = self.clock()
        held = {m.plugin: opens for m in matches if m.hours is not None and (opens := m.hours.next_open(now))}
        if matches:
            note = "jobs: " + ", ".join(f"{m.plugin} (rule {m.rule})" for m in matches)
            urgent = sorted({m.urgent for m in matches if m.urgent})
            extra = [f"priority stat: {why}" for why in urgent]
            extra += [f"{m.plugin} held until {held[m.plugin].isoformat(timespec='seconds')} (rule hours {m.hours})"
                      for m in matches if m.plugin in held]
            note = "; ".join([note, *extra, *notes, *decision.reasons])
        else:
            note = "; ".join([*notes, *decision.reasons]) or "no rule matched"
        with self.maker.begin() as session:
            if not mark_routed(session, series_id, note, now):
                return []  # reopened by a late instance meanwhile: routed again once complete
            ids = self._create_jobs(session, series_id, matches, held, bool(series.reopened_count), now)
            items = queue_items(session, ids, now)
        log.info("series %s routed: %s", uid_hash(series.series_uid), ", ".join(m.plugin for m in matches) or "no job")
        return self._send(items)
