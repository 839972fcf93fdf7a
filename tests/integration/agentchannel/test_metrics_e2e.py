"""Acceptance: enrolled agents' host metrics are queryable through the structured API and
the Prometheus API within seconds, and a Grafana-style `sum by (server_id) (rate(…))`
returns the right numbers.

The numbers come from real nodes: summed over every mode, CPU time grows by one second
per second per logical CPU, so `sum by (server_id) (rate(system_cpu_time[…]))` is the
machine's CPU count for each agent (both run on this machine).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from .conftest import Channel, eventually
from .test_agent_metrics import Store, start_agent
from .test_agent_metrics import store as store  # the fixture

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

PROM = "/prometheus/api/v1"


def data_of(r: httpx.Response) -> Any:
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]


async def test_agent_metrics_are_queryable_through_both_apis(
    channel: Channel, store: Store, tmp_path: Path
) -> None:
    api = channel.api
    client = api.token_client(await api.token(channel.tenant, ["metrics:read"]))
    started = time.monotonic()
    agents = [await start_agent(channel, tmp_path, f"node-{i}", "", []) for i in range(2)]
    servers = {server_id for server_id, _ in agents}
    try:
        # Prometheus API: memory utilisation of both nodes, as a Grafana panel asks.
        async def memory_used() -> dict[str, float]:
            r = await client.get(
                f"{PROM}/query",
                params={"query": 'system_memory_utilization{system_memory_state="used"}'},
            )
            return {s["metric"]["server_id"]: float(s["value"][1]) for s in data_of(r)["result"]}

        used = await eventually(memory_used, lambda got: set(got) == servers, timeout_s=45)
        first_queryable_s = time.monotonic() - started
        assert all(0 < v < 1 for v in used.values()), used

        # Structured API: the same metric as a range at the finest tier.
        now = int(time.time())
        r = await client.get(
            "/v1/metrics/query_range",
            params={
                "metric": "system_memory_utilization",
                "match": "system_memory_state=used",
                "start": now - 120,
                "end": now + 10,
                "step": 10,
                "aggregation": "last",
            },
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tier"] in ("raw", "10s"), body["tier"]
        by_server = {s["labels"]["server_id"]: s["points"] for s in body["series"]}
        assert set(by_server) == servers
        assert all(0 < v < 1 for points in by_server.values() for _, v in points)

        # A rate needs its window covered by samples (Prometheus extrapolates at most half
        # an interval past the first and last sample): wait until the counters have been
        # reported for longer than the window.
        query = "sum by (server_id) (rate(system_cpu_time[5s]))"

        async def cpu_rates() -> list[dict[str, Any]]:
            r = await client.get(f"{PROM}/query", params={"query": query})
            result: list[dict[str, Any]] = data_of(r)["result"]
            return result

        cpus = psutil.cpu_count()
        result = await eventually(
            cpu_rates,
            lambda got: (
                {s["metric"].get("server_id") for s in got} == servers
                and all(float(s["value"][1]) == pytest.approx(cpus, rel=0.1) for s in got)
            ),
            timeout_s=30,
        )
        # `by (server_id)` keeps that label only.
        assert sorted(s["metric"]["server_id"] for s in result) == sorted(servers)
        assert all(s["metric"].keys() == {"server_id"} for s in result)
        rates = {s["metric"]["server_id"]: float(s["value"][1]) for s in result}
    finally:
        for _, runtime in agents:
            await runtime.stop()
    print(f"first queryable after {first_queryable_s:.1f}s; cpu rates {rates}")
