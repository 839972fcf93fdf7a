"""Which tier a query reads, and that answers from coarse tiers stay exact where the
rollups allow it (`*_over_time`, bucketed aggregates) or close to raw (rates)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import numpy as np
import pytest

from ingest.query import Limits, MemoryStore, MetricsQueries, QueryError, metric_selector
from ingest.query.tiers import choose_tier, exact_tier, group_seconds
from yakpanel.clock import ManualClock

TENANT = str(uuid.uuid4())
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
HOUR = 3_600_000
DAY = 24 * HOUR


def engine(store: MemoryStore, **limits: int) -> MetricsQueries:
    return MetricsQueries(store, ManualClock(NOW), Limits(**limits))


@pytest.mark.parametrize(
    ("target_s", "age_ms", "tier"),
    [
        (0, HOUR, "raw"),
        (5, HOUR, "raw"),
        (15, HOUR, "10s"),
        (60, HOUR, "1m"),
        (300, HOUR, "1m"),
        (3600, HOUR, "1h"),
        (15, 2 * DAY + HOUR, "10s"),  # raw keeps 2 days
        (5, 2 * DAY + HOUR, "10s"),  # nothing finer holds it: the finest that does
        (15, 4 * DAY, "1m"),  # 10 s keeps 3 days
        (60, 40 * DAY, "1h"),  # 1 m keeps 30 days
    ],
)
def test_the_coarsest_tier_serving_the_target_and_still_holding_the_data(
    target_s: float, age_ms: int, tier: str
) -> None:
    assert choose_tier(target_s, NOW_MS - age_ms, NOW_MS).name == tier


def test_group_width_prefers_divisors_of_step_and_range() -> None:
    one_minute = choose_tier(60, NOW_MS - HOUR, NOW_MS)
    assert group_seconds(one_minute, 300, 300_000, 0) == 300
    assert group_seconds(one_minute, 250, 300_000, 0) == 60  # 120, 180, 240 s do not divide
    ten = choose_tier(15, NOW_MS - HOUR, NOW_MS)
    assert group_seconds(ten, 250, 300_000, 0) == 150
    assert group_seconds(one_minute, 75, 90_000, 300_000) == 60
    assert exact_tier(300, NOW_MS - HOUR, NOW_MS).name == "1m"  # type: ignore[union-attr]
    assert exact_tier(15, NOW_MS - HOUR, NOW_MS).name == "raw"  # type: ignore[union-attr]
    assert exact_tier(15, NOW_MS - 5 * DAY, NOW_MS) is None
    assert exact_tier(7200, NOW_MS - 40 * DAY, NOW_MS).name == "1h"  # type: ignore[union-attr]


def gauge(
    start_ms: int, end_ms: int, every_ms: int, offset_ms: int = 5_000
) -> list[tuple[int, float]]:
    """Samples between the tier boundaries (5 s past), values varying irregularly."""
    ts = np.arange(start_ms + offset_ms, end_ms, every_ms)
    return [(int(t), float((t // every_ms) * 7919 % 101)) for t in ts]


def test_over_time_at_a_rollup_tier_equals_raw_samples_over_whole_groups() -> None:
    store = MemoryStore()
    points = gauge(NOW_MS - 3 * HOUR, NOW_MS, 10_000)
    store.add(TENANT, "temp", {"server_id": "a"}, points)
    q = engine(store)
    start, end = NOW_MS - 2 * HOUR, NOW_MS - HOUR
    ts = np.array([t for t, _ in points])
    vs = np.array([v for _, v in points])
    for fn, reduce in (
        ("avg", np.mean),
        ("min", np.min),
        ("max", np.max),
        ("sum", np.sum),
        ("count", len),
    ):
        result = q.range(TENANT, f"{fn}_over_time(temp[5m])", start, end, 60_000)
        assert result.tiers == ("1m",), fn
        (series,) = result.series
        for t, got in zip(series.timestamps_ms, series.values, strict=True):
            window = vs[(ts > t - 300_000) & (ts <= t)]
            assert got == pytest.approx(float(reduce(window))), (fn, t)
        assert len(series.values) == 61


def test_rates_from_rollups_match_a_steady_counter() -> None:
    store = MemoryStore()
    # +2 per second, sampled every 10 s, reset at the half hour.
    ts = np.arange(NOW_MS - 3 * HOUR + 5_000, NOW_MS, 10_000)
    values = [(int(t), float((t - ts[0]) / 500 % 7200)) for t in ts]
    store.add(TENANT, "bytes_total", {"server_id": "a"}, values)
    q = engine(store)
    start, end = NOW_MS - 2 * HOUR, NOW_MS - HOUR
    result = q.range(TENANT, "rate(bytes_total[5m])", start, end, 60_000)
    assert result.tiers == ("1m",)
    (series,) = result.series
    # Steady except the window holding the reset (one 10 s interval is lost).
    steady = np.isclose(series.values, 2.0)
    assert steady.sum() >= len(series.values) - 5
    assert (series.values > 1.5).all()
    instant = q.instant(TENANT, "increase(bytes_total[1h])", NOW_MS - HOUR)
    assert instant.tiers == ("raw",)
    assert float(instant.series[0].values[0]) == pytest.approx(7200, rel=0.01)


def test_a_coarse_step_reads_the_hour_tier_without_gaps_off_the_hour() -> None:
    store = MemoryStore()
    store.add(TENANT, "up", {"server_id": "a"}, gauge(NOW_MS - 10 * DAY, NOW_MS, 60_000))
    q = engine(store)
    # Steps at hh:30: the latest hour group before each step ended 30 min earlier.
    start = NOW_MS - 9 * DAY + 30 * 60_000
    result = q.range(TENANT, "up", start, start + 2 * DAY, HOUR)
    assert result.tiers == ("1h",)
    (series,) = result.series
    assert len(series.values) == 49


def test_old_data_falls_back_to_the_tier_that_still_holds_it() -> None:
    store = MemoryStore()
    store.add(TENANT, "up", {"server_id": "a"}, gauge(NOW_MS - 41 * DAY, NOW_MS - 39 * DAY, 60_000))
    q = engine(store)
    result = q.range(TENANT, "up", NOW_MS - 40 * DAY, NOW_MS - 40 * DAY + HOUR, 10_000)
    assert result.tiers == ("1h",)
    assert len(result.series) == 1


def test_bucketed_aggregates_are_exact_per_step_and_group() -> None:
    store = MemoryStore()
    first = NOW_MS - 3 * HOUR
    for server, region in (("a", "eu"), ("b", "eu"), ("c", "us")):
        pts = gauge(first, NOW_MS, 10_000, offset_ms=ord(server) * 10)
        store.add(TENANT, "cpu", {"server_id": server, "region": region}, pts)
    q = engine(store)
    selector = metric_selector("cpu", [])
    start_s, end_s = (NOW_MS - 2 * HOUR) // 1000, (NOW_MS - HOUR) // 1000
    result = q.buckets(TENANT, selector, start_s, end_s, 300, "avg", ["region"])
    assert (result.tier, result.step_s) == ("1m", 300)
    eu = next(s for s in result.series if s.labels == {"region": "eu"})
    assert len(eu.buckets_s) == 13
    for b, got in zip(eu.buckets_s, eu.values, strict=True):
        window = [
            v
            for server in ("a", "b")
            for t, v in gauge(first, NOW_MS, 10_000, offset_ms=ord(server) * 10)
            if b * 1000 <= t < (b + 300) * 1000
        ]
        assert got == pytest.approx(sum(window) / len(window))
    counts = q.buckets(TENANT, selector, start_s, end_s, 300, "count")
    assert {s.labels["server_id"]: set(s.values.tolist()) for s in counts.series} == {
        "a": {30.0},
        "b": {30.0},
        "c": {30.0},
    }
    old = (NOW_MS - 2 * DAY - HOUR) // 1000
    with pytest.raises(QueryError, match="use a multiple of one of: 10 s, 60 s, 3600 s"):
        q.buckets(TENANT, selector, old, old + 3600, 15, "avg")
    with pytest.raises(QueryError, match="the limit is 11000"):
        q.buckets(TENANT, selector, start_s - 12_000, end_s, 1, "avg")


def test_limits_name_what_to_change() -> None:
    store = MemoryStore()
    for i in range(5):
        store.add(TENANT, "n", {"server_id": str(i)}, gauge(NOW_MS - HOUR, NOW_MS, 10_000))
    with pytest.raises(QueryError, match="more than 3 series") as err:
        engine(store, max_series=3).instant(TENANT, "n", NOW_MS)
    assert err.value.kind == "execution"
    with pytest.raises(QueryError, match="more than 100 samples") as err:
        engine(store, max_samples=100).range(TENANT, "n", NOW_MS - HOUR, NOW_MS, 5_000)
    assert err.value.kind == "execution"
    with pytest.raises(QueryError, match="too many samples into memory"):
        engine(store, max_points=1000).range(TENANT, "n", NOW_MS - HOUR, NOW_MS, 10_000)


def test_a_counter_reset_inside_a_rollup_group_is_added_back_from_its_max() -> None:
    store = MemoryStore()
    # +3 every 10 s; the process restarts at :30:25 and counts from 3 again, so the 1 m
    # group [:30:00, :31:00) holds 546, 549, then 3 … 12: its max is the lost peak.
    first = NOW_MS - 2 * HOUR + 5_000
    values, total = [], 0.0
    for i in range(720):
        total = 3.0 if i == 182 else total + 3.0
        values.append((first + i * 10_000, total))
    assert values[182] == (NOW_MS - 2 * HOUR + 30 * 60_000 + 25_000, 3.0)
    store.add(TENANT, "ops_total", {"server_id": "a"}, values)
    result = engine(store).range(
        TENANT, "rate(ops_total[5m])", NOW_MS - 90 * 60_000, NOW_MS - 60 * 60_000, 60_000
    )
    assert result.tiers == ("1m",)
    (series,) = result.series
    assert series.values == pytest.approx([0.3] * 31)  # as raw samples give it
