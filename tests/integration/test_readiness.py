"""`/healthz` and `/readyz` of the API against the real dependencies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from controlplane.app import create_app
from controlplane.service import ApiService
from yakpanel.embedded import EmbeddedBroker, free_port
from yakpanel.readiness import ClickHouseProbe, KafkaProbe, PostgresProbe
from yakpanel.services import Stack

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A broker this test may stop and start without disturbing the others."""
    broker = EmbeddedBroker(free_port(), log_path=tmp_path / "broker.log")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
async def api(stack: Stack, own_broker: EmbeddedBroker) -> AsyncIterator[str]:
    stack.kafka_bootstrap = own_broker.bootstrap
    stack.settings.readiness_timeout_s = 3.0
    service = ApiService(create_app(stack), "127.0.0.1", 0)
    await service.start()
    yield service.url
    await service.stop()


async def _ready(client: httpx.AsyncClient) -> httpx.Response:
    return await client.get("/readyz")


async def test_healthz_and_readyz_are_ok_when_everything_is_up(api: str) -> None:
    async with httpx.AsyncClient(base_url=api) as client:
        health = await client.get("/healthz")
        ready = await _ready(client)
    assert health.status_code == 200
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ok"
    assert {name: c["status"] for name, c in body["checks"].items()} == {
        "postgres": "ok",
        "kafka": "ok",
        "clickhouse": "ok",
    }


async def test_readyz_names_the_broker_while_it_is_down_and_recovers(
    api: str, own_broker: EmbeddedBroker
) -> None:
    async with httpx.AsyncClient(base_url=api, timeout=15) as client:
        assert (await _ready(client)).status_code == 200
        await asyncio.to_thread(own_broker.stop)

        down = await _ready(client)
        assert down.status_code == 503
        body = down.json()
        assert body["status"] == "unavailable"
        assert body["checks"]["kafka"]["status"] == "down"
        assert body["checks"]["kafka"]["error"]
        assert body["checks"]["postgres"]["status"] == "ok"
        assert body["checks"]["clickhouse"]["status"] == "ok"

        await asyncio.to_thread(own_broker.start)
        deadline = time.monotonic() + 20
        status = 0
        while time.monotonic() < deadline:
            status = (await _ready(client)).status_code
            if status == 200:
                break
            await asyncio.sleep(0.2)
        assert status == 200


async def test_readyz_names_postgres_when_it_cannot_be_reached(
    stack: Stack, tmp_path: Path
) -> None:
    probes = [
        PostgresProbe(f"postgresql://postgres@/postgres?host={tmp_path}/nowhere"),
        KafkaProbe(stack.kafka_bootstrap),
        ClickHouseProbe(stack.clickhouse),
    ]
    service = ApiService(create_app(stack, probes), "127.0.0.1", 0)
    await service.start()
    try:
        async with httpx.AsyncClient(base_url=service.url, timeout=15) as client:
            response = await _ready(client)
    finally:
        await service.stop()
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["postgres"]["status"] == "down"
    assert "nowhere" in checks["postgres"]["error"]
    assert checks["kafka"]["status"] == "ok"
