"""Issue #6's last two acceptance points through the real alerting service, the real
Kafka-protocol broker, chDB, PostgreSQL and a webhook receiver on loopback (the unit
versions, over an in-memory store, are in tests/unit/test_alert_evaluator.py):

- a metric that flaps around its threshold pages once with `keep_firing_for`: streamed
  samples (the production default) flap 1/0 under two rules on the same series, one with
  `keep_firing_for` longer than the dips and a control without it; the first sends one
  firing and one resolved notification, the control one of each per flap;
- an agent that stops reporting raises the no-data alert: samples go through the real
  aggregator into ClickHouse (and the stream), an `absent_over_time` rule stays quiet
  while they arrive and fires with the selector's labels once they stop; evaluated from
  the stream's hot window and, with streaming off, on ClickHouse.

Timing is short (evaluation every 300 ms, group_wait 100 ms) but every wait is a
generous upper bound: the assertions are on counts and order, never on speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import pytest

from alerting.routing import parse_config
from alerting.rules import load_rules_text
from alerting.service import AlertingConfig, AlertingService
from alerting.state import AlertState
from alerting.stream import StreamConfig, WindowState
from controlplane.crypto import SecretBox
from ingest.aggregator.config import AggregatorConfig
from ingest.aggregator.service import Aggregator
from ingest.query import ClickHouseStore
from yakpanel.clickhouse import ClickHouseTarget

from .test_alert_notifications import WebhookServer, webhook  # noqa: F401 - fixture
from .test_alert_stream import Agent, agent, migrated  # noqa: F401 - fixtures
from .test_alerting_service import _pg_rows, _until, box, tenant_id  # noqa: F401 - fixtures

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

EVAL = "300ms"
KEEP_FIRING_S = 2.0
PHASE_S = 0.9  # each high and each low stretch of the flapping series
FLAPS = 3
SEND_EVERY_S = 0.15

FLAPPING_RULES = f"""
groups:
  - name: flapping
    interval: {EVAL}
    rules:
      - alert: LoadKept
        expr: cpu_load > 0.5
        for: 0s
        keep_firing_for: {KEEP_FIRING_S:g}s
        labels: {{severity: page}}
      - alert: LoadControl
        expr: cpu_load > 0.5
        for: 0s
        labels: {{severity: page}}
"""

NO_DATA_WINDOW_S = 3


def no_data_rules(server_id: str) -> str:
    return f"""
groups:
  - name: nodata
    interval: {EVAL}
    rules:
      - alert: AgentSilent
        expr: absent_over_time(cpu_load{{server_id="{server_id}"}}[{NO_DATA_WINDOW_S}s])
        for: 0s
        labels: {{severity: page}}
        annotations:
          summary: "no load from {{{{ $labels.server_id }}}}"
"""


async def _configure(service: AlertingService, tenant: str, text: str, url: str) -> None:
    """Stores the rule group and the notification config as the API does (the receiver
    URL sealed), before the service starts."""
    await service.store.open()
    try:
        now = datetime.now(UTC)
        (group,) = load_rules_text(text)
        await service.store.save_rule_group(tenant, group, now)
        route = {
            "receiver": "oncall",
            "group_by": ["alertname"],
            "group_wait": "100ms",
            "group_interval": "300ms",
            "repeat_interval": "1h",
        }
        config = parse_config({"route": route, "receivers": [{"name": "oncall", "urls": [url]}]})
        await service.store.save_notification_config(tenant, config, now)
    finally:
        await service.store.close()


@pytest.fixture
async def make_service(
    pg_dsn: str,
    migrated: ClickHouseTarget,  # noqa: F811 - the fixture
    box: SecretBox,  # noqa: F811 - the fixture
    kafka_bootstrap: str,
    topic_prefix: str,
) -> AsyncIterator[Callable[[bool], AlertingService]]:
    made: list[AlertingService] = []

    def make(stream: bool) -> AlertingService:
        service = AlertingService(
            pg_dsn,
            ClickHouseStore(migrated.client, migrated.database),
            sealer=box,
            config=AlertingConfig(
                tick_s=0.1, stop_grace_s=2.0, stream=StreamConfig(enabled=stream)
            ),
            kafka_bootstrap=kafka_bootstrap,
            topic_prefix=topic_prefix,
        )
        made.append(service)
        return service

    yield make
    for service in made:  # whatever a failing test left running
        if service._task is not None:
            await service.stop()


def _statuses(hook: WebhookServer, alertname: str) -> list[str]:
    return [
        r.body["status"]
        for r in hook.delivered("/hook")
        if r.body["groupLabels"] == {"alertname": alertname}
    ]


@contextlib.asynccontextmanager
async def _reporting(
    agent: Agent,  # noqa: F811 - the fixture's type
    value: Callable[[], float | None],
) -> AsyncIterator[list[float]]:
    """An agent exporting `value()` every SEND_EVERY_S (None: it says nothing)."""
    sent: list[float] = []

    async def export() -> None:
        while True:
            v = value()
            if v is not None:
                await agent.send(v)
                sent.append(v)
            await asyncio.sleep(SEND_EVERY_S)

    task = asyncio.create_task(export())
    try:
        yield sent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_flapping_metric_pages_once_with_keep_firing_for(
    pg_dsn: str,
    tenant_id: str,  # noqa: F811
    agent: Agent,  # noqa: F811
    make_service: Callable[[bool], AlertingService],
    webhook: WebhookServer,  # noqa: F811
) -> None:
    service = make_service(True)
    await _configure(service, tenant_id, FLAPPING_RULES, webhook.url("/hook"))
    await service.start()
    stream = service.stream
    assert stream is not None
    assert await _until(lambda: stream.state(tenant_id) == WindowState.READY, 15), (
        "the tenant's hot window never became ready",
        stream.state(tenant_id),
    )

    value = 0.0
    async with _reporting(agent, lambda: value) as sent:
        for _ in range(FLAPS):
            value = 1.0
            await asyncio.sleep(PHASE_S)
            value = 0.0
            await asyncio.sleep(PHASE_S)
        # Then it stays low, past keep_firing_for: the kept alert resolves, once.
        assert await _until(lambda: _statuses(webhook, "LoadKept") == ["firing", "resolved"], 15), (
            _statuses(webhook, "LoadKept")
        )
        await asyncio.sleep(1.0)  # a few group_intervals: nothing more is sent
    await service.stop()
    assert 1.0 in sent and sent[-1] == 0.0
    assert service.stream_evaluations > 0 and service.ingest_evaluations > 0

    kept = _statuses(webhook, "LoadKept")
    control = _statuses(webhook, "LoadControl")
    assert kept == ["firing", "resolved"], f"keep_firing_for: {kept}; control: {control}"
    # The same flapping without keep_firing_for pages on each flap: this is what
    # keep_firing_for saves.
    assert control.count("firing") >= 2, f"the control paged only {control}"
    assert control == ["firing", "resolved"] * (len(control) // 2), control

    firing = [
        r.body
        for r in webhook.delivered("/hook")
        if r.body["groupLabels"] == {"alertname": "LoadKept"}
    ]
    assert [a["labels"] for a in firing[0]["alerts"]] == [
        {
            "alertname": "LoadKept",
            "host_name": "web-1",
            "server_id": agent.server,
            "severity": "page",
        }
    ]
    assert [a["status"] for a in firing[1]["alerts"]] == ["resolved"]

    # The history says the same: one firing and one resolved transition for LoadKept.
    rows = _pg_rows(
        pg_dsn,
        "SELECT alertname AS name, from_state, to_state FROM alert_transitions ORDER BY at",
    )
    assert [(r["from_state"], r["to_state"]) for r in rows if r["name"] == "LoadKept"] == [
        ("inactive", "firing"),
        ("firing", "resolved"),
    ]
    assert sum(r["to_state"] == "firing" for r in rows if r["name"] == "LoadControl") >= 2


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "clickhouse"])
async def test_an_agent_that_stops_reporting_raises_the_no_data_alert(
    stream: bool,
    tenant_id: str,  # noqa: F811
    agent: Agent,  # noqa: F811
    kafka_bootstrap: str,
    topic_prefix: str,
    migrated: ClickHouseTarget,  # noqa: F811
    make_service: Callable[[bool], AlertingService],
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
    service = make_service(stream)
    await _configure(service, tenant_id, no_data_rules(agent.server), webhook.url("/hook"))
    reporting = True
    try:
        async with _reporting(agent, lambda: 1.0 if reporting else None) as sent:
            # Reporting: the series reaches ClickHouse through the aggregator first, so
            # that the rule's window is full before the service looks at it.
            store = ClickHouseStore(migrated.client, migrated.database)
            try:
                assert await _until(
                    lambda: len(store.series(tenant_id, [], None, None, 10)) == 1, 15
                ), "the aggregator never stored the agent's samples"
            finally:
                store.close()
            await service.start()
            if stream:
                hot = service.stream
                assert hot is not None
                assert await _until(lambda: hot.state(tenant_id) == WindowState.READY, 15), (
                    "the tenant's hot window never became ready",
                    hot.state(tenant_id),
                )
            # Five interval evaluations (not counting those started by arriving samples)
            # with data: nothing fires, nothing is even pending.
            before = service.evaluations - service.ingest_evaluations
            assert await _until(
                lambda: service.evaluations - service.ingest_evaluations >= before + 5, 15
            )
            assert webhook.delivered("/hook") == []
            assert await service.store.transitions(tenant_id) == []
            assert sent, "the agent sent nothing"

            reporting = False  # the agent goes silent
            assert await _until(lambda: _statuses(webhook, "AgentSilent") == ["firing"], 15), (
                _statuses(webhook, "AgentSilent"),
                service.errors,
            )
            fired = webhook.delivered("/hook")[0].body["alerts"]
            assert [a["labels"] for a in fired] == [
                {"alertname": "AgentSilent", "server_id": agent.server, "severity": "page"}
            ]
            assert fired[0]["annotations"] == {"summary": f"no load from {agent.server}"}
            transitions = await service.store.transitions(tenant_id)
            assert [(t.from_state, t.to_state) for t in transitions] == [
                (AlertState.INACTIVE, AlertState.FIRING)
            ]

            reporting = True  # back: the no-data alert resolves, once
            assert await _until(
                lambda: _statuses(webhook, "AgentSilent") == ["firing", "resolved"], 15
            ), _statuses(webhook, "AgentSilent")
            await asyncio.sleep(1.0)
        await service.stop()
    finally:
        await aggregator.stop()
    assert _statuses(webhook, "AgentSilent") == ["firing", "resolved"]
    if stream:
        assert service.stream_evaluations > 0
    else:
        assert service.stream is None and service.stream_evaluations == 0
