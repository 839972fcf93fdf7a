"""The alert state machine over real query evaluation (in-memory store, manual clock):
`for`, `keep_firing_for`, resolution, no-data and rate-of-change rules, restart from
serialised state, and what a failing query does to alerts."""

from __future__ import annotations

import json
import math
import textwrap
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from alerting.evaluator import (
    EvaluatorSettings,
    GroupEvaluation,
    QueryOutcome,
    RuleEvaluator,
    advance,
)
from alerting.rules import RuleGroup, load_rules_text
from alerting.state import Alert, AlertState, GroupState, RuleState, Transition
from ingest.query import MemoryStore, MetricsQueries, QueryError
from ingest.query.store import Grouping, SampleBlock, SeriesRef
from ingest.query.tiers import Tier
from yakpanel.clock import ManualClock

TENANT = str(uuid.uuid4())
START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
P, F, R, OFF = AlertState.PENDING, AlertState.FIRING, AlertState.RESOLVED, AlertState.INACTIVE


def ms(minute: float) -> int:
    return int((START + timedelta(minutes=minute)).timestamp() * 1000)


def minute_of(at: datetime) -> float:
    return (at - START) / timedelta(minutes=1)


class FlakyStore(MemoryStore):
    """A MemoryStore whose reads fail while `down` (a ClickHouse outage)."""

    down = False

    def series(self, *args: object, **kwargs: object) -> list[SeriesRef]:
        if self.down:
            raise QueryError("unavailable", "the metrics store is unavailable: connection refused")
        return super().series(*args, **kwargs)  # type: ignore[arg-type]

    def fetch(
        self,
        tenant_id: str,
        series_ids: Sequence[int],
        tier: Tier,
        start_ms: int,
        end_ms: int,
        grouping: Grouping | None,
        limit: int,
        timeout_s: float | None = None,
    ) -> SampleBlock:
        if self.down:
            raise QueryError("unavailable", "the metrics store is unavailable: connection refused")
        return super().fetch(tenant_id, series_ids, tier, start_ms, end_ms, grouping, limit)


class Harness:
    """One rule group evaluated once a minute from START on a manual clock, over series
    whose samples reach the store as time passes (never ahead of the clock)."""

    def __init__(self, rules: str, settings: EvaluatorSettings | None = None) -> None:
        (self.group,) = load_rules_text(textwrap.dedent(rules))
        self.store = FlakyStore()
        self.settings = settings
        self.incoming: list[tuple[str, Mapping[str, str], int, float]] = []
        self.restart(GroupState())
        self.log: list[tuple[float, str, AlertState, AlertState]] = []
        self.transitions: list[Transition] = []

    def restart(self, state: GroupState, at_minute: int = 0) -> None:
        """A new evaluator process: new clock, new query functions, the given state."""
        self.minute = at_minute
        self.clock = ManualClock(START + timedelta(minutes=at_minute))
        queries = MetricsQueries(self.store, self.clock)
        self.evaluator = RuleEvaluator(queries, self.clock, self.settings)
        self.state = state

    def series(
        self, metric: str, labels: Mapping[str, str], values: Sequence[float | None]
    ) -> None:
        """One sample per minute from minute 0 (None: no sample that minute)."""
        self.incoming += [(metric, labels, ms(i), v) for i, v in enumerate(values) if v is not None]

    def evaluate(self) -> GroupEvaluation:
        now = int(self.clock.now().timestamp() * 1000)
        for metric, labels, at, value in [x for x in self.incoming if x[2] <= now]:
            self.store.add(TENANT, metric, labels, [(at, value)])
        self.incoming = [x for x in self.incoming if x[2] > now]
        result = self.evaluator.evaluate_group(TENANT, self.group, self.state)
        self.state = result.state
        self.transitions.extend(result.transitions)
        for t in result.transitions:
            self.log.append((minute_of(t.at), t.alertname, t.from_state, t.to_state))
        return result

    def run(self, minutes: int, round_trip: bool = False) -> None:
        """Evaluate at the next `minutes` minutes; optionally restarting from the state
        serialised to JSON after each evaluation."""
        for _ in range(minutes):
            target = START + timedelta(minutes=self.minute)
            self.clock.advance((target - self.clock.now()).total_seconds())
            self.evaluate()
            self.minute += 1
            if round_trip:
                saved = json.loads(json.dumps(self.state.to_dict()))
                self.restart(GroupState.from_dict(saved), self.minute)

    def alerts(self) -> list[Alert]:
        return self.state.alerts()


LOAD_RULE = """
groups:
  - name: host
    rules:
      - alert: HighLoad
        expr: system_cpu_load_average_1m > 4
        for: 3m
        labels: {severity: page}
        annotations: {summary: "load {{ $value }} on {{ $labels.host_name }}"}
"""
WEB1 = {"server_id": "s1", "host_name": "web-1"}


def test_for_holds_pending_then_fires_resolves_and_retires() -> None:
    h = Harness(LOAD_RULE)
    #                      0  1  2  3  4  5  6  7  8  9 10 11
    values = [1.0, 1, 5, 5, 5, 5, 5, 1, 1, 1, 5, 1] + [1.0] * 20
    h.series("system_cpu_load_average_1m", WEB1, values)
    h.run(12)
    assert h.log == [
        (2, "HighLoad", OFF, P),
        (5, "HighLoad", P, F),  # active continuously for 3m
        (7, "HighLoad", F, R),
        (10, "HighLoad", R, P),  # a new episode while the resolved one is still kept
        (11, "HighLoad", P, OFF),  # gone before its `for`: never fired
    ]
    firing = h.transitions[1]
    assert firing.labels == {"alertname": "HighLoad", "severity": "page", **WEB1}
    assert firing.annotations == {"summary": "load 5 on web-1"}
    assert (firing.active_since, firing.fired_at) == (START + timedelta(minutes=2), firing.at)
    resolved = h.transitions[2]
    assert resolved.resolved_at == START + timedelta(minutes=7)
    assert resolved.fired_at == firing.fired_at
    assert firing.fingerprint == resolved.fingerprint == h.transitions[3].fingerprint
    assert h.alerts() == []  # the pending alert that went inactive is not kept


def test_resolved_alerts_are_kept_for_15_minutes() -> None:
    h = Harness(LOAD_RULE)
    h.series("system_cpu_load_average_1m", WEB1, [5.0] * 4 + [1.0] * 30)
    h.run(5)
    assert h.log[-1] == (4, "HighLoad", F, R)
    h.run(14)  # minutes 5 … 18: still shown as resolved
    assert [a.state for a in h.alerts()] == [R]
    h.run(1)  # minute 19 = 15 minutes after resolving: dropped, with no transition
    assert h.alerts() == []
    assert h.log[-1] == (4, "HighLoad", F, R)


def test_for_zero_fires_at_the_first_evaluation() -> None:
    h = Harness(LOAD_RULE.replace("for: 3m", "for: 0s"))
    h.series("system_cpu_load_average_1m", WEB1, [5.0, 5, 1])
    h.run(3)
    assert h.log == [(0, "HighLoad", OFF, F), (2, "HighLoad", F, R)]


FLAP_RULE = """
groups:
  - name: sites
    rules:
      - alert: SiteDown
        expr: yakpanel_site_up == 0
        for: 1m
        keep_firing_for: 5m
"""
#              0  1  2  3  4  5  6  7  8  9 10 …
FLAPPING = [1.0, 0, 0, 0, 1, 0, 1, 0, 1, 0] + [1.0] * 20
SITE = {"site": "shop.example.com", "url": "https://shop.example.com/", **WEB1}


@pytest.mark.parametrize("round_trip", [False, True], ids=["in-memory", "restored-each-minute"])
def test_keep_firing_for_a_flapping_metric_pages_once(round_trip: bool) -> None:
    h = Harness(FLAP_RULE)
    h.series("yakpanel_site_up", SITE, FLAPPING)
    h.run(20, round_trip=round_trip)
    # Up from minute 10 on: held firing until 5 minutes of that, then resolved once.
    assert h.log == [(1, "SiteDown", OFF, P), (2, "SiteDown", P, F), (15, "SiteDown", F, R)]
    assert sum(t.to_state == F for t in h.transitions) == 1


def test_without_keep_firing_for_the_same_metric_pages_again_and_again() -> None:
    h = Harness(FLAP_RULE.replace("for: 1m", "for: 0s").replace("keep_firing_for: 5m", ""))
    h.series("yakpanel_site_up", SITE, FLAPPING)
    h.run(20)
    assert sum(t.to_state == F for t in h.transitions) == 4  # down at 1-3, 5, 7 and 9


def test_a_restart_mid_for_fires_on_time_and_a_restored_firing_alert_is_not_sent_again() -> None:
    rule = LOAD_RULE.replace("for: 3m", "for: 5m")
    h = Harness(rule)
    h.series("system_cpu_load_average_1m", WEB1, [5.0] * 30)
    h.run(3)  # minutes 0, 1, 2: pending since 0
    assert h.log == [(0, "HighLoad", OFF, P)]
    saved = json.dumps(h.state.to_dict())

    # Restart at minute 3 from the stored rows: the `for` goes on from minute 0.
    h.restart(GroupState.from_dict(json.loads(saved)), at_minute=3)
    h.run(3)  # 3, 4, 5
    assert h.log == [(0, "HighLoad", OFF, P), (5, "HighLoad", P, F)]
    assert h.transitions[-1].active_since == START

    # A process that had lost the state would only fire at minute 8 (3 + 5).
    fresh = Harness(rule)
    fresh.store = h.store
    fresh.restart(GroupState(), at_minute=3)
    fresh.run(6)
    assert fresh.log == [(3, "HighLoad", OFF, P), (8, "HighLoad", P, F)]

    # Restart while firing: still firing, same fired_at, and no second "firing" transition.
    saved = json.dumps(h.state.to_dict())
    h.restart(GroupState.from_dict(json.loads(saved)), at_minute=6)
    h.run(4)
    assert h.log == [(0, "HighLoad", OFF, P), (5, "HighLoad", P, F)]
    (alert,) = h.alerts()
    assert (alert.state, alert.fired_at) == (F, START + timedelta(minutes=5))


def test_after_a_long_outage_pending_alerts_start_their_for_again() -> None:
    h = Harness(LOAD_RULE.replace("for: 3m", "for: 30m"))
    h.series("system_cpu_load_average_1m", WEB1, [5.0] * 200)
    h.run(2)
    saved = GroupState.from_dict(json.loads(json.dumps(h.state.to_dict())))
    h.restart(saved, at_minute=121)  # down for two hours: nobody watched the condition
    h.run(30)
    assert h.log == [(0, "HighLoad", OFF, P)]
    assert h.alerts()[0].active_since == START + timedelta(minutes=121)
    h.run(2)
    assert h.log[-1] == (151, "HighLoad", P, F)


NO_DATA_RULES = """
groups:
  - name: agents
    rules:
      - alert: DatabaseServerNoData
        expr: absent_over_time(system_cpu_load_average_1m{server_id="s1"}[5m])
      - alert: HostAgentSilent
        expr: >-
          present_over_time(system_cpu_load_average_1m[1d])
          unless present_over_time(system_cpu_load_average_1m[5m])
        for: 1m
        annotations: {summary: "no metrics from {{ $labels.host_name }}"}
"""


def test_an_agent_that_stops_reporting_raises_the_no_data_alerts() -> None:
    h = Harness(NO_DATA_RULES)
    # s1 reports every minute until 10, then stops; comes back at 18. s2 never stops.
    h.series("system_cpu_load_average_1m", WEB1, [1.0] * 11 + [None] * 7 + [1.0] * 5)
    h.series("system_cpu_load_average_1m", {"server_id": "s2", "host_name": "web-2"}, [1.0] * 25)
    h.run(20)
    # Last sample at 10:00; the 5 minute windows (t - 5m, t] are empty from 15:00.
    assert h.log == [
        (15, "DatabaseServerNoData", OFF, F),
        (15, "HostAgentSilent", OFF, P),
        (16, "HostAgentSilent", P, F),
        (18, "DatabaseServerNoData", F, R),
        (18, "HostAgentSilent", F, R),
    ]
    absent, _, silent, _, _ = h.transitions
    assert absent.labels == {"alertname": "DatabaseServerNoData", "server_id": "s1"}
    assert silent.labels == {"alertname": "HostAgentSilent", **WEB1}
    assert silent.annotations == {"summary": "no metrics from web-1"}


RATE_RULES = """
groups:
  - name: trends
    rules:
      - alert: HostDiskFillingUp
        expr: deriv(system_filesystem_utilization[10m]) * 3600 > 0.05
        for: 5m
        annotations:
          summary: "{{ $labels.system_filesystem_mountpoint }} +{{ $value | humanizePercentage }}/h"
      - alert: HostNetworkBusy
        expr: rate(system_network_io{network_io_direction="receive"}[5m]) > 1e6
"""


def test_rate_of_change_rules() -> None:
    h = Harness(RATE_RULES)
    root = {**WEB1, "system_device": "/dev/sda1", "system_filesystem_mountpoint": "/"}
    srv = {**WEB1, "system_device": "/dev/sdb1", "system_filesystem_mountpoint": "/srv"}
    h.series("system_filesystem_utilization", root, [0.5 + 0.002 * i for i in range(30)])
    h.series("system_filesystem_utilization", srv, [0.3] * 30)
    nic = {**WEB1, "network_interface_name": "eth0", "network_io_direction": "receive"}
    # A byte counter: 120 MB a minute (2 MB/s) until minute 8, then 6 MB a minute.
    counter = [120e6 * i for i in range(9)] + [960e6 + 6e6 * i for i in range(1, 20)]
    h.series("system_network_io", nic, counter)
    h.run(16)
    assert h.log == [
        (1, "HostDiskFillingUp", OFF, P),  # two samples: a slope of 12 points an hour
        # From a zero start the 5m window's rate is 120 MB · m / 300 s: above 1 MB/s at 3.
        (3, "HostNetworkBusy", OFF, F),
        (6, "HostDiskFillingUp", P, F),
        # At 11 the window (6m, 11m] holds 7 … 11: (120 + 18) MB over 4 min, extrapolated
        # by the minute before the first sample: 138 MB · 1.25 / 300 s = 0.575 MB/s.
        (11, "HostNetworkBusy", F, R),
    ]
    filling = h.transitions[2]
    assert filling.labels == {"alertname": "HostDiskFillingUp", **root}
    assert filling.value == pytest.approx(0.12)
    assert filling.annotations == {"summary": "/ +12%/h"}


def test_a_failing_query_keeps_every_alert_and_marks_the_rule_unhealthy() -> None:
    h = Harness(FLAP_RULE)
    h.series("yakpanel_site_up", SITE, [0.0] * 3 + [1.0] * 30)
    h.run(3)
    assert h.log[-1] == (1, "SiteDown", P, F)
    h.store.down = True
    h.run(10)  # minutes 3-12: the site is back up, but nobody can tell
    (alert,) = h.alerts()
    assert alert.state == F
    assert alert.keep_firing_since is None  # keep_firing_for did not run during the outage
    health = h.state.rule("sites/SiteDown")
    assert health.health == "error"
    assert health.last_error == "unavailable: the metrics store is unavailable: connection refused"
    assert h.log[-1] == (1, "SiteDown", P, F)
    h.store.down = False
    h.run(6)  # 13 … 18: the site is seen up from 13, held 5 minutes, resolved at 18
    assert h.log[-1] == (18, "SiteDown", F, R)
    assert h.state.rule("sites/SiteDown").health == "ok"
    assert h.state.rule("sites/SiteDown").last_error is None


def test_labels_annotations_and_template_failures() -> None:
    h = Harness(
        """
        groups:
          - name: host
            rules:
              - alert: HighLoad
                expr: system_cpu_load_average_1m > 4
                labels:
                  severity: "{{ if gt $value 8.0 }}page{{ else }}ticket{{ end }}"
                  team: "{{ $labels.team }}"
                  empty: ""
                annotations:
                  summary: "{{ $labels.host_name }}: {{ $value | humanize }}"
                  broken: "{{ $labels.mountpoint }}"
        """
    )
    h.series("system_cpu_load_average_1m", WEB1, [5.0])
    h.series("system_cpu_load_average_1m", {**WEB1, "server_id": "s9"}, [9.0])
    h.run(1)
    by_server = {t.labels["server_id"]: t for t in h.transitions}
    # No __name__; rendered labels; a label that rendered empty is left out.
    assert by_server["s1"].labels == {
        "alertname": "HighLoad",
        "host_name": "web-1",
        "server_id": "s1",
        "severity": "ticket",
        "team": "<error expanding template: label 'team' is not set on this series"
        " (its labels: __name__, host_name, server_id)>",
    }
    assert by_server["s9"].labels["severity"] == "page"
    assert by_server["s9"].annotations["summary"] == "web-1: 9"
    assert (
        by_server["s1"]
        .annotations["broken"]
        .startswith("<error expanding template: label 'mountpoint' is not set")
    )
    assert by_server["s1"].fingerprint != by_server["s9"].fingerprint


def test_series_that_collide_after_labelling_and_the_group_limit_are_rule_errors() -> None:
    h = Harness(
        """
        groups:
          - name: g
            limit: 1
            rules:
              - alert: Collide
                expr: '{__name__=~"metric_a|metric_b", server_id="s1"} > 0'
              - alert: TooMany
                expr: system_cpu_load_average_1m > 0
        """
    )
    h.series("metric_a", {"server_id": "s1"}, [1.0])
    h.series("metric_b", {"server_id": "s1"}, [2.0])
    h.series("system_cpu_load_average_1m", WEB1, [1.0])
    h.series("system_cpu_load_average_1m", {"server_id": "s2"}, [1.0])
    h.run(1)
    assert h.transitions == []
    collide, too_many = h.state.rule("g/Collide"), h.state.rule("g/TooMany")
    assert collide.health == too_many.health == "error"
    assert collide.last_error is not None
    assert "same labels after applying the rule's labels" in collide.last_error
    assert too_many.last_error == "exceeded the group's limit of 1 alerts with 2"


def test_removing_a_rule_resolves_its_alerts_and_evaluation_delay_shifts_the_query() -> None:
    h = Harness(
        """
        groups:
          - name: host
            evaluation_delay: 2m
            rules:
              - alert: HighLoad
                expr: system_cpu_load_average_1m > 4
              - alert: Other
                expr: system_cpu_load_average_1m > 100
        """
    )
    h.series("system_cpu_load_average_1m", WEB1, [1.0] * 10 + [5.0] * 10)
    h.run(13)
    # Above 4 from the sample of minute 10; queried two minutes late, seen at 12.
    assert h.log == [(12, "HighLoad", OFF, F)]
    assert h.transitions[0].at == START + timedelta(minutes=12)
    h.group = RuleGroup(h.group.name, h.group.rules[1:], None, h.group.evaluation_delay)
    h.run(2)
    assert h.log[-1] == (13, "HighLoad", F, R)
    assert set(h.state.rules) == {"host/Other"}


def test_state_and_transitions_round_trip_through_json() -> None:
    at = START + timedelta(minutes=3)
    alert = Alert(
        "fp",
        "g/A",
        {"alertname": "A", "server_id": "s1"},
        {"summary": "x"},
        F,
        math.nan,
        START,
        at,
        fired_at=at,
        keep_firing_since=at,
    )
    state = GroupState({"g/A": RuleState("g/A", {"fp": alert}, "error", "boom", at)})
    restored = GroupState.from_dict(json.loads(json.dumps(state.to_dict(), allow_nan=False)))
    (back,) = restored.alerts()
    assert math.isnan(back.value)
    assert back == Alert(**{**alert.__dict__, "value": back.value})
    assert restored.rule("g/A").last_error == "boom"

    h = Harness(LOAD_RULE)
    h.series("system_cpu_load_average_1m", WEB1, [5.0] * 6)
    h.run(6)
    keys = set()
    for t in h.transitions:
        data = json.loads(json.dumps(t.to_dict(), allow_nan=False))
        assert Transition.from_dict(data) == t
        assert data["key"] == t.key
        keys.add(t.key)
    assert len(keys) == len(h.transitions) == 2


def test_advance_is_pure_and_refuses_naive_times() -> None:
    (group,) = load_rules_text(textwrap.dedent(LOAD_RULE))
    rule = group.rules[0]
    state = RuleState(rule.id)
    outcome = QueryOutcome(error="timeout: too slow")
    result = advance(rule, state, outcome, START, tenant_id=TENANT)
    assert state == RuleState(rule.id)  # the input is untouched
    assert (result.state.health, result.state.last_error) == ("error", "timeout: too slow")
    with pytest.raises(ValueError, match="timezone-aware"):
        advance(rule, state, outcome, datetime(2026, 1, 1), tenant_id=TENANT)
