"""Malformed OTLP, an oversized request and a cardinality flood from one tenant each get
their documented error, while another tenant's samples keep arriving in ClickHouse, all of
them, through the real gateway, broker and aggregator."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from ingest.aggregator.config import AggregatorConfig
from ingest.aggregator.service import Aggregator
from yakpanel.migrations import CLICKHOUSE_SOURCES, ClickHouseMigrator
from yakpanel.services import Stack

from .conftest import Channel
from .test_otlp_ingest import (
    MAX_DATAPOINTS,
    MAX_NEW_SERIES,
    MAX_REQUEST_BYTES,
    Agent,
    export,
    gauges,
    new_agent,
    otlp_limits,  # noqa: F401 - autouse fixture: the low limits apply here too
    series,
)

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

EXPORT_METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
ROUNDS = 25
POINTS = 8  # per round of the well-behaved tenant


@pytest.fixture
async def aggregator(stack: Stack) -> AsyncIterator[Aggregator]:
    client = stack.clickhouse.client()
    try:
        migrations = [m for source in CLICKHOUSE_SOURCES for m in source.load()]
        await asyncio.to_thread(
            ClickHouseMigrator(client, stack.clickhouse.database).apply, migrations
        )
    finally:
        client.close()
    service = Aggregator(
        stack.kafka_bootstrap,
        stack.topic_prefix,
        stack.clickhouse.client,
        stack.clickhouse.database,
        AggregatorConfig(max_records=50, max_wait_s=0.1, session_timeout_ms=6000),
    )
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def raw_export(channel: Channel, agent: Agent, payload: bytes) -> grpc.aio.AioRpcError:
    """Sends bytes that are not an OTLP request as the body of `Export`."""
    creds = grpc.ssl_channel_credentials(channel.ca_pem, agent.key_pem, agent.cert_pem)
    async with grpc.aio.secure_channel(channel.address, creds) as ch:
        call = ch.unary_unary(EXPORT_METHOD)
        try:
            await call(payload, timeout=20)
        except grpc.aio.AioRpcError as exc:
            return exc
    raise AssertionError("garbage was accepted as an OTLP request")


async def count_samples(stack: Stack, server_id: str) -> int:
    def query() -> int:
        client = stack.clickhouse.client()
        try:
            return int(
                client.command(
                    "SELECT count() FROM samples_raw WHERE series_id IN "
                    "(SELECT series_id FROM metric_series WHERE server_id = {s:UUID})",
                    parameters={"s": server_id},
                )
            )
        finally:
            client.close()

    return await asyncio.to_thread(query)


async def test_abuse_by_one_tenant_is_refused_while_another_keeps_flowing(
    channel: Channel, aggregator: Aggregator, tmp_path: Path
) -> None:
    abuser = await new_agent(channel, "noisy-1", tmp_path)
    other_tenant = await channel.api.create_tenant(plan="business")
    other_channel = dataclasses.replace(channel, tenant=other_tenant)
    steady = await new_agent(other_channel, "steady-1", tmp_path)

    async def steady_stream() -> int:
        sent = 0
        for round_ in range(ROUNDS):
            request = gauges([f"steady.metric{i}" for i in range(POINTS)], host="steady-1")
            for point in request.resource_metrics[0].scope_metrics[0].metrics:
                point.gauge.data_points[0].time_unix_nano = (
                    int(time.time() * 1000) - round_
                ) * 1_000_000
            assert await export(channel, steady, request) is None
            sent += POINTS
            await asyncio.sleep(0.05)
        return sent

    async def abuse() -> dict[str, grpc.aio.AioRpcError | None]:
        outcomes: dict[str, grpc.aio.AioRpcError | None] = {}
        assert await export(channel, abuser, series(MAX_NEW_SERIES - 10)) is None
        for _ in range(3):
            outcomes["garbage"] = await raw_export(channel, abuser, b"\xff\x01not-protobuf")
            big = gauges(["system.cpu.load"], padding="x" * (MAX_REQUEST_BYTES + 1))
            outcomes["oversized"] = await export(channel, abuser, big)
            outcomes["datapoints"] = await export(channel, abuser, series(MAX_DATAPOINTS + 1))
            outcomes["flood"] = await export(channel, abuser, series(40, start=1000))
            await asyncio.sleep(0.05)
        return outcomes

    sent, outcomes = await asyncio.gather(steady_stream(), abuse())

    def refused(name: str, code: grpc.StatusCode, fragment: str) -> None:
        error = outcomes[name]
        assert error is not None, name
        assert error.code() == code, (name, error.code(), error.details())
        assert fragment in (error.details() or ""), (name, error.details())

    refused("garbage", grpc.StatusCode.INVALID_ARGUMENT, "not an OTLP")
    refused("oversized", grpc.StatusCode.RESOURCE_EXHAUSTED, f"the limit is {MAX_REQUEST_BYTES}")
    refused("datapoints", grpc.StatusCode.RESOURCE_EXHAUSTED, "otlp_max_datapoints")
    refused("flood", grpc.StatusCode.RESOURCE_EXHAUSTED, "cardinality limit: ")

    # Every sample of the other tenant is in ClickHouse; of the abuser, exactly the one
    # request that was within its limits.
    deadline = time.monotonic() + 30
    stored: dict[str, Any] = {}
    while time.monotonic() < deadline:
        stored = {
            "steady": await count_samples(channel.stack, steady.server_id),
            "abuser": await count_samples(channel.stack, abuser.server_id),
        }
        if stored == {"steady": sent, "abuser": MAX_NEW_SERIES - 10}:
            break
        await asyncio.sleep(0.2)
    assert stored == {"steady": sent, "abuser": MAX_NEW_SERIES - 10}
    assert aggregator.stats.dlq == 0
