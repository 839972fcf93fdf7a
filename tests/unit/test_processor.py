"""The command processor: refusals, deduplication, resume, deadlines, progress, secrets."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.ledger import Ledger, Run
from agent.processor import CommandProcessor
from engines.base import CommandContext, CommandSpec, EngineError, EngineRegistry
from engines.system import SystemEngine
from proto import agent_pb2, signing
from yakpanel.clock import ManualClock
from yakpanel.pki import CertificateAuthority, NodeIdentity, new_csr, new_private_key, public_key_of
from yakpanel.sealing import seal_secrets

A = agent_pb2


class ProbeEngine:
    """Handlers that record every call, so tests can count executions."""

    name = "probe"

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def commands(self) -> dict[str, CommandSpec]:
        return {
            "probe.count": CommandSpec(self.count, idempotent=True, description="count"),
            "probe.once": CommandSpec(self.count, idempotent=False, description="not idempotent"),
            "probe.steps": CommandSpec(self.steps, idempotent=True, description="progress"),
            "probe.hang": CommandSpec(self.hang, idempotent=True, description="never ends"),
            "probe.refuse": CommandSpec(self.refuse, idempotent=True, description="EngineError"),
            "probe.crash": CommandSpec(self.crash, idempotent=True, description="bug"),
            "probe.garbage": CommandSpec(self.garbage, idempotent=True, description="no JSON"),
            "probe.login": CommandSpec(self.login, idempotent=True, description="secret"),
        }

    async def count(self, ctx: CommandContext, payload: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((ctx.idempotency_key, payload))
        return {"calls": len(self.calls), "payload": payload}

    async def steps(self, ctx: CommandContext, payload: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((ctx.idempotency_key, payload))
        for percent in (10, 50, 90):
            await ctx.progress(percent, f"step {percent}")
        return {"done": True}

    async def hang(self, ctx: CommandContext, payload: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((ctx.idempotency_key, payload))
        await asyncio.sleep(60)
        return {}

    async def refuse(self, ctx: CommandContext, payload: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((ctx.idempotency_key, payload))
        raise EngineError("port_in_use", "port 80 is taken by another process", retryable=True)

    async def crash(self, ctx: CommandContext, payload: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((ctx.idempotency_key, payload))
        raise RuntimeError(f"boom with {payload.get('password')}")

    async def garbage(self, ctx: CommandContext, payload: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((ctx.idempotency_key, payload))
        return {"when": datetime.now()}

    async def login(self, ctx: CommandContext, payload: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((ctx.idempotency_key, payload))
        return {"user": payload["user"], "password_ok": payload["password"] == "hunter2-long"}


@dataclass
class Node:
    identity: NodeIdentity
    key: ec.EllipticCurvePrivateKey
    public_key: ec.EllipticCurvePublicKey
    signer: Ed25519PrivateKey
    clock: ManualClock
    ledger: Ledger
    probe: ProbeEngine
    processor: CommandProcessor
    capabilities: set[str] = field(default_factory=set)

    def envelope(
        self,
        type_: str = "probe.count",
        payload: Any = None,
        *,
        key: str | None = None,
        command_id: str | None = None,
        deadline: datetime | None = None,
        tenant_id: str | None = None,
        server_id: str | None = None,
        raw_payload: bytes | None = None,
        signer: Ed25519PrivateKey | None = None,
    ) -> agent_pb2.CommandEnvelope:
        command_id = command_id or str(uuid.uuid4())
        if raw_payload is None:
            value = {} if payload is None else payload
            value = seal_secrets(value, self.public_key, command_id)
            raw_payload = json.dumps(value).encode()
        env = agent_pb2.CommandEnvelope(
            command_id=command_id,
            idempotency_key=key or str(uuid.uuid4()),
            tenant_id=tenant_id or str(self.identity.tenant_id),
            server_id=server_id or str(self.identity.server_id),
            type=type_,
            payload=raw_payload,
        )
        env.issued_at.FromDatetime(self.clock.now())
        env.deadline.FromDatetime(deadline or self.clock.now() + timedelta(minutes=5))
        signing.sign(env, signer or self.signer)
        return env

    async def deliver(self, env: agent_pb2.CommandEnvelope) -> list[agent_pb2.CommandResult]:
        return [result async for result in self.processor.handle(env)]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    ca = CertificateAuthority.create()
    key = new_private_key()
    identity = NodeIdentity(uuid.uuid4(), uuid.uuid4())
    cert = ca.issue_agent(new_csr(key, "node"), identity)
    signer = Ed25519PrivateKey.generate()
    clock = ManualClock()
    ledger = Ledger(tmp_path / "ledger.sqlite3", clock)
    probe = ProbeEngine()
    capabilities = {*probe.commands(), "system.ping", "ghost.run"}
    processor = CommandProcessor(
        identity=identity,
        signing_public_key=signer.public_key().public_bytes_raw(),
        private_key=key,
        capabilities=capabilities,
        registry=EngineRegistry([SystemEngine(), probe]),
        ledger=ledger,
        clock=clock,
    )
    yield Node(
        identity, key, public_key_of(cert), signer, clock, ledger, probe, processor, capabilities
    )
    ledger.close()


def statuses(results: list[agent_pb2.CommandResult]) -> list[int]:
    return [r.status for r in results]


def output(result: agent_pb2.CommandResult) -> Any:
    return json.loads(result.output)


def assert_rejected(
    node: Node, env: agent_pb2.CommandEnvelope, results: list[agent_pb2.CommandResult], code: str
) -> agent_pb2.CommandResult:
    assert statuses(results) == [A.REJECTED], results
    (result,) = results
    assert result.error_code == code
    assert result.message
    assert node.probe.calls == []
    # Refused before the ledger: a corrected redelivery is not blocked by it.
    assert node.ledger.get(env.idempotency_key) is None
    return result


async def test_a_command_runs_and_reports_acknowledged_then_succeeded(node: Node) -> None:
    env = node.envelope("probe.count", {"x": 1})
    results = await node.deliver(env)
    assert statuses(results) == [A.ACKNOWLEDGED, A.SUCCEEDED]
    assert output(results[-1]) == {"calls": 1, "payload": {"x": 1}}
    for result in results:
        assert result.command_id == env.command_id
        assert result.idempotency_key == env.idempotency_key
        assert result.tenant_id == str(node.identity.tenant_id)
        assert result.server_id == str(node.identity.server_id)
        assert result.at.ToDatetime().replace(tzinfo=node.clock.now().tzinfo) == node.clock.now()
        assert not result.replayed
    entry = node.ledger.get(env.idempotency_key)
    assert entry is not None and entry.status == "SUCCEEDED"


async def test_a_tampered_envelope_is_rejected_as_bad_signature(node: Node) -> None:
    env = node.envelope("probe.count", {"x": 1})
    env.payload = b'{"x": 2}'
    result = assert_rejected(node, env, await node.deliver(env), "bad_signature")
    assert result.command_id == env.command_id


async def test_an_envelope_signed_by_another_key_is_rejected(node: Node) -> None:
    env = node.envelope("probe.count", signer=Ed25519PrivateKey.generate())
    assert_rejected(node, env, await node.deliver(env), "bad_signature")


@pytest.mark.parametrize("field_", ["tenant_id", "server_id"])
async def test_a_command_for_another_node_is_rejected_as_wrong_target(
    node: Node, field_: str
) -> None:
    env = node.envelope("probe.count", **{field_: str(uuid.uuid4())})
    result = assert_rejected(node, env, await node.deliver(env), "wrong_target")
    # Results always carry this node's identity, whatever the envelope claimed.
    assert result.tenant_id == str(node.identity.tenant_id)
    assert result.server_id == str(node.identity.server_id)


async def test_a_command_past_its_deadline_is_rejected_as_expired(node: Node) -> None:
    env = node.envelope("probe.count", deadline=node.clock.now() + timedelta(seconds=30))
    node.clock.advance(30)
    assert_rejected(node, env, await node.deliver(env), "expired")


async def test_a_registered_but_unapproved_type_is_not_capable(node: Node) -> None:
    env = node.envelope("system.sleep", {"seconds": 1})
    result = assert_rejected(node, env, await node.deliver(env), "not_capable")
    assert "system.sleep" in result.message
    assert "agent.toml" in result.message


async def test_an_approved_type_without_an_engine_is_not_capable(node: Node) -> None:
    env = node.envelope("ghost.run")
    result = assert_rejected(node, env, await node.deliver(env), "not_capable")
    assert "ghost.run" in result.message
    assert "agent.toml" in result.message


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b"\xff\xfe", b""])
async def test_a_payload_that_is_not_a_json_object_is_rejected(node: Node, raw: bytes) -> None:
    env = node.envelope("probe.count", raw_payload=raw)
    assert_rejected(node, env, await node.deliver(env), "invalid_payload")


async def test_the_signature_is_checked_before_anything_else(node: Node) -> None:
    env = node.envelope(
        "ghost.run",
        tenant_id=str(uuid.uuid4()),
        deadline=node.clock.now() - timedelta(seconds=1),
        raw_payload=b"garbage",
        signer=Ed25519PrivateKey.generate(),
    )
    assert_rejected(node, env, await node.deliver(env), "bad_signature")


async def test_one_key_with_a_different_payload_is_a_conflict(node: Node) -> None:
    first = node.envelope("probe.count", {"x": 1}, key="shared")
    await node.deliver(first)
    second = node.envelope("probe.count", {"x": 2}, key="shared")
    results = await node.deliver(second)
    assert statuses(results) == [A.REJECTED]
    assert results[0].error_code == "conflict"
    assert first.command_id in results[0].message
    assert len(node.probe.calls) == 1


async def test_a_duplicate_delivered_three_times_executes_once(node: Node) -> None:
    env = node.envelope("probe.count", {"x": 1})
    first = await node.deliver(env)
    again = [await node.deliver(env) for _ in range(2)]
    assert len(node.probe.calls) == 1
    assert statuses(first) == [A.ACKNOWLEDGED, A.SUCCEEDED]
    for results in again:
        assert statuses(results) == [A.ACKNOWLEDGED, A.SUCCEEDED]
        assert results[-1].replayed
        assert output(results[-1]) == output(first[-1])
        assert results[-1].command_id == env.command_id


async def test_concurrent_duplicates_execute_once(node: Node) -> None:
    env = node.envelope("probe.steps")
    deliveries = await asyncio.gather(*(node.deliver(env) for _ in range(3)))
    assert len(node.probe.calls) == 1
    finals = [results[-1] for results in deliveries]
    assert [f.status for f in finals] == [A.SUCCEEDED] * 3
    assert sorted(f.replayed for f in finals) == [False, True, True]


async def test_an_interrupted_idempotent_command_runs_again(node: Node) -> None:
    env = node.envelope("probe.count", {"x": 1})
    # As if the agent was killed after the ledger recorded the start.
    assert node.ledger.begin(env) == Run()
    results = await node.deliver(env)
    assert statuses(results) == [A.ACKNOWLEDGED, A.SUCCEEDED]
    assert not results[-1].replayed
    assert len(node.probe.calls) == 1
    entry = node.ledger.get(env.idempotency_key)
    assert entry is not None and (entry.attempts, entry.status) == (2, "SUCCEEDED")


async def test_an_interrupted_non_idempotent_command_is_not_run_again(node: Node) -> None:
    env = node.envelope("probe.once", {"x": 1})
    assert node.ledger.begin(env) == Run()
    results = await node.deliver(env)
    assert statuses(results) == [A.ACKNOWLEDGED, A.FAILED]
    assert results[-1].error_code == "interrupted"
    assert "not idempotent" in results[-1].message
    assert node.probe.calls == []
    # The decision sticks: a later duplicate replays it instead of running.
    replay = await node.deliver(env)
    assert statuses(replay) == [A.ACKNOWLEDGED, A.FAILED]
    assert replay[-1].replayed and replay[-1].error_code == "interrupted"
    assert node.probe.calls == []


async def test_a_command_still_running_at_its_deadline_fails(node: Node) -> None:
    env = node.envelope("probe.hang", deadline=node.clock.now() + timedelta(seconds=0.3))
    started = time.monotonic()
    results = await node.deliver(env)
    assert time.monotonic() - started < 5
    assert statuses(results) == [A.ACKNOWLEDGED, A.FAILED]
    assert results[-1].error_code == "deadline_exceeded"
    assert output(results[-1]) == {"retryable": True}
    entry = node.ledger.get(env.idempotency_key)
    assert entry is not None and (entry.status, entry.error_code) == ("FAILED", "deadline_exceeded")


async def test_progress_streams_in_order_between_ack_and_result(node: Node) -> None:
    env = node.envelope("probe.steps")
    results = await node.deliver(env)
    assert statuses(results) == [A.ACKNOWLEDGED, A.PROGRESS, A.PROGRESS, A.PROGRESS, A.SUCCEEDED]
    assert [(r.progress_percent, r.message) for r in results[1:4]] == [
        (10, "step 10"),
        (50, "step 50"),
        (90, "step 90"),
    ]
    assert all(r.command_id == env.command_id for r in results)


async def test_an_engine_error_fails_with_its_code_and_message(node: Node) -> None:
    results = await node.deliver(node.envelope("probe.refuse"))
    assert statuses(results) == [A.ACKNOWLEDGED, A.FAILED]
    assert (results[-1].error_code, results[-1].message) == (
        "port_in_use",
        "port 80 is taken by another process",
    )
    assert output(results[-1]) == {"retryable": True}


async def test_an_unexpected_exception_fails_without_leaking_secrets(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    env = node.envelope("probe.crash", {"password": {"$secret": "hunter2-long"}})
    with caplog.at_level(logging.ERROR, logger="agent.processor"):
        results = await node.deliver(env)
    assert statuses(results) == [A.ACKNOWLEDGED, A.FAILED]
    assert results[-1].error_code == "engine_error"
    assert env.command_id in results[-1].message
    assert "hunter2-long" not in results[-1].message
    assert any(r.exc_info for r in caplog.records), "the traceback goes to the agent log"
    # The processor keeps serving.
    assert statuses(await node.deliver(node.envelope("probe.count")))[-1] == A.SUCCEEDED


async def test_output_that_is_not_json_fails_as_engine_error(node: Node) -> None:
    results = await node.deliver(node.envelope("probe.garbage"))
    assert statuses(results) == [A.ACKNOWLEDGED, A.FAILED]
    assert results[-1].error_code == "engine_error"


async def test_sealed_secrets_reach_the_handler_opened(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    env = node.envelope("probe.login", {"user": "app", "password": {"$secret": "hunter2-long"}})
    assert b"hunter2-long" not in env.payload
    with caplog.at_level(logging.DEBUG):
        results = await node.deliver(env)
    assert output(results[-1]) == {"user": "app", "password_ok": True}
    assert node.probe.calls[0][1]["password"] == "hunter2-long"
    assert "hunter2-long" not in caplog.text
    assert env.payload.decode() not in caplog.text


async def test_a_secret_sealed_for_another_command_does_not_open(node: Node) -> None:
    command_id = str(uuid.uuid4())
    sealed = seal_secrets({"password": {"$secret": "hunter2-long"}}, node.public_key, "other")
    env = node.envelope(
        "probe.login", command_id=command_id, raw_payload=json.dumps(sealed).encode()
    )
    results = await node.deliver(env)
    assert statuses(results) == [A.ACKNOWLEDGED, A.FAILED]
    assert results[-1].error_code == "sealed_secret"
    assert node.probe.calls == []


async def test_a_real_system_command_runs(node: Node) -> None:
    results = await node.deliver(node.envelope("system.ping"))
    assert output(results[-1]) == {"pong": True, "agent_time": node.clock.now().isoformat()}
