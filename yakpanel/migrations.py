"""Schema migrations for PostgreSQL and ClickHouse.

Migrations are numbered SQL files (`0001_name.sql`) that live with the package owning
the tables. Applied ones are recorded with a checksum; a run is serialized across
processes by a PostgreSQL advisory lock (ClickHouse migrations run under the same
lock), so `yakpanel migrate` is safe to start from several replicas at once and a
second run changes nothing.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from typing import Any

import psycopg

log = logging.getLogger(__name__)

# A fixed 64-bit key: "yakpanel migrations".
ADVISORY_LOCK_KEY = 0x59414B4D49475241
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    """A migration could not be applied or the recorded history disagrees with the files."""


@dataclass(frozen=True)
class Migration:
    source: str
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def label(self) -> str:
        return f"{self.source}/{self.version:04d}_{self.name}"


@dataclass(frozen=True)
class MigrationSource:
    """A named folder of migrations inside a package."""

    name: str
    package: str
    folder: str

    def load(self) -> list[Migration]:
        root = importlib.resources.files(self.package).joinpath(self.folder)
        return load_folder(self.name, root)


def load_folder(source: str, root: Traversable) -> list[Migration]:
    found: dict[int, Migration] = {}
    if not root.is_dir():
        return []
    for entry in root.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(entry.name)
        if match is None:
            raise MigrationError(f"{source}: {entry.name} is not named NNNN_lowercase_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"{source}: two migrations numbered {version:04d}")
        found[version] = Migration(source, version, match.group(2), entry.read_text("utf-8"))
    return [found[v] for v in sorted(found)]


POSTGRES_SOURCES: tuple[MigrationSource, ...] = (
    MigrationSource("controlplane", "controlplane", "schema"),
)
CLICKHOUSE_SOURCES: tuple[MigrationSource, ...] = (MigrationSource("ingest", "ingest", "schema"),)


def _check_history(applied: dict[tuple[str, int], str], migrations: Iterable[Migration]) -> None:
    for m in migrations:
        recorded = applied.get((m.source, m.version))
        if recorded is not None and recorded != m.checksum:
            raise MigrationError(
                f"{m.label} was changed after it was applied; add a new migration instead"
            )


class PostgresMigrator:
    TABLE = "yak_schema_migrations"

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        if not conn.autocommit:
            raise ValueError("the migrator needs an autocommit connection")
        self.conn = conn

    def lock(self) -> None:
        self.conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))

    def unlock(self) -> None:
        self.conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))

    def applied(self) -> dict[tuple[str, int], str]:
        self.conn.execute(
            f"""CREATE TABLE IF NOT EXISTS {self.TABLE} (
                source text NOT NULL,
                version integer NOT NULL,
                name text NOT NULL,
                checksum text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (source, version))"""
        )
        rows = self.conn.execute(f"SELECT source, version, checksum FROM {self.TABLE}").fetchall()
        return {(r[0], r[1]): r[2] for r in rows}

    def apply(self, migrations: list[Migration]) -> list[Migration]:
        """Apply what is pending, each migration in its own transaction. Caller holds the lock."""
        done = self.applied()
        _check_history(done, migrations)
        applied = []
        for m in migrations:
            if (m.source, m.version) in done:
                continue
            try:
                with self.conn.transaction():
                    self.conn.execute(m.sql.encode())
                    self.conn.execute(
                        f"INSERT INTO {self.TABLE} (source, version, name, checksum)"
                        " VALUES (%s, %s, %s, %s)",
                        (m.source, m.version, m.name, m.checksum),
                    )
            except psycopg.Error as exc:
                raise MigrationError(f"{m.label} failed: {exc}") from exc
            log.info("applied postgres migration", extra={"migration": m.label})
            applied.append(m)
        return applied


def split_statements(sql: str) -> list[str]:
    """Split a ClickHouse migration into statements: each ends with `;` at a line end."""
    statements: list[str] = []
    current: list[str] = []
    for line in sql.splitlines():
        if line.strip().startswith("--"):
            continue
        current.append(line)
        if line.rstrip().endswith(";"):
            text = "\n".join(current).strip().rstrip(";").strip()
            if text:
                statements.append(text)
            current = []
    tail = "\n".join(current).strip()
    if tail:
        statements.append(tail)
    return statements


class ClickHouseMigrator:
    TABLE = "yak_schema_migrations"

    def __init__(self, client: Any, database: str) -> None:
        self.client = client
        self.database = database

    def applied(self) -> dict[tuple[str, int], str]:
        self.client.command(f"CREATE DATABASE IF NOT EXISTS `{self.database}`")
        self.client.command(
            f"""CREATE TABLE IF NOT EXISTS `{self.database}`.{self.TABLE} (
                source String, version UInt32, name String, checksum String,
                applied_at DateTime64(3, 'UTC') DEFAULT now64(3))
            ENGINE = ReplacingMergeTree ORDER BY (source, version)"""
        )
        result = self.client.query(
            f"SELECT source, version, checksum FROM `{self.database}`.{self.TABLE} FINAL"
        )
        return {(r[0], int(r[1])): r[2] for r in result.result_rows}

    def apply(self, migrations: list[Migration]) -> list[Migration]:
        done = self.applied()
        _check_history(done, migrations)
        applied = []
        for m in migrations:
            if (m.source, m.version) in done:
                continue
            # ClickHouse DDL is not transactional: statements must be idempotent
            # (IF NOT EXISTS), so a migration interrupted half-way can run again.
            for statement in split_statements(m.sql.replace("{database}", self.database)):
                try:
                    self.client.command(statement)
                except Exception as exc:
                    raise MigrationError(f"{m.label} failed: {exc}") from exc
            self.client.insert(
                f"`{self.database}`.{self.TABLE}",
                [[m.source, m.version, m.name, m.checksum]],
                column_names=["source", "version", "name", "checksum"],
            )
            log.info("applied clickhouse migration", extra={"migration": m.label})
            applied.append(m)
        return applied


@dataclass(frozen=True)
class MigrationReport:
    postgres: list[Migration]
    clickhouse: list[Migration]

    @property
    def changed(self) -> bool:
        return bool(self.postgres or self.clickhouse)


def migrate_all(
    postgres_dsn: str,
    clickhouse_client: Any,
    clickhouse_database: str,
    postgres_migrations: list[Migration] | None = None,
    clickhouse_migrations: list[Migration] | None = None,
) -> MigrationReport:
    pg = postgres_migrations
    if pg is None:
        pg = [m for s in POSTGRES_SOURCES for m in s.load()]
    ch = clickhouse_migrations
    if ch is None:
        ch = [m for s in CLICKHOUSE_SOURCES for m in s.load()]
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        migrator = PostgresMigrator(conn)
        migrator.lock()
        try:
            pg_applied = migrator.apply(pg)
            ch_applied = ClickHouseMigrator(clickhouse_client, clickhouse_database).apply(ch)
        finally:
            migrator.unlock()
    return MigrationReport(pg_applied, ch_applied)
