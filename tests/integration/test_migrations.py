"""Migrations against the real PostgreSQL and ClickHouse engines."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from yakpanel.clickhouse import ClickHouseTarget
from yakpanel.embedded import EmbeddedPostgres
from yakpanel.migrations import POSTGRES_SOURCES, MigrationError, load_folder, migrate_all

from ..conftest import create_database, drop_database

pytestmark = [pytest.mark.postgres, pytest.mark.clickhouse]

CH_MIGRATIONS = {
    "0001_samples.sql": """-- a table and a view in one migration
CREATE TABLE IF NOT EXISTS {database}.samples (k UInt64, v Float64)
ENGINE = MergeTree ORDER BY k;
CREATE VIEW IF NOT EXISTS {database}.sample_count AS SELECT count() AS n FROM {database}.samples;
""",
    "0002_add_column.sql": "ALTER TABLE {database}.samples ADD COLUMN IF NOT EXISTS note String;\n",
}


@pytest.fixture
def fresh_db(postgres_server: EmbeddedPostgres) -> Any:
    name, dsn = create_database(postgres_server.dsn)
    yield dsn
    drop_database(postgres_server.dsn, name)


def _pg_shape(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            """SELECT table_name, column_name, data_type, is_nullable
               FROM information_schema.columns WHERE table_schema = 'public'
               ORDER BY table_name, ordinal_position"""
        ).fetchall()


def _ch_folder(tmp_path: Path) -> Path:
    root = tmp_path / "ch"
    root.mkdir()
    for name, text in CH_MIGRATIONS.items():
        (root / name).write_text(text)
    return root


def test_migrations_apply_once_and_a_second_run_changes_nothing(
    fresh_db: str, ch_client: Any, clickhouse_target: ClickHouseTarget, tmp_path: Path
) -> None:
    ch = load_folder("test", _ch_folder(tmp_path))
    first = migrate_all(fresh_db, ch_client, clickhouse_target.database, clickhouse_migrations=ch)
    shipped = [m.label for s in POSTGRES_SOURCES for m in s.load()]
    assert [m.label for m in first.postgres] == shipped
    assert [m.label for m in first.clickhouse] == ["test/0001_samples", "test/0002_add_column"]
    pg_before = _pg_shape(fresh_db)
    ch_before = ch_client.query("SELECT name, type FROM system.columns WHERE table = 'samples'")

    second = migrate_all(fresh_db, ch_client, clickhouse_target.database, clickhouse_migrations=ch)
    assert not second.changed
    assert _pg_shape(fresh_db) == pg_before
    ch_after = ch_client.query("SELECT name, type FROM system.columns WHERE table = 'samples'")
    assert ch_after.result_rows == ch_before.result_rows
    with psycopg.connect(fresh_db) as conn:
        recorded = conn.execute("SELECT count(*) FROM yak_schema_migrations").fetchone()
    assert recorded == (len(shipped),)
    ch_client.insert("samples", [[1, 2.0, "x"]], column_names=["k", "v", "note"])
    assert ch_client.command("SELECT n FROM sample_count") == 1


def test_an_edited_migration_is_refused(
    fresh_db: str, ch_client: Any, clickhouse_target: ClickHouseTarget, tmp_path: Path
) -> None:
    root = _ch_folder(tmp_path)
    migrate_all(
        fresh_db,
        ch_client,
        clickhouse_target.database,
        clickhouse_migrations=load_folder("test", root),
    )
    (root / "0002_add_column.sql").write_text(
        "ALTER TABLE {database}.samples ADD COLUMN IF NOT EXISTS other String;\n"
    )
    with pytest.raises(MigrationError, match="changed after it was applied"):
        migrate_all(
            fresh_db,
            ch_client,
            clickhouse_target.database,
            clickhouse_migrations=load_folder("test", root),
        )


def test_a_failing_migration_leaves_nothing_half_applied(
    fresh_db: str, ch_client: Any, clickhouse_target: ClickHouseTarget, tmp_path: Path
) -> None:
    pg_root = tmp_path / "pg"
    pg_root.mkdir()
    (pg_root / "0001_ok.sql").write_text("CREATE TABLE a (x int);")
    (pg_root / "0002_broken.sql").write_text("CREATE TABLE b (y int); CREATE TABLE oops (;")
    with pytest.raises(MigrationError, match="0002_broken failed"):
        migrate_all(fresh_db, ch_client, clickhouse_target.database, load_folder("t", pg_root), [])
    with psycopg.connect(fresh_db) as conn:
        tables = {
            r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname='public'")
        }
        versions = conn.execute("SELECT version FROM yak_schema_migrations").fetchall()
    assert "a" in tables and "b" not in tables
    assert versions == [(1,)]


def test_concurrent_runs_are_serialized(
    fresh_db: str, clickhouse_target: ClickHouseTarget, tmp_path: Path
) -> None:
    pg_root = tmp_path / "pg"
    pg_root.mkdir()
    # Not idempotent on purpose: a second, unserialized application would fail.
    (pg_root / "0001_slow.sql").write_text("SELECT pg_sleep(0.3); CREATE TABLE once (x int);")
    errors: list[BaseException] = []
    applied: list[int] = []

    def run() -> None:
        client = clickhouse_target.client()
        try:
            report = migrate_all(
                fresh_db, client, clickhouse_target.database, load_folder("t", pg_root), []
            )
            applied.append(len(report.postgres))
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(applied) == [0, 0, 0, 1]
