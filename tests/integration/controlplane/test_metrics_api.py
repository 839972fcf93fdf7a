"""The metrics APIs over real chDB and the real API app: samples written the aggregator's
way (OTLP → decode → rollups → ClickHouseWriter) for two tenants, read back through
`/v1/metrics/*` and `/prometheus/api/v1/*`."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from controlplane.access.permissions import TENANT_PERMISSIONS
from ingest.aggregator.decode import SampleBatchBuilder
from ingest.aggregator.rollup import aggregate
from ingest.aggregator.writer import BatchSource, ClickHouseWriter
from yakpanel.migrations import CLICKHOUSE_SOURCES, ClickHouseMigrator

from ...support.otlp import GaugePoint, gauge_request, metrics_headers
from .conftest import Api, Client, Tenant

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

HOUR = 3_600_000
# Two hours ago on an hour boundary: inside raw retention, in one 1 h bucket.
BASE = (int(time.time() * 1000) // HOUR - 2) * HOUR
PROM = "/prometheus/api/v1"


@dataclass
class Writer:
    """Writes OTLP gauges for one tenant the way the aggregator does, batch by batch."""

    client: Any
    database: str
    offset: int = 0

    def write(self, tenant: str, server: str, host: str, points: list[GaugePoint]) -> None:
        # One batch per 5 minutes of samples: the aggregator drops samples more than
        # 10 minutes older than the batch's newest `received_at`.
        chunks: dict[int, list[GaugePoint]] = {}
        for p in points:
            chunks.setdefault(p.ts_ms // 300_000, []).append(p)
        for chunk in chunks.values():
            received = max(p.ts_ms for p in chunk)
            builder = SampleBatchBuilder()
            builder.add(gauge_request(chunk, host=host), metrics_headers(tenant, server, received))
            self.offset += 1
            source = BatchSource("test.yak.metrics.v1", 0, self.offset, self.offset, received)
            ClickHouseWriter(self.client, self.database).write(aggregate(builder.frame()), source)


@pytest.fixture
def writer(api: Api, ch_client: Any) -> Writer:
    database = api.stack.clickhouse.database
    ClickHouseMigrator(ch_client, database).apply([m for s in CLICKHOUSE_SOURCES for m in s.load()])
    return Writer(ch_client, database)


def counter(
    step: int, start_ms: int = BASE, minutes: int = 30, reset_at: int | None = None
) -> list[GaugePoint]:
    """`http.requests` sampled every 10 s (5 s past), +`step` per sample; a restart at
    sample `reset_at` starts again from `step` (so the rate never changes)."""
    points = []
    value = 0.0
    for i in range(minutes * 6):
        value = step if reset_at is not None and i == reset_at else value + step
        points.append(GaugePoint("http.requests", start_ms + 5_000 + i * 10_000, value))
    return points


async def seeded(api: Api, writer: Writer) -> tuple[Tenant, Tenant, dict[str, str]]:
    """Tenants A (servers a0..a2) and B (b0, b1, hosts secret-b…), server ids by name."""
    a, b = await api.create_tenant(), await api.create_tenant()
    servers = {}
    for k in range(3):
        server = str(uuid.uuid4())
        servers[f"a{k}"] = server
        writer.write(a.id, server, f"host-a{k}", counter(k + 1, reset_at=100 if k == 0 else None))
    for k in range(2):
        server = str(uuid.uuid4())
        servers[f"b{k}"] = server
        writer.write(b.id, server, f"secret-b{k}", counter(1000 * (k + 1)))
    return a, b, servers


def ok(r: httpx.Response) -> Any:
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]


async def test_sum_by_server_of_rate_over_the_prometheus_api(api: Api, writer: Writer) -> None:
    a, _, servers = await seeded(api, writer)
    client = api.token_client(await api.token(a, ["metrics:read"]))
    at = (BASE + 20 * 60_000) / 1000
    query = "sum by (server_id) (rate(http_requests[5m]))"
    instant = ok(await client.get(f"{PROM}/query", params={"query": query, "time": at}))
    assert instant["resultType"] == "vector"
    got = {
        s["metric"]["server_id"]: (s["value"][0], float(s["value"][1])) for s in instant["result"]
    }
    # +k per 10 s is k/10 per second, also across server a0's restart.
    assert got == {servers[f"a{k}"]: (at, pytest.approx((k + 1) / 10)) for k in range(3)}

    # The same over a range, as Grafana sends it: POST with a form body.
    r = await client.post(
        f"{PROM}/query_range",
        data={"query": query, "start": at - 600, "end": at, "step": "60"},
    )
    matrix = ok(r)
    assert matrix["resultType"] == "matrix"
    for series in matrix["result"]:
        k = next(k for k in range(3) if servers[f"a{k}"] == series["metric"]["server_id"])
        assert len(series["values"]) == 11
        for t, v in series["values"]:
            assert float(v) == pytest.approx((k + 1) / 10), (k, t)
    assert len(matrix["result"]) == 3

    # Instant selectors carry every label but tenant_id; values are strings.
    r = await client.get(
        f"{PROM}/query", params={"query": 'http_requests{host_name="host-a1"}', "time": at}
    )
    (one,) = ok(r)["result"]
    assert one["metric"] == {
        "__name__": "http_requests",
        "host_name": "host-a1",
        "server_id": servers["a1"],
    }
    assert one["value"] == [at, "240"]  # 120 samples of +2 up to 20 min (19:55 inclusive)


async def test_rollup_partials_written_in_two_batches_are_merged(
    api: Api, writer: Writer, ch_client: Any
) -> None:
    a = await api.create_tenant()
    database = api.stack.clickhouse.database
    for table in ("rollup_1m", "rollup_1h"):
        ch_client.command(f"SYSTEM STOP MERGES `{database}`.{table}")
    server = str(uuid.uuid4())
    minute = BASE + 10 * 60_000
    first = [GaugePoint("disk.used", minute + s * 1000, v) for s, v in ((1, 4.0), (20, 8.0))]
    second = [GaugePoint("disk.used", minute + s * 1000, v) for s, v in ((30, 1.0), (50, 6.0))]
    writer.write(a.id, server, "host-1", first)
    writer.write(a.id, server, "host-1", second)
    rows = ch_client.query(
        f"SELECT count() FROM `{database}`.rollup_1m WHERE tenant_id = {{t:UUID}}",
        parameters={"t": a.id},
    ).result_rows[0][0]
    assert rows == 2  # two partial rows of one bucket: the query must merge them

    client = api.token_client(await api.token(a, ["metrics:read"]))
    expected = {"avg": 19 / 4, "min": 1.0, "max": 8.0, "sum": 19.0, "count": 4.0, "last": 6.0}
    for step, tier in ((60, "1m"), (3600, "1h")):
        for aggregation, want in expected.items():
            r = await client.get(
                "/v1/metrics/query_range",
                params={
                    "metric": "disk_used",
                    "start": BASE // 1000,
                    "end": (BASE + HOUR - 1) // 1000,
                    "step": step,
                    "aggregation": aggregation,
                },
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert (body["tier"], body["step"]) == (tier, step)
            (series,) = body["series"]
            assert series["labels"] == {"host_name": "host-1", "server_id": server}
            bucket = minute // 1000 if step == 60 else BASE // 1000
            assert series["points"] == [[bucket, want]], (step, aggregation)

    # PromQL over the 1 h tier reads the merged aggregates too.
    r = await client.get(
        f"{PROM}/query_range",
        params={
            "query": "count_over_time(disk_used[1h])",
            "start": (BASE + HOUR) / 1000,
            "end": (BASE + HOUR) / 1000,
            "step": "1h",
        },
    )
    (series,) = ok(r)["result"]
    assert series["values"] == [[(BASE + HOUR) // 1000, "4"]]


async def _everything(client: Client, tenant_id: str | None = None) -> list[httpx.Response]:
    """Every read path of both APIs, asking for all series there are."""
    t = {"tenant_id": tenant_id} if tenant_id else {}
    at = (BASE + 20 * 60_000) / 1000
    everything = '{__name__=~".+"}'
    rng = {"start": at - 600, "end": at, "step": "60"}
    return [
        await client.get(
            "/v1/metrics/query_range", params={**t, "metric": "http_requests", **_v1_range()}
        ),
        await client.get("/v1/metrics/series", params=t),
        await client.get("/v1/metrics/labels", params=t),
        await client.get("/v1/metrics/labels/host_name/values", params=t),
        await client.get(f"{PROM}/query", params={**t, "query": everything, "time": at}),
        await client.post(f"{PROM}/query", params=t, data={"query": everything, "time": at}),
        await client.get(f"{PROM}/query_range", params={**t, "query": everything, **rng}),
        await client.post(f"{PROM}/query_range", params=t, data={"query": everything, **rng}),
        await client.get(f"{PROM}/series", params={**t, "match[]": everything}),
        await client.post(f"{PROM}/series", params=t, data={"match[]": everything}),
        await client.get(f"{PROM}/labels", params=t),
        await client.post(f"{PROM}/labels", params=t, data={}),
        await client.get(f"{PROM}/label/host_name/values", params=t),
        await client.post(f"{PROM}/label/host_name/values", params=t, data={}),
    ]


def _v1_range() -> dict[str, Any]:
    return {"start": BASE // 1000, "end": (BASE + 30 * 60_000) // 1000, "step": 60}


async def test_a_tenant_sees_only_its_own_series_through_every_path(
    api: Api, writer: Writer
) -> None:
    a, b, servers = await seeded(api, writer)
    token = api.token_client(await api.token(a, sorted(TENANT_PERMISSIONS)))
    b_marks = ("secret-b", servers["b0"], servers["b1"])
    for r in await _everything(token):
        assert r.status_code == 200, f"{r.request.method} {r.request.url}: {r.text}"
        assert not [m for m in b_marks if m in r.text], r.request.url
        if not r.request.url.path.endswith("/labels"):
            assert "host-a1" in r.text, f"{r.request.url}: {r.text}"  # control: A's data

    # B's tenant named explicitly: 404, the same answer as for a tenant that does not
    # exist; never B's data.
    for who, client in (("A's token", token), ("A's owner", a.owner)):
        answers = await _everything(client, b.id)
        nowhere = await _everything(client, str(uuid.uuid4()))
        for r, control in zip(answers, nowhere, strict=True):
            where = f"{who}: {r.request.method} {r.request.url}"
            assert r.status_code == 404, f"{where}: {r.text}"
            assert not [m for m in b_marks if m in r.text], where
            assert _without_instance(r) == _without_instance(control), where
    # A session reads its own tenant's metrics by naming it.
    for r in await _everything(a.owner, a.id):
        assert r.status_code == 200, f"{r.request.url}: {r.text}"
        assert not [m for m in b_marks if m in r.text], r.request.url
    # A session without a tenant: told to pass one.
    r = await a.owner.get("/v1/metrics/series")
    assert (r.status_code, r.json()["code"]) == (400, "tenant_required")
    r = await a.owner.get(f"{PROM}/labels")
    assert (r.status_code, r.json()["errorType"]) == (400, "bad_data")

    # Control: staff reading B see B's series.
    staff = await api.staff()
    r = await staff.get(f"{PROM}/label/host_name/values", params={"tenant_id": b.id})
    assert ok(r) == ["secret-b0", "secret-b1"]


def _without_instance(r: httpx.Response) -> Any:
    body = r.json()
    body.pop("instance", None)
    return body


async def test_a_token_without_metrics_read_is_refused(api: Api, writer: Writer) -> None:
    a = await api.create_tenant()
    client = api.token_client(await api.token(a, ["servers:read"]))
    r = await client.get("/v1/metrics/labels")
    assert r.status_code == 403, r.text
    assert r.json()["permission"] == "metrics:read"
    r = await client.get(f"{PROM}/query", params={"query": "up"})
    assert r.status_code == 403, r.text
    assert r.json() == {
        "status": "error",
        "errorType": "forbidden",
        "error": "this needs the permission metrics:read",
    }
    r = await api.client().get(f"{PROM}/query", params={"query": "up"})
    assert r.status_code == 401
    assert r.json()["status"] == "error"


async def test_bad_queries_and_limits_get_clear_errors(api: Api, writer: Writer) -> None:
    a = await api.create_tenant()
    client = api.token_client(await api.token(a, ["metrics:read"]))
    r = await client.get(f"{PROM}/query", params={"query": "sum(rate(x[5m])"})
    assert r.status_code == 400
    body = r.json()
    assert (body["status"], body["errorType"]) == ("error", "bad_data")
    assert "invalid PromQL" in body["error"] and "parenthes" in body["error"]
    r = await client.post(f"{PROM}/query", data={"query": 'label_replace(x, "a", "b", "c", "d")'})
    assert r.status_code == 400
    assert "label_replace() is not supported" in r.json()["error"]
    r = await client.get(
        f"{PROM}/query_range", params={"query": "up", "start": 0, "end": 20_000, "step": 1}
    )
    assert r.status_code == 400
    assert "exceeded maximum resolution of 11,000 points" in r.json()["error"]
    r = await client.get(
        f"{PROM}/query_range", params={"query": "up", "start": "soon", "end": 1, "step": 1}
    )
    assert (r.status_code, r.json()["error"]) == (
        400,
        'invalid parameter "start": cannot parse "soon" to a valid timestamp',
    )
    r = await client.get(f"{PROM}/series")
    assert (r.status_code, r.json()["error"]) == (400, "no match[] parameter provided")
    r = await client.get("/v1/metrics/query_range", params={"metric": "x", "match": "bad matcher"})
    assert (r.status_code, r.json()["code"]) == (400, "invalid_query")

    # More series than a query may select: 10 001 of them.
    server = str(uuid.uuid4())
    builder = SampleBatchBuilder()
    at = BASE + 60_000
    request = ExportMetricsServiceRequest()
    metric = request.resource_metrics.add().scope_metrics.add().metrics.add(name="wide")
    for i in range(10_001):
        point = metric.gauge.data_points.add(time_unix_nano=at * 1_000_000, as_double=1.0)
        point.attributes.append(KeyValue(key="i", value=AnyValue(string_value=str(i))))
    builder.add(request.SerializeToString(), metrics_headers(a.id, server, at))
    ClickHouseWriter(writer.client, writer.database).write(
        aggregate(builder.frame()), BatchSource("test.wide", 0, 1, 1, at)
    )
    r = await client.get(f"{PROM}/query", params={"query": "wide", "time": at / 1000})
    assert r.status_code == 422, r.text
    assert r.json()["errorType"] == "execution"
    assert "more than 10000 series" in r.json()["error"]
    r = await client.get("/v1/metrics/query_range", params={"metric": "wide", **_v1_range()})
    assert (r.status_code, r.json()["code"]) == (422, "query_refused")
    # A narrower selector answers.
    r = await client.get(f"{PROM}/query", params={"query": 'wide{i=~"1.."}', "time": at / 1000})
    assert len(ok(r)["result"]) == 100


async def test_grafana_datasource_test_passes(api: Api, writer: Writer) -> None:
    a = await api.create_tenant()
    client = api.token_client(await api.token(a, ["metrics:read"]))
    info = ok(await client.get(f"{PROM}/status/buildinfo"))
    assert info["version"].startswith("2.")
    r = await client.post(f"{PROM}/query", data={"query": "1+1", "time": "1700000000.5"})
    assert ok(r) == {"resultType": "scalar", "result": [1700000000.5, "2"]}
