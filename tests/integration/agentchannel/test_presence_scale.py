"""Presence at scale: 1,000 simulated agent sessions on one gateway.

The agents are bare Connect streams (tests/support/simulated_agents.py), each with its own
certificate and TCP connection. Their servers and certificates are written straight into
PostgreSQL, as enrollment would have left them; everything after that goes the real way:
mTLS Connect, the certificate check against the control plane, presence events on
`yak.presence.v1`, the worker applying them to PostgreSQL, the API reading them back.
"""

from __future__ import annotations

import asyncio
import resource
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import psycopg
import pytest

from controlplane.crypto import SecretBox, load_master_key
from controlplane.keys import load_platform_keys
from controlplane.registry.agents import public_key_pem
from controlplane.worker import ControlPlaneWorker
from ingest.gateway.service import GatewayService
from tests.support.simulated_agents import (
    AgentCredentials,
    SimulatedAgent,
    connect_all,
    drop_all,
)
from yakpanel.ids import new_id
from yakpanel.pki import (
    NodeIdentity,
    cert_pem,
    fingerprint,
    new_csr,
    new_private_key,
    private_key_pem,
    serial_hex,
)
from yakpanel.services import Stack
from yakpanel.topics import PRESENCE

from ..controlplane.conftest import Api, api  # noqa: F401 - the api fixture
from .conftest import Channel

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

SESSIONS = 1000
SILENT = 300  # stop heartbeats, keep the stream open: "three missed heartbeats"
DROPPED = 200  # cancel the stream: disconnect, then the grace period
RECONNECTED = 100  # of the 500 offline, come back
# One event loop runs the API, the worker, the gateway and all 1,000 clients here, so
# a loop stall must not look like three missed heartbeats: a 1 s interval (3 s to miss).
HEARTBEAT_MS = 1000
PRESENCE_REFRESH_S = 4.0


@pytest.fixture
async def scale_channel(api: Api, stack: Stack) -> AsyncIterator[Channel]:  # noqa: F811
    """The `channel` fixture with a heartbeat interval that suits 1,000 sessions."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * SESSIONS + 1024  # both ends of every connection live in this process
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    stack.settings.controlplane_url = api.url
    stack.settings.heartbeat_interval_ms = HEARTBEAT_MS
    stack.settings.presence_refresh_s = PRESENCE_REFRESH_S
    stack.settings.gateway_port = 0
    stack.settings.gateway_enroll_port = 0
    worker = ControlPlaneWorker(stack, housekeeping_interval_s=0.5)
    worker.relay.poll_interval_s = 0.05
    await worker.start()
    gateway = GatewayService(stack)
    await gateway.start()
    tenant = await api.create_tenant(plan="business")
    try:
        yield Channel(api, stack, gateway, worker, tenant)
    finally:
        await gateway.stop()
        await worker.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def provision(channel: Channel, count: int) -> list[AgentCredentials]:
    """Servers with enrolled certificates, written in bulk as enrollment would leave them."""
    stack = channel.stack
    ca = load_platform_keys(stack.postgres_dsn, SecretBox(load_master_key(stack.settings))).ca
    tenant_id = uuid.UUID(channel.tenant.id)
    servers: list[tuple[uuid.UUID, uuid.UUID, str]] = []
    certificates: list[tuple[Any, ...]] = []
    credentials: list[AgentCredentials] = []
    for i in range(count):
        server_id = new_id()
        key = new_private_key()
        cert = ca.issue_agent(new_csr(key, f"sim-{i}"), NodeIdentity(tenant_id, server_id))
        servers.append((server_id, tenant_id, f"sim-{i:04d}"))
        certificates.append(
            (
                serial_hex(cert),
                tenant_id,
                server_id,
                fingerprint(cert),
                public_key_pem(cert),
                cert.not_valid_after_utc,
            )
        )
        credentials.append(AgentCredentials(str(server_id), private_key_pem(key), cert_pem(cert)))
    with psycopg.connect(stack.postgres_dsn) as conn, conn.transaction():
        with conn.cursor().copy("COPY servers (id, tenant_id, name) FROM STDIN") as copy:
            for row in servers:
                copy.write_row(row)
        with conn.cursor().copy(
            "COPY agent_certificates (serial, tenant_id, server_id, fingerprint,"
            " public_key_pem, not_after) FROM STDIN"
        ) as copy:
            for row in certificates:
                copy.write_row(row)
    return credentials


async def presence_by_server(channel: Channel) -> dict[str, str]:
    async with await psycopg.AsyncConnection.connect(channel.stack.postgres_dsn) as conn:
        rows = await (
            await conn.execute(
                "SELECT id, presence FROM servers WHERE tenant_id = %s", (channel.tenant.id,)
            )
        ).fetchall()
    return {str(r[0]): r[1] for r in rows}


async def presence_via_api(channel: Channel) -> dict[str, str]:
    """Every server's presence as the API reports it, 200 to a page."""
    seen: dict[str, str] = {}
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 200}
        if cursor:
            params["cursor"] = cursor
        r = await channel.tenant.owner.get(
            f"/v1/tenants/{channel.tenant.id}/servers", params=params
        )
        assert r.status_code == 200, r.text
        body = r.json()
        seen.update({s["id"]: s["presence"] for s in body["items"]})
        cursor = body["next_cursor"]
        if cursor is None:
            return seen


async def offline_history(channel: Channel) -> dict[str, list[str]]:
    """server id → the reasons of its offline records in presence_history."""
    async with await psycopg.AsyncConnection.connect(channel.stack.postgres_dsn) as conn:
        rows = await (
            await conn.execute(
                "SELECT server_id, reason FROM presence_history"
                " WHERE tenant_id = %s AND NOT online ORDER BY at",
                (channel.tenant.id,),
            )
        ).fetchall()
    history: dict[str, list[str]] = {}
    for server_id, reason in rows:
        history.setdefault(str(server_id), []).append(reason)
    return history


def expected(online: Iterable[SimulatedAgent], offline: Iterable[SimulatedAgent]) -> dict[str, str]:
    want = {a.server_id: "online" for a in online}
    want.update({a.server_id: "offline" for a in offline})
    return want


async def until(done: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.1)


async def wait_for_presence(
    channel: Channel, want: dict[str, str], timeout_s: float
) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while True:
        got = await presence_by_server(channel)
        if got == want:
            return got
        if time.monotonic() > deadline:
            wrong = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
            sample = dict(list(wrong.items())[:5])
            pytest.fail(
                f"{len(wrong)} servers with the wrong presence after {timeout_s}s "
                f"(got, want), e.g. {sample}"
            )
        await asyncio.sleep(0.25)


async def test_a_thousand_sessions_on_one_gateway_show_correct_presence(
    scale_channel: Channel,
) -> None:
    channel = scale_channel
    timings: dict[str, float] = {}
    started = time.monotonic()
    credentials = provision(channel, SESSIONS)
    timings["provision"] = time.monotonic() - started

    agents = [SimulatedAgent(c, channel.address, channel.ca_pem) for c in credentials]
    try:
        mark = time.monotonic()
        await connect_all(agents)
        timings["connect"] = time.monotonic() - mark
        assert len(channel.gateway.sessions) == SESSIONS
        await wait_for_presence(channel, expected(agents, []), timeout_s=60)
        timings["all online"] = time.monotonic() - mark
        assert await presence_via_api(channel) == expected(agents, [])

        silent = agents[:SILENT]
        dropped = agents[SILENT : SILENT + DROPPED]
        steady = agents[SILENT + DROPPED :]
        mark = time.monotonic()
        for agent in silent:
            agent.fall_silent()
        await drop_all(dropped)
        await wait_for_presence(channel, expected(steady, silent + dropped), timeout_s=45)
        timings["500 offline"] = time.monotonic() - mark
        # The earliest an offline is due: three intervals (missed beats, or the grace).
        assert timings["500 offline"] >= 3 * HEARTBEAT_MS / 1000 * 0.8
        assert len(channel.gateway.sessions) == len(steady)
        # The gateway ended the silent streams itself.
        await until(lambda: all(a.ended is not None for a in silent), timeout_s=10)
        history = await offline_history(channel)
        assert {h[-1] for s, h in history.items() if s in {a.server_id for a in silent}} == {
            "missed three heartbeats"
        }
        assert {h[-1] for s, h in history.items() if s in {a.server_id for a in dropped}} == {
            "disconnected"
        }

        back = silent[: RECONNECTED // 2] + dropped[: RECONNECTED // 2]
        mark = time.monotonic()
        await drop_all(back)
        await connect_all(back)
        still_offline = silent[RECONNECTED // 2 :] + dropped[RECONNECTED // 2 :]
        want = expected(steady + back, still_offline)
        await wait_for_presence(channel, want, timeout_s=30)
        timings["100 back online"] = time.monotonic() - mark
        assert len(channel.gateway.sessions) == len(steady) + len(back)

        # Settled: a few more heartbeat intervals and presence refreshes change nothing.
        await asyncio.sleep(max(3 * HEARTBEAT_MS / 1000, PRESENCE_REFRESH_S) + 1)
        assert await presence_via_api(channel) == want
        history = await offline_history(channel)
        flapped = [a.server_id for a in steady if a.server_id in history]
        assert flapped == [], f"{len(flapped)} always-connected servers went offline"
        assert all(len(history[a.server_id]) == 1 for a in silent + dropped)
        timings["total"] = time.monotonic() - started
        retries = sum(a.connect_attempts for a in agents) - SESSIONS - len(back)
        # Shown with `-s`: how long each phase took on this machine.
        print(
            "\npresence at scale (s):",
            {k: round(v, 1) for k, v in timings.items()},
            f"connect retries: {retries}",
        )
    finally:
        await drop_all(agents)


async def test_a_reconnect_within_the_grace_period_never_shows_offline(
    scale_channel: Channel,
) -> None:
    channel = scale_channel
    agents = [SimulatedAgent(c, channel.address, channel.ca_pem) for c in provision(channel, 20)]
    try:
        await connect_all(agents)
        await wait_for_presence(channel, expected(agents, []), timeout_s=30)
        first_sessions = {a.server_id: a.session_id for a in agents}

        await drop_all(agents)
        # Back well inside the grace period (three heartbeat intervals).
        await asyncio.sleep(HEARTBEAT_MS / 1000)
        await connect_all(agents)
        assert all(a.session_id != first_sessions[a.server_id] for a in agents)

        # Past the grace period of the dropped sessions: still online, never offline.
        await asyncio.sleep(3 * HEARTBEAT_MS / 1000 + 2)
        assert await presence_via_api(channel) == expected(agents, [])
        assert await offline_history(channel) == {}
        async with await psycopg.AsyncConnection.connect(channel.stack.postgres_dsn) as conn:
            rows = await (
                await conn.execute(
                    "SELECT id, presence_session FROM servers WHERE tenant_id = %s",
                    (channel.tenant.id,),
                )
            ).fetchall()
        assert {str(r[0]): r[1] for r in rows} == {a.server_id: a.session_id for a in agents}
    finally:
        await drop_all(agents)


async def test_a_session_that_ends_during_a_presence_refresh_is_not_announced_again(
    scale_channel: Channel,
) -> None:
    """With many sessions a refresh round takes a while; a `still connected` for a session
    that ended meanwhile can reach the control plane after its `offline`. It must not bring
    the server back online (nothing would ever take it offline again)."""
    channel = scale_channel
    gateway = channel.gateway
    agents = [SimulatedAgent(c, channel.address, channel.ca_pem) for c in provision(channel, 20)]
    try:
        await connect_all(agents)
        await wait_for_presence(channel, expected(agents, []), timeout_s=30)
        ended = list(gateway.sessions.all())
        for agent in agents:
            agent.fall_silent()
        await wait_for_presence(channel, expected([], agents), timeout_s=30)
        # The late refresh round: `online` for each session that has already ended.
        assert gateway._producer is not None
        for session in ended:
            event = gateway._presence_event(session, True, "still connected")
            await gateway._producer.send_and_wait(
                PRESENCE.full_name(channel.stack.topic_prefix),
                event.SerializeToString(),
                key=event.server_id.encode(),
            )
        await asyncio.sleep(3)
        assert await presence_by_server(channel) == expected([], agents)
        assert len(gateway.sessions) == 0
    finally:
        await drop_all(agents)
