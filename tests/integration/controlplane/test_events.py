"""Domain events: written with the change, published by the relay in per-aggregate
order, and not lost while the broker is away."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer

from controlplane.worker import ControlPlaneWorker
from yakpanel.embedded import EmbeddedBroker, free_port
from yakpanel.services import Stack
from yakpanel.topics import EVENTS

from .conftest import Api

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker(free_port(), log_path=tmp_path / "broker.log")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def events_stack(stack: Stack, own_broker: EmbeddedBroker) -> Stack:
    stack.kafka_bootstrap = own_broker.bootstrap
    return stack


@pytest.fixture
async def worker(events_stack: Stack) -> AsyncIterator[ControlPlaneWorker]:
    w = ControlPlaneWorker(events_stack, housekeeping_interval_s=3600)
    w.relay.max_backoff_s = 0.5
    await w.start()
    yield w
    await w.stop()


async def _consume_all(
    bootstrap: str, topic: str, want: int, timeout_s: float = 30
) -> list[dict[str, Any]]:
    """Events as an idempotent consumer sees them: delivery is at-least-once, so a
    redelivered event id is skipped (its first delivery is the one that counts)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    got: list[dict[str, Any]] = []
    seen: set[str] = set()
    try:
        deadline = time.monotonic() + timeout_s
        while len(got) < want and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=300)
            for tp in sorted(batches, key=lambda tp: tp.partition):
                for msg in batches[tp]:
                    event = json.loads(msg.value)
                    assert msg.key.decode() == event["aggregate_id"]
                    if event["event_id"] not in seen:
                        seen.add(event["event_id"])
                        got.append(event)
        # Nothing further is expected; anything more would be an event never written.
        extra = await consumer.getmany(timeout_ms=500)
        for messages in extra.values():
            for msg in messages:
                assert json.loads(msg.value)["event_id"] in seen
    finally:
        await consumer.stop()
    return got


def _outbox(dsn: str) -> list[tuple[str, str, str, bool]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT event_id::text, aggregate_id, event_type, published_at IS NOT NULL"
            " FROM outbox ORDER BY id"
        ).fetchall()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


async def _wait_published(dsn: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(published for *_, published in _outbox(dsn)):
            return
        await asyncio.sleep(0.2)
    pytest.fail(f"outbox not drained: {_outbox(dsn)}")


async def test_every_write_emits_its_event_in_aggregate_order(
    api: Api, events_stack: Stack, worker: ControlPlaneWorker
) -> None:
    t = await api.create_tenant()
    r = await t.owner.post(f"/v1/tenants/{t.id}/servers", json={"name": "web-1"})
    sid = r.json()["id"]
    for region in ("eu-1", "eu-2", "eu-3"):
        r = await t.owner.patch(f"/v1/tenants/{t.id}/servers/{sid}", json={"region": region})
        assert r.status_code == 200
    await _wait_published(events_stack.postgres_dsn)

    outbox = _outbox(events_stack.postgres_dsn)
    topic = EVENTS.full_name(events_stack.topic_prefix)
    events = await _consume_all(events_stack.kafka_bootstrap, topic, len(outbox))
    assert sorted(e["event_id"] for e in events) == sorted(o[0] for o in outbox)
    server_events = [e for e in events if e["aggregate_id"] == sid]
    assert [e["type"] for e in server_events] == ["server.created"] + ["server.updated"] * 3
    assert [e["data"]["after"]["region"] for e in server_events[1:]] == ["eu-1", "eu-2", "eu-3"]
    assert all(e["tenant_id"] == t.id for e in server_events)
    assert server_events[0]["actor"]["kind"] == "user"


async def test_writes_succeed_while_the_broker_is_down_and_events_follow(
    api: Api, events_stack: Stack, worker: ControlPlaneWorker, own_broker: EmbeddedBroker
) -> None:
    t = await api.create_tenant()
    await _wait_published(events_stack.postgres_dsn)
    published_before = len(_outbox(events_stack.postgres_dsn))

    await asyncio.to_thread(own_broker.stop)
    ids = []
    for i in range(3):
        r = await t.owner.post(f"/v1/tenants/{t.id}/servers", json={"name": f"srv-{i}"})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    for i, sid in enumerate(ids):
        for n in range(3):
            r = await t.owner.patch(
                f"/v1/tenants/{t.id}/servers/{sid}", json={"labels": {"n": f"{i}-{n}"}}
            )
            assert r.status_code == 200, r.text
    r = await t.owner.patch(f"/v1/tenants/{t.id}", json={"name": "Renamed while down"})
    assert r.status_code == 200, r.text

    await asyncio.sleep(1.5)
    pending = [o for o in _outbox(events_stack.postgres_dsn) if not o[3]]
    assert len(pending) == 3 + 9 + 1, "events wait in the outbox while the broker is away"

    await asyncio.to_thread(own_broker.start)
    await _wait_published(events_stack.postgres_dsn)

    # The embedded broker kept nothing across its restart: what it holds now is exactly
    # what was written while it was down, each aggregate's events in write order.
    topic = EVENTS.full_name(events_stack.topic_prefix)
    events = await _consume_all(events_stack.kafka_bootstrap, topic, len(pending))
    assert sorted(e["event_id"] for e in events) == sorted(o[0] for o in pending)
    for i, sid in enumerate(ids):
        mine = [e for e in events if e["aggregate_id"] == sid]
        assert [e["type"] for e in mine] == ["server.created"] + ["server.updated"] * 3
        assert [e["data"]["after"]["labels"].get("n") for e in mine[1:]] == [
            f"{i}-{n}" for n in range(3)
        ]
    assert published_before > 0
