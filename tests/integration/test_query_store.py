"""One contract for both `MetricStore`s: `ClickHouseStore` over chDB (written the
aggregator's way, batch by batch) and `MemoryStore` given the same samples must select,
fetch and answer PromQL alike, and never cross tenants."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from ingest.aggregator.decode import SampleBatchBuilder
from ingest.aggregator.rollup import aggregate
from ingest.aggregator.writer import BatchSource, ClickHouseWriter
from ingest.query import (
    ClickHouseStore,
    LabelMatcher,
    MemoryStore,
    MetricsQueries,
    MetricStore,
    QueryError,
)
from ingest.query.store import Grouping
from ingest.query.tiers import BY_NAME
from yakpanel.clickhouse import ClickHouseTarget
from yakpanel.clock import ManualClock
from yakpanel.migrations import CLICKHOUSE_SOURCES, ClickHouseMigrator

from ..support.otlp import GaugePoint, gauge_request, metrics_headers

pytestmark = pytest.mark.clickhouse

HOUR = 3_600_000
NOW = (int(time.time() * 1000) // HOUR) * HOUR
BASE = NOW - 2 * HOUR
A, B = str(uuid.uuid4()), str(uuid.uuid4())
SERVERS = {A: [str(uuid.uuid4()) for _ in range(3)], B: [str(uuid.uuid4())]}


def points(k: int) -> list[GaugePoint]:
    """An hour of samples every 10 s (3 s past): a gauge, and a counter with a restart."""
    out = []
    total = 0.0
    for i in range(360):
        ts = BASE + 3_000 + i * 10_000
        out.append(GaugePoint("cpu.load", ts, float((i * 37 + k * 11) % 23)))
        total = 5.0 if (k == 1 and i == 200) else total + k + 1
        out.append(GaugePoint("net.bytes", ts, total))
    return out


@pytest.fixture
def stores(ch_client: Any, clickhouse_target: ClickHouseTarget) -> dict[str, MetricStore]:
    database = clickhouse_target.database
    ClickHouseMigrator(ch_client, database).apply([m for s in CLICKHOUSE_SOURCES for m in s.load()])
    memory = MemoryStore()
    writer = ClickHouseWriter(ch_client, database)
    offset = 0
    for tenant, servers in SERVERS.items():
        for k, server in enumerate(servers):
            host = f"{'web' if tenant == A else 'other'}-{k}"
            pts = points(k)
            # Batches of 9 minutes (the late window is 10): buckets of the 1 h tier and
            # some of the 1 m tier get several partial rows.
            for start in range(0, len(pts), 108):
                chunk = pts[start : start + 108]
                received = max(p.ts_ms for p in chunk)
                builder = SampleBatchBuilder()
                builder.add(
                    gauge_request(chunk, host=host), metrics_headers(tenant, server, received)
                )
                offset += 1
                source = BatchSource("contract", 0, offset, offset, received)
                writer.write(aggregate(builder.frame()), source)
            for metric in ("cpu_load", "net_bytes"):
                name = metric.replace("_", ".")
                samples = [(p.ts_ms, p.value) for p in pts if p.metric == name]
                memory.add(tenant, metric, {"host_name": host, "server_id": server}, samples)
    return {"clickhouse": ClickHouseStore(clickhouse_target.client, database), "memory": memory}


def test_series_labels_and_values_match_across_stores(stores: dict[str, MetricStore]) -> None:
    selectors = [
        (LabelMatcher("__name__", "=", "cpu_load"),),
        (
            LabelMatcher("__name__", "=~", "cpu_.*|net_bytes"),
            LabelMatcher("host_name", "!=", "web-0"),
        ),
        (LabelMatcher("host_name", "=~", "web-[12]"), LabelMatcher("__name__", "!~", "net.*")),
        (LabelMatcher("__name__", "=", "cpu_load"), LabelMatcher("missing", "=", "")),
        (LabelMatcher("__name__", "=", "cpu_load"), LabelMatcher("host_name", "=", "")),
        (LabelMatcher("host_name", "=~", "WEB-0"),),  # case-sensitive, anchored
        (LabelMatcher("host_name", "=~", "web"),),
    ]
    got: dict[str, Any] = {}
    for name, store in stores.items():
        got[name] = [
            [r.labels for r in store.series(A, [sel], BASE, NOW, 100)] for sel in selectors
        ] + [
            store.label_names(A, [], None, None, 100),
            store.label_values(A, "host_name", [], None, None, 100),
            store.label_values(A, "__name__", [selectors[2]], None, None, 100),
            [r.labels for r in store.series(A, [], None, None, 2)],
            [r.labels for r in store.series(A, [], None, None, 100, after=("cpu_load", 0))],
        ]
    assert got["clickhouse"] == got["memory"]
    ch = got["clickhouse"]
    assert [len(x) for x in ch[:7]] == [3, 4, 2, 3, 0, 0, 0]
    assert ch[7] == ["__name__", "host_name", "server_id"]
    assert ch[8] == ["web-0", "web-1", "web-2"]  # never B's "other-0"
    assert ch[9] == ["cpu_load"]
    # Time bounds: nothing before the data, nothing that ended long ago.
    for store in stores.values():
        assert store.series(A, [selectors[0]], None, BASE - HOUR, 100) == []
        assert store.series(A, [selectors[0]], NOW + 2 * HOUR, None, 100) == []


def test_fetch_merges_partials_alike(stores: dict[str, MetricStore]) -> None:
    ids = [r.series_id for r in stores["memory"].series(A, [], None, None, 100)]
    cases = [
        (BY_NAME["raw"], None),
        (BY_NAME["raw"], Grouping(60, 0)),
        (BY_NAME["10s"], None),
        (BY_NAME["1m"], Grouping(300, 120)),
        (BY_NAME["1h"], None),
    ]
    for tier, grouping in cases:
        blocks = {
            name: store.fetch(A, ids, tier, BASE, NOW, grouping, 1_000_000)
            for name, store in stores.items()
        }
        ch, mem = blocks["clickhouse"], blocks["memory"]
        assert len(ch) == len(mem) > 0, tier
        for column in ("series_id", "bucket", "ts", "count", "min", "max", "value"):
            assert np.array_equal(getattr(ch, column), getattr(mem, column)), (tier, column)
        assert np.allclose(ch.sum, mem.sum), tier
    with pytest.raises(QueryError, match="more than 10 samples"):
        stores["clickhouse"].fetch(A, ids, BY_NAME["raw"], BASE, NOW, None, 10)
    # Another tenant's ids give nothing.
    assert len(stores["clickhouse"].fetch(B, ids, BY_NAME["raw"], BASE, NOW, None, 10)) == 0


QUERIES = [
    "cpu_load",
    "sum by (host_name) (rate(net_bytes[5m]))",
    "increase(net_bytes[10m])",
    "avg_over_time(cpu_load[5m]) > 10",
    "max_over_time(cpu_load[15m]) - min_over_time(cpu_load[15m])",
    "topk(1, irate(net_bytes[1m]))",
    "count(cpu_load) by (host_name) * on (host_name) group(cpu_load) by (host_name)",
]


def test_promql_answers_match_across_stores(stores: dict[str, MetricStore]) -> None:
    clock = ManualClock(datetime.fromtimestamp(NOW / 1000, tz=UTC))
    tiers: set[str] = set()
    for query in QUERIES:
        answers = {}
        for name, store in stores.items():
            q = MetricsQueries(store, clock)
            ranged = q.range(A, query, BASE + 20 * 60_000, BASE + 50 * 60_000, 60_000)
            instant = q.instant(A, query, BASE + 30 * 60_000)
            answers[name] = [
                [
                    (s.labels, s.timestamps_ms.tolist(), np.round(s.values, 9).tolist())
                    for s in r.series
                ]
                for r in (ranged, instant)
            ]
            assert ranged.series, query
            tiers.update(ranged.tiers + instant.tiers)
        assert answers["clickhouse"] == answers["memory"], query
        for series in answers["clickhouse"][0]:
            assert "other-0" not in series[0].get("host_name", ""), query
    assert tiers == {"raw", "10s", "1m"}  # rollups (with partials) and raw samples alike
