"""The alerting service across restarts, against real PostgreSQL, chDB, the Kafka-protocol
broker and a webhook receiver on loopback (issue #6's acceptance):

restarted in the middle of a `for` period it fires at the right time, once; restarted
while firing it sends no duplicate, and later sends the resolved notification once; every
transition is recorded once and reaches `yak.alerts.v1` keyed by fingerprint. Small
intervals: evaluation every 0.5 s, `for` 3 s, group_wait 0.2 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer
from psycopg.rows import dict_row

from alerting.routing import parse_config
from alerting.rules import load_rules_text
from alerting.service import AlertingConfig, AlertingService, tenant_lock_key
from alerting.state import AlertState
from controlplane.crypto import SecretBox
from controlplane.relay import OutboxRelay
from ingest.aggregator.decode import SampleBatchBuilder
from ingest.aggregator.rollup import aggregate
from ingest.aggregator.writer import BatchSource, ClickHouseWriter
from ingest.query import ClickHouseStore
from yakpanel.clickhouse import ClickHouseTarget
from yakpanel.migrations import CLICKHOUSE_SOURCES, ClickHouseMigrator
from yakpanel.topics import ALERTS

from ..support.otlp import GaugePoint, gauge_request, metrics_headers
from .test_alert_notifications import WebhookServer, webhook  # noqa: F401 - fixture

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

FOR_S = 3.0
EVAL = "500ms"
RULES = f"""
groups:
  - name: host
    interval: {EVAL}
    rules:
      - alert: HostLoadHigh
        expr: cpu_load > 5
        for: 3s
        labels: {{severity: page}}
        annotations:
          summary: "load {{{{ $value }}}} on {{{{ $labels.host_name }}}}"
"""


class Samples:
    """Writes `cpu.load` samples of one server the aggregator's way."""

    def __init__(self, client: Any, database: str, tenant: str) -> None:
        ClickHouseMigrator(client, database).apply(
            [m for s in CLICKHOUSE_SOURCES for m in s.load()]
        )
        self.writer = ClickHouseWriter(client, database)
        self.tenant, self.server, self.offset = tenant, str(uuid.uuid4()), 0

    def write(self, value: float) -> None:
        now = int(time.time() * 1000)
        builder = SampleBatchBuilder()
        builder.add(
            gauge_request([GaugePoint("cpu.load", now, value)], host="web-1"),
            metrics_headers(self.tenant, self.server, now),
        )
        self.offset += 1
        source = BatchSource("alerting-test", 0, self.offset, self.offset, now)
        self.writer.write(aggregate(builder.frame()), source)


def _new_tenant(dsn: str) -> str:
    tid = str(uuid.uuid4())
    with psycopg.connect(dsn, autocommit=True) as conn:
        plan = uuid.uuid4()
        conn.execute(
            """INSERT INTO plans (id, code, name, max_servers, max_sites, max_databases,
                   max_alert_rules, metric_retention_days, api_requests_per_minute)
               VALUES (%s, %s, 'Test', 10, 10, 10, 10, 30, 600)""",
            (plan, f"p-{uuid.uuid4().hex[:8]}"),
        )
        conn.execute(
            "INSERT INTO tenants (id, slug, name, plan_id) VALUES (%s, %s, 'Acme', %s)",
            (tid, f"acme-{uuid.uuid4().hex[:8]}", plan),
        )
    return tid


@pytest.fixture
def tenant_id(pg_dsn: str) -> str:
    return _new_tenant(pg_dsn)


@pytest.fixture
def box() -> SecretBox:
    return SecretBox(os.urandom(32))


@pytest.fixture
def samples(ch_client: Any, clickhouse_target: ClickHouseTarget, tenant_id: str) -> Samples:
    return Samples(ch_client, clickhouse_target.database, tenant_id)


@pytest.fixture
async def make_service(
    pg_dsn: str, clickhouse_target: ClickHouseTarget, box: SecretBox
) -> AsyncIterator[Callable[[], AlertingService]]:
    made: list[AlertingService] = []

    def make() -> AlertingService:
        metrics = ClickHouseStore(clickhouse_target.client, clickhouse_target.database)
        service = AlertingService(
            pg_dsn, metrics, sealer=box, config=AlertingConfig(tick_s=0.1, stop_grace_s=2.0)
        )
        made.append(service)
        return service

    yield make
    for service in made:  # whatever a failing test left running
        if service._task is not None:
            await service.stop()


async def _until(check: Callable[[], bool], within: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(step)
    return bool(check())


def _pg_rows(dsn: str, query: str) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(query).fetchall()


async def test_restarts_neither_lose_nor_duplicate_notifications(
    pg_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    tenant_id: str,
    samples: Samples,
    make_service: Callable[[], AlertingService],
    webhook: WebhookServer,  # noqa: F811 - the fixture
    box: SecretBox,
) -> None:
    setup = make_service()
    await setup.store.open()
    now = datetime.now(UTC)
    (group,) = load_rules_text(RULES)
    await setup.store.save_rule_group(tenant_id, group, now)
    config = parse_config(
        {
            "route": {
                "receiver": "oncall",
                "group_by": ["alertname"],
                "group_wait": "200ms",
                "group_interval": "1s",
                "repeat_interval": "1h",
            },
            "receivers": [{"name": "oncall", "urls": [webhook.url("/hook")]}],
        }
    )
    await setup.store.save_notification_config(tenant_id, config, now)
    await setup.store.close()
    stored = _pg_rows(pg_dsn, "SELECT config::text AS c FROM alert_notification_config")
    assert "127.0.0.1" not in stored[0]["c"], "a receiver URL is stored in the clear"

    def deliveries(status: str) -> list[Any]:
        return [r for r in webhook.delivered("/hook") if r.body["status"] == status]

    # --- restarted mid-`for`: fires once, `for` after the condition first held ---------
    samples.write(9.0)
    first = make_service()
    await first.start()
    assert await _until(lambda: first.owned_tenants == {tenant_id}, 5)
    assert await _until(lambda: first.evaluations >= 2, 5)
    pending = await first.store.transitions(tenant_id)
    assert [t.to_state for t in pending] == [AlertState.PENDING]
    active_since = pending[0].active_since
    await first.stop()
    assert time.time() < active_since.timestamp() + FOR_S - 0.5, "stopped too late to test"

    second = make_service()
    await second.start()
    assert await _until(lambda: len(deliveries("firing")) >= 1, FOR_S + 5)
    fired = deliveries("firing")[0]
    # The request's arrival (monotonic) against the expected time (wall clock).
    lateness = time.time() - (time.monotonic() - fired.at) - (active_since.timestamp() + FOR_S)
    assert -0.1 <= lateness <= 1.2, f"fired {lateness:+.2f}s from active_since + for"
    assert [a["labels"]["severity"] for a in fired.body["alerts"]] == ["page"]
    assert fired.body["alerts"][0]["annotations"]["summary"] == "load 9 on web-1"

    # --- a second replica waits; the handover while firing sends nothing twice --------
    third = make_service()
    await third.start()
    await asyncio.sleep(1.0)
    assert third.owned_tenants == set(), "two processes evaluate the same tenant"
    assert third.evaluations == 0
    await second.stop()
    assert await _until(lambda: third.owned_tenants == {tenant_id}, 5)
    assert await _until(lambda: third.evaluations >= 3, 5)
    await asyncio.sleep(1.5)  # group_wait and a group_interval flush after the takeover
    assert len(deliveries("firing")) == 1, "a firing notification was sent again"

    # --- the condition stops: one resolved notification --------------------------------
    samples.write(1.0)
    assert await _until(lambda: len(deliveries("resolved")) >= 1, 5)
    await asyncio.sleep(1.5)
    await third.stop()
    assert len(deliveries("resolved")) == 1
    assert len(deliveries("firing")) == 1
    resolved = deliveries("resolved")[0].body["alerts"]
    assert [a["status"] for a in resolved] == ["resolved"]

    # --- the history: each transition once; delivery attempts recorded ---------------
    rows = _pg_rows(pg_dsn, "SELECT key, from_state, to_state FROM alert_transitions ORDER BY at")
    assert [(r["from_state"], r["to_state"]) for r in rows] == [
        ("inactive", "pending"),
        ("pending", "firing"),
        ("firing", "resolved"),
    ]
    attempts = _pg_rows(pg_dsn, "SELECT outcome, final FROM alert_delivery_attempts")
    assert [(a["outcome"], a["final"]) for a in attempts] == [("success", True)] * 2
    log_rows = _pg_rows(pg_dsn, "SELECT firing, resolved FROM alert_notification_log")
    assert len(log_rows) == 1 and log_rows[0]["firing"] == []

    # --- the outbox reaches yak.alerts.v1, keyed by fingerprint ------------------------
    relay = OutboxRelay(pg_dsn, kafka_bootstrap, topic_prefix)
    async with await psycopg.AsyncConnection.connect(
        pg_dsn, autocommit=True, row_factory=dict_row
    ) as conn:
        # Three transitions (yak.alerts.v1) and the incident they opened and resolved
        # (incident.opened, incident.resolved on yak.events.v1).
        assert await relay.publish_batch(conn) == 5
    await relay._close_producer()
    consumer = AIOKafkaConsumer(
        ALERTS.full_name(topic_prefix),
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    got: list[tuple[str, dict[str, Any]]] = []
    try:
        deadline = time.monotonic() + 15
        while len(got) < 3 and time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=300)).values():
                got += [(m.key.decode(), json.loads(m.value)) for m in messages]
    finally:
        await consumer.stop()
    assert [v["key"] for _, v in got] == [r["key"] for r in rows]
    assert all(k == v["fingerprint"] == pending[0].fingerprint for k, v in got)
    assert [v["to_state"] for _, v in got] == ["pending", "firing", "resolved"]


async def test_tenant_lock_keys_are_distinct_and_stable() -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    assert tenant_lock_key(a) == tenant_lock_key(a) != tenant_lock_key(b)
    assert -(2**63) <= tenant_lock_key(a) < 2**63


async def test_removing_a_group_resolves_its_alerts(
    pg_dsn: str,
    tenant_id: str,
    samples: Samples,
    make_service: Callable[[], AlertingService],
    webhook: WebhookServer,  # noqa: F811 - the fixture
) -> None:
    service = make_service()
    await service.store.open()
    now = datetime.now(UTC)
    (group,) = load_rules_text(RULES.replace("for: 3s", "for: 0s"))
    await service.store.save_rule_group(tenant_id, group, now)
    route = {"receiver": "oncall", "group_wait": "200ms", "group_interval": "500ms"}
    config = parse_config(
        {"route": route, "receivers": [{"name": "oncall", "urls": [webhook.url("/hook")]}]}
    )
    await service.store.save_notification_config(tenant_id, config, now)
    await service.store.close()
    samples.write(9.0)
    await service.start()

    def statuses() -> list[str]:
        return [r.body["status"] for r in webhook.delivered("/hook")]

    assert await _until(lambda: statuses() == ["firing"], 5)
    await service.store.delete_rule_group(tenant_id, "host")
    assert await _until(lambda: statuses() == ["firing", "resolved"], 5)
    assert await _until(lambda: service.owned_tenants == set(), 5)
    await service.stop()
    rows = _pg_rows(pg_dsn, "SELECT from_state, to_state FROM alert_transitions ORDER BY at")
    assert [(r["from_state"], r["to_state"]) for r in rows] == [
        ("inactive", "firing"),
        ("firing", "resolved"),
    ]
    assert _pg_rows(pg_dsn, "SELECT * FROM alert_group_state") == []

    # Row-level security: another tenant sees none of it through the store.
    other = _new_tenant(pg_dsn)
    await service.store.open()
    try:
        assert len(await service.store.transitions(tenant_id)) == 2
        assert await service.store.transitions(other) == []
        assert await service.store.notify_log_entries(other) == []
        assert await service.store.attempts(other) == []
        assert await service.store.notification_config(other) is None
    finally:
        await service.store.close()


async def test_heartbeat_file_is_fresh_while_passes_reach_postgres(
    pg_dsn: str, clickhouse_target: ClickHouseTarget, box: SecretBox, tmp_path: Path
) -> None:
    beat = tmp_path / "alerting.alive"
    metrics = ClickHouseStore(clickhouse_target.client, clickhouse_target.database)
    service = AlertingService(
        pg_dsn,
        metrics,
        sealer=box,
        config=AlertingConfig(tick_s=0.05, stop_grace_s=2.0, heartbeat_file=beat),
    )
    await service.start()
    try:
        deadline = time.monotonic() + 20
        while not beat.exists() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert beat.exists(), "the service never touched its heartbeat file"
        first = beat.stat().st_mtime
        await asyncio.sleep(0.3)
        assert beat.stat().st_mtime > first
    finally:
        await service.stop()
