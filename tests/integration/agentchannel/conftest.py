"""The agent channel in one process: API, worker and gateway on loopback ports."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.worker import ControlPlaneWorker
from ingest.gateway.service import GatewayService
from proto import agent_pb2, agent_pb2_grpc
from yakpanel.services import Stack

from ..controlplane.conftest import Api, Tenant, api  # noqa: F401 - re-exported fixture

HEARTBEAT_MS = 400


@dataclass
class Channel:
    api: Api
    stack: Stack
    gateway: GatewayService
    worker: ControlPlaneWorker
    tenant: Tenant

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    @property
    def enroll_address(self) -> str:
        return f"127.0.0.1:{self.gateway.enroll_port}"

    @property
    def ca_pem(self) -> bytes:
        return self.gateway.ca_pem

    async def new_server(self, name: str) -> str:
        r = await self.tenant.owner.post(
            f"/v1/tenants/{self.tenant.id}/servers", json={"name": name}
        )
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    async def enrollment_token(self, server_id: str, **body: Any) -> str:
        r = await self.tenant.owner.post(
            f"/v1/tenants/{self.tenant.id}/servers/{server_id}/enrollment-tokens", json=body
        )
        assert r.status_code == 201, r.text
        assert r.json()["ca_certificate_pem"].encode() == self.ca_pem
        return str(r.json()["token"])

    async def server(self, server_id: str) -> dict[str, Any]:
        r = await self.tenant.owner.get(f"/v1/tenants/{self.tenant.id}/servers/{server_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def command(
        self, server_id: str, type_: str, payload: dict[str, Any] | None = None, **extra: Any
    ) -> dict[str, Any]:
        r = await self.tenant.owner.post(
            f"/v1/tenants/{self.tenant.id}/servers/{server_id}/commands",
            json={"type": type_, "payload": payload or {}, **extra},
        )
        assert r.status_code in (200, 202), r.text
        body: dict[str, Any] = r.json()
        return body

    async def get_command(self, command_id: str) -> dict[str, Any]:
        r = await self.tenant.owner.get(f"/v1/tenants/{self.tenant.id}/commands/{command_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def wait_command(
        self,
        command_id: str,
        states: tuple[str, ...] = ("succeeded", "failed", "expired"),
        timeout_s: float = 30,
    ) -> dict[str, Any]:
        return await eventually(
            lambda: self.get_command(command_id), lambda c: c["state"] in states, timeout_s
        )

    def raw_stub(
        self, credentials: grpc.ChannelCredentials, enroll: bool = False
    ) -> tuple[grpc.aio.Channel, Any]:
        ch = grpc.aio.secure_channel(self.enroll_address if enroll else self.address, credentials)
        return ch, agent_pb2_grpc.AgentServiceStub(ch)  # type: ignore[no-untyped-call]

    async def raw_enroll(self, token: str, csr_pem: bytes) -> agent_pb2.EnrollResponse:
        ch, stub = self.raw_stub(
            grpc.ssl_channel_credentials(root_certificates=self.ca_pem), enroll=True
        )
        try:
            response: agent_pb2.EnrollResponse = await stub.Enroll(
                agent_pb2.EnrollRequest(token=token, csr_pem=csr_pem, hostname="test-node")
            )
            return response
        finally:
            await ch.close()


async def eventually(
    fetch: Callable[[], Awaitable[Any]], done: Callable[[Any], bool], timeout_s: float = 30
) -> Any:
    deadline = time.monotonic() + timeout_s
    value = await fetch()
    while not done(value):
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s}s; last value: {value!r}")
        await asyncio.sleep(0.1)
        value = await fetch()
    return value


@pytest.fixture
async def channel(api: Api, stack: Stack) -> AsyncIterator[Channel]:  # noqa: F811
    stack.settings.controlplane_url = api.url
    stack.settings.heartbeat_interval_ms = HEARTBEAT_MS
    stack.settings.presence_refresh_s = 2.0
    stack.settings.gateway_port = 0
    stack.settings.gateway_enroll_port = 0
    worker = ControlPlaneWorker(stack, housekeeping_interval_s=0.5)
    worker.relay.poll_interval_s = 0.05
    await worker.start()
    gateway = GatewayService(stack)
    await gateway.start()
    tenant = await api.create_tenant(plan="business")
    handle = Channel(api, stack, gateway, worker, tenant)
    try:
        yield handle
    finally:
        # A test may have replaced the gateway (restart tests): stop the current one.
        await handle.gateway.stop()
        await worker.stop()


TEST_CAPABILITIES = [
    "system.ping",
    "system.info",
    "system.sleep",
    "test.effect",
    "test.secret_digest",
]


def write_agent_config(state_dir: Path, capabilities: list[str] | None = None) -> None:
    """The node operator's choices: approved command types and the test engine."""
    state_dir.mkdir(parents=True, exist_ok=True)
    caps = capabilities if capabilities is not None else TEST_CAPABILITIES
    (state_dir / "agent.toml").write_text(
        "capabilities = [" + ", ".join(f'"{c}"' for c in caps) + "]\n"
        'engines = ["tests.support.engines:CountingEngine"]\n'
    )


async def enroll_agent(channel: Channel, name: str, state_dir: Path, **config: Any) -> str:
    from agent.enroll import enroll

    server_id = await channel.new_server(name)
    token = await channel.enrollment_token(server_id)
    write_agent_config(state_dir, **config)
    identity = await enroll(channel.enroll_address, token, channel.ca_pem, state_dir)
    assert str(identity.server_id) == server_id
    return server_id


async def wait_presence(
    channel: Channel, server_id: str, presence: str, timeout_s: float = 30
) -> dict[str, Any]:
    return await eventually(
        lambda: channel.server(server_id), lambda s: s["presence"] == presence, timeout_s
    )
