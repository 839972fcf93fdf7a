from __future__ import annotations

from pathlib import Path

import pytest

from yakpanel.migrations import (
    CLICKHOUSE_SOURCES,
    POSTGRES_SOURCES,
    MigrationError,
    load_folder,
    split_statements,
)


def _write(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def test_files_load_in_numeric_order(tmp_path: Path) -> None:
    root = _write(tmp_path / "m", {"0002_b.sql": "B", "0001_a.sql": "A", "0010_c.sql": "C"})
    loaded = load_folder("s", root)
    assert [(m.version, m.name) for m in loaded] == [(1, "a"), (2, "b"), (10, "c")]
    assert loaded[0].checksum != loaded[1].checksum


@pytest.mark.parametrize("bad", ["1_a.sql", "0001-a.sql", "0001_A.sql", "0001_a b.sql"])
def test_badly_named_files_are_refused(tmp_path: Path, bad: str) -> None:
    root = _write(tmp_path / "m", {bad: "x"})
    with pytest.raises(MigrationError, match="is not named"):
        load_folder("s", root)


def test_duplicate_numbers_are_refused(tmp_path: Path) -> None:
    root = _write(tmp_path / "m", {"0001_a.sql": "A", "0001_b.sql": "B"})
    with pytest.raises(MigrationError, match="two migrations numbered 0001"):
        load_folder("s", root)


def test_split_statements_on_line_ending_semicolons() -> None:
    sql = """-- comment; not a statement
CREATE TABLE a (x String DEFAULT 'a;b')
ENGINE = MergeTree ORDER BY x;

CREATE TABLE b (y UInt8) ENGINE = Memory;
"""
    assert split_statements(sql) == [
        "CREATE TABLE a (x String DEFAULT 'a;b')\nENGINE = MergeTree ORDER BY x",
        "CREATE TABLE b (y UInt8) ENGINE = Memory",
    ]


def test_shipped_migrations_load() -> None:
    pg = [m for s in POSTGRES_SOURCES for m in s.load()]
    assert pg, "the control plane ships PostgreSQL migrations"
    assert [m.version for m in pg] == sorted(m.version for m in pg)
    for source in CLICKHOUSE_SOURCES:
        source.load()
