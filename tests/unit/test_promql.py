"""PromQL evaluation semantics against the in-memory store, with hand-computed values.

Counter samples every 10 s; windows and extrapolation are worked out in the comments the
way Prometheus's `extrapolatedRate` does it.
"""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime

import pytest

from ingest.query import MemoryStore, MetricsQueries, QueryError, QueryResult
from yakpanel.clock import ManualClock

TENANT = str(uuid.uuid4())
OTHER = str(uuid.uuid4())
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
T0 = NOW_MS - 3_600_000  # an hour ago, on a minute boundary


def at(seconds: float) -> int:
    return T0 + int(seconds * 1000)


def samples(
    values: list[float], first_s: float = 45, every_s: float = 10
) -> list[tuple[int, float]]:
    return [(at(first_s + i * every_s), v) for i, v in enumerate(values)]


def engine(store: MemoryStore) -> MetricsQueries:
    return MetricsQueries(store, ManualClock(NOW))


def values(result: QueryResult) -> dict[tuple[tuple[str, str], ...], float]:
    assert result.result_type == "vector"
    return {tuple(sorted(s.labels.items())): float(s.values[0]) for s in result.series}


def one(result: QueryResult) -> float:
    (value,) = values(result).values()
    return value


@pytest.fixture
def counters() -> MemoryStore:
    store = MemoryStore()
    # Samples at 45, 55, …, 95 s; a reset between 75 s (130) and 85 s (5).
    store.add(TENANT, "req_total", {"server_id": "a"}, samples([100, 110, 120, 130, 5, 15]))
    # Starts near zero: extrapolation stops at the counter's zero point.
    store.add(TENANT, "req_total", {"server_id": "b"}, samples([2, 12, 22, 32, 42, 52]))
    # Another tenant's series with the same labels must never show.
    store.add(OTHER, "req_total", {"server_id": "a"}, samples([1e9, 2e9, 3e9, 4e9, 5e9, 6e9]))
    return store


def a(query: str) -> str:
    return query.replace("SEL", 'req_total{server_id="a"}')


def b(query: str) -> str:
    return query.replace("SEL", 'req_total{server_id="b"}')


def test_increase_and_rate_add_back_resets_and_extrapolate_to_the_window(
    counters: MemoryStore,
) -> None:
    q = engine(counters)
    # Window (40 s, 100 s]: 6 samples. Change 15 - 100 = -85, +130 for the reset = 45.
    # Sampled 50 s, average interval 10 s, threshold 11 s; 5 s to each edge (< 11 s):
    # extrapolate fully: factor (50 + 5 + 5) / 50 = 1.2.
    assert one(q.instant(TENANT, a("increase(SEL[60s])"), at(100))) == pytest.approx(54.0)
    assert one(q.instant(TENANT, a("rate(SEL[60s])"), at(100))) == pytest.approx(0.9)
    # Zero point: 2 / 50 of the 50 s sampled = 2 s before the first sample, < 5 s to the
    # edge, so extrapolation starts there: (50 + 2 + 5) / 50 · 50 = 57.
    assert one(q.instant(TENANT, b("increase(SEL[60s])"), at(100))) == pytest.approx(57.0)


def test_extrapolation_stops_half_an_interval_out_when_the_edge_is_far(
    counters: MemoryStore,
) -> None:
    q = engine(counters)
    # Window (0 s, 120 s]: 45 s to the start and 25 s to the end, both ≥ 11 s: extend by
    # 5 s each: (50 + 5 + 5) / 50 · 45 = 54; rate over the 120 s range = 0.45.
    assert one(q.instant(TENANT, a("increase(SEL[120s])"), at(120))) == pytest.approx(54.0)
    assert one(q.instant(TENANT, a("rate(SEL[120s])"), at(120))) == pytest.approx(0.45)
    # A window holding one sample has no rate.
    assert q.instant(TENANT, a("rate(SEL[10s])"), at(100)).series == []


def test_irate_delta_and_idelta(counters: MemoryStore) -> None:
    q = engine(counters)
    # Last two samples (85 s: 5, 95 s: 15): 10 / 10 s.
    assert one(q.instant(TENANT, a("irate(SEL[60s])"), at(100))) == 1.0
    # Last two at 90 s are (75 s: 130, 85 s: 5): a reset, so 5 / 10 s.
    assert one(q.instant(TENANT, a("irate(SEL[60s])"), at(90))) == 0.5
    # delta treats the series as a gauge: (15 - 100) · 1.2 = -102.
    assert one(q.instant(TENANT, a("delta(SEL[60s])"), at(100))) == pytest.approx(-102.0)
    assert one(q.instant(TENANT, a("idelta(SEL[60s])"), at(100))) == 10.0


def test_over_time_functions(counters: MemoryStore) -> None:
    q = engine(counters)
    # Window (50 s, 100 s]: 110, 120, 130, 5, 15.
    expected = {
        "avg_over_time": 76.0,
        "min_over_time": 5.0,
        "max_over_time": 130.0,
        "sum_over_time": 380.0,
        "count_over_time": 5.0,
        "last_over_time": 15.0,
        "present_over_time": 1.0,
    }
    for fn, want in expected.items():
        assert one(q.instant(TENANT, a(f"{fn}(SEL[50s])"), at(100))) == want, fn
    # last_over_time keeps the metric name; the others drop it.
    (series,) = q.instant(TENANT, a("last_over_time(SEL[50s])"), at(100)).series
    assert series.labels == {"__name__": "req_total", "server_id": "a"}
    (series,) = q.instant(TENANT, a("max_over_time(SEL[50s])"), at(100)).series
    assert series.labels == {"server_id": "a"}


def test_aggregations_by_and_without() -> None:
    store = MemoryStore()
    for server, region, value in (("a", "eu", 1.0), ("b", "eu", 3.0), ("c", "us", 10.0)):
        labels = {"server_id": server, "region": region}
        store.add(TENANT, "load", labels, samples([value] * 3, first_s=60))
    q = engine(store)
    t = at(90)
    assert values(q.instant(TENANT, "sum by (region) (load)", t)) == {
        (("region", "eu"),): 4.0,
        (("region", "us"),): 10.0,
    }
    assert values(q.instant(TENANT, "avg without (server_id) (load)", t)) == {
        (("region", "eu"),): 2.0,
        (("region", "us"),): 10.0,
    }
    assert values(q.instant(TENANT, "max(load)", t)) == {(): 10.0}
    assert values(q.instant(TENANT, "min(load)", t)) == {(): 1.0}
    assert values(q.instant(TENANT, "count by (region) (load)", t)) == {
        (("region", "eu"),): 2.0,
        (("region", "us"),): 1.0,
    }
    top = q.instant(TENANT, "topk(2, load)", t)
    assert [s.labels["server_id"] for s in top.series] == ["c", "b"]  # ordered by value
    bottom = q.instant(TENANT, "bottomk by (region) (1, load)", t)
    assert sorted(s.labels["server_id"] for s in bottom.series) == ["a", "c"]
    assert one(q.instant(TENANT, "quantile(0.5, load)", t)) == 3.0
    assert one(q.instant(TENANT, 'stddev(load{region="eu"})', t)) == 1.0


def test_arithmetic_and_comparisons() -> None:
    store = MemoryStore()
    for server, used, total in (("a", 30.0, 100.0), ("b", 95.0, 100.0)):
        store.add(TENANT, "mem_used", {"server_id": server}, samples([used], first_s=60))
        store.add(TENANT, "mem_total", {"server_id": server}, samples([total], first_s=60))
    store.add(TENANT, "mem_part", {"server_id": "a", "kind": "cache"}, samples([10.0], first_s=60))
    q = engine(store)
    t = at(90)
    ratio = "mem_used / mem_total"
    assert values(q.instant(TENANT, ratio, t)) == {
        (("server_id", "a"),): 0.3,
        (("server_id", "b"),): 0.95,
    }
    # An alert threshold filters, keeping the left side's value and labels.
    assert values(q.instant(TENANT, f"{ratio} > 0.9", t)) == {(("server_id", "b"),): 0.95}
    assert values(q.instant(TENANT, f"{ratio} > bool 0.9", t)) == {
        (("server_id", "a"),): 0.0,
        (("server_id", "b"),): 1.0,
    }
    assert values(q.instant(TENANT, "mem_used > 50", t)) == {
        (("__name__", "mem_used"), ("server_id", "b")): 95.0
    }
    # Scalar on the left of a comparison still keeps the vector's value.
    assert values(q.instant(TENANT, "50 < mem_used", t)) == {
        (("__name__", "mem_used"), ("server_id", "b")): 95.0
    }
    assert values(q.instant(TENANT, "(mem_used + 10) * 2 - 1", t)) == {
        (("server_id", "a"),): 79.0,
        (("server_id", "b"),): 209.0,
    }
    assert values(q.instant(TENANT, "mem_used % 7 ^ 2", t)) == {
        (("server_id", "a"),): 30.0 % 49.0,
        (("server_id", "b"),): 95.0 % 49.0,
    }
    assert values(q.instant(TENANT, "-mem_used", t))[(("server_id", "a"),)] == -30.0
    assert q.instant(TENANT, "2 * 3 + 1", t).scalar == (t, 7.0)
    assert q.instant(TENANT, "1 > bool 2", t).scalar == (t, 0.0)
    # One-to-one matching on a subset of labels.
    onq = 'sum by (server_id) (mem_used) / on (server_id) mem_total{server_id="a"}'
    assert values(q.instant(TENANT, onq, t)) == {(("server_id", "a"),): 0.3}
    # `ignoring` drops the ignored labels from the result.
    assert values(q.instant(TENANT, "mem_part / ignoring (kind) mem_total", t)) == {
        (("server_id", "a"),): 0.1
    }
    assert values(q.instant(TENANT, 'mem_used and mem_total{server_id="a"}', t)) == {
        (("__name__", "mem_used"), ("server_id", "a")): 30.0
    }
    assert values(q.instant(TENANT, 'mem_used unless mem_total{server_id="a"}', t)) == {
        (("__name__", "mem_used"), ("server_id", "b")): 95.0
    }
    nan = values(q.instant(TENANT, "mem_used / 0 - mem_used / 0", t))
    assert all(math.isnan(v) for v in nan.values())


def test_duplicate_series_on_one_side_is_an_error() -> None:
    store = MemoryStore()
    store.add(TENANT, "x", {"server_id": "a", "disk": "1"}, samples([1.0], first_s=60))
    store.add(TENANT, "x", {"server_id": "a", "disk": "2"}, samples([2.0], first_s=60))
    store.add(TENANT, "y", {"server_id": "a"}, samples([1.0], first_s=60))
    with pytest.raises(QueryError, match="many-to-many matching not allowed") as err:
        engine(store).instant(TENANT, "y / on (server_id) x", at(90))
    assert err.value.kind == "execution"


def test_lookback_and_staleness_in_range_queries() -> None:
    store = MemoryStore()
    # One sample at 60 s, the next at 1000 s: between them the value holds for 5 min.
    store.add(TENANT, "g", {"server_id": "a"}, [(at(60), 1.0), (at(1000), 2.0)])
    q = engine(store)
    result = q.range(TENANT, "g", at(0), at(1200), 5_000)
    (series,) = result.series
    seen = {
        (int(t) - T0) // 1000: float(v)
        for t, v in zip(series.timestamps_ms, series.values, strict=True)
    }
    assert 55 not in seen and seen[60] == 1.0 and seen[355] == 1.0
    assert 360 not in seen and 995 not in seen  # stale after 300 s, (t - 5m, t]
    assert seen[1000] == 2.0 and seen[1200] == 2.0
    assert result.tiers == ("raw",)  # a 5 s step needs raw samples
    # The instant value and `offset`.
    assert one(q.instant(TENANT, "g", at(200))) == 1.0
    assert q.instant(TENANT, "g", at(400)).series == []
    assert one(q.instant(TENANT, "g offset 1000s", at(1200))) == 1.0
    assert one(q.instant(TENANT, "g", at(400), lookback_ms=600_000)) == 1.0


def test_functions_on_instant_vectors() -> None:
    store = MemoryStore()
    store.add(TENANT, "t", {"server_id": "a"}, samples([-2.5], first_s=60))
    q = engine(store)
    t = at(90)
    assert one(q.instant(TENANT, "abs(t)", t)) == 2.5
    assert one(q.instant(TENANT, "round(t)", t)) == -2.0  # floor(x + 0.5)
    assert one(q.instant(TENANT, "clamp_min(t, 0)", t)) == 0.0
    assert one(q.instant(TENANT, "clamp(t, -1, 1)", t)) == -1.0
    assert one(q.instant(TENANT, "ceil(t)", t)) == -2.0
    assert q.instant(TENANT, "scalar(t)", t).scalar == (t, -2.5)
    assert q.instant(TENANT, "time()", t).scalar == (t, t / 1000)
    assert values(q.instant(TENANT, "vector(3)", t)) == {(): 3.0}
    assert values(q.instant(TENANT, 'absent(nothing{server_id="z"})', t)) == {
        (("server_id", "z"),): 1.0
    }
    assert q.instant(TENANT, "absent(t)", t).series == []


def test_histogram_quantile() -> None:
    store = MemoryStore()
    # Cumulative buckets: 10 ≤ 0.1 s, 30 ≤ 0.5 s, 40 ≤ 1 s, 40 in all.
    for le, count in (("0.1", 10.0), ("0.5", 30.0), ("1", 40.0), ("+Inf", 40.0)):
        store.add(TENANT, "lat_bucket", {"le": le, "server_id": "a"}, samples([count], first_s=60))
    q = engine(store)
    # Rank 0.5 · 40 = 20 falls in (0.1, 0.5]: 0.1 + 0.4 · (20 - 10) / 20 = 0.3.
    assert values(q.instant(TENANT, "histogram_quantile(0.5, lat_bucket)", at(90))) == {
        (("server_id", "a"),): pytest.approx(0.3)
    }
    # Rank 39.6 falls in (0.5, 1]: 0.5 + 0.5 · 9.6 / 10 = 0.98.
    got = one(q.instant(TENANT, "histogram_quantile(0.99, lat_bucket)", at(90)))
    assert got == pytest.approx(0.98)


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("rate(x[5m:1m])", "subqueries"),
        ("x @ 100", "the @ modifier"),
        ("x / on (a) group_left (b) y", "group_left/group_right"),
        ('label_replace(x, "a", "$1", "b", "(.*)")', "the function label_replace()"),
        ('count_values("v", x)', "the aggregation count_values"),
        ("predict_linear(x[5m], 60)", "the function predict_linear()"),
    ],
)
def test_unsupported_constructs_are_named(query: str, named: str) -> None:
    with pytest.raises(QueryError) as err:
        engine(MemoryStore()).instant(TENANT, query, at(90))
    assert err.value.kind == "bad_data"
    assert named in err.value.message
    assert "not supported" in err.value.message


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("sum(rate(x[5m])", "unclosed left parenthesis"),
        ("rate(x)", "expected type matrix in call to function 'rate'"),
        ('x{a=~"("}', "illegal regex"),
        ("", "empty query"),
    ],
)
def test_malformed_queries_carry_the_parser_message(query: str, message: str) -> None:
    with pytest.raises(QueryError) as err:
        engine(MemoryStore()).instant(TENANT, query, at(90))
    assert err.value.kind == "bad_data"
    assert message in err.value.message


def test_range_query_parameters_are_checked() -> None:
    q = engine(MemoryStore())
    with pytest.raises(QueryError, match="exceeded maximum resolution of 11,000 points"):
        q.range(TENANT, "x", at(0), at(11_000), 1_000)
    with pytest.raises(QueryError, match="zero or negative query resolution"):
        q.range(TENANT, "x", at(0), at(10), 0)
    with pytest.raises(QueryError, match="end timestamp must not be before start time"):
        q.range(TENANT, "x", at(10), at(0), 1_000)
    with pytest.raises(QueryError, match='invalid expression type "range vector"'):
        q.range(TENANT, "x[5m]", at(0), at(10), 1_000)


def test_tenants_never_see_each_other(counters: MemoryStore) -> None:
    q = engine(counters)
    result = q.instant(TENANT, '{__name__=~".+"}', at(100))
    assert {s.labels["server_id"] for s in result.series} == {"a", "b"}
    assert max(float(s.values[0]) for s in result.series) < 1e6
    other = q.instant(OTHER, '{__name__=~".+"}', at(100))
    assert [float(s.values[0]) for s in other.series] == [6e9]
    assert q.label_values(OTHER, "server_id") == ["a"]
