"""Simulated agents: bare `Connect` streams that say Hello and send heartbeats, nothing else.

They stand in for many real agents in scale tests. Each one has its own client
certificate (so the gateway sees a distinct identity), its own gRPC channel and TCP
connection, and can be told to fall silent (stop heartbeats, keep the stream open),
drop its stream (cancel), or connect again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass
from typing import Any

import grpc

from proto import agent_pb2, agent_pb2_grpc

WELCOME_TIMEOUT_S = 20.0
CHANNEL_OPTIONS = [
    # One TCP connection per simulated agent, as with real agents on separate hosts.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.keepalive_time_ms", 30_000),
]


class ConnectFailed(Exception):
    """The gateway did not welcome the agent within the connect deadline."""


@dataclass(frozen=True)
class AgentCredentials:
    server_id: str
    key_pem: bytes
    cert_pem: bytes


class SimulatedAgent:
    def __init__(self, credentials: AgentCredentials, address: str, ca_pem: bytes) -> None:
        self.server_id = credentials.server_id
        self.address = address
        self._credentials = grpc.ssl_channel_credentials(
            root_certificates=ca_pem,
            private_key=credentials.key_pem,
            certificate_chain=credentials.cert_pem,
        )
        self.session_ids: list[str] = []
        self.connect_attempts = 0
        self.heartbeats_sent = 0
        # Why the current stream ended, from the agent's side (None while it is open).
        self.ended: str | None = None
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None
        self._outbound: asyncio.Queue[agent_pb2.AgentMessage | None] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def session_id(self) -> str:
        return self.session_ids[-1]

    async def connect(self, deadline_s: float = 60.0) -> str:
        """Open a stream and wait for Welcome; a refused or failed attempt is retried."""
        deadline = time.monotonic() + deadline_s
        while True:
            self.connect_attempts += 1
            try:
                return await self._open()
            except (grpc.aio.AioRpcError, TimeoutError, ConnectFailed) as exc:
                await self.drop()
                if time.monotonic() > deadline:
                    raise ConnectFailed(f"{self.server_id}: {exc}") from exc
                await asyncio.sleep(random.uniform(0.1, 0.5))

    async def _open(self) -> str:
        self._channel = grpc.aio.secure_channel(self.address, self._credentials, CHANNEL_OPTIONS)
        stub = agent_pb2_grpc.AgentServiceStub(self._channel)  # type: ignore[no-untyped-call]
        outbound: asyncio.Queue[agent_pb2.AgentMessage | None] = asyncio.Queue()
        outbound.put_nowait(
            agent_pb2.AgentMessage(
                hello=agent_pb2.Hello(agent_version="simulated", hostname=self.server_id[:8])
            )
        )
        self._outbound = outbound
        self.ended = None
        self._call = stub.Connect(_drain(outbound))
        async with asyncio.timeout(WELCOME_TIMEOUT_S):
            first = await self._call.read()
        if not isinstance(first, agent_pb2.GatewayMessage) or not first.HasField("welcome"):
            raise ConnectFailed(f"no Welcome: {first!r}")
        self.session_ids.append(first.welcome.session_id)
        interval_s = first.welcome.heartbeat_interval_ms / 1000
        self._tasks = [
            asyncio.create_task(self._heartbeats(outbound, interval_s)),
            asyncio.create_task(self._read(self._call)),
        ]
        return first.welcome.session_id

    async def _heartbeats(
        self, outbound: asyncio.Queue[agent_pb2.AgentMessage | None], interval_s: float
    ) -> None:
        seq = 0
        while True:
            seq += 1
            beat = agent_pb2.Heartbeat(seq=seq)
            beat.sent_at.GetCurrentTime()
            outbound.put_nowait(agent_pb2.AgentMessage(heartbeat=beat))
            self.heartbeats_sent += 1
            await asyncio.sleep(interval_s)

    async def _read(self, call: Any) -> None:
        try:
            while isinstance(await call.read(), agent_pb2.GatewayMessage):
                pass
            self.ended = f"ended: {await call.code()}"
        except grpc.aio.AioRpcError as exc:
            self.ended = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            self.ended = "cancelled"
            raise

    def fall_silent(self) -> None:
        """Stop heartbeats but keep the stream (and its TCP connection) open."""
        if self._tasks:
            self._tasks[0].cancel()

    async def drop(self) -> None:
        """Cancel the stream and close the connection, as a crashed agent or a cut link."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._outbound is not None:
            self._outbound.put_nowait(None)
            self._outbound = None
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None


async def _drain(queue: asyncio.Queue[agent_pb2.AgentMessage | None]) -> Any:
    while (message := await queue.get()) is not None:
        yield message


async def connect_all(
    agents: list[SimulatedAgent], concurrency: int = 50, deadline_s: float = 60.0
) -> None:
    """Connect every agent, at most `concurrency` handshakes at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one(agent: SimulatedAgent) -> None:
        async with gate:
            await agent.connect(deadline_s)

    await asyncio.gather(*(one(a) for a in agents))


async def drop_all(agents: list[SimulatedAgent]) -> None:
    await asyncio.gather(*(a.drop() for a in agents))
