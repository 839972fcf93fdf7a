"""Streaming evaluation's parts without Kafka: what a rule reads, the hot window (answers
like a full store within its retention, trimmed beyond it, bounded), the fall back to
ClickHouse over the cap, and the on-ingest throttle."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from alerting.evaluator import RuleEvaluator
from alerting.hotwindow import HotWindow
from alerting.rules import load_rules_text
from alerting.service import AlertingService, _Tenant
from alerting.state import AlertState, GroupState
from alerting.store import StoredState
from alerting.stream import (
    IngestThrottle,
    MetricStream,
    StreamConfig,
    WindowState,
    expression_reads,
    plan_groups,
)
from ingest.query import DEFAULT_LOOKBACK_MS, TIERS, MemoryStore, MetricsQueries, QueryError
from ingest.query.matchers import LabelMatcher
from ingest.query.store import Grouping
from yakpanel.clock import ManualClock

from ..support.otlp import GaugePoint, gauge_request, metrics_headers

TENANT = str(uuid.uuid4())
START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MIN = 60_000
OFF, P, F, R = AlertState.INACTIVE, AlertState.PENDING, AlertState.FIRING, AlertState.RESOLVED


def ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def rules(expr: str, name: str = "g", extra: str = "") -> str:
    return f"""
groups:
  - name: {name}
    interval: 1s{extra}
    rules:
      - alert: A
        expr: {expr}
"""


# --- what a rule reads -------------------------------------------------------------------


def test_expression_reads_lists_every_selector_and_the_longest_read() -> None:
    reads = expression_reads(
        'sum by (host) (rate(http_requests_total{code=~"5.."}[5m] offset 1m))'
        " / on(host) sum by (host) (rate(http_requests_total[10m]))"
        ' > 0.1 and on() absent(up{job="node"}) == 0 or -cpu_load'
    )
    assert reads.window_ms == 10 * MIN
    assert set(reads.selectors) == {
        (LabelMatcher("__name__", "=", "http_requests_total"), LabelMatcher("code", "=~", "5..")),
        (LabelMatcher("__name__", "=", "http_requests_total"),),
        (LabelMatcher("__name__", "=", "up"), LabelMatcher("job", "=", "node")),
        (LabelMatcher("__name__", "=", "cpu_load"),),
    }
    assert expression_reads("max_over_time(x[5m] offset 10m)").window_ms == 15 * MIN
    assert expression_reads("quantile(0.9, x)").selectors == (
        (LabelMatcher("__name__", "=", "x"),),
    )


@pytest.mark.parametrize("expr", ["max_over_time(x[10m:1m])", "x @ 1700000000", "x >"])
def test_what_the_window_cannot_serve_is_refused(expr: str) -> None:
    with pytest.raises(QueryError):
        expression_reads(expr)


def test_plan_keeps_long_or_unplannable_groups_on_clickhouse() -> None:
    groups = [
        *load_rules_text(rules("cpu_load > 5", "fast", "\n    evaluation_delay: 30s")),
        *load_rules_text(rules("avg_over_time(cpu_load[20m]) > 5", "slow")),
        *load_rules_text(rules("avg_over_time(cpu_load[2h]) > 5", "long")),
    ]
    # (The rule loader refuses subqueries; a later one may not.)
    (sub,) = load_rules_text(rules("cpu_load > 5", "sub"))
    rule = dataclasses.replace(sub.rules[0], expr="max_over_time(cpu_load[10m:1m]) > 5")
    groups.append(dataclasses.replace(sub, rules=(rule,)))
    plan = plan_groups(groups, timedelta(hours=1))
    assert plan.groups == {"fast", "slow"}
    assert set(plan.on_clickhouse) == {"long", "sub"}
    assert "more than the stream's 3600 s" in plan.on_clickhouse["long"]
    # The longest read, its lookback, and a lookback of margin for late samples.
    assert plan.retention_ms == 20 * MIN + 2 * DEFAULT_LOOKBACK_MS
    fast_only = plan_groups(groups[:1], timedelta(hours=1))
    assert fast_only.retention_ms == 2 * DEFAULT_LOOKBACK_MS + 30_000


# --- the hot window ------------------------------------------------------------------------


def test_hot_window_answers_like_the_full_store_and_forgets_what_is_older() -> None:
    clock = ManualClock(START)
    full, hot = MemoryStore(), HotWindow(TENANT)
    (group,) = load_rules_text(rules("avg_over_time(cpu_load[10m]) > 5 or cpu_load > 8"))
    plan = plan_groups([group], timedelta(hours=1))
    labels = {"host_name": "web-1", "server_id": str(uuid.uuid4())}
    on_full = RuleEvaluator(MetricsQueries(full, clock), clock)
    on_hot = RuleEvaluator(MetricsQueries(hot, clock), clock)
    state_full, state_hot = GroupState(), GroupState()
    fired = 0
    for minute in range(120):
        at = ms(clock.now())
        value = 9.0 if minute % 40 in (30, 31, 32) else 4.0 + (minute % 7) / 3
        full.add(TENANT, "cpu_load", labels, [(at, value)])
        assert hot.put("cpu_load", labels, [(at, value)]) == 1
        assert hot.put("cpu_load", labels, [(at, value)]) == 0, "a repeated timestamp is new"
        hot.trim(at - plan.retention_ms)
        a = on_full.evaluate_group(TENANT, group, state_full)
        b = on_hot.evaluate_group(TENANT, group, state_hot)
        state_full, state_hot = a.state, b.state
        assert b.transitions == a.transitions, f"minute {minute}"
        fired += sum(t.to_state == AlertState.FIRING for t in a.transitions)
        clock.advance(60)
    assert fired >= 2, "the rule never fired: the comparison proves nothing"
    assert hot.samples == plan.retention_ms // MIN + 1  # both ends of the retention
    assert min(t for t, _ in _points(hot)) == at - plan.retention_ms


def test_hot_window_reads_like_memory_store_out_of_order_and_rolled_up() -> None:
    rng = random.Random(7)
    full, hot = MemoryStore(), HotWindow(TENANT)
    base = ms(START)
    for i in range(3):
        labels = {"host_name": f"web-{i}", "server_id": SERVER}
        points = [(base + rng.randrange(0, 600_000, 250), rng.uniform(0, 10)) for _ in range(500)]
        for at, value in points:  # one at a time, out of order, some timestamps repeated
            full.add(TENANT, "cpu_load", labels, [(at, value)])
            hot.put("cpu_load", labels, [(at, value)])
    refs = full.series(TENANT, [], None, None, 10)
    assert refs == hot.series(TENANT, [], None, None, 10)
    assert hot.samples == sum(len(_points_of(full, r.series_id)) for r in refs)
    ids = [r.series_id for r in refs]
    for tier in TIERS[:2]:
        for grouping in (None, Grouping(30)):
            a = full.fetch(TENANT, ids, tier, base + 60_000, base + 400_000, grouping, 10**6)
            b = hot.fetch(TENANT, ids, tier, base + 60_000, base + 400_000, grouping, 10**6)
            for column in ("series_id", "bucket", "ts", "value", "min", "max", "sum", "count"):
                assert getattr(a, column).tolist() == getattr(b, column).tolist(), column
    with pytest.raises(QueryError):
        hot.fetch(TENANT, ids, TIERS[0], base, base + 600_000, None, 10)
    assert hot.series(str(uuid.uuid4()), [], None, None, 10) == [], "another tenant's series"


def _points_of(store: MemoryStore, sid: int) -> list[int]:
    block = store.fetch(TENANT, [sid], TIERS[0], 0, 2**62, None, 10**6)
    return [int(t) for t in block.ts]


def _points(hot: HotWindow) -> list[tuple[int, float]]:
    refs = hot.series(TENANT, [], None, None, 10)
    block = hot.fetch(TENANT, [r.series_id for r in refs], _raw(), 0, 2**62, None, 10**6)
    return list(zip(block.ts.tolist(), block.value.tolist(), strict=True))


def _raw() -> Any:
    from alerting.streamplan import RAW

    return RAW


# --- the stream's windows, fed directly -----------------------------------------------------


def _message(values: dict[str, float], at: datetime, host: str = "web-1") -> tuple[bytes, Any]:
    points = [GaugePoint(name, ms(at), v) for name, v in values.items()]
    return gauge_request(points, host=host), metrics_headers(TENANT, SERVER, ms(at))


SERVER = str(uuid.uuid4())


def _stream(
    config: StreamConfig, clock: ManualClock
) -> tuple[MetricStream, list[tuple[str, frozenset[str]]]]:
    calls: list[tuple[str, frozenset[str]]] = []
    stream = MetricStream("127.0.0.1:1", "", config, lambda t, g: calls.append((t, g)), clock)
    return stream, calls


async def _inline(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


async def test_ingest_keeps_selected_series_and_triggers_ready_groups_only() -> None:
    clock = ManualClock(START)
    stream, calls = _stream(StreamConfig(), clock)
    groups = [
        *load_rules_text(rules("cpu_load > 5", "cpu")),
        *load_rules_text(rules('mem_used{host_name="db-1"} > 5', "mem")),
    ]
    stream.plan(TENANT, groups)
    assert stream.state(TENANT) == WindowState.WARMING
    triggered: dict[str, set[str]] = {}
    stream.ingest(*_message({"cpu.load": 9.0, "mem.used": 9.0, "disk.used": 1.0}, START), triggered)
    assert triggered == {}, "a warming window triggers evaluations"
    assert stream.window_for(TENANT, "cpu") is None, "evaluated from a warming window"

    # What ClickHouse held before the marks, merged with what the stream kept.
    clickhouse = MemoryStore()
    earlier = ms(START - timedelta(seconds=30))
    clickhouse.add(TENANT, "cpu_load", {"host_name": "web-1", "server_id": SERVER}, [(earlier, 1)])
    clickhouse.add(TENANT, "disk_used", {"host_name": "web-1", "server_id": SERVER}, [(earlier, 1)])
    assert await stream.warm_up(TENANT, _inline, clickhouse) == WindowState.READY
    hot = stream.window_for(TENANT, "cpu")
    assert hot is not None and hot.samples == 2  # cpu_load twice; mem_used is web-1's
    assert [r.metric for r in hot.series(TENANT, [], None, None, 10)] == ["cpu_load"]

    later = START + timedelta(seconds=1)
    stream.ingest(*_message({"cpu.load": 9.5}, later), triggered)
    stream.ingest(*_message({"mem.used": 9.5}, later, host="db-1"), triggered)
    stream.ingest(*_message({"disk.used": 9.5}, later), triggered)
    assert triggered == {TENANT: {"cpu", "mem"}}
    assert hot.samples == 4
    other: dict[str, set[str]] = {}
    stream.ingest(
        gauge_request([GaugePoint("cpu.load", ms(later), 1.0)]),
        metrics_headers(str(uuid.uuid4()), SERVER, ms(later)),
        other,
    )
    assert other == {} and hot.samples == 4, "another tenant's sample was kept"
    stream.ingest(b"\xff\xff", metrics_headers(TENANT, SERVER, ms(later)), other)
    assert stream.stats.undecodable == 1 and other == {}
    assert calls == []  # `on_ingest` is called per Kafka batch, by the consumer


async def test_over_the_cap_the_tenant_falls_back_to_clickhouse() -> None:
    clock = ManualClock(START)
    stream, _ = _stream(StreamConfig(max_samples=50), clock)
    stream.plan(TENANT, load_rules_text(rules("'{__name__=~\"m_.*\"} > 5'")))
    await stream.warm_up(TENANT, _inline, MemoryStore())
    assert stream.window_for(TENANT, "g") is not None
    triggered: dict[str, set[str]] = {}
    for second in range(5):
        at = START + timedelta(seconds=second)
        stream.ingest(*_message({f"m.{i}": 1.0 for i in range(10)}, at), triggered)
    assert stream.state(TENANT) == WindowState.READY
    stream.ingest(*_message({"m.0": 1.0}, START + timedelta(seconds=5)), triggered)
    assert stream.state(TENANT) == WindowState.FALLBACK
    assert stream.stats.fallbacks == 1
    assert stream.window_for(TENANT, "g") is None
    triggered.clear()
    stream.ingest(*_message({"m.0": 1.0}, START + timedelta(seconds=6)), triggered)
    assert triggered == {}
    # Retried later: warming again, and ready when it fits.
    clock.advance(StreamConfig().fallback_retry.total_seconds() + 1)
    await stream.advance_warmups(_inline, MemoryStore())
    assert stream.state(TENANT) == WindowState.WARMING


async def test_a_group_too_big_to_load_stays_on_clickhouse() -> None:
    clock = ManualClock(START)
    stream, _ = _stream(StreamConfig(max_samples=1000), clock)
    stream.plan(TENANT, load_rules_text(rules("cpu_load > 5")))
    clickhouse = MemoryStore()
    now = ms(START)
    clickhouse.add(TENANT, "cpu_load", {"server_id": SERVER}, [(now - i, 1.0) for i in range(1001)])
    assert await stream.warm_up(TENANT, _inline, clickhouse) == WindowState.FALLBACK
    assert stream.window_for(TENANT, "g") is None


async def test_trimming_keeps_the_window_within_its_retention() -> None:
    clock = ManualClock(START)
    stream, _ = _stream(StreamConfig(), clock)
    stream.plan(TENANT, load_rules_text(rules("cpu_load > 5")))
    await stream.warm_up(TENANT, _inline, MemoryStore())
    retention_s = stream.tenants[TENANT].plan.retention_ms // 1000
    for _ in range(0, 3 * retention_s, 30):
        clock.advance(30)
        stream.ingest(*_message({"cpu.load": 1.0}, clock.now()), {})
    hot = stream.window_for(TENANT, "g")
    assert hot is not None
    assert hot.samples <= retention_s // 30 + 2
    assert min(t for t, _ in _points(hot)) >= ms(clock.now()) - retention_s * 1000 - 1000


# --- the throttle ---------------------------------------------------------------------------


async def test_throttle_folds_triggers_and_always_runs_after_the_last() -> None:
    release = asyncio.Event()
    seen: list[tuple[str, int]] = []
    inputs = {"a": 0, "b": 0}

    async def evaluate(key: str) -> None:
        seen.append((key, inputs[key]))
        if len(seen) == 1:
            await release.wait()

    throttle: IngestThrottle[str] = IngestThrottle(0.02, evaluate)
    inputs["a"] = 1
    throttle.trigger("a")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert seen == [("a", 1)], "the first trigger waits"
    for n in range(2, 12):  # samples keep arriving while it evaluates
        inputs["a"] = n
        throttle.trigger("a")
    inputs["b"] = 1
    throttle.trigger("b")
    for _ in range(50):
        await asyncio.sleep(0.01)
        if ("b", 1) in seen:
            break
    assert ("b", 1) in seen, "another group waits for this one"
    release.set()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if len(seen) >= 3:
            break
    await asyncio.sleep(0.1)
    # One more run of "a", after the last trigger: it sees the last samples.
    assert [s for s in seen if s[0] == "a"] == [("a", 1), ("a", 11)]
    assert throttle.runs == 3
    await throttle.close()


# --- what evaluating on ingest may change ---------------------------------------------------


def test_on_ingest_evaluations_fire_but_only_interval_ones_end_or_resolve() -> None:
    clock = ManualClock(START)
    store = MemoryStore()
    (group,) = load_rules_text(
        rules("cpu_load > 5").replace("expr: cpu_load > 5", "expr: cpu_load > 5\n        for: 2m")
    )
    evaluator = RuleEvaluator(MetricsQueries(store, clock), clock)
    labels = {"host_name": "web-1", "server_id": SERVER}
    state = GroupState()

    def sample(value: float, *, on_ingest: bool) -> list[tuple[AlertState, AlertState]]:
        nonlocal state
        store.add(TENANT, "cpu_load", labels, [(ms(clock.now()), value)])
        evaluation = evaluator.evaluate_group(TENANT, group, state, hold_absent=on_ingest)
        state = evaluation.state
        clock.advance(30)
        return [(t.from_state, t.to_state) for t in evaluation.transitions]

    assert sample(9, on_ingest=True) == [(OFF, P)]
    assert sample(1, on_ingest=True) == [], "a dip between interval evaluations reset `for`"
    assert sample(9, on_ingest=True) == []
    assert sample(9, on_ingest=True) == []
    assert sample(9, on_ingest=True) == [(P, F)], "fired before `for` held"
    assert sample(1, on_ingest=True) == [], "resolved on ingest"
    assert sample(1, on_ingest=False) == [(F, R)]
    assert sample(9, on_ingest=True) == [(R, P)]
    assert sample(1, on_ingest=False) == [(P, OFF)]


def test_on_ingest_evaluations_do_not_postpone_the_interval_one() -> None:
    # (A regression: evaluations on every arriving sample kept the group's last
    # evaluation "just now", so the interval evaluation — the only one that resolves —
    # never came due after a takeover.)
    clock = ManualClock(START)
    service = AlertingService("postgresql://unused", MemoryStore(), clock=clock)
    (group,) = load_rules_text(rules("cpu_load > 5"))  # interval 1s

    def due_within(tenant: _Tenant, seconds: float) -> bool:
        started = clock.now()
        while clock.now() - started < timedelta(seconds=seconds):
            clock.advance(0.2)  # a sample every 0.2 s, evaluated on arrival
            tenant.states[group.name] = StoredState(GroupState(), clock.now())
            if service._due(tenant, group):
                return True
        return False

    fresh = _Tenant(TENANT)
    assert service._due(fresh, group), "a group never evaluated is due"
    fresh.interval_at[group.name] = clock.now()
    assert due_within(fresh, 1.0)
    # Taken over with a state stored just now, before any interval evaluation here.
    taken = _Tenant(TENANT)
    taken.states[group.name] = StoredState(GroupState(), clock.now())
    assert due_within(taken, 1.0)
