"""The ClickHouse metric tables (`ingest/schema/0001_metrics.sql`), for writers and readers.

Tables (all keyed by `tenant_id` first; every query filters on the caller's tenant):

`metric_series` — ReplacingMergeTree(last_seen), ORDER BY (tenant_id, metric, series_id).
    One row per series: `metric` (Prometheus-style name), `labels` Map(name → value) with
    the data-point attributes, selected resource attributes (`host_name`, `service_name`,
    `service_instance_id`) and always `server_id`; `server_id` UUID; `first_seen`,
    `last_seen` (sample time, ms). Rows are rewritten as a series stays active (at most
    every 15 minutes of sample time), so read it with `FINAL` or `argMax(…, last_seen)`;
    `last_seen` is therefore up to 15 minutes behind the newest sample.

`samples_raw` — MergeTree, PARTITION BY day, ORDER BY (tenant_id, series_id, ts),
    TTL 2 days. Every sample kept by the late policy: `ts` DateTime64(3), `value` Float64.

`rollup_10s`, `rollup_1m`, `rollup_1h` — AggregatingMergeTree,
    ORDER BY (tenant_id, series_id, bucket), PARTITION BY day (1 h tier: month),
    TTL `bucket + toIntervalDay(retention_days)`. `bucket` DateTime is the bucket start.
    Rows are *partials*: background merges combine them, but a query must always merge
    what is not merged yet:

        SELECT series_id, bucket,
               min(min) AS min, max(max) AS max, sum(sum) AS sum, sum(count) AS count,
               max(last).2 AS last              -- value at the latest timestamp
        FROM rollup_1m
        WHERE tenant_id = {tenant:UUID} AND series_id IN (…) AND bucket >= … AND bucket < …
        GROUP BY series_id, bucket

    `last` is max of (ts, value): the value at the latest sample timestamp, ties broken by
    the larger value. `retention_days` = the tenant plan's metric retention capped per
    tier: 10 s keeps min(plan, 3) days, 1 m min(plan, 30), 1 h the plan's days.

`ingest_batches` — the aggregator's own bookkeeping (offset ranges it started writing);
    not for queries.

Series identity: `series_id` = first 8 bytes, big-endian, of BLAKE2b-512 over
`"<tenant_id>\\n<metric>{k="v",…}"` (labels sorted, values escaped as in Prometheus) —
`ingest.aggregator.decode.series_id_of` computes it.

Counters (cumulative OTLP sums, histogram `_bucket`/`_count`/`_sum`) are stored as
reported; rates are computed at query time from `last` (or raw samples), resetting where
the value drops.
"""

from __future__ import annotations

SERIES_TABLE = "metric_series"
RAW_TABLE = "samples_raw"
RAW_RETENTION_DAYS = 2
ROLLUP_10S_TABLE = "rollup_10s"
ROLLUP_1M_TABLE = "rollup_1m"
ROLLUP_1H_TABLE = "rollup_1h"
BATCHES_TABLE = "ingest_batches"

METRIC_TABLES = (
    SERIES_TABLE,
    RAW_TABLE,
    ROLLUP_10S_TABLE,
    ROLLUP_1M_TABLE,
    ROLLUP_1H_TABLE,
    BATCHES_TABLE,
)

# Select-list that merges the partial rows of a rollup table (use with GROUP BY).
ROLLUP_MERGE_COLUMNS = (
    "min(min) AS min, max(max) AS max, sum(sum) AS sum, sum(count) AS count, max(last) AS last"
)
