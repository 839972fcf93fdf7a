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
    origin = origin_of(source)
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
