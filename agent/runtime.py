"""The running agent: one mTLS `Connect` session at a time, reconnecting with backoff.

Session protocol (agent side):
  1. the agent sends `Hello` (version, hostname, the command types it will run);
  2. the gateway answers `Welcome` (session id, heartbeat interval) before anything else;
  3. the agent sends `Heartbeat` every interval, and the results of commands;
  4. each `GatewayMessage.command` runs in its own task; results stream back in order.

Commands outlive sessions: a command still running when its session drops keeps going,
and its final result is sent on the next session. The ledger makes redelivery safe.

Metrics (`agent.telemetry`) start and stop with the runtime but go their own way: their
own RPCs to the gateway's `MetricsService/Export`, a disk queue while it is unreachable,
and no failure of theirs reaches command execution.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import grpc.aio

from agent.ledger import Ledger
from agent.processor import CommandProcessor
from agent.state import AgentState, load_state
from agent.telemetry.service import AgentTelemetry
from engines.base import Engine, EngineRegistry, load_engine
from engines.system import SystemEngine
from proto import agent_pb2
from yakpanel import __version__
from yakpanel.clock import Clock, SystemClock

log = logging.getLogger(__name__)

CONNECT_METHOD = "/yakpanel.agent.v1.AgentService/Connect"

BACKOFF_BASE_S = 0.5
# A session that lasted this long was healthy: the next failure starts backoff afresh.
HEALTHY_SESSION_S = 30.0
DEFAULT_HEARTBEAT_MS = 15_000
MIN_HEARTBEAT_MS = 100
WELCOME_TIMEOUT_S = 30.0
# Final results produced while disconnected wait for the next session, up to this many.
UNDELIVERED_LIMIT = 1024

# HTTP/2 keepalive notices a gateway that vanished without closing the connection; the
# gateway must accept pings this often (grpc.http2.min_recv_ping_interval_without_data_ms).
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]

_CREDENTIALS_REFUSED = frozenset(
    {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
)
_FINAL = frozenset({agent_pb2.SUCCEEDED, agent_pb2.FAILED, agent_pb2.REJECTED})


@dataclass
class AgentCounters:
    """What the agent has done since start (for tests and status output)."""

    sessions: int = 0
    reconnects: int = 0
    heartbeats_sent: int = 0
    commands_run: int = 0
    commands_replayed: int = 0
    commands_rejected: int = 0


class SessionProtocolError(Exception):
    """The gateway broke the session protocol (e.g. no Welcome first)."""


@dataclass
class _Session:
    id: str
    outbound: asyncio.Queue[agent_pb2.AgentMessage | None]
    heartbeat_interval_s: float


class AgentRuntime:
    """The node agent as a Service (`name = "agent"`): `start()` returns once the state is
    loaded and the connect loop runs; `stop()` lets running commands finish (up to
    `drain_timeout_s`) and disconnects."""

    name = "agent"

    def __init__(
        self,
        state_dir: Path,
        *,
        clock: Clock | None = None,
        heartbeat_override_ms: int | None = None,
        max_backoff_s: float = 30.0,
        drain_timeout_s: float = 10.0,
        hostname: str | None = None,
        agent_version: str = __version__,
        ledger_retention: timedelta = timedelta(days=30),
    ) -> None:
        self.state_dir = state_dir
        self.counters = AgentCounters()
        self._clock = clock or SystemClock()
        self._heartbeat_override_ms = heartbeat_override_ms
        self._max_backoff_s = max_backoff_s
        self._drain_timeout_s = drain_timeout_s
        self._hostname = hostname or socket.gethostname()
        self._agent_version = agent_version
        self._ledger_retention = ledger_retention
        self._random = random.SystemRandom()
        self._state: AgentState | None = None
        self._ledger: Ledger | None = None
        self._processor: CommandProcessor | None = None
        self._capabilities: list[str] = []
        self._loop_task: asyncio.Task[None] | None = None
        self._commands: set[asyncio.Task[None]] = set()
        self._session: _Session | None = None
        self._undelivered: deque[agent_pb2.CommandResult] = deque(maxlen=UNDELIVERED_LIMIT)
        self._draining = False
        self._connected = asyncio.Event()
        self._telemetry: AgentTelemetry | None = None

    @property
    def session_id(self) -> str | None:
        """The current session's id, None while disconnected."""
        return self._session.id if self._session else None

    @property
    def telemetry(self) -> AgentTelemetry | None:
        """Host metrics and site probes; None when disabled in agent.toml or not started."""
        return self._telemetry

    @property
    def capabilities(self) -> list[str]:
        """Approved in agent.toml and handled by a loaded engine: what Hello announces."""
        return list(self._capabilities)

    async def wait_connected(self) -> str:
        """Wait until a session is welcomed; return its id."""
        while self._session is None:
            await self._connected.wait()
        return self._session.id

    def endpoints(self) -> dict[str, str]:
        return {}

    async def start(self) -> None:
        if self._loop_task is not None:
            raise RuntimeError("the agent is already running")
        state = load_state(self.state_dir)
        engines: list[Engine] = [SystemEngine()]
        engines.extend(load_engine(target) for target in state.config.engines)
        registry = EngineRegistry(engines)
        ledger = await asyncio.to_thread(Ledger, state.ledger_path, self._clock)
        pruned = await asyncio.to_thread(ledger.prune, self._clock.now() - self._ledger_retention)
        if pruned:
            log.info("forgot %d executed commands older than the ledger retention", pruned)
        approved = state.config.capabilities
        unhandled = sorted(c for c in approved if c not in registry)
        if unhandled:
            log.warning(
                "agent.toml approves %s but no loaded engine handles them; add the engines "
                "to `engines` in agent.toml",
                ", ".join(unhandled),
            )
        self._state = state
        self._ledger = ledger
        self._capabilities = sorted(c for c in approved if c in registry)
        self._processor = CommandProcessor(
            identity=state.identity,
            signing_public_key=state.signing_public_key,
            private_key=state.private_key,
            capabilities=set(self._capabilities),
            registry=registry,
            ledger=ledger,
            clock=self._clock,
        )
        self._draining = False
        log.info(
            "agent %s for %s connecting to %s; capabilities: %s",
            self._agent_version,
            state.identity.uri,
            state.gateway,
            ", ".join(self._capabilities) or "none",
        )
        self._loop_task = asyncio.create_task(self._connect_loop(), name="agent connect loop")
        if state.config.telemetry.enabled:
            await self._start_telemetry(state)

    async def _start_telemetry(self, state: AgentState) -> None:
        telemetry = AgentTelemetry(
            state.config.telemetry,
            state_dir=state.state_dir,
            server_id=str(state.identity.server_id),
            hostname=self._hostname,
            gateway=state.gateway,
            ca_pem=state.ca_pem,
            key_pem=state.key_pem,
            cert_pem=state.cert_pem,
            max_backoff_s=self._max_backoff_s,
            clock=self._clock,
        )
        try:
            await telemetry.start()
        except Exception:
            # Commands matter more than metrics: run without them.
            log.exception("telemetry did not start; the agent runs without metrics")
            with contextlib.suppress(Exception):
                await telemetry.stop()
            return
        self._telemetry = telemetry

    async def stop(self) -> None:
        if self._loop_task is None:
            return
        # New commands are left unacknowledged from here on; the gateway redelivers them
        # to the next session. Running ones get a chance to finish and report.
        self._draining = True
        if self._commands:
            log.info(
                "waiting up to %.0f s for %d running commands",
                self._drain_timeout_s,
                len(self._commands),
            )
            await asyncio.wait(set(self._commands), timeout=self._drain_timeout_s)
        await _cancel_and_wait({self._loop_task, *self._commands})
        self._loop_task = None
        if self._telemetry is not None:
            telemetry, self._telemetry = self._telemetry, None
            try:
                await telemetry.stop()
            except Exception:
                log.exception("telemetry did not stop cleanly")
        if self._ledger is not None:
            await asyncio.to_thread(self._ledger.close)
            self._ledger = None

    async def _connect_loop(self) -> None:
        attempt = 0
        while True:
            started = self._clock.monotonic()
            try:
                reason = await self._run_session()
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details() or 'no details'}"
                if exc.code() in _CREDENTIALS_REFUSED:
                    reason += (
                        " (the gateway refuses this node's certificate; if it was revoked, "
                        "re-enroll with `yakpanel agent enroll --force`)"
                    )
            except (SessionProtocolError, TimeoutError) as exc:
                reason = str(exc) or "the gateway sent no Welcome in time"
            except Exception:
                log.exception("agent session failed unexpectedly")
                reason = "unexpected error"
            if self._clock.monotonic() - started > HEALTHY_SESSION_S:
                attempt = 0
            ceiling = min(self._max_backoff_s, BACKOFF_BASE_S * 2 ** min(attempt, 32))
            delay = self._random.uniform(0, ceiling)
            attempt += 1
            self.counters.reconnects += 1
            log.warning(
                "session with the gateway ended (%s); reconnecting in %.1f s", reason, delay
            )
            await asyncio.sleep(delay)

    async def _run_session(self) -> str:
        """One Connect call, from Hello to its end; returns why it ended cleanly."""
        state = self._state
        assert state is not None
        credentials = grpc.ssl_channel_credentials(
            root_certificates=state.ca_pem,
            private_key=state.key_pem,
            certificate_chain=state.cert_pem,
        )
        outbound: asyncio.Queue[agent_pb2.AgentMessage | None] = asyncio.Queue()
        outbound.put_nowait(
            agent_pb2.AgentMessage(
                hello=agent_pb2.Hello(
                    agent_version=self._agent_version,
                    hostname=self._hostname,
                    capabilities=self._capabilities,
                )
            )
        )
        async with grpc.aio.secure_channel(state.gateway, credentials, _CHANNEL_OPTIONS) as ch:
            connect: grpc.aio.StreamStreamMultiCallable[
                agent_pb2.AgentMessage, agent_pb2.GatewayMessage
            ] = ch.stream_stream(
                CONNECT_METHOD,
                request_serializer=agent_pb2.AgentMessage.SerializeToString,
                response_deserializer=agent_pb2.GatewayMessage.FromString,
            )
            call = connect(_drain(outbound))
            try:
                async with asyncio.timeout(WELCOME_TIMEOUT_S):
                    first = await call.read()
                if not isinstance(first, agent_pb2.GatewayMessage):
                    return await _ended(call)
                if first.WhichOneof("kind") != "welcome":
                    raise SessionProtocolError(
                        f"the gateway sent {first.WhichOneof('kind')} before Welcome"
                    )
                session = self._open_session(first.welcome, outbound)
                heartbeats = asyncio.create_task(self._send_heartbeats(session))
                try:
                    while isinstance(message := await call.read(), agent_pb2.GatewayMessage):
                        self._on_gateway_message(message)
                    return await _ended(call)
                finally:
                    heartbeats.cancel()
                    self._close_session(session)
            finally:
                call.cancel()
                # cancel() is a no-op on a call that already failed; ending the request
                # iterator is what lets gRPC's writer task finish.
                outbound.put_nowait(None)

    def _open_session(
        self, welcome: agent_pb2.Welcome, outbound: asyncio.Queue[agent_pb2.AgentMessage | None]
    ) -> _Session:
        interval_ms = (
            self._heartbeat_override_ms or welcome.heartbeat_interval_ms or DEFAULT_HEARTBEAT_MS
        )
        session = _Session(welcome.session_id, outbound, max(interval_ms, MIN_HEARTBEAT_MS) / 1000)
        self._session = session
        self.counters.sessions += 1
        self._connected.set()
        log.info(
            "connected: session %s, heartbeat every %.1f s",
            session.id,
            session.heartbeat_interval_s,
        )
        while self._undelivered:
            self._send_result(session, self._undelivered.popleft())
        return session

    def _close_session(self, session: _Session) -> None:
        self._session = None
        self._connected.clear()
        # Results the stream never took: keep the final ones for the next session.
        while not session.outbound.empty():
            message = session.outbound.get_nowait()
            if message is not None and message.result.status in _FINAL:
                self._undelivered.append(message.result)
        session.outbound.put_nowait(None)

    async def _send_heartbeats(self, session: _Session) -> None:
        seq = 0
        while True:
            seq += 1
            heartbeat = agent_pb2.Heartbeat(seq=seq)
            heartbeat.sent_at.FromDatetime(self._clock.now())
            session.outbound.put_nowait(agent_pb2.AgentMessage(heartbeat=heartbeat))
            self.counters.heartbeats_sent += 1
            await asyncio.sleep(session.heartbeat_interval_s)

    def _on_gateway_message(self, message: agent_pb2.GatewayMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind == "command":
            if self._draining:
                log.info("stopping: leaving command %s for redelivery", message.command.command_id)
                return
            task = asyncio.create_task(
                self._run_command(message.command), name=f"command {message.command.command_id}"
            )
            self._commands.add(task)
            task.add_done_callback(self._commands.discard)
        elif kind == "heartbeat":
            log.debug("gateway heartbeat %d", message.heartbeat.seq)
        else:
            log.warning("ignoring unexpected %s from the gateway", kind)

    async def _run_command(self, envelope: agent_pb2.CommandEnvelope) -> None:
        processor = self._processor
        assert processor is not None
        try:
            async for result in processor.handle(envelope):
                if result.status == agent_pb2.REJECTED:
                    self.counters.commands_rejected += 1
                elif result.status in _FINAL and result.replayed:
                    self.counters.commands_replayed += 1
                elif result.status in _FINAL:
                    self.counters.commands_run += 1
                self._emit(result)
        except Exception:
            # The processor reports handler failures itself; this is the ledger or a bug.
            # No final result goes out, so the gateway's redelivery will retry it.
            log.exception("command %s could not be processed", envelope.command_id)

    def _emit(self, result: agent_pb2.CommandResult) -> None:
        session = self._session
        if session is not None:
            self._send_result(session, result)
        elif result.status in _FINAL:
            self._undelivered.append(result)

    @staticmethod
    def _send_result(session: _Session, result: agent_pb2.CommandResult) -> None:
        result.session_id = session.id
        session.outbound.put_nowait(agent_pb2.AgentMessage(result=result))


async def _drain(
    outbound: asyncio.Queue[agent_pb2.AgentMessage | None],
) -> AsyncIterator[agent_pb2.AgentMessage]:
    while (message := await outbound.get()) is not None:
        yield message


async def _ended(
    call: grpc.aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.GatewayMessage],
) -> str:
    code = await call.code()
    details = await call.details()
    return f"the gateway closed the stream ({code.name}: {details or 'no details'})"


async def _cancel_and_wait(tasks: set[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
