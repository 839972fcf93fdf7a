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
`last_seen` moved by more than `series_refresh_ms`. The check is one join per batch, so a
batch of known series costs no Python work per series.
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
# Column types of the inserts made from Python rows (ingest/schema): given, they spare
# clickhouse-connect a DESCRIBE TABLE round trip per insert.
_BATCH_COLUMNS = ["topic", "partition", "first_offset", "last_offset", "first_timestamp"]
_BATCH_TYPES = ["String", "UInt32", "UInt64", "UInt64", "Int64"]
_SERIES_COLUMNS = [
    "tenant_id",
    "series_id",
    "metric",
    "labels",
    "server_id",
    "first_seen",
    "last_seen",
]
_SERIES_TYPES = [
    "UUID",
    "UInt64",
    "LowCardinality(String)",
    "Map(LowCardinality(String), String)",
    "UUID",
    "DateTime64(3, 'UTC')",
    "DateTime64(3, 'UTC')",
]
_KNOWN_SCHEMA = {"series_id": pl.UInt64, "known_first": pl.Int64, "known_last": pl.Int64}


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
        # series_id, known_first, known_last: first_seen and last_seen written, unix ms
        self._known = pl.DataFrame(schema=_KNOWN_SCHEMA)

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
        series_rows = self._write_series(batch.samples, source, batch.series)
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
            column_names=_BATCH_COLUMNS,
            column_type_names=_BATCH_TYPES,
            settings={"insert_deduplication_token": source.token("intent")},
        )

    def _write_series(
        self, samples: pl.DataFrame, source: BatchSource, series: pl.DataFrame | None = None
    ) -> int:
        """Writes the batch's series rows that are new or due a refresh. The series'
        description comes from `series` or, when it is None, from the samples' columns."""
        if samples.is_empty():
            return 0
        seen = samples.group_by("series_id").agg(
            first_seen=pl.col("ts").min(), last_seen=pl.col("ts").max()
        )
        due = seen.join(self._known, on="series_id", how="left").filter(
            pl.col("known_first").is_null()
            | (pl.col("first_seen") < pl.col("known_first"))
            | (pl.col("last_seen") - pl.col("known_last") >= self.series_refresh_ms)
        )
        if due.is_empty():
            return 0
        unknown = due.filter(pl.col("known_first").is_null())["series_id"].to_list()
        stored = self._stored_first_seen(unknown)
        stored_frame = pl.DataFrame(
            {"series_id": list(stored), "stored_first": list(stored.values())},
            schema={"series_id": pl.UInt64, "stored_first": pl.Int64},
        )
        due = due.join(stored_frame, on="series_id", how="left").select(
            "series_id",
            first=pl.min_horizontal("first_seen", "known_first", "stored_first"),
            last=pl.max_horizontal("last_seen", "known_last"),
        )
        if series is None:
            series = (
                samples.filter(pl.col("series_id").is_in(due["series_id"].implode()))
                .group_by("series_id")
                .agg(pl.col("tenant_id", "server_id", "metric", "labels").first())
            )
        described = due.join(
            series.select("series_id", "tenant_id", "server_id", "metric", "labels"),
            on="series_id",
            how="left",
        )
        rows = [
            [
                r["tenant_id"],
                r["series_id"],
                r["metric"],
                {item["key"]: item["value"] for item in r["labels"]},
                r["server_id"],
                _datetime_ms(r["first"]),
                _datetime_ms(r["last"]),
            ]
            for r in described.iter_rows(named=True)
        ]
        self.client.insert(
            self._table(SERIES_TABLE),
            rows,
            column_names=_SERIES_COLUMNS,
            column_type_names=_SERIES_TYPES,
            settings={"insert_deduplication_token": source.token("series")},
        )
        updates = due.select("series_id", known_first="first", known_last="last")
        known = self._known
        if known.height + updates.height > self.series_cache_size:
            known = known.clear()
        self._known = pl.concat([known.join(updates, on="series_id", how="anti"), updates])
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
