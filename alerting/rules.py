"""Alerting rules: the model, and the loader for Prometheus-shaped rule-group YAML.

```yaml
groups:
  - name: host
    interval: 1m              # optional; the evaluator's default otherwise
    evaluation_delay: 30s     # optional (Prometheus: query_offset); absorbs late samples
    limit: 100                # optional; more alerts than this from one rule is an error
    labels: {team: ops}       # optional; added to every rule's labels
    rules:
      - alert: HostHighCpu
        expr: avg by (server_id, host_name) (system_cpu_utilization{cpu_mode!="idle"}) > 0.9
        for: 5m
        keep_firing_for: 10m
        labels: {severity: page}
        annotations:
          summary: "CPU at {{ $value | humanizePercentage }} on {{ $labels.host_name }}"
```

Loading is strict: unknown keys, bad durations, label names outside the grammar, PromQL the
query layer does not support and templates that do not compile are all reported at once,
each naming its group, rule and field. The model is plain frozen dataclasses; `to_dict`
gives back the YAML shape (what the API stores and returns).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from alerting.durations import DurationError, format_duration, parse_duration
from alerting.templates import AlertTemplate, TemplateError, compile_template
from ingest.query import LABEL_NAME, METRIC_NAME, MemoryStore, MetricsQueries, QueryError
from yakpanel.clock import ManualClock

ALERTNAME = "alertname"
_GROUP_KEYS = {"name", "interval", "evaluation_delay", "query_offset", "limit", "labels", "rules"}
_RULE_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
_CHECK_TENANT = str(uuid.UUID(int=0))


class RuleError(ValueError):
    """Rules that cannot be loaded; `problems` lists every one, each naming where it is."""

    def __init__(self, problems: Sequence[str], source: str = "") -> None:
        self.problems = list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(self.problems))


class RuleLimitExceeded(RuleError):
    """More alerting rules than the tenant's plan allows."""


@dataclass(frozen=True)
class AlertRule:
    """One alerting rule. `id` is stable across reloads: the control plane's row id, or
    `<group>/<alert>` from a file (`#2`, `#3`… for repeated names in one group)."""

    id: str
    group: str
    alert: str
    expr: str
    for_: timedelta
    keep_firing_for: timedelta
    labels: tuple[tuple[str, AlertTemplate], ...]
    annotations: tuple[tuple[str, AlertTemplate], ...]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"alert": self.alert, "expr": self.expr}
        if self.for_:
            out["for"] = format_duration(self.for_)
        if self.keep_firing_for:
            out["keep_firing_for"] = format_duration(self.keep_firing_for)
        if self.labels:
            out["labels"] = {k: t.source for k, t in self.labels}
        if self.annotations:
            out["annotations"] = {k: t.source for k, t in self.annotations}
        return out


@dataclass(frozen=True)
class RuleGroup:
    """Rules evaluated together, every `interval` (None: the evaluator's default), at
    `now - evaluation_delay`. `limit` > 0 caps the alerts one rule may produce."""

    name: str
    rules: tuple[AlertRule, ...]
    interval: timedelta | None = None
    evaluation_delay: timedelta = timedelta(0)
    limit: int = 0
    labels: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.interval is not None:
            out["interval"] = format_duration(self.interval)
        if self.evaluation_delay:
            out["evaluation_delay"] = format_duration(self.evaluation_delay)
        if self.limit:
            out["limit"] = self.limit
        if self.labels:
            out["labels"] = dict(self.labels)
        group_labels = dict(self.labels)
        rules = []
        for rule in self.rules:
            item = rule.to_dict()
            # Group labels were merged into each rule at load; give back what was written.
            own = {k: v for k, v in item.get("labels", {}).items() if group_labels.get(k) != v}
            item.pop("labels", None)
            if own:
                item["labels"] = own
            rules.append(item)
        out["rules"] = rules
        return out


def rules_to_dict(groups: Sequence[RuleGroup]) -> dict[str, Any]:
    return {"groups": [g.to_dict() for g in groups]}


def count_rules(groups: Sequence[RuleGroup]) -> int:
    return sum(len(g.rules) for g in groups)


def check_rule_limit(groups: Sequence[RuleGroup], max_rules: int | None) -> None:
    """Refuse a rule set bigger than the plan's limit (None: unlimited). Callers pass
    the tenant's whole rule set after the change they are about to store."""
    total = count_rules(groups)
    if max_rules is not None and total > max_rules:
        raise RuleLimitExceeded(
            [
                f"{total} alerting rules exceed the plan's limit of {max_rules}; delete rules"
                " or move to a plan with more"
            ]
        )


def check_expression(expr: str) -> str | None:
    """Why `expr` cannot be an alert condition (None: it can): PromQL the query layer
    cannot parse or does not support, or an answer that is not an instant vector. Found
    by evaluating it once over an empty store through the published query functions."""
    queries = MetricsQueries(MemoryStore(), ManualClock(datetime(2026, 1, 1, tzinfo=UTC)))
    try:
        result = queries.instant(_CHECK_TENANT, expr)
    except QueryError as exc:
        return exc.message
    if result.result_type == "matrix":
        return "a range vector cannot be an alert condition; wrap it in a function (rate, …)"
    return None


def load_rule_file(path: Path) -> tuple[RuleGroup, ...]:
    """Rule groups from a YAML file. OSError when it cannot be read; RuleError otherwise."""
    return load_rules_text(path.read_text(encoding="utf-8"), str(path))


def load_rules_text(text: str, source: str = "<rules>") -> tuple[RuleGroup, ...]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RuleError([f"not valid YAML: {exc}"], source) from None
    return parse_rule_groups(data, source)


def parse_rule_groups(
    data: object, source: str = "<rules>", rule_ids: Mapping[tuple[str, str], str] | None = None
) -> tuple[RuleGroup, ...]:
    """Validate the `{"groups": [...]}` document. `rule_ids` maps (group, alert) to the
    ids the caller keeps (the control plane's rows); the default derives them from names."""
    problems: list[str] = []
    if data is None:
        data = {"groups": []}
    if not isinstance(data, dict):
        raise RuleError(["the document must be a mapping with a `groups` list"], source)
    unknown = sorted(set(data) - {"groups"})
    if unknown:
        problems.append(f"unknown top-level field(s) {', '.join(map(str, unknown))}")
    raw_groups = data.get("groups") or []
    if not isinstance(raw_groups, list):
        raise RuleError([*problems, "`groups` must be a list"], source)
    groups: list[RuleGroup] = []
    seen: set[str] = set()
    for gi, raw in enumerate(raw_groups):
        group = _group(raw, gi, problems, rule_ids or {})
        if group is None:
            continue
        if group.name in seen:
            problems.append(f'group "{group.name}": the name is used by another group')
        seen.add(group.name)
        groups.append(group)
    if problems:
        raise RuleError(problems, source)
    return tuple(groups)


def _group(
    raw: object, index: int, problems: list[str], rule_ids: Mapping[tuple[str, str], str]
) -> RuleGroup | None:
    if not isinstance(raw, dict):
        problems.append(f"group {index + 1}: must be a mapping with name and rules")
        return None
    name = raw.get("name")
    where = f'group "{name}"' if isinstance(name, str) and name else f"group {index + 1}"
    if not isinstance(name, str) or not name.strip():
        problems.append(f"{where}: field name: a non-empty name is required")
        name = f"#{index + 1}"
    for key in sorted(set(raw) - _GROUP_KEYS, key=str):
        problems.append(f"{where}: unknown field {key!r}")
    interval = _duration(raw, "interval", where, problems, None)
    if interval is not None and interval <= timedelta(0):
        problems.append(f"{where}: field interval: must be positive")
    if "evaluation_delay" in raw and "query_offset" in raw:
        problems.append(f"{where}: give evaluation_delay or query_offset, not both")
    delay_key = "query_offset" if "query_offset" in raw else "evaluation_delay"
    delay = _duration(raw, delay_key, where, problems, timedelta(0)) or timedelta(0)
    limit = raw.get("limit", 0)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        problems.append(f"{where}: field limit: must be a whole number ≥ 0")
        limit = 0
    group_labels = _string_map(raw.get("labels"), f"{where}: field labels", problems, labels=True)
    raw_rules = raw.get("rules")
    if not isinstance(raw_rules, list):
        problems.append(f"{where}: field rules: a list of rules is required")
        raw_rules = []
    rules: list[AlertRule] = []
    used: dict[str, int] = {}
    for ri, raw_rule in enumerate(raw_rules):
        rule = _rule(raw_rule, name, ri, where, dict(group_labels), problems)
        if rule is None:
            continue
        used[rule.alert] = used.get(rule.alert, 0) + 1
        rule_id = rule_ids.get((name, rule.alert)) or f"{name}/{rule.alert}"
        if used[rule.alert] > 1:
            rule_id += f"#{used[rule.alert]}"
        rules.append(dataclasses.replace(rule, id=rule_id))
    return RuleGroup(name, tuple(rules), interval, delay, limit, tuple(group_labels.items()))


def _rule(
    raw: object,
    group: str,
    index: int,
    group_where: str,
    group_labels: dict[str, str],
    problems: list[str],
) -> AlertRule | None:
    if not isinstance(raw, dict):
        problems.append(f"{group_where} rule {index + 1}: must be a mapping")
        return None
    alert = raw.get("alert")
    where = f"{group_where} rule {index + 1}" + (f" ({alert})" if isinstance(alert, str) else "")
    if "record" in raw:
        problems.append(
            f"{where}: recording rules (record:) are not supported; alert on the expression"
            " itself, or use the rollups the query layer already keeps"
        )
        return None
    start = len(problems)
    for key in sorted(set(raw) - _RULE_KEYS, key=str):
        problems.append(f"{where}: unknown field {key!r}")
    if not isinstance(alert, str) or not METRIC_NAME.match(alert):
        problems.append(
            f"{where}: field alert: a name like HostHighCpu is required"
            " (letters, digits, _ and :, not starting with a digit)"
        )
    expr = raw.get("expr")
    if isinstance(expr, int | float) and not isinstance(expr, bool):
        expr = str(expr)
    if not isinstance(expr, str) or not expr.strip():
        problems.append(f"{where}: field expr: a PromQL expression is required")
    else:
        why = check_expression(expr)
        if why is not None:
            problems.append(f"{where}: field expr: {why}")
    hold = _duration(raw, "for", where, problems, timedelta(0)) or timedelta(0)
    keep = _duration(raw, "keep_firing_for", where, problems, timedelta(0)) or timedelta(0)
    labels = {
        **group_labels,
        **_string_map(raw.get("labels"), f"{where}: field labels", problems, labels=True),
    }
    annotations = _string_map(raw.get("annotations"), f"{where}: field annotations", problems)
    label_templates = _templates(labels, f"{where}: label", problems)
    annotation_templates = _templates(annotations, f"{where}: annotation", problems)
    if len(problems) > start:
        return None
    assert isinstance(alert, str)
    assert isinstance(expr, str)
    return AlertRule(
        "",
        group,
        alert,
        expr.strip(),
        hold,
        keep,
        tuple(sorted(label_templates.items())),
        tuple(sorted(annotation_templates.items())),
    )


def _duration(
    raw: dict[str, Any], key: str, where: str, problems: list[str], default: timedelta | None
) -> timedelta | None:
    if key not in raw or raw[key] is None:
        return default
    try:
        return parse_duration(raw[key])
    except DurationError as exc:
        problems.append(f"{where}: field {key}: {exc}")
        return default


def _string_map(
    raw: object, where: str, problems: list[str], labels: bool = False
) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be a mapping of names to strings")
        return {}
    out: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not LABEL_NAME.match(key):
            problems.append(
                f"{where}: invalid name {key!r} (letters, digits and _, not starting with a digit)"
            )
            continue
        if labels and (key.startswith("__") or key == ALERTNAME):
            problems.append(f"{where}: {key!r} is reserved and cannot be set by a rule")
            continue
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            problems.append(f"{where}: {key}: the value must be a string, got {value!r}")
            continue
        out[key] = str(value)
    return out


def _templates(values: dict[str, str], where: str, problems: list[str]) -> dict[str, AlertTemplate]:
    out: dict[str, AlertTemplate] = {}
    for key, text in values.items():
        try:
            out[key] = compile_template(text)
        except TemplateError as exc:
            problems.append(f"{where} {key}: {exc}")
    return out
