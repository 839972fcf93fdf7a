"""Ingest: the gRPC gateway and the Kafka → polars → ClickHouse aggregator, with the
ClickHouse schema (migrations in `schema/`) and query layer."""
