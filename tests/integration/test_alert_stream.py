"""Streaming evaluation against the real Kafka-protocol broker, chDB and PostgreSQL, with a
webhook receiver on loopback:

- with no aggregator running at all (nothing reaches ClickHouse) and a group interval of
  an hour, a sample produced to `yak.metrics.v1` that crosses the threshold fires the
  alert and notifies the webhook: the samples were evaluated on ingest; evaluations
  that change nothing are not written to PostgreSQL each time; the end of the condition
  resolves the alert at the next interval evaluation, not at the first low sample;
- with the real aggregator, restarts in stream mode still neither reset a pending `for`
  nor lose or repeat a firing notification (issue #6's acceptance, as
  test_alerting_service.py checks it on ClickHouse).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from alerting.routing import parse_config
from alerting.rules import load_rules_text
from alerting.service import AlertingConfig, AlertingService
from alerting.state import AlertState
from alerting.stream import WindowState
from controlplane.crypto import SecretBox
from ingest.aggregator.config import AggregatorConfig
from ingest.aggregator.service import Aggregator
from ingest.query import ClickHouseStore
from yakpanel.clickhouse import ClickHouseTarget
from yakpanel.migrations import CLICKHOUSE_SOURCES, ClickHouseMigrator
from yakpanel.topics import METRICS, ensure_topics

from ..support.otlp import GaugePoint, gauge_request, metrics_headers
from .test_alert_notifications import WebhookServer, webhook  # noqa: F401 - fixture
from .test_alerting_service import _pg_rows, _until, box, tenant_id  # noqa: F401 - fixtures

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

FOR_S = 3.0


def rules(for_: str, interval: str) -> str:
    return f"""
groups:
  - name: host
    interval: {interval}
    rules:
      - alert: HostLoadHigh
        expr: cpu_load > 5
        for: {for_}
        labels: {{severity: page}}
        annotations:
          summary: "load {{{{ $value }}}} on {{{{ $labels.host_name }}}}"
"""


class Agent:
    """Produces `cpu.load` of one server to yak.metrics.v1 as the gateway does."""

    def __init__(self, bootstrap: str, prefix: str, tenant: str) -> None:
        self.bootstrap, self.topic, self.tenant = bootstrap, METRICS.full_name(prefix), tenant
        self.prefix = prefix
        self.server = str(uuid.uuid4())
        self.producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        await ensure_topics(self.bootstrap, self.prefix, (METRICS,))
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
        await self.producer.start()

    async def send(self, value: float) -> None:
        assert self.producer is not None
        now = int(time.time() * 1000)
        await self.producer.send_and_wait(
            self.topic,
            gauge_request([GaugePoint("cpu.load", now, value)], host="web-1"),
            key=self.server.encode(),
            headers=metrics_headers(self.tenant, self.server, now),
        )

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()


@pytest.fixture
async def agent(
    kafka_bootstrap: str,
    topic_prefix: str,
    tenant_id: str,  # noqa: F811 - the fixture
) -> AsyncIterator[Agent]:
    a = Agent(kafka_bootstrap, topic_prefix, tenant_id)
    await a.start()
    yield a
    await a.stop()


@pytest.fixture
def migrated(clickhouse_target: ClickHouseTarget, ch_client: Any) -> ClickHouseTarget:
    ClickHouseMigrator(ch_client, clickhouse_target.database).apply(
        [m for s in CLICKHOUSE_SOURCES for m in s.load()]
    )
    return clickhouse_target


@pytest.fixture
async def make_service(
    pg_dsn: str,
    migrated: ClickHouseTarget,
    box: SecretBox,  # noqa: F811 - the fixture
    kafka_bootstrap: str,
    topic_prefix: str,
) -> AsyncIterator[Callable[[], AlertingService]]:
    made: list[AlertingService] = []

    def make() -> AlertingService:
        service = AlertingService(
            pg_dsn,
            ClickHouseStore(migrated.client, migrated.database),
            sealer=box,
            config=AlertingConfig(tick_s=0.1, stop_grace_s=2.0),
            kafka_bootstrap=kafka_bootstrap,
            topic_prefix=topic_prefix,
        )
        made.append(service)
        return service

    yield make
    for service in made:
        if service._task is not None:
            await service.stop()


async def _configure(service: AlertingService, tenant: str, text: str, url: str) -> None:
    await service.store.open()
    now = datetime.now(UTC)
    (group,) = load_rules_text(text)
    await service.store.save_rule_group(tenant, group, now)
    route = {
        "receiver": "oncall",
        "group_by": ["alertname"],
        "group_wait": "200ms",
        "group_interval": "1s",
        "repeat_interval": "1h",
    }
    config = parse_config({"route": route, "receivers": [{"name": "oncall", "urls": [url]}]})
    await service.store.save_notification_config(tenant, config, now)
    await service.store.close()


def _statuses(webhook: WebhookServer) -> list[str]:  # noqa: F811
    return [r.body["status"] for r in webhook.delivered("/hook")]


async def test_a_crossing_sample_notifies_without_the_aggregator(
    pg_dsn: str,
    tenant_id: str,  # noqa: F811
    agent: Agent,
    migrated: ClickHouseTarget,
    make_service: Callable[[], AlertingService],
    webhook: WebhookServer,  # noqa: F811
) -> None:
    service = make_service()
    # An hour between interval evaluations: only arriving samples can start one in time.
    await _configure(service, tenant_id, rules("0s", "1h"), webhook.url("/hook"))
    await service.start()
    service_stream = service.stream
    assert service_stream is not None
    assert await _until(lambda: service_stream.state(tenant_id) == WindowState.READY, 15)
    assert service.evaluations == 1  # the takeover's, at once
    await agent.send(1.0)
    await agent.send(9.0)
    assert await _until(lambda: _statuses(webhook) == ["firing"], 10), _statuses(webhook)
    fired = webhook.delivered("/hook")[0].body["alerts"][0]
    assert fired["annotations"]["summary"] == "load 9 on web-1"
    assert service.ingest_evaluations >= 1

    # Nothing went through ClickHouse: no aggregator ran.
    store = ClickHouseStore(migrated.client, migrated.database)
    try:
        assert store.series(tenant_id, [], None, None, 10) == []
    finally:
        store.close()

    # Evaluated on every arrival, but an unchanged state is not rewritten each time.
    writes, evaluations = service.state_writes, service.evaluations
    for _ in range(10):
        await agent.send(9.5)
        await asyncio.sleep(0.05)
    assert await _until(lambda: service.evaluations >= evaluations + 2, 5)
    assert service.state_writes == writes == 2  # the takeover's and the one that fired

    # A sample below the threshold is evaluated at once, but only an interval evaluation
    # resolves (as without streaming: a noisy series flaps no more than before).
    ingest_before = service.ingest_evaluations
    await agent.send(1.0)
    assert await _until(lambda: service.ingest_evaluations > ingest_before, 5)
    await asyncio.sleep(0.5)
    assert _statuses(webhook) == ["firing"]
    # The interval shortened; the same selectors keep the window (no new warm-up).
    warmups = service_stream.stats.warmups
    await service.store.save_rule_group(
        tenant_id, load_rules_text(rules("0s", "1s"))[0], datetime.now(UTC)
    )
    assert await _until(lambda: _statuses(webhook) == ["firing", "resolved"], 10)
    assert service_stream.stats.warmups == warmups
    assert service_stream.state(tenant_id) == WindowState.READY
    await asyncio.sleep(1.2)  # a group_interval: nothing more is sent
    await service.stop()
    assert _statuses(webhook) == ["firing", "resolved"]
    rows = _pg_rows(pg_dsn, "SELECT from_state, to_state FROM alert_transitions ORDER BY at")
    assert [(r["from_state"], r["to_state"]) for r in rows] == [
        ("inactive", "firing"),
        ("firing", "resolved"),
    ]


async def test_restarts_in_stream_mode_neither_reset_for_nor_repeat_notifications(
    pg_dsn: str,
    tenant_id: str,  # noqa: F811
    agent: Agent,
    kafka_bootstrap: str,
    topic_prefix: str,
    migrated: ClickHouseTarget,
    make_service: Callable[[], AlertingService],
    webhook: WebhookServer,  # noqa: F811
) -> None:
    aggregator = Aggregator(
        kafka_bootstrap,
        topic_prefix,
        migrated.client,
        migrated.database,
        dataclasses.replace(AggregatorConfig(), max_wait_s=0.2),
    )
    await aggregator.start()
    value = 1.0  # below the threshold until the first replica streams

    sent: list[float] = []
    send_errors: list[str] = []

    async def export() -> None:
        while True:
            try:
                await agent.send(value)
                sent.append(value)
            except KafkaError as exc:  # an agent retries
                send_errors.append(repr(exc))
            await asyncio.sleep(0.2)

    sender = asyncio.create_task(export())
    first = make_service()
    await _configure(first, tenant_id, rules("3s", "500ms"), webhook.url("/hook"))
    try:
        await first.start()
        first_stream = first.stream
        assert first_stream is not None
        assert await _until(lambda: first_stream.state(tenant_id) == WindowState.READY, 15)
        value = 9.0
        deadline = time.monotonic() + 5
        while not (pending := await first.store.transitions(tenant_id)):
            assert time.monotonic() < deadline, "no pending alert from the stream"
            await asyncio.sleep(0.05)
        assert [t.to_state for t in pending] == [AlertState.PENDING]
        assert first.ingest_evaluations > 0
        active_since = pending[0].active_since
        await first.stop()
        assert time.time() < active_since.timestamp() + FOR_S - 0.5, "stopped too late to test"

        # Restarted mid-`for`: warms up from ClickHouse + the stream, fires on time, once.
        second = make_service()
        await second.start()
        assert await _until(lambda: len(_statuses(webhook)) >= 1, FOR_S + 10)
        fired = webhook.delivered("/hook")[0]
        lateness = time.time() - (time.monotonic() - fired.at) - (active_since.timestamp() + FOR_S)
        assert -0.1 <= lateness <= 1.2, f"fired {lateness:+.2f}s from active_since + for"
        second_stream = second.stream
        assert second_stream is not None
        assert await _until(lambda: second_stream.state(tenant_id) == WindowState.READY, 15)
        assert await _until(lambda: second.stream_evaluations > 0, 5)

        # Handover while firing: the new owner streams too and sends nothing again.
        third = make_service()
        await third.start()
        await second.stop()
        third_stream = third.stream
        assert third_stream is not None
        assert await _until(lambda: third_stream.state(tenant_id) == WindowState.READY, 15)
        assert await _until(lambda: third.stream_evaluations >= 3, 5)
        await asyncio.sleep(1.5)
        assert _statuses(webhook) == ["firing"], "a firing notification was sent again"

        value = 1.0
        assert await _until(lambda: _statuses(webhook) == ["firing", "resolved"], 10), (
            _statuses(webhook),
            third_stream.state(tenant_id),
            third.evaluations,
            third.ingest_evaluations,
            third_stream.stats,
            sent[-3:],
            send_errors[-3:],
            sender.done(),
            third.errors,
            third.owned_tenants,
            [(t.from_state, t.to_state) for t in await third.store.transitions(tenant_id)],
        )
        await asyncio.sleep(1.2)
        await third.stop()
        assert _statuses(webhook) == ["firing", "resolved"]
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        await aggregator.stop()
    rows = _pg_rows(pg_dsn, "SELECT from_state, to_state FROM alert_transitions ORDER BY at")
    assert [(r["from_state"], r["to_state"]) for r in rows] == [
        ("inactive", "pending"),
        ("pending", "firing"),
        ("firing", "resolved"),
    ]
