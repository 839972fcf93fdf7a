"""Encoding of the live partial rollups published to `yak.rollups.v1`.

One record per 10 s partial: key = series_id as decimal ASCII; value = UTF-8 JSON
`{"tenant_id", "series_id" (decimal string: JSON numbers lose 64-bit precision), "tier",
"bucket" (unix s), "min", "max", "sum", "count", "last_ts" (unix ms), "last_value",
"source": "<topic>:<partition>:<first>-<last>@<first timestamp>"}`.

Each record is a partial of its bucket, merged like the rollup table rows. Delivery is
at-least-once (a replayed batch publishes again), so a consumer that sums partials drops
a repeat of (`series_id`, `bucket`, `source`).
"""

from __future__ import annotations

import json

import polars as pl

from ingest.aggregator.writer import BatchSource


def origin_of(source: BatchSource) -> str:
    return (
        f"{source.topic}:{source.partition}:{source.first_offset}-{source.last_offset}"
        f"@{source.first_timestamp}"
    )


def encode_partials(
    rows: pl.DataFrame, tier: str, source: BatchSource
) -> list[tuple[bytes, bytes]]:
    """(key, value) records for the partial rollups of one batch (see `rollup.rollup`)."""
    if rows.is_empty():
        return []
    origin = origin_of(source)
    finite = rows.select(
        pl.all_horizontal(pl.col("min", "max", "sum", "last_value").is_finite().all())
    ).item()
    if not finite:
        # JSON has no NaN or infinity: the standard encoder refuses them, as before.
        return _encode_rows(rows, tier, origin)
    # The same JSON as `json.dumps(value, separators=(",", ":"))`, encoded by polars.
    sid = pl.col("series_id").cast(pl.String)
    encoded = rows.select(
        sid.cast(pl.Binary).alias("key"),
        pl.struct(
            pl.col("tenant_id"),
            sid.alias("series_id"),
            pl.lit(tier).alias("tier"),
            pl.col("bucket"),
            pl.col("min"),
            pl.col("max"),
            pl.col("sum"),
            pl.col("count"),
            pl.col("last_ts"),
            pl.col("last_value"),
            pl.lit(origin).alias("source"),
        )
        .struct.json_encode()
        .cast(pl.Binary)
        .alias("value"),
    )
    return list(zip(encoded["key"].to_list(), encoded["value"].to_list(), strict=True))


def _encode_rows(rows: pl.DataFrame, tier: str, origin: str) -> list[tuple[bytes, bytes]]:
    records = []
    for r in rows.iter_rows(named=True):
        sid = str(r["series_id"])
        value = {
            "tenant_id": r["tenant_id"],
            "series_id": sid,
            "tier": tier,
            "bucket": r["bucket"],
            "min": r["min"],
            "max": r["max"],
            "sum": r["sum"],
            "count": r["count"],
            "last_ts": r["last_ts"],
            "last_value": r["last_value"],
            "source": origin,
        }
        body = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
        records.append((sid.encode(), body))
    return records
