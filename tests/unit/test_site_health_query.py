"""The site health queries (`ingest.query.sites`) against the ClickHouse engine (chDB).

Probe results are written the aggregator's way (OTLP decoded, rolled up, written by its
writer), as the agent's `yakpanel.site.*` gauges with the `site` and `url` attributes.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from ingest.aggregator.decode import SampleBatchBuilder
from ingest.aggregator.rollup import aggregate
from ingest.aggregator.writer import BatchSource, ClickHouseWriter
from ingest.query import sites
from ingest.query.fleet import WINDOWS
from yakpanel.clickhouse import ClickHouseTarget

from ..support.host_metrics import migrate_clickhouse
from ..support.otlp import metrics_headers

pytestmark = pytest.mark.clickhouse

_offsets = itertools.count(1)


@dataclass(frozen=True)
class Probe:
    """One probe result of a site at `ts_ms`, as the agent reports it."""

    ts_ms: int
    up: bool
    status_code: int
    duration_s: float
    tls_days_left: float | None = None
    url: str = ""


def probe_request(site: str, probes: list[Probe]) -> bytes:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.append(KeyValue(key="host.name", value=AnyValue(string_value="web")))
    scope = rm.scope_metrics.add()
    gauges = {
        name: scope.metrics.add(name=name)
        for name in (
            "yakpanel.site.up",
            "yakpanel.site.http.status_code",
            "yakpanel.site.http.duration",
            "yakpanel.site.tls.days_left",
        )
    }
    for p in probes:
        url = p.url or f"https://{site}.example/"
        values = {
            "yakpanel.site.up": 1.0 if p.up else 0.0,
            "yakpanel.site.http.status_code": float(p.status_code),
            "yakpanel.site.http.duration": p.duration_s,
            "yakpanel.site.tls.days_left": p.tls_days_left,
        }
        for name, value in values.items():
            if value is None:
                continue
            point = gauges[name].gauge.data_points.add(
                time_unix_nano=p.ts_ms * 1_000_000, as_double=value
            )
            point.attributes.extend(
                [
                    KeyValue(key="site", value=AnyValue(string_value=site)),
                    KeyValue(key="url", value=AnyValue(string_value=url)),
                ]
            )
    return req.SerializeToString()


def write_probes(
    client: Any, database: str, tenant_id: str, server_id: str, site: str, probes: list[Probe]
) -> None:
    """Decode, roll up and write as the aggregator does, one record per 5 minutes."""
    ordered = sorted(probes, key=lambda p: p.ts_ms)
    while ordered:
        first = ordered[0].ts_ms
        chunk = [p for p in ordered if p.ts_ms < first + 300_000]
        ordered = ordered[len(chunk) :]
        received = chunk[-1].ts_ms
        builder = SampleBatchBuilder()
        builder.add(probe_request(site, chunk), metrics_headers(tenant_id, server_id, received))
        offset = next(_offsets)
        batch = aggregate(builder.frame())
        assert batch.late_dropped == 0 and batch.future_dropped == 0
        source = BatchSource(f"test.sites.{server_id}", 0, offset, offset, received)
        ClickHouseWriter(client, database).write(batch, source)


def every_10s(now_ms: int, minutes: int, make: Any) -> list[Probe]:
    """A probe every 10 s for `minutes` up to now; `make(k)` builds the k-th from the end."""
    return [make(k, now_ms - k * 10_000) for k in range(minutes * 6, -1, -1)]


@pytest.fixture
def ch(clickhouse_target: ClickHouseTarget) -> Iterator[Any]:
    try:
        client = clickhouse_target.client()
    except Exception as exc:
        pytest.fail(f"chDB did not open: {exc}", pytrace=False)
    migrate_clickhouse(client, clickhouse_target.database)
    yield client
    client.close()


def test_latest_probe_state_since_and_worst_values(
    ch: Any, clickhouse_target: ClickHouseTarget
) -> None:
    db = clickhouse_target.database
    tenant, other = uuid.uuid4(), uuid.uuid4()
    server = str(uuid.uuid4())
    shop, blog, two_urls, quiet, foreign = (uuid.uuid4() for _ in range(5))
    now = datetime.now(UTC).replace(microsecond=0)
    now_ms = int(now.timestamp() * 1000)

    # shop: up for 30 min, then down (503) for the last 3 minutes.
    write_probes(
        ch, db, str(tenant), server, str(shop),
        every_10s(now_ms, 30, lambda k, ts: Probe(ts, k > 18, 200 if k > 18 else 503, 0.05, 40)),
    )  # fmt: skip
    # blog: up all along, certificate expiring in 10 days, slower.
    write_probes(
        ch, db, str(tenant), server, str(blog),
        every_10s(now_ms, 10, lambda k, ts: Probe(ts, True, 200, 0.25, 10.5)),
    )  # fmt: skip
    # two URLs: one up, one not answering: the site is down, status 0.
    write_probes(
        ch, db, str(tenant), server, str(two_urls),
        every_10s(now_ms, 2, lambda k, ts: Probe(ts, True, 200, 0.1, url="https://a/"))
        + every_10s(now_ms, 2, lambda k, ts: Probe(ts, False, 0, 5.0, url="https://b/")),
    )  # fmt: skip
    # quiet: probed last 30 minutes ago, nothing since.
    write_probes(
        ch, db, str(tenant), server, str(quiet),
        [Probe(now_ms - 1_800_000, True, 200, 0.1)],
    )  # fmt: skip
    # foreign: the same site id, reported under another tenant, is never read as ours.
    write_probes(
        ch, db, str(other), server, str(foreign),
        every_10s(now_ms, 2, lambda k, ts: Probe(ts, False, 500, 0.1)),
    )  # fmt: skip
    write_probes(
        ch, db, str(other), server, str(blog),
        every_10s(now_ms, 2, lambda k, ts: Probe(ts, False, 500, 9.0, 1.0)),
    )  # fmt: skip

    refs = [sites.SiteRef(tenant, s) for s in (shop, blog, two_urls, quiet, foreign)]
    health = sites.site_health(ch, refs, now)

    assert set(health) == {shop, blog, two_urls, quiet, foreign}
    s = health[shop]
    assert (s.state, s.status_code, s.tls_days_left) == ("down", 503, 40.0)
    assert s.since is not None and s.since_at_least is None
    # Down since the first failing probe, 18 probes (180 s) ago, to the 10 s bucket.
    assert abs((now - s.since).total_seconds() - 180) <= 20, now - s.since
    assert s.last_probe_at is not None and (now - s.last_probe_at).total_seconds() < 11

    b = health[blog]
    assert (b.state, b.status_code, b.tls_days_left, b.duration_s) == ("up", 200, 10.5, 0.25)
    # Up for as long as anything was read: "at least since" the first sample.
    assert b.since is None and b.since_at_least is not None
    assert abs((now - b.since_at_least).total_seconds() - 600) <= 20

    t = health[two_urls]
    assert (t.state, t.status_code, t.duration_s) == ("down", 0, 5.0)

    assert health[quiet] == sites.SiteHealth()  # nothing recent: unknown, no values
    assert health[foreign] == sites.SiteHealth()  # another tenant's data is not ours
    assert sites.site_health(ch, [], now) == {}


def test_site_charts_per_step(ch: Any, clickhouse_target: ClickHouseTarget) -> None:
    db = clickhouse_target.database
    tenant, site = uuid.uuid4(), uuid.uuid4()
    server = str(uuid.uuid4())
    now = datetime.now(UTC).replace(microsecond=0)
    now_ms = int(now.timestamp() * 1000)
    write_probes(
        ch, db, str(tenant), server, str(site),
        every_10s(now_ms, 20, lambda k, ts: Probe(ts, k > 30, 200 if k > 30 else 502, 0.2, 7)),
    )  # fmt: skip
    # Another tenant's series with the same site id stays out of the charts.
    write_probes(
        ch, db, str(uuid.uuid4()), server, str(site),
        every_10s(now_ms, 20, lambda k, ts: Probe(ts, True, 999, 60.0, 1)),
    )  # fmt: skip

    charts = sites.site_charts(ch, sites.SiteRef(tenant, site), WINDOWS["1h"], now)
    assert len(charts.timeline) == 360
    up = [v for _, v in charts.availability.points if v is not None]
    assert len(up) >= 120 and up[0] == 1.0 and up[-1] == 0.0
    codes = {v for _, v in charts.status_code.points if v is not None}
    assert codes == {200.0, 502.0}
    durations = {round(v, 6) for _, v in charts.duration.points if v is not None}
    assert durations == {0.2}
    assert {v for _, v in charts.tls_days_left.points if v is not None} == {7.0}
    # Before the first probe the lines have gaps, not zeros.
    assert charts.availability.points[0][1] is None

    six = sites.site_charts(ch, sites.SiteRef(tenant, site), WINDOWS["6h"], now)
    per_minute = [v for _, v in six.availability.points if v is not None]
    assert 20 <= len(per_minute) <= 22
    assert per_minute[0] == 1.0 and per_minute[-1] == 0.0
    empty = sites.empty_site_charts(WINDOWS["24h"], now)
    assert all(v is None for _, v in empty.availability.points)
    assert len(empty.timeline) == 360
