"""Query latency over real chDB: one day of 1-minute rollups for 1,000 series.

- `query.function`: p50/p99 of a one-day, 1-minute-step `query_range` of one series
  through the published function (`ingest.query.MetricsQueries.range`), for a plain
  selector and for `rate(…[5m])`;
- `query.http`: the same through `GET /prometheus/api/v1/query_range` of the real API
  (uvicorn, PostgreSQL for the token's tenant, the API's own ClickHouse store);
- `query.fleet`: `sum(rate(…[5m]))` over all 1,000 series, one day at a 5-minute step.

Data goes into the documented tables (`metric_series`, `rollup_1m`) in the writer's
shape. Run with `python -m bench query`.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import polars as pl
import psycopg

from bench._common import emit, fail, percentile
from controlplane.app import create_app
from controlplane.passwords import hash_password
from controlplane.service import ApiService
from ingest.aggregator.decode import series_id_of
from ingest.aggregator.rollup import TIERS
from ingest.aggregator.writer import ClickHouseWriter
from ingest.metrics_schema import ROLLUP_1M_TABLE, SERIES_TABLE
from ingest.query import ClickHouseStore, MetricsQueries
from yakpanel.clickhouse import ClickHouseTarget
from yakpanel.embedded import EmbeddedPostgres
from yakpanel.ids import new_id
from yakpanel.migrations import migrate_all
from yakpanel.services import Stack
from yakpanel.settings import Settings

SERIES = 1_000
MINUTES = 24 * 60
ITERATIONS = 200
METRIC = "bench_cpu_seconds"
DATABASE = "bench_query"
STAFF = ("noc@bench.test", "bench-staff-password")
OWNER = ("owner@bench.test", "bench-owner-password")


def load(client: Any, tenant: str, end_s: int) -> list[str]:
    """One day of 1-minute rollups (6 samples a minute) for SERIES counters."""
    servers = [str(uuid.UUID(int=i + 1)) for i in range(SERIES)]
    first_s = end_s - MINUTES * 60
    rows = []
    for i, server in enumerate(servers):
        labels = (("host_name", f"web-{i}"), ("server_id", server))
        sid = series_id_of(tenant, METRIC, labels)
        rows.append([tenant, sid, METRIC, dict(labels), server, first_s * 1000, end_s * 1000])
    client.insert(
        f"`{DATABASE}`.{SERIES_TABLE}",
        [[r[0], r[1], r[2], r[3], r[4], _dt(r[5]), _dt(r[6])] for r in rows],
        column_names=[
            "tenant_id",
            "series_id",
            "metric",
            "labels",
            "server_id",
            "first_seen",
            "last_seen",
        ],
    )
    minute = np.arange(MINUTES, dtype=np.int64)
    tier = next(t for t in TIERS if t.table == ROLLUP_1M_TABLE)
    for chunk in range(0, SERIES, 100):
        frames = []
        for i in range(chunk, min(chunk + 100, SERIES)):
            rate = 1.0 + i % 7  # per second
            last = (minute + 1) * 60 * rate
            frames.append(
                pl.DataFrame(
                    {
                        "tenant_id": [tenant] * MINUTES,
                        "series_id": pl.Series([rows[i][1]] * MINUTES, dtype=pl.UInt64),
                        "bucket": first_s + minute * 60,
                        "min": last - 50 * rate,
                        "max": last,
                        "sum": 6 * last - 150 * rate,
                        "count": pl.Series([6] * MINUTES, dtype=pl.UInt64),
                        "last_ts": (first_s + minute * 60 + 55) * 1000,
                        "last_value": last,
                        "retention_days": pl.Series([30] * MINUTES, dtype=pl.UInt16),
                    }
                )
            )
        frame = ClickHouseWriter.tier_rows(pl.concat(frames), tier)
        client.insert_arrow(f"`{DATABASE}`.{tier.table}", frame.to_arrow())
    return servers


def _dt(ms: int) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def timed(fn: Callable[[], Any], iterations: int) -> list[float]:
    for _ in range(5):  # warm up
        fn()
    out = []
    for _ in range(iterations):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def latencies(name: str, ms: list[float], **fields: Any) -> None:
    emit(
        name,
        series_stored=SERIES,
        iterations=len(ms),
        p50_ms=round(percentile(ms, 50), 2),
        p99_ms=round(percentile(ms, 99), 2),
        **fields,
    )


async def _api_token(url: str, pg_dsn: str) -> tuple[str, str]:
    """(tenant id, metrics:read token) created through the API like an operator would."""
    with psycopg.connect(pg_dsn) as conn:
        conn.execute(
            "INSERT INTO platform_staff (id, email, password_hash, permissions)"
            " VALUES (%s, %s, %s, %s)",
            (
                new_id(),
                STAFF[0],
                hash_password(STAFF[1]),
                ["platform:tenants:write", "platform:plans:write", "platform:tenants:read"],
            ),
        )
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        r = await c.post("/v1/auth/login", json={"email": STAFF[0], "password": STAFF[1]})
        csrf = {"X-CSRF-Token": r.json()["csrf_token"]}
        plan = {
            "code": "bench",
            "name": "Bench",
            "max_servers": 10_000,
            "max_sites": 10,
            "max_databases": 10,
            "max_alert_rules": 10,
            "metric_retention_days": 30,
            "api_requests_per_minute": 1_000_000,
        }
        r = await c.post("/v1/plans", json=plan, headers=csrf)
        assert r.status_code == 201, r.text
        tenant = {
            "slug": "bench",
            "name": "Bench",
            "plan": "bench",
            "owner_email": OWNER[0],
            "owner_password": OWNER[1],
        }
        r = await c.post("/v1/tenants", json=tenant, headers=csrf)
        assert r.status_code == 201, r.text
        tenant_id = str(r.json()["id"])
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        r = await c.post("/v1/auth/login", json={"email": OWNER[0], "password": OWNER[1]})
        csrf = {"X-CSRF-Token": r.json()["csrf_token"]}
        r = await c.post(
            f"/v1/tenants/{tenant_id}/tokens",
            json={"name": "grafana", "scopes": ["metrics:read"]},
            headers=csrf,
        )
        assert r.status_code == 201, r.text
        return tenant_id, str(r.json()["token"])


async def run(root: Path) -> None:
    pg = EmbeddedPostgres(root / "pg")
    pg.start()
    try:
        target = ClickHouseTarget(f"chdb://{root / 'ch'}", DATABASE)
        client = target.client()
        migrate_all(pg.dsn, client, DATABASE)
        settings = Settings(
            state_dir=root / "state",
            postgres_dsn=pg.dsn,
            kafka_bootstrap="127.0.0.1:9",
            clickhouse_dsn=target.dsn,
            clickhouse_database=DATABASE,
            api_port=0,
        )
        stack = Stack(settings, pg.dsn, "127.0.0.1:9", target)
        api = ApiService(create_app(stack), "127.0.0.1", 0)
        await api.start()
        try:
            tenant, token = await _api_token(api.url, pg.dsn)
            end_s = int(time.time()) // 60 * 60
            started = time.perf_counter()
            servers = load(client, tenant, end_s)
            loaded_s = time.perf_counter() - started
            # Steady state: a day's partials merged, as background merges leave them.
            for table in (SERIES_TABLE, ROLLUP_1M_TABLE):
                client.command(f"OPTIMIZE TABLE `{DATABASE}`.{table} FINAL")
            emit(
                "query.load",
                series=SERIES,
                rows=SERIES * MINUTES,
                seconds=round(loaded_s, 2),
                merged_s=round(time.perf_counter() - started - loaded_s, 2),
            )
            await measure(target, tenant, token, api.url, servers, end_s)
        finally:
            await api.stop()
            client.close()
    finally:
        pg.stop()


async def measure(
    target: ClickHouseTarget, tenant: str, token: str, url: str, servers: list[str], end_s: int
) -> None:
    store = ClickHouseStore(target.client, target.database)
    queries = MetricsQueries(store)
    start_ms, end_ms = (end_s - MINUTES * 60) * 1000, end_s * 1000
    one = f'{METRIC}{{server_id="{servers[17]}"}}'
    for label, query in (("selector", one), ("rate", f"rate({one}[5m])")):
        result = queries.range(tenant, query, start_ms, end_ms, 60_000)
        if len(result.series) != 1 or len(result.series[0].values) < MINUTES - 5:
            fail(f"query.function {label}: unexpected answer {result.series!r:.300}")
        ms = timed(lambda q=query: queries.range(tenant, q, start_ms, end_ms, 60_000), ITERATIONS)
        latencies(
            "query.function",
            ms,
            query=label,
            points=len(result.series[0].values),
            tier=result.tiers[0],
        )

    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as c:
        for label, query in (("selector", one), ("rate", f"rate({one}[5m])")):
            params = {"query": query, "start": end_s - MINUTES * 60, "end": end_s, "step": 60}
            ms = []
            for i in range(ITERATIONS + 1):
                started = time.perf_counter()
                r = await c.get("/prometheus/api/v1/query_range", params=params)
                if r.status_code != 200:
                    fail(f"query.http {label}: {r.status_code} {r.text[:300]}")
                if i:
                    ms.append((time.perf_counter() - started) * 1000)
            (series,) = r.json()["data"]["result"]
            latencies("query.http", ms, query=label, points=len(series["values"]))

    fleet = f"sum(rate({METRIC}[5m]))"
    result = queries.range(tenant, fleet, start_ms, end_ms, 300_000)
    ms = timed(lambda: queries.range(tenant, fleet, start_ms, end_ms, 300_000), 5)
    latencies(
        "query.fleet",
        ms,
        query=fleet,
        series_read=SERIES,
        points=len(result.series[0].values),
        samples_loaded=result.samples_loaded,
        tier=result.tiers[0],
    )
    store.close()


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="yak-bench-query-"))
    try:
        asyncio.run(run(root))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
