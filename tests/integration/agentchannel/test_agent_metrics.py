"""An enrolled agent's metrics end to end: OTel SDK → disk queue → gateway (mTLS OTLP) →
Kafka → aggregator → ClickHouse, including a gateway outage the backlog bridges."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent.runtime import AgentRuntime
from agent.telemetry.service import AgentTelemetry
from ingest.aggregator.config import AggregatorConfig
from ingest.aggregator.service import Aggregator
from ingest.gateway.service import GatewayService
from yakpanel.clickhouse import ClickHouseTarget
from yakpanel.migrations import CLICKHOUSE_SOURCES, ClickHouseMigrator

from .conftest import Channel, enroll_agent, eventually

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

INTERVAL_S = 0.5
HOSTNAME = "metrics-node"


class Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base name
        pass


@pytest.fixture
def site_url() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/health"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@dataclass
class Store:
    """Reads what the aggregator wrote for this test's tenant."""

    client: Any
    tenant_id: str

    async def query(self, sql: str, **parameters: Any) -> list[tuple[Any, ...]]:
        result = await asyncio.to_thread(
            self.client.query, sql, parameters={"t": self.tenant_id, **parameters}
        )
        return list(result.result_rows)

    async def series(self, server_id: str) -> dict[str, list[dict[str, str]]]:
        rows = await self.query(
            "SELECT metric, labels FROM metric_series FINAL"
            " WHERE tenant_id = {t:UUID} AND labels['server_id'] = {s:String}",
            s=server_id,
        )
        out: dict[str, list[dict[str, str]]] = {}
        for metric, labels in rows:
            out.setdefault(metric, []).append(dict(labels))
        return out

    async def samples(self, server_id: str, metric: str, **labels: str) -> list[tuple[int, float]]:
        """(unix ms, value) of one series, oldest first."""
        where = "".join(
            f" AND labels[{{k{i}:String}}] = {{v{i}:String}}" for i in range(len(labels))
        )
        params = {f"k{i}": k for i, k in enumerate(labels)} | {
            f"v{i}": v for i, v in enumerate(labels.values())
        }
        rows = await self.query(
            "SELECT toUnixTimestamp64Milli(ts), value FROM samples_raw"
            " WHERE tenant_id = {t:UUID} AND series_id IN ("
            "   SELECT series_id FROM metric_series FINAL WHERE tenant_id = {t:UUID}"
            "   AND metric = {m:String} AND labels['server_id'] = {s:String}" + where + ")"
            " ORDER BY ts",
            m=metric,
            s=server_id,
            **params,
        )
        return [(int(ts), float(value)) for ts, value in rows]


@pytest.fixture
async def store(
    channel: Channel, ch_client: Any, clickhouse_target: ClickHouseTarget
) -> AsyncIterator[Store]:
    """The aggregator running on the test stack's ClickHouse."""
    migrations = [m for s in CLICKHOUSE_SOURCES for m in s.load()]
    await asyncio.to_thread(
        ClickHouseMigrator(ch_client, clickhouse_target.database).apply, migrations
    )
    stack = channel.stack
    aggregator = Aggregator(
        stack.kafka_bootstrap,
        stack.topic_prefix,
        clickhouse_target.client,
        clickhouse_target.database,
        AggregatorConfig(
            max_records=20, max_wait_s=0.2, session_timeout_ms=3_000, heartbeat_interval_ms=300
        ),
    )
    await aggregator.start()
    try:
        yield Store(ch_client, channel.tenant.id)
    finally:
        await aggregator.stop()


async def start_agent(
    channel: Channel, tmp_path: Path, name: str, telemetry: str, probes: list[dict[str, Any]]
) -> tuple[str, AgentRuntime]:
    state = tmp_path / name
    server_id = await enroll_agent(channel, name, state)
    with (state / "agent.toml").open("a") as config:
        config.write(f"\n[telemetry]\nexport_interval_s = {INTERVAL_S}\n{telemetry}\n")
    (state / "probes.json").write_text(json.dumps(probes))
    runtime = AgentRuntime(state, max_backoff_s=1.0, hostname=HOSTNAME)
    await runtime.start()
    return server_id, runtime


def telemetry_of(runtime: AgentRuntime) -> AgentTelemetry:
    telemetry = runtime.telemetry
    assert telemetry is not None and telemetry.queue is not None and telemetry.sender is not None
    return telemetry


async def restart_gateway_after(channel: Channel, outage_s: float) -> tuple[float, float]:
    """Stops the gateway for `outage_s`, starts a new one on the same ports; returns the
    (stop, restart) wall-clock times in unix ms."""
    ports = channel.gateway.port, channel.gateway.enroll_port
    stopped = time.time() * 1000
    await channel.gateway.stop()
    await asyncio.sleep(outage_s)
    channel.stack.settings.gateway_port, channel.stack.settings.gateway_enroll_port = ports
    channel.gateway = GatewayService(channel.stack)
    await channel.gateway.start()
    return stopped, time.time() * 1000


async def test_host_metrics_and_site_probes_reach_clickhouse(
    channel: Channel, store: Store, tmp_path: Path, site_url: str
) -> None:
    server_id, runtime = await start_agent(
        channel, tmp_path, "web-1", "", [{"site": "shop", "url": site_url}]
    )
    try:
        wanted = {
            "system_cpu_utilization",
            "system_memory_utilization",
            "system_filesystem_utilization",
            "system_network_io",
            "yakpanel_site_up",
        }
        series = await eventually(
            lambda: store.series(server_id), lambda s: wanted <= set(s), timeout_s=45
        )
        # Commands still run while metrics flow.
        command = await channel.command(server_id, "system.ping")
        assert (await channel.wait_command(command["id"]))["state"] == "succeeded"
    finally:
        await runtime.stop()

    identity = {
        "server_id": server_id,
        "host_name": HOSTNAME,
        "service_name": "yakpanel-agent",
        "service_instance_id": server_id,
    }
    for metric in wanted:
        for labels in series[metric]:
            assert identity.items() <= labels.items(), (metric, labels)
    modes = {labels["cpu_mode"] for labels in series["system_cpu_utilization"]}
    assert {"user", "system", "idle"} <= modes
    states = {labels["system_memory_state"] for labels in series["system_memory_utilization"]}
    assert states == {"used", "free", "cached", "buffers"}
    mountpoints = {
        labels["system_filesystem_mountpoint"] for labels in series["system_filesystem_utilization"]
    }
    assert "/" in mountpoints
    assert all("system_device" in labels for labels in series["system_filesystem_utilization"])
    directions = {labels["network_io_direction"] for labels in series["system_network_io"]}
    assert directions == {"receive", "transmit"}
    assert [(s["site"], s["url"]) for s in series["yakpanel_site_up"]] == [("shop", site_url)]

    up = await store.samples(server_id, "yakpanel_site_up", site="shop")
    assert up and all(value == 1.0 for _, value in up)
    status = await store.samples(server_id, "yakpanel_site_http_status_code", site="shop")
    assert status and status[-1][1] == 200.0
    duration = await store.samples(server_id, "yakpanel_site_http_duration", site="shop")
    assert duration and duration[-1][1] > 0
    # http: no certificate to report.
    assert "yakpanel_site_tls_days_left" not in await store.series(server_id)


async def test_after_a_gateway_outage_the_backlog_arrives_with_no_gap(
    channel: Channel, store: Store, tmp_path: Path
) -> None:
    server_id, runtime = await start_agent(channel, tmp_path, "steady", "", [])
    telemetry = telemetry_of(runtime)
    assert telemetry.queue is not None and telemetry.sender is not None
    try:
        await eventually(
            lambda: store.samples(server_id, "system_uptime"), lambda s: len(s) >= 4, 45
        )
        stopped, restarted = await restart_gateway_after(channel, outage_s=9)
        assert telemetry.queue.depth >= 9 / INTERVAL_S / 2, "the outage was queued on disk"

        # The backlog drains oldest first, without waiting for collections.
        await eventually(
            lambda: store.samples(server_id, "system_uptime"),
            lambda s: s[-1][0] > restarted + 2000,
            45,
        )
        await eventually(
            lambda: asyncio.sleep(0, telemetry.queue.depth if telemetry.queue else -1),
            lambda depth: depth <= 1,
            15,
        )
        sender_retries = telemetry.sender.stats.retries
    finally:
        await runtime.stop()

    samples = await store.samples(server_id, "system_uptime")
    times = [ts for ts, _ in samples]
    assert times[0] < stopped - 1000 and times[-1] > restarted + 2000
    gaps = [b - a for a, b in itertools.pairwise(times)]
    worst = max(gaps)
    assert worst <= 3 * INTERVAL_S * 1000, (
        f"largest gap {worst} ms between samples; outage {stopped:.0f}-{restarted:.0f}"
    )
    assert sum(stopped < ts < restarted for ts in times) >= 9 / INTERVAL_S * 0.8
    assert sender_retries >= 1, "the sender did retry during the outage"
    # The agent reported its own backlog while it waited.
    depth = await store.samples(server_id, "yakpanel_agent_telemetry_queue_depth")
    assert max(value for _, value in depth) >= 9 / INTERVAL_S / 2
    dropped = await store.samples(
        server_id, "yakpanel_agent_telemetry_queue_dropped", reason="queue_full"
    )
    assert dropped and all(value == 0 for _, value in dropped)


async def test_a_full_queue_drops_the_oldest_and_reports_it(
    channel: Channel, store: Store, tmp_path: Path
) -> None:
    # Room for three seconds of collections during a seven-second outage.
    server_id, runtime = await start_agent(
        channel, tmp_path, "cramped", "queue_max_entries = 6", []
    )
    telemetry = telemetry_of(runtime)
    assert telemetry.queue is not None
    try:
        await eventually(
            lambda: store.samples(server_id, "system_uptime"), lambda s: len(s) >= 2, 45
        )
        stopped, restarted = await restart_gateway_after(channel, outage_s=7)
        dropped_locally = telemetry.queue.dropped()["queue_full"]
        assert dropped_locally >= 7 / INTERVAL_S - 6 - 2
        # Later collections carry the final count; the gateway gets it after reconnect.
        await eventually(
            lambda: store.samples(
                server_id, "yakpanel_agent_telemetry_queue_dropped", reason="queue_full"
            ),
            lambda s: bool(s) and s[-1][1] >= dropped_locally,
            45,
        )
    finally:
        await runtime.stop()

    times = [ts for ts, _ in await store.samples(server_id, "system_uptime")]
    outage = [ts for ts in times if stopped < ts < restarted]
    # The oldest collections of the outage were dropped ...
    assert not any(ts < stopped + 2500 for ts in outage), (stopped, outage)
    assert len(outage) <= 6
    # ... the newest kept: from the first kept one on, nothing is missing.
    kept = [ts for ts in times if ts > stopped]
    assert kept and kept[0] < restarted, (restarted, kept[:3])
    gaps = [b - a for a, b in itertools.pairwise(kept)]
    assert max(gaps) <= 3 * INTERVAL_S * 1000
