"""The alert evaluator: query results in, new alert state and transitions out.

Per rule and evaluation time `at` (the group's clock tick):

1. `query_rule` asks the query layer for the rule's expression at `at - evaluation_delay`
   (the only I/O here);
2. `advance` — pure — turns the answer into alerts, one per series, keyed by
   `fingerprint(tenant, rule id, labels)`, and moves each through
   inactive → pending → firing → resolved:
   - a new active series is pending; it fires once active continuously for `for`
     (`for: 0` fires at once: one inactive → firing transition);
   - a pending alert whose series is no longer active goes back to inactive;
   - a firing alert whose series is no longer active stays firing until it has been
     inactive for `keep_firing_for`, then resolves; active again meanwhile, it carries on
     firing with no new transition (a flapping metric pages once);
   - resolved alerts are kept `resolved_retention` (15 min), then dropped; active again
     before that, a new episode starts (resolved → pending);
   - a failed query leaves every alert as it was and marks the rule's health `error`
     with the message: a transient store failure neither resolves nor re-fires anything;
   - `hold_absent` (the evaluations streaming runs when samples arrive, between the
     group's interval evaluations): alerts whose series are absent stay as they were —
     only the interval evaluations end a pending `for` or resolve, so evaluating on
     every sample fires sooner but does not make a noisy series flap more than before.
3. `RuleEvaluator.evaluate_group` runs a group at the injected clock's time, and resolves
   the alerts of rules that were removed from the group.

The service persists `GroupEvaluation.state` and `transitions` in one transaction
before publishing the transitions, so that a restart resumes from the stored state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from alerting.rules import ALERTNAME, AlertRule, RuleGroup
from alerting.state import Alert, AlertState, GroupState, RuleState, Transition, fingerprint
from ingest.query import METRIC_LABEL, MetricsQueries, QueryError
from yakpanel.clock import Clock

RESOLVED_RETENTION = timedelta(minutes=15)
OUTAGE_TOLERANCE = timedelta(hours=1)
DEFAULT_INTERVAL = timedelta(minutes=1)


@dataclass(frozen=True)
class EvaluatorSettings:
    """`outage_tolerance`: after a gap this long without evaluating a rule (the service
    was down), pending alerts start their `for` again rather than fire on a condition
    nobody saw hold. Firing alerts are never affected by a gap."""

    resolved_retention: timedelta = RESOLVED_RETENTION
    outage_tolerance: timedelta = OUTAGE_TOLERANCE
    default_interval: timedelta = DEFAULT_INTERVAL
    external_labels: Mapping[str, str] = field(default_factory=dict)
    external_url: str = ""


@dataclass(frozen=True)
class Sample:
    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True)
class QueryOutcome:
    """The active series of a rule's expression, or why it could not be evaluated."""

    samples: tuple[Sample, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class RuleEvaluation:
    state: RuleState
    transitions: tuple[Transition, ...]


@dataclass(frozen=True)
class GroupEvaluation:
    at: datetime
    state: GroupState
    transitions: tuple[Transition, ...]


def query_rule(
    queries: MetricsQueries, tenant_id: str, rule: AlertRule, query_time: datetime
) -> QueryOutcome:
    """The rule's expression at `query_time` (the evaluation time minus the group's delay)."""
    try:
        result = queries.instant(tenant_id, rule.expr, int(query_time.timestamp() * 1000))
    except QueryError as exc:
        return QueryOutcome(error=f"{exc.kind}: {exc.message}")
    if result.result_type == "scalar":
        assert result.scalar is not None
        return QueryOutcome((Sample({}, result.scalar[1]),))
    if result.result_type != "vector":
        return QueryOutcome(error="the expression must give an instant vector")
    return QueryOutcome(
        tuple(Sample(s.labels, float(s.values[-1])) for s in result.series if len(s.values))
    )


@dataclass(frozen=True)
class _Built:
    labels: dict[str, str]
    annotations: dict[str, str]
    value: float


def _build(
    rule: AlertRule, samples: Sequence[Sample], tenant_id: str, settings: EvaluatorSettings
) -> dict[str, _Built] | str:
    """Alerts by fingerprint (labels and annotations rendered), or an error message."""
    out: dict[str, _Built] = {}
    for sample in samples:
        series = dict(sample.labels)
        labels = {k: v for k, v in series.items() if k != METRIC_LABEL}
        extra = (settings.external_labels, settings.external_url)
        for name, template in rule.labels:
            text = template.render(series, sample.value, *extra)
            if text:
                labels[name] = text
            else:  # as Prometheus: a label rendered empty is removed
                labels.pop(name, None)
        labels[ALERTNAME] = rule.alert
        annotations = {}
        for name, template in rule.annotations:
            text = template.render(series, sample.value, *extra)
            if text:
                annotations[name] = text
        fp = fingerprint(tenant_id, rule.id, labels)
        if fp in out:
            shown = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            return (
                "the result has several series with the same labels after applying the rule's"
                f" labels ({{{shown}}}); aggregate or keep a distinguishing label"
            )
        out[fp] = _Built(labels, annotations, sample.value)
    return out


def _transition(
    tenant_id: str, rule: AlertRule, alert: Alert, before: AlertState, at: datetime
) -> Transition:
    return Transition(
        tenant_id=tenant_id,
        fingerprint=alert.fingerprint,
        rule_id=rule.id,
        group=rule.group,
        alertname=rule.alert,
        labels=dict(alert.labels),
        annotations=dict(alert.annotations),
        from_state=before,
        to_state=alert.state,
        at=at,
        value=alert.value,
        active_since=alert.active_since,
        fired_at=alert.fired_at,
        resolved_at=alert.resolved_at,
    )


def _failed(state: RuleState, message: str, at: datetime) -> RuleEvaluation:
    failed = dataclasses.replace(state, health="error", last_error=message, last_evaluated_at=at)
    return RuleEvaluation(failed, ())


def advance(
    rule: AlertRule,
    state: RuleState,
    outcome: QueryOutcome,
    at: datetime,
    *,
    tenant_id: str,
    limit: int = 0,
    settings: EvaluatorSettings | None = None,
    hold_absent: bool = False,
) -> RuleEvaluation:
    """The rule's next state at evaluation time `at`, given what its query found."""
    if at.tzinfo is None:
        raise ValueError("evaluation times must be timezone-aware")
    settings = settings or EvaluatorSettings()
    if outcome.error is not None:
        return _failed(state, outcome.error, at)
    built = _build(rule, outcome.samples, tenant_id, settings)
    if isinstance(built, str):
        return _failed(state, built, at)
    if limit and len(built) > limit:
        return _failed(state, f"exceeded the group's limit of {limit} alerts with {len(built)}", at)
    previous = dict(state.alerts)
    gap = None if state.last_evaluated_at is None else at - state.last_evaluated_at
    restart_pending = gap is not None and gap > settings.outage_tolerance
    alerts: dict[str, Alert] = {}
    moved: list[tuple[Alert, AlertState]] = []
    for fp, new in sorted(built.items(), key=lambda item: sorted(item[1].labels.items())):
        old = previous.get(fp)
        ongoing = old is not None and old.state in (AlertState.PENDING, AlertState.FIRING)
        if old is not None and ongoing:
            since = at if old.state == AlertState.PENDING and restart_pending else old.active_since
            alert = dataclasses.replace(
                old,
                labels=new.labels,
                annotations=new.annotations,
                value=new.value,
                active_since=since,
                last_active_at=at,
                keep_firing_since=None,
            )
        else:
            alert = Alert(
                fp, rule.id, new.labels, new.annotations, AlertState.PENDING, new.value, at, at
            )
        if alert.state == AlertState.PENDING and at - alert.active_since >= rule.for_:
            alert = dataclasses.replace(alert, state=AlertState.FIRING, fired_at=at)
        before = AlertState.INACTIVE if old is None else old.state
        if not ongoing or alert.state != before:
            moved.append((alert, before))
        alerts[fp] = alert
    gone = sorted(
        (a for fp, a in previous.items() if fp not in built), key=lambda a: sorted(a.labels.items())
    )
    for old in gone:
        if hold_absent and old.state in (AlertState.PENDING, AlertState.FIRING):
            alerts[old.fingerprint] = old
        elif old.state == AlertState.PENDING:
            moved.append((dataclasses.replace(old, state=AlertState.INACTIVE), old.state))
        elif old.state == AlertState.FIRING:
            since = old.keep_firing_since or at
            if rule.keep_firing_for and at - since < rule.keep_firing_for:
                alerts[old.fingerprint] = dataclasses.replace(old, keep_firing_since=since)
                continue
            resolved = dataclasses.replace(
                old, state=AlertState.RESOLVED, resolved_at=at, keep_firing_since=None
            )
            alerts[old.fingerprint] = resolved
            moved.append((resolved, old.state))
        elif old.resolved_at is not None and at - old.resolved_at < settings.resolved_retention:
            alerts[old.fingerprint] = old
    transitions = tuple(_transition(tenant_id, rule, a, before, at) for a, before in moved)
    new_state = RuleState(rule.id, alerts, "ok", None, at)
    return RuleEvaluation(new_state, transitions)


def retire(
    rule_state: RuleState, group: str, at: datetime, *, tenant_id: str
) -> tuple[Transition, ...]:
    """Transitions for the alerts of a rule that no longer exists: pending ones go
    inactive, firing ones resolve (so receivers hear that they ended)."""
    out = []
    for alert in sorted(rule_state.alerts.values(), key=lambda a: sorted(a.labels.items())):
        if alert.state == AlertState.PENDING:
            target = dataclasses.replace(alert, state=AlertState.INACTIVE)
        elif alert.state == AlertState.FIRING:
            target = dataclasses.replace(alert, state=AlertState.RESOLVED, resolved_at=at)
        else:
            continue
        out.append(
            Transition(
                tenant_id=tenant_id,
                fingerprint=alert.fingerprint,
                rule_id=alert.rule_id,
                group=group,
                alertname=alert.alertname,
                labels=dict(alert.labels),
                annotations=dict(alert.annotations),
                from_state=alert.state,
                to_state=target.state,
                at=at,
                value=alert.value,
                active_since=alert.active_since,
                fired_at=alert.fired_at,
                resolved_at=target.resolved_at,
            )
        )
    return tuple(out)


class RuleEvaluator:
    """Evaluates rule groups through the published query functions at the clock's time."""

    def __init__(
        self, queries: MetricsQueries, clock: Clock, settings: EvaluatorSettings | None = None
    ) -> None:
        self.queries = queries
        self.clock = clock
        self.settings = settings or EvaluatorSettings()

    def interval(self, group: RuleGroup) -> timedelta:
        return group.interval or self.settings.default_interval

    def evaluate_group(
        self,
        tenant_id: str,
        group: RuleGroup,
        state: GroupState | None = None,
        at: datetime | None = None,
        *,
        hold_absent: bool = False,
    ) -> GroupEvaluation:
        """One evaluation of every rule of `group` at `at` (default: the clock's now,
        to the millisecond), from `state` (None: nothing known yet). `hold_absent`: see
        `advance`."""
        at = at or self.clock.now()
        at = at.replace(microsecond=at.microsecond // 1000 * 1000)
        state = state or GroupState()
        query_time = at - group.evaluation_delay
        rules: dict[str, RuleState] = {}
        transitions: list[Transition] = []
        for rule in group.rules:
            outcome = query_rule(self.queries, tenant_id, rule, query_time)
            result = advance(
                rule,
                state.rule(rule.id),
                outcome,
                at,
                tenant_id=tenant_id,
                limit=group.limit,
                settings=self.settings,
                hold_absent=hold_absent,
            )
            rules[rule.id] = result.state
            transitions.extend(result.transitions)
        for rule_id, old in sorted(state.rules.items()):
            if rule_id not in rules:
                transitions.extend(retire(old, group.name, at, tenant_id=tenant_id))
        return GroupEvaluation(at, GroupState(rules), tuple(transitions))
