"""`yakpanel serve`: one service in its own process against external DSNs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from yakpanel.embedded import EmbeddedPostgres, free_port

from ..conftest import create_database, drop_database

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]

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


@pytest.mark.parametrize("service", ["api"])
def test_serve_refuses_to_start_without_external_dsns(service: str) -> None:
    result = subprocess.run(
        [*YAKPANEL, "serve", service], env=_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "YAKPANEL_POSTGRES_DSN" in result.stderr
    assert "yakpanel up" in result.stderr


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
