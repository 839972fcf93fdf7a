"""Writes an `AggregateBatch` to ClickHouse, idempotently per Kafka offset range.

Every insert carries `insert_deduplication_token = "<part>:<topic>:<partition>:<first>-<last>"`
and the tables keep `non_replicated_deduplication_window` recent tokens, so a batch
replayed after a crash (its offsets were not committed) is dropped by ClickHouse, table by
table, whichever inserts had completed.

A replay only dedups if it covers the same offsets. Before its inserts the writer records
the range in `ingest_batches`; on (re)assignment the consumer loads the ranges recorded
from its position on (`recorded_batches()`) and cuts its batches at the same offsets (the
ClickHouse Kafka Connect sink keeps the same kind of state for the same reason).

`metric_series` is a ReplacingMergeTree on `last_seen`: the newest row wins merges, so each
row must carry the true `first_seen`. The writer remembers the series it wrote (bounded),
reads `first_seen` of the ones it does not know, and rewrites a series row only when its
`last_seen` moved by more than `series_refresh_ms`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import polars as pl

from ingest.aggregator.rollup import TIERS, AggregateBatch, RollupTier
from ingest.metrics_schema import BATCHES_TABLE, RAW_TABLE, SERIES_TABLE

_MS = pl.Datetime("ms", "UTC")


@dataclass(frozen=True)
class BatchSource:
    """The contiguous offsets of one partition a batch was built from.

    `first_timestamp` is the Kafka timestamp (ms) of the first record: it tells apart two
    incarnations of a log whose offsets restarted (the embedded broker keeps nothing across
    a restart), which would otherwise reuse the deduplication tokens of the old one.
    """

    topic: str
    partition: int
    first_offset: int
    last_offset: int
    first_timestamp: int

    def token(self, part: str) -> str:
        return (
            f"{part}:{self.topic}:{self.partition}:{self.first_offset}-{self.last_offset}"
            f"@{self.first_timestamp}"
        )


@dataclass(frozen=True)
class WriteReport:
    series_rows: int
    raw_rows: int
    rollup_rows: int
    seconds: float


def _datetime_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


class ClickHouseWriter:
    """Writes series, raw samples and the rollup tiers through a clickhouse-connect client.

    Synchronous (clickhouse-connect and chDB are); call it from one thread at a time.
    """

    def __init__(
        self,
        client: Any,
        database: str,
        tiers: tuple[RollupTier, ...] = TIERS,
        series_refresh_ms: int = 15 * 60 * 1000,
        series_cache_size: int = 1_000_000,
    ) -> None:
        self.client = client
        self.database = database
        self.tiers = tiers
        self.series_refresh_ms = series_refresh_ms
        self.series_cache_size = series_cache_size
        # series_id -> (first_seen, last_seen written) in unix ms
        self._series: dict[int, tuple[int, int]] = {}

    def _table(self, name: str) -> str:
        return f"`{self.database}`.{name}"

    def recorded_batches(
        self, topic: str, partition: int, from_offset: int, limit: int = 100_000
    ) -> dict[tuple[int, int], int]:
        """Ranges recorded for this partition from `from_offset` on:
        (first_offset, first_timestamp) -> last_offset."""
        result = self.client.query(
            "SELECT first_offset, max(last_offset), first_timestamp"
            f" FROM {self._table(BATCHES_TABLE)}"
            " WHERE topic = {topic:String} AND partition = {partition:UInt32}"
            " AND first_offset >= {start:UInt64}"
            " GROUP BY first_offset, first_timestamp ORDER BY first_offset LIMIT {limit:UInt32}",
            parameters={
                "topic": topic,
                "partition": partition,
                "start": from_offset,
                "limit": limit,
            },
        )
        return {(int(first), int(ts)): int(last) for first, last, ts in result.result_rows}

    def write(self, batch: AggregateBatch, source: BatchSource) -> WriteReport:
        started = time.perf_counter()
        self._record_intent(source)
        series_rows = self._write_series(batch.samples, source)
        raw = batch.samples.select("tenant_id", "series_id", pl.col("ts").cast(_MS), "value")
        self._insert_frame(RAW_TABLE, raw, source.token("raw"))
        rollup_rows = 0
        for tier in self.tiers:
            rows = batch.rollups.get(tier.name)
            if rows is None or rows.is_empty():
                continue
            self._insert_frame(tier.table, self.tier_rows(rows, tier), source.token(tier.name))
            rollup_rows += rows.height
        return WriteReport(series_rows, raw.height, rollup_rows, time.perf_counter() - started)

    @staticmethod
    def tier_rows(rows: pl.DataFrame, tier: RollupTier) -> pl.DataFrame:
        """A rollup frame in the shape of the tier's table."""
        return rows.select(
            "tenant_id",
            "series_id",
            pl.from_epoch(pl.col("bucket"), time_unit="s").dt.replace_time_zone("UTC"),
            "min",
            "max",
            "sum",
            "count",
            pl.struct(
                pl.col("last_ts").cast(_MS).alias("ts"), pl.col("last_value").alias("value")
            ).alias("last"),
            tier.retention_days(pl.col("retention_days")).alias("retention_days"),
        )

    def _insert_frame(self, table: str, frame: pl.DataFrame, token: str) -> None:
        if frame.is_empty():
            return
        self.client.insert_arrow(
            self._table(table),
            frame.to_arrow(),
            settings={"insert_deduplication_token": token},
        )

    def _record_intent(self, source: BatchSource) -> None:
        self.client.insert(
            self._table(BATCHES_TABLE),
            [
                [
                    source.topic,
                    source.partition,
                    source.first_offset,
                    source.last_offset,
                    source.first_timestamp,
                ]
            ],
            column_names=["topic", "partition", "first_offset", "last_offset", "first_timestamp"],
            settings={"insert_deduplication_token": source.token("intent")},
        )

    def _write_series(self, samples: pl.DataFrame, source: BatchSource) -> int:
        if samples.is_empty():
            return 0
        seen = samples.group_by("series_id").agg(
            pl.col("tenant_id").first(),
            pl.col("server_id").first(),
            pl.col("metric").first(),
            pl.col("labels").first(),
            first_seen=pl.col("ts").min(),
            last_seen=pl.col("ts").max(),
        )
        due = [
            row
            for row in seen.iter_rows(named=True)
            if (known := self._series.get(row["series_id"])) is None
            or row["first_seen"] < known[0]
            or row["last_seen"] - known[1] >= self.series_refresh_ms
        ]
        if not due:
            return 0
        stored = self._stored_first_seen(
            [r["series_id"] for r in due if r["series_id"] not in self._series]
        )
        rows = []
        updates: dict[int, tuple[int, int]] = {}
        for r in due:
            sid = r["series_id"]
            known = self._series.get(sid)
            firsts = [r["first_seen"]]
            if known is not None:
                firsts.append(known[0])
            if sid in stored:
                firsts.append(stored[sid])
            first = min(firsts)
            last = max(r["last_seen"], known[1] if known else r["last_seen"])
            labels = {item["key"]: item["value"] for item in r["labels"]}
            rows.append(
                [
                    r["tenant_id"],
                    sid,
                    r["metric"],
                    labels,
                    r["server_id"],
                    _datetime_ms(first),
                    _datetime_ms(last),
                ]
            )
            updates[sid] = (first, last)
        self.client.insert(
            self._table(SERIES_TABLE),
            rows,
            column_names=[
                "tenant_id",
                "series_id",
                "metric",
                "labels",
                "server_id",
                "first_seen",
                "last_seen",
            ],
            settings={"insert_deduplication_token": source.token("series")},
        )
        if len(self._series) + len(updates) > self.series_cache_size:
            self._series.clear()
        self._series.update(updates)
        return len(rows)

    def _stored_first_seen(self, series_ids: list[int]) -> dict[int, int]:
        found: dict[int, int] = {}
        for start in range(0, len(series_ids), 10_000):
            chunk = series_ids[start : start + 10_000]
            result = self.client.query(
                "SELECT series_id, toUnixTimestamp64Milli(min(first_seen))"
                f" FROM {self._table(SERIES_TABLE)}"
                " WHERE series_id IN {ids:Array(UInt64)} GROUP BY series_id",
                parameters={"ids": chunk},
            )
            found.update((int(sid), int(ms)) for sid, ms in result.result_rows)
        return found
