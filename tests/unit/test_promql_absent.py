"""`absent_over_time`, `changes`, `resets` and `deriv` (for alert rules' no-data and
rate-of-change conditions), against the in-memory store with values worked
out by hand."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from ingest.query import MemoryStore, MetricsQueries, QueryError, QueryResult
from yakpanel.clock import ManualClock

TENANT = str(uuid.uuid4())
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
T0 = NOW_MS - 3_600_000


def at(seconds: float) -> int:
    return T0 + int(seconds * 1000)


def engine(store: MemoryStore) -> MetricsQueries:
    return MetricsQueries(store, ManualClock(NOW))


def values(result: QueryResult) -> dict[tuple[tuple[str, str], ...], float]:
    assert result.result_type == "vector"
    return {tuple(sorted(s.labels.items())): float(s.values[0]) for s in result.series}


@pytest.fixture
def store() -> MemoryStore:
    s = MemoryStore()
    # Every 10 s from 0 to 290 s: 100, 102, 104, … (0.2 per second).
    s.add(TENANT, "disk", {"server_id": "a"}, [(at(i * 10), 100 + 2 * i) for i in range(30)])
    # Every 10 s from 0 to 90 s, with two drops.
    flips = [1, 1, 2, 2, 0, 5, 5, 1, 1, 1]
    s.add(TENANT, "flips", {"server_id": "a"}, [(at(i * 10), v) for i, v in enumerate(flips)])
    return s


def test_absent_over_time_answers_with_the_selectors_equality_labels(store: MemoryStore) -> None:
    q = engine(store)
    # The last disk sample is at 290 s: present in (300 - 60, 300], gone in (400 - 60, 400].
    assert q.instant(TENANT, "absent_over_time(disk[1m])", at(300)).series == []
    assert values(q.instant(TENANT, 'absent_over_time(disk{server_id="a"}[1m])', at(400))) == {
        (("server_id", "a"),): 1.0
    }
    # Regex and negative matchers give no labels; a label matched twice is left out too.
    query = 'absent_over_time(nothing{server_id="x", job=~"node", env="a", env="b"}[5m])'
    assert values(q.instant(TENANT, query, at(300))) == {(("server_id", "x"),): 1.0}
    assert values(q.instant(TENANT, "absent_over_time(nothing[5m])", at(300))) == {(): 1.0}


def test_absent_over_time_over_a_range_marks_only_the_silent_steps(store: MemoryStore) -> None:
    result = engine(store).range(TENANT, "absent_over_time(disk[1m])", at(240), at(420), 60_000)
    (series,) = result.series
    # Windows (t - 60 s, t]: samples until 290 s, so 240 and 300 see one; 360 on do not.
    assert [int((t - T0) / 1000) for t in series.timestamps_ms] == [360, 420]
    assert list(series.values) == [1.0, 1.0]


def test_changes_and_resets_count_inside_the_window(store: MemoryStore) -> None:
    q = engine(store)
    # 1 1 2 2 0 5 5 1 1 1: changes 1→2, 2→0, 0→5, 5→1; drops 2→0 and 5→1.
    assert values(q.instant(TENANT, "changes(flips[2m])", at(95))) == {(("server_id", "a"),): 4}
    assert values(q.instant(TENANT, "resets(flips[2m])", at(95))) == {(("server_id", "a"),): 2}
    # Window (55 s, 95 s] holds 5 1 1 1 (60 … 90 s): one change, one reset.
    assert values(q.instant(TENANT, "changes(flips[40s])", at(95))) == {(("server_id", "a"),): 1}
    assert values(q.instant(TENANT, "resets(flips[40s])", at(95))) == {(("server_id", "a"),): 1}
    # One sample in the window: no change; none: no answer.
    assert values(q.instant(TENANT, "changes(flips[5s])", at(90))) == {(("server_id", "a"),): 0}
    assert q.instant(TENANT, "changes(flips[5s])", at(500)).series == []


def test_deriv_fits_a_line(store: MemoryStore) -> None:
    q = engine(store)
    key = (("server_id", "a"),)
    assert values(q.instant(TENANT, "deriv(disk[5m])", at(295)))[key] == pytest.approx(0.2)
    # A rate-of-change alert condition keeps the series' labels, without the metric name.
    assert values(q.instant(TENANT, "deriv(disk[1m]) * 60 > 10", at(295))) == {
        key: pytest.approx(12.0)
    }
    # Fewer than two samples: no slope.
    assert q.instant(TENANT, "deriv(disk[5s])", at(295)).series == []


def test_deriv_is_precise_far_from_the_epoch_and_over_noise() -> None:
    s = MemoryStore()
    # y = 3 + 0.5 t plus alternating noise ±1 that cancels in the fit of an even count.
    s.add(
        TENANT,
        "g",
        {},
        [(at(i * 15), 3 + 0.5 * i * 15 + (1 if i % 2 else -1)) for i in range(40)],
    )
    (slope,) = values(engine(s).instant(TENANT, "deriv(g[11m])", at(600))).values()
    # Least squares over 40 points, x = 0 … 585 s: the noise term adds
    # Σ(x - x̄)·e / Σ(x - x̄)² = (20 · 15) / (15² · 40 · (40² - 1) / 12) = 0.000834…
    assert slope == pytest.approx(0.5 + 300 / (225 * 40 * 1599 / 12))


def test_range_functions_refuse_instant_vectors(store: MemoryStore) -> None:
    q = engine(store)
    for query in ("deriv(disk)", "changes(disk)", "absent_over_time(disk)"):
        with pytest.raises(QueryError) as err:
            q.instant(TENANT, query, at(100))
        assert err.value.kind == "bad_data"
