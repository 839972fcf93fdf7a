-- Metric series and samples written by the aggregator (ingest/aggregator); see docs/metrics.md.
-- Every statement is idempotent: an interrupted run can be repeated.

-- One row per series; merges keep the row with the latest last_seen.
CREATE TABLE IF NOT EXISTS {database}.metric_series (
    tenant_id UUID,
    series_id UInt64,
    metric LowCardinality(String),
    labels Map(LowCardinality(String), String),
    server_id UUID,
    first_seen DateTime64(3, 'UTC'),
    last_seen DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(last_seen)
ORDER BY (tenant_id, metric, series_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- Raw samples, kept two days (recent high-resolution views, debugging).
CREATE TABLE IF NOT EXISTS {database}.samples_raw (
    tenant_id UUID,
    series_id UInt64,
    ts DateTime64(3, 'UTC'),
    value Float64
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(ts)
ORDER BY (tenant_id, series_id, ts)
TTL toDateTime(ts) + INTERVAL 2 DAY
SETTINGS non_replicated_deduplication_window = 10000;

-- Rollup tiers: partial aggregates per (series, bucket), merged by queries with
-- GROUP BY and min(min), max(max), sum(sum), sum(count), max(last).
CREATE TABLE IF NOT EXISTS {database}.rollup_10s (
    tenant_id UUID,
    series_id UInt64,
    bucket DateTime('UTC'),
    min SimpleAggregateFunction(min, Float64),
    max SimpleAggregateFunction(max, Float64),
    sum SimpleAggregateFunction(sum, Float64),
    count SimpleAggregateFunction(sum, UInt64),
    last SimpleAggregateFunction(max, Tuple(DateTime64(3, 'UTC'), Float64)),
    retention_days SimpleAggregateFunction(max, UInt16)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMMDD(bucket)
ORDER BY (tenant_id, series_id, bucket)
TTL bucket + toIntervalDay(retention_days)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS {database}.rollup_1m (
    tenant_id UUID,
    series_id UInt64,
    bucket DateTime('UTC'),
    min SimpleAggregateFunction(min, Float64),
    max SimpleAggregateFunction(max, Float64),
    sum SimpleAggregateFunction(sum, Float64),
    count SimpleAggregateFunction(sum, UInt64),
    last SimpleAggregateFunction(max, Tuple(DateTime64(3, 'UTC'), Float64)),
    retention_days SimpleAggregateFunction(max, UInt16)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMMDD(bucket)
ORDER BY (tenant_id, series_id, bucket)
TTL bucket + toIntervalDay(retention_days)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS {database}.rollup_1h (
    tenant_id UUID,
    series_id UInt64,
    bucket DateTime('UTC'),
    min SimpleAggregateFunction(min, Float64),
    max SimpleAggregateFunction(max, Float64),
    sum SimpleAggregateFunction(sum, Float64),
    count SimpleAggregateFunction(sum, UInt64),
    last SimpleAggregateFunction(max, Tuple(DateTime64(3, 'UTC'), Float64)),
    retention_days SimpleAggregateFunction(max, UInt16)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (tenant_id, series_id, bucket)
TTL bucket + toIntervalDay(retention_days)
SETTINGS non_replicated_deduplication_window = 10000;

-- Offset ranges the aggregator started writing (before its inserts), so that a replay
-- after a crash cuts the same batches and its deduplication tokens match.
CREATE TABLE IF NOT EXISTS {database}.ingest_batches (
    topic String,
    partition UInt32,
    first_offset UInt64,
    last_offset UInt64,
    first_timestamp Int64,
    written_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY (topic, partition, first_offset, first_timestamp)
TTL toDateTime(written_at) + INTERVAL 7 DAY
SETTINGS non_replicated_deduplication_window = 10000;
