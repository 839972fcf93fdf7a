"""Drains the telemetry queue, oldest first, into the gateway's OTLP `MetricsService/Export`.

Runs on the agent's event loop with its own mutual-TLS channel (the node's key,
certificate and CA, the address `Connect` uses), independent of the `Connect` stream.
An entry leaves the queue only once the gateway accepted it, or refused it for good:

- OK → removed; the next entry goes at once, so a backlog drains without waiting for
  collections;
- INVALID_ARGUMENT, RESOURCE_EXHAUSTED (the gateway's refusals: malformed, too large, too
  many points, cardinality) → removed and counted as `rejected`; resending cannot help;
- anything else (UNAVAILABLE, DEADLINE_EXCEEDED, a refused certificate, …) → kept, and
  retried after an exponential backoff with full jitter, capped at `max_backoff_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass
from enum import Enum

import grpc
import grpc.aio
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from agent.telemetry.queue import QueueClosedError, QueuedRequest, TelemetryQueue

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 0.5
DEFAULT_MAX_BACKOFF_S = 30.0
RPC_TIMEOUT_S = 10.0
# The exporter wakes the sender on every append; this is only a safety net.
IDLE_POLL_S = 5.0

REFUSED = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED})
_CREDENTIALS_REFUSED = frozenset(
    {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
)


class _Outcome(Enum):
    DONE = "done"
    RETRY = "retry"


@dataclass
class SenderStats:
    """What the sender did since start."""

    sent: int = 0
    rejected: int = 0
    retries: int = 0
    last_error: str | None = None


class MetricsSender:
    def __init__(
        self,
        queue: TelemetryQueue,
        target: str,
        credentials: grpc.ChannelCredentials,
        *,
        max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
        rpc_timeout_s: float = RPC_TIMEOUT_S,
    ) -> None:
        self.queue = queue
        self.target = target
        self.credentials = credentials
        self.max_backoff_s = max_backoff_s
        self.rpc_timeout_s = rpc_timeout_s
        self.stats = SenderStats()
        self._random = random.SystemRandom()
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failing = False

    def notify(self) -> None:
        """Something was queued; callable from any thread."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed while stopping
            loop.call_soon_threadsafe(self._wakeup.set)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        backoff_ms = int(self.max_backoff_s * 1000)
        options = [
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            # gRPC's own reconnect backoff grows to minutes by default; keep it within
            # ours so that a gateway back after an outage is reached promptly.
            ("grpc.initial_reconnect_backoff_ms", min(1000, backoff_ms)),
            ("grpc.min_reconnect_backoff_ms", min(1000, backoff_ms)),
            ("grpc.max_reconnect_backoff_ms", max(backoff_ms, 100)),
        ]
        async with grpc.aio.secure_channel(self.target, self.credentials, options) as channel:
            stub = metrics_service_pb2_grpc.MetricsServiceStub(channel)  # type: ignore[no-untyped-call]
            attempt = 0
            while True:
                try:
                    outcome = await self._send(stub, await self._next())
                except QueueClosedError:
                    return
                except Exception as exc:  # the queue's disk, most likely: try again later
                    log.exception("the telemetry sender failed; retrying")
                    self.stats.last_error = f"{type(exc).__name__}: {exc}"
                    outcome = _Outcome.RETRY
                if outcome is _Outcome.DONE:
                    attempt = 0
                    continue
                ceiling = min(self.max_backoff_s, BACKOFF_BASE_S * 2 ** min(attempt, 32))
                attempt += 1
                self.stats.retries += 1
                await asyncio.sleep(self._random.uniform(0, ceiling))

    async def _next(self) -> QueuedRequest:
        while True:
            # Cleared before looking, so an append after the look still wakes us.
            self._wakeup.clear()
            entry = await asyncio.to_thread(self.queue.oldest)
            if entry is not None:
                return entry
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(IDLE_POLL_S):
                    await self._wakeup.wait()

    async def _send(
        self, stub: metrics_service_pb2_grpc.MetricsServiceStub, entry: QueuedRequest
    ) -> _Outcome:
        try:
            request = ExportMetricsServiceRequest.FromString(entry.payload)
        except DecodeError as exc:
            log.error("dropping unreadable telemetry queue entry %d: %s", entry.id, exc)
            await self._reject(entry)
            return _Outcome.DONE
        try:
            response: ExportMetricsServiceResponse = await stub.Export(
                request, timeout=self.rpc_timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or "no details"
            if code in REFUSED:
                log.warning(
                    "the gateway refused a metrics request (%s: %s); dropped it",
                    code.name,
                    details,
                )
                await self._reject(entry)
                return _Outcome.DONE
            reason = f"{code.name}: {details}"
            if code in _CREDENTIALS_REFUSED:
                reason += (
                    " (the gateway refuses this node's certificate; if it was revoked, "
                    "re-enroll with `yakpanel agent enroll --force`)"
                )
            self._on_failure(reason)
            return _Outcome.RETRY
        except Exception as exc:  # anything else from gRPC: retry
            log.exception("sending metrics failed unexpectedly")
            self._on_failure(f"{type(exc).__name__}: {exc}")
            return _Outcome.RETRY
        partial = response.partial_success
        if partial.rejected_data_points:
            log.warning(
                "the gateway rejected %d data points: %s",
                partial.rejected_data_points,
                partial.error_message or "no details",
            )
        await asyncio.to_thread(self.queue.remove, entry.id)
        self.stats.sent += 1
        if self._failing:
            self._failing = False
            log.info("the gateway takes metrics again; %d collections queued", self.queue.depth)
        return _Outcome.DONE

    async def _reject(self, entry: QueuedRequest) -> None:
        await asyncio.to_thread(self.queue.reject, entry.id)
        self.stats.rejected += 1

    def _on_failure(self, reason: str) -> None:
        self.stats.last_error = reason
        if not self._failing:
            self._failing = True
            log.warning(
                "cannot send metrics to %s (%s); keeping them on disk and retrying",
                self.target,
                reason,
            )
        else:
            log.debug("sending metrics still fails: %s", reason)
