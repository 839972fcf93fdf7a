"""Commands end to end: API → outbox → Kafka → gateway → agent → results → API/events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from agent.runtime import AgentRuntime
from controlplane.crypto import SecretBox, load_master_key
from controlplane.keys import load_platform_keys
from proto import agent_pb2, signing
from yakpanel.topics import COMMAND_RESULTS, COMMANDS, EVENTS

from .conftest import HEARTBEAT_MS, Channel, enroll_agent, eventually, wait_presence

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]


@pytest.fixture
async def agent(channel: Channel, tmp_path: Path) -> AsyncIterator[tuple[str, AgentRuntime]]:
    state = tmp_path / "agent"
    server_id = await enroll_agent(channel, "node-1", state)
    runtime = AgentRuntime(state, max_backoff_s=1.0)
    await runtime.start()
    await asyncio.wait_for(runtime.wait_connected(), 20)
    try:
        yield server_id, runtime
    finally:
        await runtime.stop()


async def _read_topic(bootstrap: str, topic: str, until: int, timeout_s: float = 20) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    got: list[bytes] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(got) < until and time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=300)).values():
                got.extend(m.value for m in messages)
    finally:
        await consumer.stop()
    return got


async def test_ping_from_the_api_to_the_agent_and_back(
    channel: Channel, agent: tuple[str, AgentRuntime]
) -> None:
    server_id, runtime = agent
    server = await wait_presence(channel, server_id, "online")
    assert server["hostname"]

    command = await channel.command(server_id, "system.ping")
    assert command["state"] in ("pending", "dispatched", "acknowledged", "succeeded")
    done = await channel.wait_command(command["id"])
    assert done["state"] == "succeeded", done
    assert done["output"]["pong"] is True
    assert done["dispatched_at"] and done["acknowledged_at"] and done["finished_at"]

    topic = EVENTS.full_name(channel.stack.topic_prefix)

    def finished(values: list[bytes]) -> bool:
        return any(
            json.loads(v)["type"] == "command.succeeded"
            and json.loads(v)["aggregate_id"] == command["id"]
            for v in values
        )

    values = await eventually(
        lambda: _read_topic(channel.stack.kafka_bootstrap, topic, 10_000, timeout_s=2),
        finished,
        timeout_s=30,
    )
    succeeded = [json.loads(v) for v in values if json.loads(v)["type"] == "command.succeeded"]
    assert succeeded[0]["data"]["after"]["output"]["pong"] is True
    assert runtime.counters.commands_run == 1


async def test_a_type_the_node_did_not_approve_is_refused_and_not_run(
    channel: Channel, agent: tuple[str, AgentRuntime], tmp_path: Path
) -> None:
    server_id, runtime = agent
    command = await channel.command(server_id, "system.reboot")
    done = await channel.wait_command(command["id"])
    assert done["state"] == "failed"
    assert done["error_code"] == "not_capable"
    assert "system.reboot" in done["message"]
    assert runtime.counters.commands_run == 0
    assert runtime.counters.commands_rejected == 1


def _signing_key(channel: Channel) -> signing.Ed25519PrivateKey:  # type: ignore[name-defined]
    box = SecretBox(load_master_key(channel.stack.settings))
    return load_platform_keys(channel.stack.postgres_dsn, box).signing_key


async def _inject(
    channel: Channel, server_id: str, envelope: agent_pb2.CommandEnvelope, times: int = 1
) -> None:
    """Put an envelope on yak.commands.v1 directly, as a compromised or replaying producer would."""
    producer = AIOKafkaProducer(bootstrap_servers=channel.stack.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for _ in range(times):
            await producer.send_and_wait(
                COMMANDS.full_name(channel.stack.topic_prefix),
                envelope.SerializeToString(),
                key=server_id.encode(),
            )
    finally:
        await producer.stop()


def _envelope(
    channel: Channel, server_id: str, key: str, type_: str, payload: dict, deadline_s: float
) -> agent_pb2.CommandEnvelope:  # type: ignore[type-arg]
    env = agent_pb2.CommandEnvelope(
        command_id=f"injected-{key}",
        idempotency_key=key,
        tenant_id=channel.tenant.id,
        server_id=server_id,
        type=type_,
        payload=json.dumps(payload).encode(),
    )
    env.issued_at.GetCurrentTime()
    env.deadline.FromSeconds(int(time.time() + deadline_s))
    return env


async def _results_for(
    channel: Channel, command_id: str, want: int = 1
) -> list[agent_pb2.CommandResult]:
    topic = COMMAND_RESULTS.full_name(channel.stack.topic_prefix)

    async def fetch() -> list[agent_pb2.CommandResult]:
        raw = await _read_topic(channel.stack.kafka_bootstrap, topic, 100_000, timeout_s=1.5)
        results = [agent_pb2.CommandResult.FromString(v) for v in raw]
        return [r for r in results if r.command_id == command_id]

    return await eventually(
        fetch, lambda rs: len([r for r in rs if r.status >= agent_pb2.SUCCEEDED]) >= want, 30
    )  # type: ignore[no-any-return]


async def test_bad_signatures_and_expired_deadlines_are_refused(
    channel: Channel, agent: tuple[str, AgentRuntime]
) -> None:
    server_id, runtime = agent
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    forged = _envelope(channel, server_id, "forged-1", "system.ping", {}, 60)
    signing.sign(forged, Ed25519PrivateKey.generate())
    await _inject(channel, server_id, forged)
    results = await _results_for(channel, forged.command_id)
    final = [r for r in results if r.status >= agent_pb2.SUCCEEDED]
    assert final[0].status == agent_pb2.REJECTED
    assert final[0].error_code == "bad_signature"

    late = _envelope(channel, server_id, "late-1", "system.ping", {}, -5)
    signing.sign(late, _signing_key(channel))
    await _inject(channel, server_id, late)
    results = await _results_for(channel, late.command_id)
    final = [r for r in results if r.status >= agent_pb2.SUCCEEDED]
    assert final[0].status == agent_pb2.REJECTED
    assert final[0].error_code == "expired"
    assert runtime.counters.commands_run == 0


async def test_the_same_envelope_delivered_three_times_runs_once(
    channel: Channel, agent: tuple[str, AgentRuntime], tmp_path: Path
) -> None:
    server_id, runtime = agent
    effects = tmp_path / "effects"
    effects.mkdir()
    env = _envelope(
        channel, server_id, "thrice-1", "test.effect", {"dir": str(effects), "hold_seconds": 0}, 60
    )
    signing.sign(env, _signing_key(channel))
    await _inject(channel, server_id, env, times=3)
    results = await _results_for(channel, env.command_id, want=3)
    finals = [r for r in results if r.status >= agent_pb2.SUCCEEDED]
    assert [r.status for r in finals] == [agent_pb2.SUCCEEDED] * 3
    assert sorted(r.replayed for r in finals) == [False, True, True]
    assert len(list(effects.iterdir())) == 1
    assert runtime.counters.commands_run == 1
    assert runtime.counters.commands_replayed == 2


async def test_commands_for_an_offline_server_wait_for_it(channel: Channel, tmp_path: Path) -> None:
    state = tmp_path / "agent"
    server_id = await enroll_agent(channel, "late-node", state)
    waiting = await channel.command(server_id, "system.ping")
    expiring = await channel.command(server_id, "system.ping", timeout_s=1)
    await asyncio.sleep(1.5)
    runtime = AgentRuntime(state, max_backoff_s=1.0)
    await runtime.start()
    try:
        done = await channel.wait_command(waiting["id"])
        assert done["state"] == "succeeded"
        gone = await channel.wait_command(expiring["id"])
        assert gone["state"] == "expired"
        assert runtime.counters.commands_run == 1
    finally:
        await runtime.stop()


async def test_secrets_reach_the_agent_and_nowhere_else_in_the_clear(
    channel: Channel, agent: tuple[str, AgentRuntime]
) -> None:
    server_id, _ = agent
    secret = "s3cret-Passw0rd-that-must-not-leak"
    command = await channel.command(
        server_id, "test.secret_digest", {"secret": {"$secret": secret}, "user": "app"}
    )
    assert secret not in json.dumps(command)
    assert "$sealed" in json.dumps(command["payload"])
    done = await channel.wait_command(command["id"])
    assert done["state"] == "succeeded", done
    import hashlib

    assert done["output"]["sha256"] == hashlib.sha256(secret.encode()).hexdigest()
    with psycopg.connect(channel.stack.postgres_dsn) as conn:
        for table in ("commands", "outbox", "audit_log"):
            dump = conn.execute(
                f"SELECT coalesce(string_agg(t::text, ' '), '') FROM {table} t"
            ).fetchone()
            assert dump is not None
            assert secret not in dump[0], table
            assert secret.encode().hex() not in dump[0], table
            # Nor a hash of the request with the secret in it (a guessable copy).
            plain = json.dumps({"secret": {"$secret": secret}, "user": "app"}, sort_keys=True)
            digest = hashlib.sha256(f"test.secret_digest\n{plain}".encode()).hexdigest()
            assert digest not in dump[0], table
    for topic in (COMMANDS, COMMAND_RESULTS, EVENTS):
        raw = await _read_topic(
            channel.stack.kafka_bootstrap, topic.full_name(channel.stack.topic_prefix), 100_000, 2
        )
        assert all(secret.encode() not in v for v in raw), topic.name


async def test_presence_goes_offline_after_missed_heartbeats(
    channel: Channel, agent: tuple[str, AgentRuntime]
) -> None:
    server_id, runtime = agent
    await wait_presence(channel, server_id, "online")
    await runtime.stop()
    started = time.monotonic()
    await wait_presence(channel, server_id, "offline", timeout_s=30)
    assert time.monotonic() - started >= 3 * HEARTBEAT_MS / 1000 * 0.5
