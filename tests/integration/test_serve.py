"""`yakpanel serve`: one service in its own process against external DSNs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from yakpanel.embedded import EmbeddedPostgres, free_port
from yakpanel.topics import METRICS

from ..conftest import create_database, drop_database
from ..support.otlp import GaugePoint, gauge_request, metrics_headers
from .test_aggregator_crash import COUNT_SCRIPT, committed_total

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

YAKPANEL = [sys.executable, "-m", "yakpanel"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("YAKPANEL_")}
    env.update(extra)
    return env


def test_serve_api_against_external_services(
    pg_dsn: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    port = free_port()
    # The serving process has its own chDB path: chDB opens one path per process.
    env = _env(
        YAKPANEL_POSTGRES_DSN=pg_dsn,
        YAKPANEL_KAFKA_BOOTSTRAP=kafka_bootstrap,
        YAKPANEL_CLICKHOUSE_DSN=f"chdb://{tmp_path / 'ch'}",
        YAKPANEL_API_PORT=str(port),
    )
    proc = subprocess.Popen(
        [*YAKPANEL, "serve", "api"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code
            except httpx.TransportError:
                status = None
            if status == 200:
                break
            time.sleep(0.2)
        assert status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out.decode()


@pytest.mark.parametrize(
    ("service", "needed", "not_needed"),
    [
        ("api", ["POSTGRES", "KAFKA", "CLICKHOUSE"], []),
        ("worker", ["POSTGRES", "KAFKA"], ["CLICKHOUSE"]),
        ("gateway", ["KAFKA"], ["POSTGRES", "CLICKHOUSE"]),
        ("aggregator", ["KAFKA", "CLICKHOUSE"], ["POSTGRES"]),
    ],
)
def test_serve_refuses_to_start_without_the_dsns_the_service_needs(
    service: str, needed: list[str], not_needed: list[str]
) -> None:
    result = subprocess.run(
        [*YAKPANEL, "serve", service], env=_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    for name in needed:
        assert f"YAKPANEL_{name}_" in result.stderr
    for name in not_needed:
        assert f"YAKPANEL_{name}_" not in result.stderr
    assert "yakpanel up" in result.stderr


async def test_serve_aggregator_needs_no_postgres(
    pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """The production shape: a migrate job prepares ClickHouse, then the aggregator runs
    with Kafka and ClickHouse only and writes what arrives on yak.metrics.v1."""
    ch_dsn = f"chdb://{tmp_path / 'ch'}"
    common = {
        "YAKPANEL_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "YAKPANEL_KAFKA_TOPIC_PREFIX": topic_prefix,
        "YAKPANEL_CLICKHOUSE_DSN": ch_dsn,
        "YAKPANEL_CLICKHOUSE_DATABASE": "metrics",
        "YAKPANEL_AGGREGATOR_MAX_WAIT_S": "0.1",
    }
    migrated = await asyncio.to_thread(
        subprocess.run,
        [*YAKPANEL, "migrate"],
        env=_env(YAKPANEL_POSTGRES_DSN=pg_dsn, **common),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrated.returncode == 0, migrated.stderr
    topic = METRICS.full_name(topic_prefix)
    tenant, server = str(uuid.uuid4()), str(uuid.uuid4())
    now = int(time.time() * 1000)
    points = [GaugePoint("serve.check", now - k * 1000, float(k)) for k in range(7)]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            topic,
            gauge_request(points),
            key=server.encode(),
            headers=metrics_headers(tenant, server, now),
        )
    finally:
        await producer.stop()
    log_path = tmp_path / "aggregator.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
            [*YAKPANEL, "serve", "aggregator"], env=_env(**common), stdout=log, stderr=log
        )
    watcher = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap, group_id=f"{topic_prefix}aggregator"
    )
    await watcher.start()
    try:
        deadline = time.monotonic() + 60
        while await committed_total(watcher, topic) < 1:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            await asyncio.sleep(0.1)
    finally:
        await watcher.stop()
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 30)
    assert proc.returncode == 0, log_path.read_text()
    counted = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", COUNT_SCRIPT, ch_dsn, "SELECT count() FROM metrics.samples_raw"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert counted.returncode == 0, counted.stderr
    assert json.loads(counted.stdout) == [len(points)]


def test_serve_names_the_known_services_for_an_unknown_one() -> None:
    result = subprocess.run(
        [*YAKPANEL, "serve", "nope"], env=_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "unknown service 'nope'" in result.stderr
    assert "api" in result.stderr


def test_migrate_against_external_services_creates_schema_and_topics(
    postgres_server: EmbeddedPostgres, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    server_dsn = postgres_server.dsn
    name, dsn = create_database(server_dsn)
    env = _env(
        YAKPANEL_POSTGRES_DSN=dsn,
        YAKPANEL_KAFKA_BOOTSTRAP=kafka_bootstrap,
        YAKPANEL_KAFKA_TOPIC_PREFIX=topic_prefix,
        YAKPANEL_CLICKHOUSE_DSN=f"chdb://{tmp_path / 'ch'}",
    )
    try:
        first = subprocess.run(
            [*YAKPANEL, "migrate"], env=env, capture_output=True, text=True, timeout=120
        )
        assert first.returncode == 0, first.stderr
        assert "applied controlplane/0001_platform_staff" in first.stdout
        assert f"created topic {topic_prefix}yak.commands.v1" in first.stdout
        second = subprocess.run(
            [*YAKPANEL, "migrate"], env=env, capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 0, second.stderr
        assert "schema is up to date" in second.stdout
        assert "created topic" not in second.stdout
    finally:
        drop_database(server_dsn, name)
