"""The metrics aggregator: `yak.metrics.v1` → polars rollups → ClickHouse.

`decode` (OTLP → samples), `rollup` (pure partial aggregates and the late policy),
`batching` (per-partition offset ranges), `writer` (idempotent ClickHouse inserts) and
`service` (the Kafka consumer that runs them). The tables are described in
`ingest/schema/0001_metrics.sql` and docs/metrics.md.
"""
