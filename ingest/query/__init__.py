"""The metrics query layer: PromQL and bucketed queries over the ClickHouse metric tables.

Published for the other services (the control plane's HTTP API, alerting, dashboards):

- `MetricsQueries(store, clock)` — `instant`, `range` (PromQL), `series`,
  `label_names`, `label_values`, `buckets` (exact per-step aggregates);
- `ClickHouseStore(client_factory, database)` — the store over the metric tables;
  `MemoryStore` — the same semantics in memory (tests, fakes);
- `QueryError` (`kind` = Prometheus `errorType`), `parse_selectors`, `parse_matcher`;
- the Prometheus HTTP API's wire format: `parse_time`, `parse_duration`,
  `PrometheusParams`, `prometheus_data`, `prometheus_success`, `prometheus_error`,
  `prometheus_openapi`, `ERROR_STATUS`.

Every call takes the caller's tenant id, resolved from its identity by the caller. See
docs/query.md for tiers, the PromQL subset and the limits.
"""

from ingest.query.clickhouse import ClickHouseStore
from ingest.query.engine import (
    AGGREGATIONS,
    MAX_POINTS_PER_SERIES,
    Aggregation,
    BucketResult,
    BucketSeries,
    MetricsQueries,
    QueryResult,
    SeriesValues,
    parse_selectors,
)
from ingest.query.errors import ErrorKind, QueryError
from ingest.query.matchers import (
    LABEL_NAME,
    METRIC_LABEL,
    METRIC_NAME,
    LabelMatcher,
    Selector,
    metric_selector,
    parse_matcher,
)
from ingest.query.memory import MemoryStore
from ingest.query.promql import DEFAULT_LOOKBACK_MS, Limits
from ingest.query.store import MetricStore, SeriesRef
from ingest.query.tiers import TIERS, Tier
from ingest.query.wire import ERROR_STATUS, PrometheusParams, parse_duration, parse_time
from ingest.query.wire import error as prometheus_error
from ingest.query.wire import openapi as prometheus_openapi
from ingest.query.wire import query_data as prometheus_data
from ingest.query.wire import success as prometheus_success

__all__ = [
    "AGGREGATIONS",
    "DEFAULT_LOOKBACK_MS",
    "ERROR_STATUS",
    "LABEL_NAME",
    "MAX_POINTS_PER_SERIES",
    "METRIC_LABEL",
    "METRIC_NAME",
    "TIERS",
    "Aggregation",
    "BucketResult",
    "BucketSeries",
    "ClickHouseStore",
    "ErrorKind",
    "LabelMatcher",
    "Limits",
    "MemoryStore",
    "MetricStore",
    "MetricsQueries",
    "PrometheusParams",
    "QueryError",
    "QueryResult",
    "Selector",
    "SeriesRef",
    "SeriesValues",
    "Tier",
    "metric_selector",
    "parse_duration",
    "parse_matcher",
    "parse_selectors",
    "parse_time",
    "prometheus_data",
    "prometheus_error",
    "prometheus_openapi",
    "prometheus_success",
]
