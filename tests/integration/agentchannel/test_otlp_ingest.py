"""The gateway's OTLP metrics endpoint: identity from the certificate, limits, refusals.

Requests go over the plain generated OTLP stub (and once through the real OpenTelemetry
SDK exporter) with an enrolled agent's client certificate, as any OTel SDK would send.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiokafka import AIOKafkaConsumer
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from tests.support.otlp import GaugePoint, gauge_request
from yakpanel.services import Stack
from yakpanel.topics import METRICS

from .conftest import Channel, enroll_agent

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

MAX_DATAPOINTS = 100
MAX_NEW_SERIES = 50
MAX_REQUEST_BYTES = 16_384


@pytest.fixture(autouse=True)
def otlp_limits(stack: Stack) -> None:
    """Lower limits, set before the `channel` fixture starts the gateway (autouse runs first)."""
    stack.settings.otlp_max_datapoints = MAX_DATAPOINTS
    stack.settings.otlp_max_new_series_per_hour = MAX_NEW_SERIES
    stack.settings.otlp_max_request_bytes = MAX_REQUEST_BYTES


@dataclasses.dataclass
class Agent:
    server_id: str
    tenant_id: str
    key_pem: bytes
    cert_pem: bytes


async def new_agent(channel: Channel, name: str, tmp_path: Path) -> Agent:
    state = tmp_path / name
    server_id = await enroll_agent(channel, name, state)
    return Agent(
        server_id,
        channel.tenant.id,
        (state / "key.pem").read_bytes(),
        (state / "cert.pem").read_bytes(),
    )


async def export(
    channel: Channel, agent: Agent | None, request: ExportMetricsServiceRequest
) -> grpc.aio.AioRpcError | None:
    """Sends one Export; None on success, the error otherwise. Without an agent: the
    enrollment port with server-only TLS (no client certificate)."""
    if agent is None:
        creds = grpc.ssl_channel_credentials(root_certificates=channel.ca_pem)
        address = channel.enroll_address
    else:
        creds = grpc.ssl_channel_credentials(channel.ca_pem, agent.key_pem, agent.cert_pem)
        address = channel.address
    async with grpc.aio.secure_channel(address, creds) as ch:
        stub = metrics_service_pb2_grpc.MetricsServiceStub(ch)  # type: ignore[no-untyped-call]
        try:
            await stub.Export(request, timeout=20)
        except grpc.aio.AioRpcError as exc:
            return exc
    return None


def gauges(names: list[str], host: str = "web-1", **resource: str) -> ExportMetricsServiceRequest:
    now_ms = int(time.time() * 1000)
    req = ExportMetricsServiceRequest.FromString(
        gauge_request([GaugePoint(n, now_ms, 1.5) for n in names], host=host)
    )
    for key, value in resource.items():
        req.resource_metrics[0].resource.attributes.append(
            KeyValue(key=key, value=AnyValue(string_value=value))
        )
    return req


def series(count: int, start: int = 0) -> ExportMetricsServiceRequest:
    """One gauge with `count` series (distinct `cpu` attribute values)."""
    req = gauges(["system.cpu.time"])
    metric = req.resource_metrics[0].scope_metrics[0].metrics[0]
    template = metric.gauge.data_points[0]
    del metric.gauge.data_points[:]
    for i in range(start, start + count):
        point = metric.gauge.data_points.add()
        point.CopyFrom(template)
        point.attributes.append(KeyValue(key="cpu", value=AnyValue(string_value=str(i))))
    return req


async def read_metrics(channel: Channel, count: int, timeout_s: float = 20) -> list[Any]:
    topic = METRICS.full_name(channel.stack.topic_prefix)
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=channel.stack.kafka_bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    got: list[Any] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(got) < count and time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=300)).values():
                got.extend(messages)
    finally:
        await consumer.stop()
    assert len(got) == count, got
    return sorted(got, key=lambda m: m.timestamp)


def headers_of(message: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in message.headers}


def resource_attributes(value: bytes) -> dict[str, str]:
    req = ExportMetricsServiceRequest.FromString(value)
    return {kv.key: kv.value.string_value for kv in req.resource_metrics[0].resource.attributes}


async def test_export_is_stamped_with_the_certificate_identity(
    channel: Channel, tmp_path: Path
) -> None:
    agent = await new_agent(channel, "web-1", tmp_path)
    before = int(time.time() * 1000)
    request = gauges(["system.cpu.load", "system.memory.usage"])
    assert await export(channel, agent, request) is None
    after = int(time.time() * 1000)

    [message] = await read_metrics(channel, 1)
    assert message.key == agent.server_id.encode()
    headers = headers_of(message)
    assert headers["tenant_id"] == agent.tenant_id
    assert headers["server_id"] == agent.server_id
    assert before <= int(headers["received_at"]) <= after
    assert headers["retention_days"] == "90"  # the business plan
    assert ExportMetricsServiceRequest.FromString(message.value) == request
    assert channel.gateway.stats.metrics_requests == 1
    assert channel.gateway.stats.metrics_points == 2
    assert channel.gateway.stats.identity_overwrites == 0


async def test_claims_of_another_identity_are_overwritten(channel: Channel, tmp_path: Path) -> None:
    agent = await new_agent(channel, "web-1", tmp_path)
    other_server, other_tenant = str(uuid.uuid4()), str(uuid.uuid4())
    request = gauges(
        ["system.cpu.load"],
        server_id=other_server,
        tenant_id=other_tenant,
        **{"yakpanel.server_id": other_server, "yakpanel.tenant_id": agent.tenant_id},
    )
    assert await export(channel, agent, request) is None

    [message] = await read_metrics(channel, 1)
    assert message.key == agent.server_id.encode()
    assert headers_of(message)["server_id"] == agent.server_id
    attributes = resource_attributes(message.value)
    assert attributes == {
        "host.name": "web-1",
        "server_id": agent.server_id,
        "tenant_id": agent.tenant_id,
        "yakpanel.server_id": agent.server_id,
        "yakpanel.tenant_id": agent.tenant_id,
    }
    # The one true claim (yakpanel.tenant_id) is not an overwrite.
    assert channel.gateway.stats.identity_overwrites == 3


async def test_without_a_client_certificate_export_is_refused(channel: Channel) -> None:
    refused = await export(channel, None, gauges(["system.cpu.load"]))
    assert refused is not None
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "client certificate" in (refused.details() or "")
    assert channel.gateway.stats.metrics_requests == 0


async def test_a_revoked_certificate_is_refused_at_export(channel: Channel, tmp_path: Path) -> None:
    agent = await new_agent(channel, "web-1", tmp_path)
    base = f"/v1/tenants/{channel.tenant.id}/servers/{agent.server_id}/certificates"
    serial = (await channel.tenant.owner.get(base)).json()[0]["serial"]
    r = await channel.tenant.owner.post(f"{base}/{serial}/revoke", json={"reason": "stolen"})
    assert r.status_code == 200, r.text
    channel.gateway.controlplane._status_cache.clear()
    refused = await export(channel, agent, gauges(["system.cpu.load"]))
    assert refused is not None
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "revoked" in (refused.details() or "")


async def test_malformed_requests_are_invalid(channel: Channel, tmp_path: Path) -> None:
    agent = await new_agent(channel, "web-1", tmp_path)
    empty = await export(channel, agent, ExportMetricsServiceRequest())
    assert empty is not None
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT
    unnamed = await export(channel, agent, gauges([""]))
    assert unnamed is not None
    assert unnamed.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "name" in (unnamed.details() or "")


async def test_request_size_and_datapoint_limits(channel: Channel, tmp_path: Path) -> None:
    agent = await new_agent(channel, "web-1", tmp_path)
    other = await new_agent(channel, "web-2", tmp_path)

    big = gauges(["system.cpu.load"], padding="x" * (MAX_REQUEST_BYTES + 1))
    too_big = await export(channel, agent, big)
    assert too_big is not None
    assert too_big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (
        too_big.details() == f"request is {big.ByteSize()} bytes; the limit is {MAX_REQUEST_BYTES}"
    )

    too_many = await export(channel, agent, series(MAX_DATAPOINTS + 1))
    assert too_many is not None
    assert too_many.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"the limit is {MAX_DATAPOINTS}" in (too_many.details() or "")
    assert "otlp_max_datapoints" in (too_many.details() or "")

    # Nothing of the refused requests was stored or counted; the next request goes through.
    assert await export(channel, other, gauges(["system.cpu.load"])) is None
    [message] = await read_metrics(channel, 1)
    assert headers_of(message)["server_id"] == other.server_id
    assert channel.gateway.stats.refused["otlp:datapoints"] == 1
    assert channel.gateway.stats.refused["otlp:request_bytes"] == 1


async def test_a_cardinality_flood_is_refused_for_that_tenant_only(
    channel: Channel, tmp_path: Path
) -> None:
    agent = await new_agent(channel, "web-1", tmp_path)
    assert await export(channel, agent, series(30)) is None
    flood = await export(channel, agent, series(30, start=30))
    assert flood is not None
    assert flood.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = flood.details() or ""
    assert details.startswith("cardinality limit: ")
    assert f"the limit is {MAX_NEW_SERIES}" in details
    # Series it already has still flow; so does a small number of new ones.
    assert await export(channel, agent, series(30)) is None
    assert await export(channel, agent, series(20, start=30)) is None

    # Another tenant (starter plan: 15 days) has its own budget.
    other_tenant = await channel.api.create_tenant(plan="starter")
    other_channel = dataclasses.replace(channel, tenant=other_tenant)
    stranger = await new_agent(other_channel, "db-1", tmp_path)
    assert await export(channel, stranger, series(40)) is None

    messages = await read_metrics(channel, 4)
    last = headers_of(messages[-1])
    assert last["tenant_id"] == other_tenant.id
    assert last["server_id"] == stranger.server_id
    assert last["retention_days"] == "15"


async def test_the_opentelemetry_sdk_exporter_can_send(channel: Channel, tmp_path: Path) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    agent = await new_agent(channel, "web-1", tmp_path)
    exporter = OTLPMetricExporter(
        endpoint=f"https://{channel.address}",
        credentials=grpc.ssl_channel_credentials(channel.ca_pem, agent.key_pem, agent.cert_pem),
        timeout=20,
    )
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(
        metric_readers=[reader],
        resource=Resource.create({"service.name": "otel-sdk", "server_id": "spoofed"}),
    )
    try:
        counter = provider.get_meter("test").create_counter("app.requests")
        counter.add(3, {"route": "/"})
        # The SDK exporter is synchronous; the gateway runs on this event loop.
        assert await asyncio.to_thread(provider.force_flush, 20_000)
    finally:
        await asyncio.to_thread(provider.shutdown)

    # The flush and the reader's final collection at shutdown: two exports.
    messages = await read_metrics(channel, 2)
    assert {headers_of(m)["server_id"] for m in messages} == {agent.server_id}
    message = messages[0]
    attributes = resource_attributes(message.value)
    assert attributes["service.name"] == "otel-sdk"
    assert attributes["server_id"] == agent.server_id
    req = ExportMetricsServiceRequest.FromString(message.value)
    [metric] = req.resource_metrics[0].scope_metrics[0].metrics
    assert metric.name == "app.requests"
    assert metric.sum.data_points[0].as_int == 3
