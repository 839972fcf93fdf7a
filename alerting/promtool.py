"""`yakpanel rules test`: unit tests for alerting rules in `promtool test rules` format.

```yaml
rule_files: [host-rules.yml]        # relative to this file; globs allowed
evaluation_interval: 1m
tests:
  - name: cpu                        # optional, shown in failures
    interval: 1m                     # between input samples (default: evaluation_interval)
    input_series:
      - series: 'system_cpu_load_average_1m{server_id="s1", host_name="web-1"}'
        values: '1 5x10 1x5'
    alert_rule_test:
      - eval_time: 5m
        alertname: HostHighLoad
        exp_alerts:
          - exp_labels: {server_id: s1, host_name: web-1, severity: page}
            exp_annotations: {summary: "load 5 on web-1"}
    promql_expr_test:
      - expr: system_cpu_load_average_1m > 4
        eval_time: 2m
        exp_samples:
          - labels: 'system_cpu_load_average_1m{server_id="s1", host_name="web-1"}'
            value: 5
```

Each test loads its series into a `MemoryStore` and runs the rule groups through the
same evaluator as the alerting service, at every `evaluation_interval` from 0 up to the
latest `eval_time`, on a manual clock — so `for` and `keep_firing_for` play out as in
production. An alert test compares the rule's firing alerts (labels with `alertname`,
and annotations) at the latest evaluation at or before `eval_time`.
"""

from __future__ import annotations

import glob
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from alerting.durations import DurationError, format_duration, parse_duration
from alerting.evaluator import EvaluatorSettings, RuleEvaluator
from alerting.input_series import (
    SampleFeed,
    Series,
    SeriesNotationError,
    expand_values,
    parse_labels,
    parse_series,
)
from alerting.rules import ALERTNAME, RuleError, RuleGroup, load_rule_file
from alerting.state import AlertState, GroupState
from ingest.query import MetricsQueries, QueryError
from yakpanel.clock import ManualClock

TENANT = str(uuid.UUID(int=1))
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
PASSED, FAILED, UNREADABLE = 0, 1, 2

_FILE_KEYS = {"rule_files", "evaluation_interval", "group_eval_order", "tests"}
_TEST_KEYS = {
    "name",
    "interval",
    "input_series",
    "alert_rule_test",
    "promql_expr_test",
    "external_labels",
    "external_url",
    "fuzzy_compare",
}
Labels = tuple[tuple[str, str], ...]
Alerts = list[tuple[Labels, Labels]]  # (labels, annotations), sorted


class _Invalid(ValueError):
    """The test file's content is wrong (reported as a failure, not as unreadable)."""


@dataclass
class FileReport:
    path: str
    status: int = PASSED
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"Unit Testing:  {self.path}"]
        if self.status == PASSED:
            out.append("  SUCCESS")
        else:
            out.append("  FAILED:")
            out.extend("    " + line for p in self.problems for line in p.splitlines())
        return out


def run_test_files(paths: Sequence[Path], out: Callable[[str], None] = print) -> int:
    """Run every file, print promtool-style reports; 0 all passed, 1 a test failed, 2 a
    file could not be read."""
    status = PASSED
    for path in paths:
        report = run_test_file(path)
        for line in report.lines():
            out(line)
        out("")
        status = max(status, report.status)
    return status


def run_test_file(path: Path) -> FileReport:
    report = FileReport(str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        return FileReport(str(path), UNREADABLE, [f"cannot read the file: {exc}"])
    except yaml.YAMLError as exc:
        return FileReport(str(path), UNREADABLE, [f"not valid YAML: {exc}"])
    if not isinstance(data, dict):
        return FileReport(str(path), UNREADABLE, ["expected a mapping with rule_files and tests"])
    try:
        groups, interval, tests = _read_file(path, data)
    except _Invalid as exc:
        return FileReport(str(path), FAILED, [str(exc)])
    for index, test in enumerate(tests):
        where = f'test "{test["name"]}"' if test.get("name") else f"test {index + 1}"
        try:
            report.problems.extend(f"{where}: {p}" for p in _run_test(test, groups, interval))
        except _Invalid as exc:
            report.problems.append(f"{where}: {exc}")
    report.status = FAILED if report.problems else PASSED
    return report


def _read_file(
    path: Path, data: dict[str, Any]
) -> tuple[list[RuleGroup], timedelta, list[dict[str, Any]]]:
    unknown = sorted(set(map(str, data)) - _FILE_KEYS)
    if unknown:
        raise _Invalid(f"unknown field(s) {', '.join(unknown)}")
    interval = _duration(data.get("evaluation_interval", "1m"), "evaluation_interval")
    if interval <= timedelta(0):
        raise _Invalid("evaluation_interval must be positive")
    groups: list[RuleGroup] = []
    problems: list[str] = []
    for pattern in _strings(data.get("rule_files"), "rule_files"):
        full = pattern if Path(pattern).is_absolute() else str(path.parent / pattern)
        matched = sorted(glob.glob(full)) if glob.has_magic(full) else [full]
        if not matched:
            problems.append(f"rule_files: nothing matches {pattern}")
        for name in matched:
            try:
                groups.extend(load_rule_file(Path(name)))
            except OSError as exc:
                problems.append(f"cannot read rule file {name}: {exc.strerror or exc}")
            except RuleError as exc:
                problems.extend(f"{name}: {p}" for p in exc.problems)
    if problems:
        raise _Invalid("\n".join(problems))
    order = _strings(data.get("group_eval_order"), "group_eval_order")
    by_name = {g.name: g for g in groups}
    missing = [n for n in order if n not in by_name]
    if missing:
        raise _Invalid(f"group_eval_order names unknown group(s) {', '.join(missing)}")
    groups = [by_name[n] for n in order] + [g for g in groups if g.name not in order]
    tests = data.get("tests") or []
    if not isinstance(tests, list) or not all(isinstance(t, dict) for t in tests):
        raise _Invalid("tests must be a list of mappings")
    return groups, interval, tests


def _run_test(test: dict[str, Any], groups: list[RuleGroup], eval_interval: timedelta) -> list[str]:
    unknown = sorted(set(map(str, test)) - _TEST_KEYS)
    if unknown:
        raise _Invalid(f"unknown field(s) {', '.join(unknown)}")
    step = _duration(test.get("interval", format_duration(eval_interval)), "interval")
    if step <= timedelta(0):
        raise _Invalid("interval must be positive")
    series = _load_series(test.get("input_series") or [], step)
    settings = EvaluatorSettings(
        external_labels=_string_map(test.get("external_labels"), "external_labels"),
        external_url=str(test.get("external_url") or ""),
    )
    tolerance = 1e-6 if test.get("fuzzy_compare") else 1e-9
    alert_tests = sorted(
        (_alert_test(t) for t in _mappings(test.get("alert_rule_test"), "alert_rule_test")),
        key=lambda t: t[0],
    )
    known = {r.alert for g in groups for r in g.rules}
    problems = [
        f"alertname {name}: no alerting rule of that name in the rule files"
        for name in sorted({t[1] for t in alert_tests} - known)
    ]
    problems += _run_alert_tests(
        alert_tests, groups, SampleFeed(series, TENANT), eval_interval, settings
    )
    for case in _mappings(test.get("promql_expr_test"), "promql_expr_test"):
        problems += _run_expr_test(case, series, tolerance)
    return problems


def _load_series(items: object, step: timedelta) -> Series:
    out = []
    step_ms = step // timedelta(milliseconds=1)
    for item in _mappings(items, "input_series"):
        if set(item) - {"series", "values"}:
            raise _Invalid(
                f"input_series: unknown field(s) {sorted(set(item) - {'series', 'values'})}"
            )
        try:
            metric, labels = parse_series(str(item.get("series", "")))
            values = expand_values(str(item.get("values", "")))
        except SeriesNotationError as exc:
            raise _Invalid(f"input_series: {exc}") from None
        out.append(
            (metric, labels, [(i * step_ms, v) for i, v in enumerate(values) if v is not None])
        )
    return out


def _alert_test(case: dict[str, Any]) -> tuple[timedelta, str, Alerts]:
    extra = set(case) - {"eval_time", "alertname", "exp_alerts"}
    if extra:
        raise _Invalid(f"alert_rule_test: unknown field(s) {', '.join(sorted(extra))}")
    at = _duration(case.get("eval_time", "0"), "eval_time")
    name = case.get("alertname")
    if not isinstance(name, str) or not name:
        raise _Invalid("alert_rule_test: alertname is required")
    expected: Alerts = []
    for alert in _mappings(case.get("exp_alerts"), "exp_alerts"):
        extra = set(alert) - {"exp_labels", "exp_annotations"}
        if extra:
            raise _Invalid(f"exp_alerts: unknown field(s) {', '.join(sorted(extra))}")
        labels = {**_string_map(alert.get("exp_labels"), "exp_labels"), ALERTNAME: name}
        annotations = _string_map(alert.get("exp_annotations"), "exp_annotations")
        expected.append((_sorted(labels), _sorted(annotations)))
    return at, name, sorted(expected)


def _run_alert_tests(
    tests: list[tuple[timedelta, str, Alerts]],
    groups: list[RuleGroup],
    feed: SampleFeed,
    interval: timedelta,
    settings: EvaluatorSettings,
) -> list[str]:
    if not tests:
        return []
    clock = ManualClock(EPOCH)
    evaluator = RuleEvaluator(MetricsQueries(feed.store, clock), clock, settings)
    states = {g.name: GroupState() for g in groups}
    problems: list[str] = []
    pending = list(tests)
    at = timedelta(0)
    while pending and at <= pending[-1][0]:
        clock.advance((EPOCH + at - clock.now()).total_seconds())
        feed.until(at // timedelta(milliseconds=1))
        for group in groups:
            states[group.name] = evaluator.evaluate_group(TENANT, group, states[group.name]).state
        # An eval_time is checked against the latest evaluation at or before it.
        while pending and pending[0][0] < at + interval:
            eval_time, name, expected = pending.pop(0)
            got = sorted(
                (_sorted(a.labels), _sorted(a.annotations))
                for s in states.values()
                for a in s.alerts()
                if a.alertname == name and a.state == AlertState.FIRING
            )
            if got != expected:
                problems.append(_alert_diff(name, eval_time, expected, got))
        at += interval
    return problems


def _run_expr_test(
    case: dict[str, Any],
    series: Series,
    tolerance: float,
) -> list[str]:
    extra = set(case) - {"expr", "eval_time", "exp_samples"}
    if extra:
        raise _Invalid(f"promql_expr_test: unknown field(s) {', '.join(sorted(extra))}")
    expr = str(case.get("expr", ""))
    at = _duration(case.get("eval_time", "0"), "eval_time")
    expected: list[tuple[Labels, float]] = []
    for sample in _mappings(case.get("exp_samples"), "exp_samples"):
        if set(sample) - {"labels", "value"}:
            raise _Invalid("exp_samples: only labels and value are supported")
        text = str(sample.get("labels") or "")
        try:
            labels = _parse_labels(text)
            value = float(sample.get("value", math.nan))
        except (SeriesNotationError, TypeError, ValueError) as exc:
            raise _Invalid(f"exp_samples: {exc}") from None
        expected.append((labels, value))
    head = f'expr: "{expr}", time: {format_duration(at)}'
    store = SampleFeed(series, TENANT).until(at // timedelta(milliseconds=1))
    queries = MetricsQueries(store, ManualClock(EPOCH + at))
    try:
        result = queries.instant(TENANT, expr, at // timedelta(milliseconds=1))
    except QueryError as exc:
        return [f"{head}:\n    error: {exc.message}"]
    got: list[tuple[Labels, float]]
    if result.result_type == "scalar":
        assert result.scalar is not None
        got = [((), result.scalar[1])]
    elif result.result_type == "vector":
        got = [(_sorted(s.labels), float(s.values[-1])) for s in result.series]
    else:
        return [f"{head}:\n    error: a range vector cannot be compared; use an instant query"]
    expected.sort(key=lambda s: s[0])
    got.sort(key=lambda s: s[0])
    if [lb for lb, _ in got] == [lb for lb, _ in expected] and all(
        _close(g, e, tolerance) for (_, g), (_, e) in zip(got, expected, strict=True)
    ):
        return []
    return [f"{head},\n    exp:\n{_samples(expected)}\n    got:\n{_samples(got)}"]


def _samples(rows: list[tuple[Labels, float]]) -> str:
    return "\n".join(f"        {_fmt(lb)} {v!r}" for lb, v in rows) or "        (none)"


def _alert_diff(name: str, at: timedelta, expected: Alerts, got: Alerts) -> str:
    lines = [f"alertname: {name}, time: {format_duration(at)},"]
    for title, alerts in (("exp", expected), ("got", got)):
        lines.append(f"    {title}: [" + ("" if alerts else "]"))
        for labels, notes in alerts:
            lines.append(f"        {_fmt(labels)}")
            lines.append(f"          annotations: {_fmt(notes)}")
        if alerts:
            lines.append("    ]")
    lines.append("    diff:")
    got_by, exp_by = dict(got), dict(expected)
    for labels, notes in expected:
        if labels not in got_by:
            lines.append(f"      - {_fmt(labels)}: expected, not firing")
        elif got_by[labels] != notes:
            exp_a, got_a = dict(notes), dict(got_by[labels])
            for key in sorted(exp_a.keys() | got_a.keys()):
                if exp_a.get(key) != got_a.get(key):
                    lines.append(
                        f"      ~ {_fmt(labels)}: annotation {key}: expected"
                        f" {_quote(exp_a.get(key))}, got {_quote(got_a.get(key))}"
                    )
    for labels, _ in got:
        if labels not in exp_by:
            lines.append(f"      + {_fmt(labels)}: firing, not expected")
    return "\n".join(lines)


def _close(got: float, expected: float, tolerance: float) -> bool:
    if math.isnan(got) or math.isnan(expected):
        return math.isnan(got) and math.isnan(expected)
    return got == expected or math.isclose(got, expected, rel_tol=tolerance, abs_tol=1e-12)


def _parse_labels(text: str) -> Labels:
    return _sorted(parse_labels(text)) if text.strip() not in ("", "{}") else ()


def _sorted(mapping: Any) -> Labels:
    return tuple(sorted((str(k), str(v)) for k, v in dict(mapping).items()))


def _fmt(labels: Labels) -> str:
    return "{" + ", ".join(f"{k}={_quote(v)}" for k, v in labels) + "}"


def _quote(value: str | None) -> str:
    if value is None:
        return "(none)"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _duration(value: object, name: str) -> timedelta:
    try:
        return parse_duration(value)
    except DurationError as exc:
        raise _Invalid(f"{name}: {exc}") from None


def _strings(value: object, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Invalid(f"{name} must be a list of strings")
    return list(value)


def _mappings(value: object, name: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise _Invalid(f"{name} must be a list of mappings")
    return list(value)


def _string_map(value: object, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Invalid(f"{name} must be a mapping")
    return {str(k): str(v) for k, v in value.items()}
