"""The real ClickHouse engine (chDB) through clickhouse-connect."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.clickhouse


def test_rows_written_are_read_back(ch_client: Any) -> None:
    ch_client.command(
        "CREATE TABLE samples (server_id String, ts DateTime64(3, 'UTC'), value Float64)"
        " ENGINE = MergeTree ORDER BY (server_id, ts)"
    )
    rows = [[f"srv-{i % 3}", 1_700_000_000 + i, float(i)] for i in range(1000)]
    ch_client.insert("samples", rows, column_names=["server_id", "ts", "value"])
    result = ch_client.query(
        "SELECT server_id, count(), sum(value) FROM samples GROUP BY server_id ORDER BY server_id"
    )
    assert result.result_rows == [
        ("srv-0", 334, float(sum(range(0, 1000, 3)))),
        ("srv-1", 333, float(sum(range(1, 1000, 3)))),
        ("srv-2", 333, float(sum(range(2, 1000, 3)))),
    ]


def test_insert_deduplication_token_drops_a_replayed_batch(ch_client: Any) -> None:
    # The aggregator relies on this: a batch replayed after a crash is not doubled.
    ch_client.command(
        "CREATE TABLE raw (k UInt64) ENGINE = MergeTree ORDER BY k"
        " SETTINGS non_replicated_deduplication_window = 1000"
    )
    batch = [[i] for i in range(10)]
    for _ in range(3):
        ch_client.insert(
            "raw", batch, column_names=["k"], settings={"insert_deduplication_token": "p0-0-9"}
        )
    ch_client.insert(
        "raw", batch, column_names=["k"], settings={"insert_deduplication_token": "p0-10-19"}
    )
    assert ch_client.command("SELECT count() FROM raw") == 20


def test_each_test_has_its_own_database(ch_client: Any) -> None:
    assert ch_client.command("SELECT currentDatabase()").startswith("t_")
    assert (
        ch_client.command("SELECT count() FROM system.tables WHERE database = currentDatabase()")
        == 0
    )
