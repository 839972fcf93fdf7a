"""The metrics sender against a real gRPC server on loopback that answers as scripted: an
entry leaves the queue only once accepted or refused for good, oldest first, transient
errors are retried, refusals counted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from agent.telemetry.queue import TelemetryQueue
from agent.telemetry.sender import MetricsSender

OK = None
LOCAL = grpc.LocalConnectionType.LOCAL_TCP


class ScriptedGateway(metrics_service_pb2_grpc.MetricsServiceServicer):
    """Answers each Export with the next scripted status (OK once the script ends)."""

    def __init__(self) -> None:
        self.script: list[grpc.StatusCode | None] = []
        self.calls: list[int] = []
        self.accepted: list[int] = []

    async def Export(
        self, request: ExportMetricsServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ExportMetricsServiceResponse:
        n = int(request.resource_metrics[0].resource.attributes[0].value.int_value)
        self.calls.append(n)
        code = self.script.pop(0) if self.script else OK
        if code is not None:
            await context.abort(code, f"scripted {code.name}")
        self.accepted.append(n)
        return ExportMetricsServiceResponse()


def request(n: int) -> bytes:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.append(KeyValue(key="n", value=AnyValue(int_value=n)))
    return req.SerializeToString()


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[ScriptedGateway, str]]:
    servicer = ScriptedGateway()
    server = grpc.aio.server()
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_secure_port("127.0.0.1:0", grpc.local_server_credentials(LOCAL))
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def wait_until(condition: Any, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_oldest_first_retry_transient_drop_refused(
    gateway: tuple[ScriptedGateway, str], tmp_path: Path
) -> None:
    servicer, address = gateway
    queue = TelemetryQueue(tmp_path / "q.sqlite3", max_bytes=10**6, max_entries=100)
    for n in range(5):
        queue.append(request(n))
    queue.append(b"\xff\xff not protobuf")
    servicer.script = [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.PERMISSION_DENIED,
        OK,  # 0
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # 1
        grpc.StatusCode.INVALID_ARGUMENT,  # 2
        grpc.StatusCode.UNAVAILABLE,  # 3, then OK
    ]
    sender = MetricsSender(
        queue, address, grpc.local_channel_credentials(LOCAL), max_backoff_s=0.05
    )
    task = asyncio.create_task(sender.run())
    try:
        await wait_until(lambda: queue.depth == 0)
        assert servicer.calls == [0, 0, 0, 0, 1, 2, 3, 3, 4]
        assert servicer.accepted == [0, 3, 4]
        assert queue.dropped() == {"queue_full": 0, "rejected": 3}  # 1, 2, the corrupt one
        assert (sender.stats.sent, sender.stats.rejected, sender.stats.retries) == (3, 3, 4)
        assert sender.stats.last_error is not None
        assert sender.stats.last_error.startswith("UNAVAILABLE")

        # New entries go out as soon as they are queued, not at the next poll.
        started = time.monotonic()
        for n in range(5, 8):
            queue.append(request(n))
            sender.notify()
        await wait_until(lambda: servicer.accepted[-1:] == [7], timeout_s=2)
        assert time.monotonic() - started < 1
        assert servicer.accepted == [0, 3, 4, 5, 6, 7]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        queue.close()


async def test_an_unreachable_gateway_keeps_everything(tmp_path: Path) -> None:
    with TelemetryQueue(tmp_path / "q.sqlite3", max_bytes=10**6, max_entries=100) as queue:
        for n in range(3):
            queue.append(request(n))
        sender = MetricsSender(
            queue, "127.0.0.1:1", grpc.local_channel_credentials(LOCAL), max_backoff_s=0.05
        )
        task = asyncio.create_task(sender.run())
        try:
            await wait_until(lambda: sender.stats.retries >= 3)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert queue.depth == 3
        assert queue.dropped() == {"queue_full": 0, "rejected": 0}
