"""Route step, configuration: the routing rules file (YAML) — schema, loading, validation with line numbers.

A rules file is an ordered list of rules; each rule's `when` maps DICOM keywords to conditions (AND
across keys, OR within a list, exact and case-insensitive unless `regex:` is asked for) and names the
plugins it routes to. There is no expression language: every condition is data, checked at load.
Errors name the file and the line (found by composing the YAML node tree and following each error's
location down it), so a bad rules file stops start-up with a message an administrator can act on.
"""

from __future__ import annotations

import datetime as dt
import difflib
import math
import re
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from node.dicom.bodypart import BODY_PARTS
from plugins.base import Manifest

DEFAULT_RULES_PATH = Path(__file__).with_name("default_rules.yaml")

STRING_KEYS = (
    "Modality",
    "BodyPart",
    "SOPClassUID",
    "CallingAE",
    "CalledAE",
    "RequestedProcedurePriority",
    "Manufacturer",
    "SeriesDescription",
    "StudyDescription",
    "ProtocolName",
)
NUMERIC_KEYS = ("SliceThickness", "SliceCount", "SeriesNumber")
WHEN_KEYS = (*STRING_KEYS, *NUMERIC_KEYS, "ImageType")

_RULE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_QUEUE_RE = re.compile(r"(gpu|cpu)(\.[a-z0-9-]+)?")
_ERROR_TYPE = "radnode_rules"


class RulesError(ValueError):
    """A rules file is invalid; str() names the file and line (one line per problem)."""


# --- validation helpers ----------------------------------------------------------------------------


def _fail(msg: str, *at: str | int) -> PydanticCustomError:
    """A validation error; `at` continues the error's location (a key or index) so the line is exact."""
    return PydanticCustomError(_ERROR_TYPE, "{msg}", {"msg": msg, "at": at})


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()}; quote it if you meant text)"
    if isinstance(value, (int, float)):
        return f"a number ({value}; quote it if you meant text)"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _mapping(data: Any, what: str, allowed: Iterable[str], required: Iterable[str] = ()) -> dict[Any, Any]:
    """Check that `data` is a mapping with only `allowed` keys and all `required` ones."""
    if not isinstance(data, dict):
        raise _fail(f"{what} must be a mapping, got {_kind(data)}")
    allowed = tuple(allowed)
    for key in data:
        if key not in allowed:
            raise _fail(f"unknown key {key!r} in {what} (allowed: {', '.join(allowed)})", key)
    for key in required:
        if key not in data:
            raise _fail(f"{what} is missing the required key {key!r}")
    return data


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: float) -> str:
    return f"{value:g}"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- conditions --------------------------------------------------------------------------------------


class StrCondition(_Model):
    """A string key's condition: one of `values` (exact, case-insensitive) or `regex` (re.search, ignore case).

    YAML forms: `CT`, `[CT, MR]`, `{regex: "lung|thorax"}`.
    """

    values: tuple[str, ...] = ()
    regex: re.Pattern[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, data: Any) -> Any:
        if isinstance(data, cls):
            return data
        if isinstance(data, str):
            data = [data]
        if isinstance(data, list):
            if not data:
                raise _fail("empty list: give at least one value")
            for i, value in enumerate(data):
                if not isinstance(value, str) or not value.strip():
                    raise _fail(f"expected a non-empty string, got {_kind(value)}", i)
            return {"values": tuple(v.strip() for v in data)}
        if isinstance(data, dict):
            _mapping(data, "a string condition", ("regex",), required=("regex",))
            pattern = data["regex"]
            if not isinstance(pattern, str) or not pattern:
                raise _fail(f"regex must be a non-empty string, got {_kind(pattern)}", "regex")
            try:
                return {"regex": re.compile(pattern, re.IGNORECASE)}
            except re.error as e:
                raise _fail(f"bad regex {pattern!r}: {e}", "regex") from None
        raise _fail(f"expected a string, a list of strings or {{regex: ...}}, got {_kind(data)}")

    def test(self, value: str | None) -> bool:
        """Whether `value` satisfies the condition; a missing value never does."""
        if value is None:
            return False
        if self.regex is not None:
            return self.regex.search(value) is not None
        value = value.strip().casefold()
        return any(value == v.casefold() for v in self.values)

    def test_any(self, values: Iterable[str]) -> bool:
        """Whether any of `values` satisfies the condition (for set-valued attributes such as body parts)."""
        return any(self.test(v) for v in values)

    def expect(self) -> str:
        """What the condition wants, for humans (routing reasons)."""
        if self.regex is not None:
            return f"/{self.regex.pattern}/"
        return " or ".join(self.values)


class NumCondition(_Model):
    """A numeric key's condition: a number (`eq`, exact) or a range `{le: X, ge: Y}` (either or both).

    YAML forms: `1.25`, `{le: 3.0}`, `{ge: 0.5, le: 3.0}`.
    """

    integer: ClassVar[bool] = False

    eq: float | None = None
    le: float | None = None
    ge: float | None = None

    @classmethod
    def _number(cls, value: Any, *at: str) -> float:
        if not _is_number(value) or value < 0 or (cls.integer and value != int(value)):
            wanted = "a whole number >= 0" if cls.integer else "a number >= 0"
            raise _fail(f"expected {wanted}, got {_kind(value)}", *at)
        return float(value)

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, data: Any) -> Any:
        if isinstance(data, cls):
            return data
        if isinstance(data, dict):
            _mapping(data, "a numeric condition", ("le", "ge"))
            if not data:
                raise _fail("empty numeric condition: give le, ge or both")
            out = {key: cls._number(value, key) for key, value in data.items()}
            if "le" in out and "ge" in out and out["ge"] > out["le"]:
                raise _fail(
                    f"empty range: ge {_fmt(out['ge'])} is greater than le {_fmt(out['le'])}, nothing can match", "ge"
                )
            return out
        if _is_number(data):
            return {"eq": cls._number(data)}
        raise _fail(f"expected a number or {{le: ..., ge: ...}}, got {_kind(data)}")

    def test(self, value: float | None) -> bool:
        """Whether `value` satisfies the condition; a missing value never does."""
        if value is None:
            return False
        if self.eq is not None and not math.isclose(value, self.eq, rel_tol=0.0, abs_tol=1e-6):
            return False
        if self.le is not None and value > self.le:
            return False
        return self.ge is None or value >= self.ge

    def expect(self) -> str:
        """What the condition wants, for humans (routing reasons)."""
        if self.eq is not None:
            return f"= {_fmt(self.eq)}"
        parts = [f">= {_fmt(self.ge)}"] if self.ge is not None else []
        parts += [f"<= {_fmt(self.le)}"] if self.le is not None else []
        return " and ".join(parts)


class CountCondition(NumCondition):
    """NumCondition for counts (SliceCount): whole numbers only."""

    integer: ClassVar[bool] = True


class ContainsCondition(_Model):
    """ImageType's condition: every value in `contains` is present (case-insensitive).

    YAML forms: `AXIAL` (means contains), `{contains: AXIAL}`, `{contains: [ORIGINAL, AXIAL]}`.
    """

    contains: tuple[str, ...]

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, data: Any) -> Any:
        if isinstance(data, cls):
            return data
        at: tuple[str, ...] = ()
        if isinstance(data, dict):
            _mapping(data, "an ImageType condition", ("contains",), required=("contains",))
            data, at = data["contains"], ("contains",)
        elif isinstance(data, list):
            raise _fail("a plain list is ambiguous for ImageType: write {contains: [A, B]} (all must be present)")
        values = [data] if isinstance(data, str) else data
        if not isinstance(values, list) or not values:
            raise _fail(f"expected a value or a non-empty list of values, got {_kind(data)}", *at)
        for i, value in enumerate(values):
            if not isinstance(value, str) or not value.strip():
                where = (*at, i) if isinstance(data, list) else at
                raise _fail(f"expected a non-empty string, got {_kind(value)}", *where)
        return {"contains": tuple(v.strip() for v in values)}

    def test(self, values: Iterable[str]) -> bool:
        """Whether every wanted value is among `values`; an empty ImageType never matches."""
        present = {v.strip().casefold() for v in values}
        return bool(present) and all(c.casefold() in present for c in self.contains)

    def expect(self) -> str:
        """What the condition wants, for humans (routing reasons)."""
        return "containing " + " and ".join(self.contains)


# --- rules ----------------------------------------------------------------------------------------------


class When(_Model):
    """A rule's conditions, keyed by DICOM keyword (BodyPart = the normalised body part). AND across keys."""

    Modality: StrCondition | None = None
    BodyPart: StrCondition | None = None
    SOPClassUID: StrCondition | None = None
    CallingAE: StrCondition | None = None
    CalledAE: StrCondition | None = None
    RequestedProcedurePriority: StrCondition | None = None
    Manufacturer: StrCondition | None = None
    SeriesDescription: StrCondition | None = None
    StudyDescription: StrCondition | None = None
    ProtocolName: StrCondition | None = None
    SliceThickness: NumCondition | None = None
    SliceCount: CountCondition | None = None
    SeriesNumber: CountCondition | None = None
    ImageType: ContainsCondition | None = None

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data: Any) -> Any:
        if isinstance(data, cls):
            return data
        for key, value in _mapping(data, "when", WHEN_KEYS).items():
            if value is None:
                raise _fail(f"{key} has no value", key)
        return data

    @field_validator("BodyPart")
    @classmethod
    def _body_part(cls, cond: StrCondition | None) -> StrCondition | None:
        if cond is not None:
            for i, value in enumerate(cond.values):
                if value.upper() not in BODY_PARTS:
                    at = (i,) if len(cond.values) > 1 else ()
                    raise _fail(f"unknown body part {value!r} (known: {', '.join(sorted(BODY_PARTS))})", *at)
        return cond

    def conditions(self) -> list[tuple[str, StrCondition | NumCondition | ContainsCondition]]:
        """The conditions that are set, as (DICOM keyword, condition), in schema order."""
        return [(key, cond) for key in WHEN_KEYS if (cond := getattr(self, key)) is not None]


_HOURS_RE = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])(?::([0-5][0-9]))?")


class Hours(_Model):
    """A daily window in the node's local time, `start` included, `end` excluded; it wraps midnight when
    `end` is earlier than `start` (22:00-06:00). YAML form: "22:00-06:00" (seconds optional: "22:00:30")."""

    start: dt.time
    end: dt.time

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, data: Any) -> Any:
        if isinstance(data, cls):
            return data
        if not isinstance(data, str) or data.count("-") != 1:
            raise _fail(f'hours must be "HH:MM-HH:MM" in local time, e.g. "22:00-06:00", got {_kind(data)}')
        bounds = []
        for part in data.split("-"):
            m = _HOURS_RE.fullmatch(part.strip())
            if m is None:
                raise _fail(f'bad time {part.strip()!r} in hours: use HH:MM (00:00 to 23:59), optionally :SS')
            bounds.append(dt.time(int(m[1]), int(m[2]), int(m[3] or 0)))
        if bounds[0] == bounds[1]:
            raise _fail("hours start and end at the same time: leave hours out to run at any time")
        return {"start": bounds[0], "end": bounds[1]}

    def contains(self, moment: dt.time) -> bool:
        if self.start < self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end

    def next_open(self, now: dt.datetime) -> dt.datetime | None:
        """None when `now` (aware) is inside the window, else when it opens next (aware, local time)."""
        local = now.astimezone()
        if self.contains(local.time().replace(tzinfo=None)):
            return None
        opening = local.replace(hour=self.start.hour, minute=self.start.minute, second=self.start.second,
                                microsecond=0)
        return opening if opening > local else opening + dt.timedelta(days=1)

    def __str__(self) -> str:
        return f"{self.start.isoformat()}-{self.end.isoformat()}"


class Rule(_Model):
    """One routing rule: when a series matches `when`, run `plugins` (on `queue`, at `priority`, within
    `hours` when given) and send the results to `destinations` (default: every configured destination;
    `[]`: keep them local).

    `level: study` applies the rule once the study is complete: `when` picks the candidate series, every
    `require` condition must match at least one series of the study (else nothing runs and the note says
    what is missing), and `select` chooses among the candidates: all (default), thinnest (smallest slice
    thickness, then most slices), largest (most instances) or first (lowest series number)."""

    name: str
    when: When
    plugins: list[str]
    queue: str | None = None
    priority: Literal["stat", "routine"] = "routine"
    destinations: list[str] | None = None
    hours: Hours | None = None
    level: Literal["series", "study"] = "series"
    select: Literal["all", "thinnest", "largest", "first"] | None = None
    require: list[When] | None = None
    rollout: Literal["live", "silent", "review"] = "live"
    review_hours: float | None = Field(None, gt=0)
    review_timeout: Literal["deliver", "discard"] = "discard"

    @property
    def rollout_fields(self) -> dict[str, Any]:
        return {"rollout": self.rollout, "review_hours": self.review_hours, "review_timeout": self.review_timeout}

    @model_validator(mode="after")
    def _review_only(self) -> Rule:
        if self.rollout != "review" and (self.review_hours is not None or "review_timeout" in self.model_fields_set):
            raise _fail("review_hours and review_timeout need `rollout: review`", "rollout")
        return self

    @model_validator(mode="after")
    def _study_only(self) -> Rule:
        if self.level != "study":
            for key in ("select", "require"):
                if getattr(self, key) is not None:
                    raise _fail(f"{key} needs `level: study` (a series-level rule sees one series)", key)
        if self.require is not None and not self.require:
            raise _fail("require is empty: give at least one series condition, or leave it out", "require")
        return self

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data: Any) -> Any:
        if isinstance(data, cls):
            return data
        return _mapping(data, "a rule", cls.model_fields, required=("name", "when", "plugins"))

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _RULE_NAME_RE.fullmatch(name):
            raise _fail(f"bad rule name {name!r}: use lower-case letters, digits and '-' (at most 63)")
        return name

    @field_validator("plugins", mode="before")
    @classmethod
    def _plugins_list(cls, plugins: Any) -> Any:
        if not isinstance(plugins, list):
            raise _fail(f"plugins must be a list of plugin names, got {_kind(plugins)}")
        if not plugins:
            raise _fail("plugins is empty: name at least one plugin")
        for i, name in enumerate(plugins):
            if not isinstance(name, str):
                raise _fail(f"expected a plugin name, got {_kind(name)}", i)
            if name in plugins[:i]:
                raise _fail(f"plugin {name!r} is listed twice", i)
        return plugins

    @field_validator("destinations", mode="before")
    @classmethod
    def _destinations_list(cls, names: Any) -> Any:
        if names is None:
            return names
        if not isinstance(names, list):
            raise _fail(f"destinations must be a list of destination names, got {_kind(names)}")
        for i, name in enumerate(names):
            if not isinstance(name, str):
                raise _fail(f"expected a destination name, got {_kind(name)}", i)
            if name in names[:i]:
                raise _fail(f"destination {name!r} is listed twice", i)
        return names

    @field_validator("queue")
    @classmethod
    def _queue(cls, queue: str | None) -> str | None:
        if queue is not None and not _QUEUE_RE.fullmatch(queue):
            raise _fail(f"bad queue {queue!r}: use gpu or cpu, optionally with a suffix such as gpu.ct-organ-seg")
        return queue

    @model_validator(mode="after")
    def _against_manifests(self, info: ValidationInfo) -> Rule:
        """With manifests in the validation context: plugins exist, can take the rule's modality, and
        (default rules only) are not reference-only."""
        context = info.context or {}
        configured: Collection[str] | None = context.get("destinations")
        if configured is not None:
            for i, name in enumerate(self.destinations or []):
                if name not in configured:
                    close = difflib.get_close_matches(name, list(configured), n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    known = ", ".join(sorted(configured)) or "none"
                    raise _fail(f"unknown destination {name!r} (configured: {known}){hint}", "destinations", i)
        manifests: Mapping[str, Manifest] | None = context.get("manifests")
        if manifests is None:
            return self
        for i, name in enumerate(self.plugins):
            manifest = manifests.get(name)
            if manifest is None:
                installed = ", ".join(sorted(manifests)) or "none"
                close = difflib.get_close_matches(name, list(manifests), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise _fail(f"unknown plugin {name!r} (installed: {installed}){hint}", "plugins", i)
            if manifest.series.multiple and self.level != "study":
                raise _fail(f"plugin {name!r} takes several series at once: route it with a `level: study` rule",
                            "plugins", i)
            if context.get("default") and manifest.reference_only:
                raise _fail(f"plugin {name!r} is reference-only: the default rules must not route to it", "plugins", i)
            modality = self.when.Modality
            if modality is not None and not modality.test_any(manifest.modalities):
                raise _fail(
                    f"plugin {name!r} takes {', '.join(manifest.modalities)}, "
                    f"which Modality {modality.expect()} can never match",
                    "plugins",
                    i,
                )
        return self


class RuleSet(_Model):
    """A whole rules file: the ordered rules (the first rule to name a plugin decides its queue/priority)."""

    rules: list[Rule]

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data: Any) -> Any:
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise _fail(f"a rules file must be a mapping with a 'rules' list (e.g. `rules: []`), got {_kind(data)}")
        return _mapping(data, "the rules file", ("rules",), required=("rules",))

    @field_validator("rules", mode="before")
    @classmethod
    def _list(cls, rules: Any) -> Any:
        if not isinstance(rules, list):
            raise _fail(f"rules must be a list (write `rules: []` for none), got {_kind(rules)}")
        return rules

    @model_validator(mode="after")
    def _unique_names(self) -> RuleSet:
        first: dict[str, int] = {}
        for i, rule in enumerate(self.rules):
            if rule.name in first:
                raise _fail(
                    f"duplicate rule name {rule.name!r} (first used by rules[{first[rule.name]}])", "rules", i, "name"
                )
            first[rule.name] = i
        return self


# --- loading ----------------------------------------------------------------------------------------------


def load_rules(path: Path | None, manifests: Mapping[str, Manifest],
               destinations: Collection[str] | None = None) -> RuleSet:
    """Read and validate a rules file against the installed plugins' manifests (and, when given, the
    names of the configured destinations).

    `path` None loads the packaged default rules (node/route/default_rules.yaml), which must also not route
    to reference-only plugins. Raises RulesError (naming the file and line) when the file cannot be
    read or is invalid.
    """
    source = path if path is not None else DEFAULT_RULES_PATH
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RulesError(f"{source}: cannot read the rules file: {e}") from None
    return _parse(text, manifests, str(source), default=path is None, destinations=destinations)


def parse_rules(text: str, manifests: Mapping[str, Manifest], source: str = "<rules>",
                destinations: Collection[str] | None = None) -> RuleSet:
    """Validate rules given as YAML text; `source` names it in errors. Raises RulesError."""
    return _parse(text, manifests, source, default=False, destinations=destinations)


def _parse(text: str, manifests: Mapping[str, Manifest], source: str, *, default: bool,
           destinations: Collection[str] | None = None) -> RuleSet:
    try:
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise RulesError(f"{source}{line}: not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise RulesError(f"{source}: not valid YAML: {e}") from None
    if root is None:
        raise RulesError(f"{source} line 1: the rules file is empty (write `rules: []` for no rules)")
    _no_duplicate_keys(root, source)
    try:
        context = {"manifests": manifests, "default": default, "destinations": destinations}
        return RuleSet.model_validate(data, context=context)
    except ValidationError as e:
        raise RulesError(_describe(e, root, source)) from None


def _no_duplicate_keys(root: yaml.Node, source: str) -> None:
    """YAML silently keeps the last of two equal keys; a rules file must not say a thing twice."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in keys:
                        raise RulesError(f"{source} line {key.start_mark.line + 1}: duplicate key {key.value!r}")
                    keys.add(key.value)
                stack += [key, value]
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value


def _line(root: yaml.Node, loc: tuple[str | int, ...]) -> int:
    """1-based line of the deepest node of `loc` present in the tree; a mapping key's own line when the
    path ends on (or stops at) a key."""
    node, line = root, root.start_mark.line
    for step in loc:
        if isinstance(node, yaml.MappingNode):
            found = next(
                (kv for kv in node.value if isinstance(kv[0], yaml.ScalarNode) and kv[0].value == str(step)), None
            )
            if found is None:
                break
            line, node = found[0].start_mark.line, found[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and 0 <= step < len(node.value):
            node = node.value[step]
            line = node.start_mark.line
        else:
            break
    return line + 1


def _path(loc: Iterable[str | int]) -> str:
    out = ""
    for step in loc:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
    return out


def _describe(error: ValidationError, root: yaml.Node, source: str) -> str:
    found: list[tuple[int, str]] = []
    for err in error.errors(include_url=False):
        loc = tuple(err["loc"])
        ctx = err.get("ctx") or {}
        line = _line(root, loc + tuple(ctx.get("at", ())))
        msg = err["msg"] if err["type"] == _ERROR_TYPE else err["msg"].removeprefix("Value error, ")
        where = _path(loc)
        found.append((line, f"{source} line {line}: {where + ': ' if where else ''}{msg}"))
    return "\n".join(text for _, text in sorted(found))
