"""The gateway service: agents' mTLS gRPC endpoint.

- `Enroll` (server-auth TLS): forwards the token and CSR to the control plane, which
  redeems the token and signs the certificate.
- `Connect` (mutual TLS): identity comes from the client certificate only; revoked or
  unknown certificates are refused. The gateway pushes command envelopes it consumes
  from `yak.commands.v1` to the sessions it holds, plus whatever the control plane
  still has pending for an agent that (re)connects; it relays results to
  `yak.command-results.v1` and presence to `yak.presence.v1`.
- `MetricsService/Export` (standard OTLP/gRPC, mutual TLS): ingest/gateway/metrics.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from cryptography.hazmat.primitives import serialization
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from ingest.gateway.controlplane import ControlPlaneClient, ControlPlaneRefused
from ingest.gateway.metrics import MetricsService
from ingest.gateway.sessions import QueueFull, Session, SessionTable, new_session_id
from proto import agent_pb2, agent_pb2_grpc
from yakpanel.pki import (
    IdentityError,
    NodeIdentity,
    identity_of,
    load_certificate,
    new_private_key,
    serial_hex,
)
from yakpanel.service_secrets import load_internal_token
from yakpanel.services import Service, Stack
from yakpanel.topics import COMMAND_RESULTS, COMMANDS, METRICS, PRESENCE, ensure_topics

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0


class GatewayStats:
    def __init__(self) -> None:
        self.sessions_opened = 0
        self.refused: dict[str, int] = {}
        self.commands_delivered = 0
        self.results_relayed = 0
        self.queue_overflows = 0
        self.metrics_requests = 0
        self.metrics_points = 0
        # Resource attributes that claimed another server or tenant and were overwritten.
        self.identity_overwrites = 0

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


class AgentGateway(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, service: GatewayService) -> None:
        self.svc = service

    async def Enroll(
        self, request: agent_pb2.EnrollRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.EnrollResponse:
        try:
            body = await self.svc.controlplane.enroll(
                request.token, request.csr_pem, request.hostname, request.agent_version
            )
        except ControlPlaneRefused as exc:
            code = {
                401: grpc.StatusCode.UNAUTHENTICATED,
                403: grpc.StatusCode.PERMISSION_DENIED,
                422: grpc.StatusCode.INVALID_ARGUMENT,
            }.get(exc.status, grpc.StatusCode.UNAVAILABLE)
            self.svc.stats.refuse(f"enroll:{exc.code}")
            await context.abort(code, exc.detail)
        except httpx.HTTPError:
            log.exception("enrollment could not reach the control plane")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the control plane is unavailable")

        return agent_pb2.EnrollResponse(
            certificate_pem=body["certificate_pem"].encode(),
            ca_chain_pem=body["ca_chain_pem"].encode(),
            command_signing_public_key=base64.b64decode(body["command_signing_public_key"]),
            tenant_id=body["tenant_id"],
            server_id=body["server_id"],
            connect_address=self.svc.connect_address,
        )

    async def Connect(
        self,
        request_iterator: AsyncIterator[agent_pb2.AgentMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[agent_pb2.GatewayMessage]:
        session = await self.svc.open_session(request_iterator, context)
        reader = asyncio.create_task(self.svc.read_agent(session, request_iterator))
        try:
            yield agent_pb2.GatewayMessage(
                welcome=agent_pb2.Welcome(
                    session_id=session.session_id,
                    heartbeat_interval_ms=self.svc.heartbeat_ms,
                )
            )
            await self.svc.session_started(session)
            while True:
                message = await session.outbox.get()
                if message is None:
                    break
                yield message
                if message.HasField("command"):
                    await self.svc.dispatched(session, message.command)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader
            await self.svc.session_ended(session)
        if session.close_reason:
            await context.abort(grpc.StatusCode.UNAVAILABLE, session.close_reason)


OTLP_EXPORT_SERVICE = "opentelemetry.proto.collector.metrics.v1.MetricsService"


def otlp_export_handler(servicer: MetricsService) -> grpc.GenericRpcHandler[Any, Any]:
    """The standard OTLP `MetricsService/Export`, decoding the request itself: bytes that
    are not an OTLP request get INVALID_ARGUMENT saying so (the generated handler would
    answer an opaque INTERNAL "Exception deserializing request")."""

    async def export(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            request = ExportMetricsServiceRequest.FromString(raw)
        except DecodeError as exc:
            # Strangers learn nothing about the payload: identity is checked first.
            await servicer.svc.authenticate(context, "Export")
            servicer.svc.stats.refuse("otlp:malformed")
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request is not an OTLP ExportMetricsServiceRequest: {exc}",
            )
        return await servicer.Export(request, context)

    return grpc.method_handlers_generic_handler(
        OTLP_EXPORT_SERVICE,
        {
            "Export": grpc.unary_unary_rpc_method_handler(
                export, response_serializer=ExportMetricsServiceResponse.SerializeToString
            )
        },
    )


class GatewayService:
    name = "gateway"

    def __init__(self, stack: Stack, controlplane: ControlPlaneClient | None = None) -> None:
        s = stack.settings
        self.stack = stack
        self.gateway_id = s.gateway_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.heartbeat_ms = s.heartbeat_interval_ms
        self.controlplane = controlplane or ControlPlaneClient(
            s.controlplane_base_url, load_internal_token(s)
        )
        self.sessions = SessionTable()
        self.stats = GatewayStats()
        self.port = s.gateway_port
        self.enroll_port = s.gateway_enroll_port
        self.ca_pem = b""
        self._server: grpc.aio.Server | None = None
        self._producer: AIOKafkaProducer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Offline announcements in flight; each leaves the set when done.
        self._announcing: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()

    # --- lifecycle --------------------------------------------------------------------

    async def _tls(self) -> tuple[grpc.ServerCredentials, grpc.ServerCredentials]:
        """(mutual TLS for Connect, server-only TLS for Enroll)."""
        key = new_private_key()
        public_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                body = await self.controlplane.gateway_certificate(
                    public_pem, self.stack.settings.gateway_hostnames
                )
                break
            except (httpx.HTTPError, ControlPlaneRefused) as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"no gateway certificate from the control plane: {exc}"
                    ) from exc
                await asyncio.sleep(0.5)
        self.ca_pem = body["ca_chain_pem"].encode()
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        pair = [(key_pem, body["certificate_pem"].encode())]
        return (
            grpc.ssl_server_credentials(
                pair, root_certificates=self.ca_pem, require_client_auth=True
            ),
            grpc.ssl_server_credentials(pair),
        )

    async def start(self) -> None:
        s = self.stack.settings
        mutual, server_only = await self._tls()
        await ensure_topics(
            self.stack.kafka_bootstrap,
            self.stack.topic_prefix,
            (COMMANDS, COMMAND_RESULTS, PRESENCE, METRICS),
            replication_factor=s.kafka_replication_factor,
        )
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.stack.kafka_bootstrap, acks="all", linger_ms=2
        )
        await self._producer.start()
        # gRPC refuses larger messages before any handler runs; Export names its own limit.
        limit = max(s.gateway_max_message_bytes, s.otlp_max_request_bytes)
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.http2.max_pings_without_data", 0),
            ],
            maximum_concurrent_rpcs=None,
        )
        agent_pb2_grpc.add_AgentServiceServicer_to_server(  # type: ignore[no-untyped-call]
            AgentGateway(self), self._server
        )
        # Served on both ports (one server); Export itself refuses callers without a
        # valid client certificate, as Connect does.
        self._server.add_generic_rpc_handlers((otlp_export_handler(MetricsService(self)),))
        self.port = self._server.add_secure_port(f"{s.gateway_host}:{s.gateway_port}", mutual)
        self.enroll_port = self._server.add_secure_port(
            f"{s.gateway_host}:{s.gateway_enroll_port}", server_only
        )
        await self._server.start()
        self._tasks = [
            asyncio.create_task(self._consume_commands(), name="gateway-commands"),
            asyncio.create_task(self._watch_heartbeats(), name="gateway-heartbeats"),
            asyncio.create_task(self._refresh_presence(), name="gateway-presence"),
        ]
        log.info("gateway listening", extra={"port": self.port, "gateway_id": self.gateway_id})

    async def stop(self) -> None:
        self._stop.set()
        for session in self.sessions.all():
            session.close("the gateway is shutting down; reconnect")
        if self._server is not None:
            await self._server.stop(grace=2)
            self._server = None
        for task in [*self._tasks, *self._announcing]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self.sessions.cancel_all()
        if self._producer is not None:
            with contextlib.suppress(KafkaError, OSError):
                await self._producer.stop()
            self._producer = None
        await self.controlplane.close()

    @property
    def connect_address(self) -> str:
        s = self.stack.settings
        return s.gateway_public_address or f"{s.gateway_host}:{self.port}"

    def endpoints(self) -> dict[str, str]:
        host = self.stack.settings.gateway_host
        return {
            "agent gateway (gRPC, mTLS)": f"{host}:{self.port}",
            "agent enrollment (gRPC, TLS)": f"{host}:{self.enroll_port}",
        }

    # --- sessions ---------------------------------------------------------------------

    async def authenticate(
        self, context: grpc.aio.ServicerContext[Any, Any], rpc: str
    ) -> tuple[NodeIdentity, str]:
        """(identity, serial) of the caller's client certificate, or the call is aborted:
        UNAUTHENTICATED without a usable certificate, PERMISSION_DENIED when the control
        plane does not hold it valid, UNAVAILABLE when the control plane cannot say."""
        auth = context.auth_context()
        pem = next(iter(auth.get("x509_pem_cert") or ()), b"")
        if not pem:
            self.stats.refuse("no_certificate")
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, f"{rpc} needs a client certificate: enroll first"
            )
        try:
            cert = load_certificate(pem)
            identity = identity_of(cert)
        except IdentityError as exc:
            self.stats.refuse("bad_certificate")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        serial = serial_hex(cert)
        try:
            status = await self.controlplane.certificate_status(serial)
        except (httpx.HTTPError, ControlPlaneRefused):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the control plane is unavailable")
        if status.status != "valid" or status.server_id != identity.server_id:
            reason = {
                "revoked": "the certificate was revoked",
                "expired": "the certificate has expired; enroll again",
            }.get(status.status, "the certificate is not known to the control plane")
            self.stats.refuse(f"certificate_{status.status}")
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
        return identity, serial

    async def produce(
        self, topic: str, value: bytes, key: bytes, headers: list[tuple[str, bytes]]
    ) -> None:
        """Sends one record and waits for the broker's acknowledgement (acks=all)."""
        if self._producer is None:
            raise KafkaError("the gateway is not running")
        await self._producer.send_and_wait(topic, value, key=key, headers=headers)

    async def open_session(
        self,
        request_iterator: AsyncIterator[agent_pb2.AgentMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> Session:
        identity, serial = await self.authenticate(context, "Connect")
        try:
            first = await asyncio.wait_for(anext(aiter(request_iterator)), HELLO_TIMEOUT_S)
        except (TimeoutError, StopAsyncIteration):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "send Hello first")
        if not first.HasField("hello"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "send Hello first")
        session = Session(
            new_session_id(), identity, serial, self.stack.settings.gateway_queue_per_agent
        )
        previous = self.sessions.add(session)
        if previous is not None:
            previous.close("replaced by a newer session of the same agent")
        self.stats.sessions_opened += 1
        return session

    async def session_started(self, session: Session) -> None:
        await self._presence(session, True, "connected")
        try:
            pending = await self.controlplane.pending_commands(
                session.identity.tenant_id, session.identity.server_id
            )
        except (httpx.HTTPError, ControlPlaneRefused) as exc:
            log.warning("could not fetch pending commands: %s", exc)
            pending = []
        for raw in pending:
            self._push(session, agent_pb2.CommandEnvelope.FromString(raw))

    async def session_ended(self, session: Session) -> None:
        if not self.sessions.remove(session):
            return  # replaced by a newer session: that one is current
        if session.close_reason.startswith("missed"):
            await self._presence(session, False, session.close_reason)
            return
        if self._stop.is_set():
            return
        # A brief reconnect must not flap: announce offline only if nobody took over.
        grace = 3 * self.heartbeat_ms / 1000
        loop = asyncio.get_running_loop()
        server_id = session.identity.server_id

        def announce() -> None:
            self.sessions.release_offline(server_id)
            if self.sessions.get(server_id) is None:
                task = asyncio.create_task(self._presence(session, False, "disconnected"))
                self._announcing.add(task)
                task.add_done_callback(self._announcing.discard)

        self.sessions.hold_offline(server_id, loop.call_later(grace, announce))

    async def read_agent(
        self, session: Session, request_iterator: AsyncIterator[agent_pb2.AgentMessage]
    ) -> None:
        try:
            async for message in request_iterator:
                session.last_heartbeat = time.monotonic()
                if message.HasField("result"):
                    await self._relay_result(session, message.result)
        finally:
            session.close(session.close_reason)

    # --- commands and results ---------------------------------------------------------

    def _push(self, session: Session, envelope: agent_pb2.CommandEnvelope) -> None:
        if envelope.tenant_id != str(session.identity.tenant_id):
            log.error("dropping a command whose tenant does not match the session")
            return
        try:
            session.deliver(agent_pb2.GatewayMessage(command=envelope))
        except QueueFull:
            # Nothing is lost: the command stays pending in the control plane and is
            # delivered again when the agent reconnects.
            self.stats.queue_overflows += 1
            session.close("too many undelivered commands; reconnect to resync")

    async def dispatched(self, session: Session, envelope: agent_pb2.CommandEnvelope) -> None:
        self.stats.commands_delivered += 1
        result = agent_pb2.CommandResult(
            command_id=envelope.command_id,
            idempotency_key=envelope.idempotency_key,
            status=agent_pb2.DISPATCHED,
        )
        await self._relay_result(session, result)

    async def _relay_result(self, session: Session, result: agent_pb2.CommandResult) -> None:
        # Identity is the certificate's, whatever the message claims.
        result.tenant_id = str(session.identity.tenant_id)
        result.server_id = str(session.identity.server_id)
        result.session_id = session.session_id
        if not result.HasField("at"):
            result.at.GetCurrentTime()
        assert self._producer is not None
        try:
            await self._producer.send_and_wait(
                COMMAND_RESULTS.full_name(self.stack.topic_prefix),
                result.SerializeToString(),
                key=result.server_id.encode(),
            )
        except KafkaError as exc:
            # The agent keeps the final result in its ledger and replays it when the
            # command is delivered again after a reconnect: close to make that happen.
            log.warning("could not relay a result (%s); closing the session to resync", exc)
            session.close("results could not be stored; reconnect")
            return
        self.stats.results_relayed += 1

    async def _consume_commands(self) -> None:
        topic = COMMANDS.full_name(self.stack.topic_prefix)
        while not self._stop.is_set():
            # A short fetch wait: the embedded broker answers a waiting fetch only when it
            # runs out (Kafka answers as soon as data arrives), and commands are latency-bound.
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.stack.kafka_bootstrap, fetch_max_wait_ms=20
            )
            try:
                await consumer.start()
                partitions = consumer.partitions_for_topic(topic)
                if not partitions:
                    await consumer._client.force_metadata_update()
                    partitions = consumer.partitions_for_topic(topic) or set()
                tps = [TopicPartition(topic, p) for p in sorted(partitions)]
                consumer.assign(tps)
                await consumer.seek_to_end(*tps)
                while not self._stop.is_set():
                    batches = await consumer.getmany(timeout_ms=200, max_records=500)
                    for messages in batches.values():
                        for msg in messages:
                            self._on_command(msg.value)
            except (KafkaError, OSError) as exc:
                log.warning("command consumer retrying: %s", exc)
                await asyncio.sleep(1)
            finally:
                with contextlib.suppress(KafkaError, OSError):
                    await consumer.stop()

    def _on_command(self, value: bytes) -> None:
        try:
            envelope = agent_pb2.CommandEnvelope.FromString(value)
            server_id = uuid.UUID(envelope.server_id)
        except ValueError:
            log.error("skipping an undecodable command envelope")
            return
        session = self.sessions.get(server_id)
        if session is not None:
            self._push(session, envelope)

    # --- presence ---------------------------------------------------------------------

    def _presence_event(
        self, session: Session, online: bool, reason: str
    ) -> agent_pb2.PresenceEvent:
        event = agent_pb2.PresenceEvent(
            tenant_id=str(session.identity.tenant_id),
            server_id=str(session.identity.server_id),
            online=online,
            session_id=session.session_id,
            gateway_id=self.gateway_id,
            reason=reason,
        )
        event.at.GetCurrentTime()
        return event

    async def _presence(self, session: Session, online: bool, reason: str) -> None:
        event = self._presence_event(session, online, reason)
        if self._producer is None:
            return
        try:
            await self._producer.send_and_wait(
                PRESENCE.full_name(self.stack.topic_prefix),
                event.SerializeToString(),
                key=event.server_id.encode(),
            )
        except KafkaError as exc:
            log.warning("could not publish presence: %s", exc)

    async def _watch_heartbeats(self) -> None:
        interval = self.heartbeat_ms / 1000
        while not self._stop.is_set():
            await asyncio.sleep(interval / 2)
            now = time.monotonic()
            for session in self.sessions.all():
                if now - session.last_heartbeat > 3 * interval:
                    session.close("missed three heartbeats")

    async def _refresh_presence(self) -> None:
        # Lets the control plane notice sessions of a gateway that died without a word.
        every = self.stack.settings.presence_refresh_s
        while not self._stop.is_set():
            await asyncio.sleep(every)
            await self._refresh_round()

    async def _refresh_round(self) -> None:
        # Sent together and awaited together: one round is one batch, not N round trips.
        # Sessions that ended since the round began are skipped, or their `offline`
        # would be followed by a stale `online`.
        if self._producer is None:
            return
        topic = PRESENCE.full_name(self.stack.topic_prefix)
        futures = []
        for session in self.sessions.all():
            if (
                session.closed.is_set()
                or self.sessions.get(session.identity.server_id) is not session
            ):
                continue
            event = self._presence_event(session, True, "still connected")
            futures.append(
                await self._producer.send(
                    topic, event.SerializeToString(), key=event.server_id.encode()
                )
            )
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed = sum(1 for r in results if isinstance(r, BaseException))
        if failed:
            log.warning("%d presence refreshes were not published", failed)


def build_gateway_service(stack: Stack) -> Service:
    return GatewayService(stack)
