"""`MetricStore` over the ClickHouse metric tables (docs/metrics.md), through one
clickhouse-connect client.

Every statement filters on the caller's tenant and binds every value as a query
parameter. Rollup partials are always merged in the query (min of `min`, max of `max`,
sum of `sum` and `count`, max of `last`), whether or not background merges ran.
Calls are synchronous and serialized on one client (chDB is one engine per process; a
clickhouse-connect client runs one query at a time): call them from a worker thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from clickhouse_connect.driver.exceptions import ClickHouseError, DatabaseError

from ingest.metrics_schema import SERIES_TABLE
from ingest.query.errors import QueryError
from ingest.query.matchers import METRIC_LABEL, Selector
from ingest.query.store import (
    LAST_SEEN_LAG_MS,
    Grouping,
    SampleBlock,
    SeriesCursor,
    SeriesRef,
)
from ingest.query.tiers import Tier

# ClickHouse error codes the query layer answers specifically.
_UNKNOWN_TABLE = 60
_TIMEOUT_EXCEEDED = 159
_TOO_SLOW = 160
_MEMORY_LIMIT_EXCEEDED = 241
_CANNOT_COMPILE_REGEXP = 427
_UNKNOWN_DATABASE = 81

# DateTime (UInt32 seconds) bounds: times outside clamp to these.
_MAX_S = 4_294_967_295
_MAX_MS = _MAX_S * 1000


def _clamp_ms(ms: int) -> int:
    return min(max(ms, 0), _MAX_MS)


class _Params:
    """Bound query parameters with generated names (never user text in SQL)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def bind(self, value: Any, type_: str) -> str:
        name = f"p{len(self.values)}"
        self.values[name] = value
        return "{" + name + ":" + type_ + "}"


def _selector_sql(selector: Selector, params: _Params) -> str:
    conditions = []
    for m in selector:
        name = m.name
        column = "metric" if name == METRIC_LABEL else f"labels[{params.bind(name, 'String')}]"
        if m.op == "=":
            conditions.append(f"{column} = {params.bind(m.value, 'String')}")
        elif m.op == "!=":
            conditions.append(f"{column} != {params.bind(m.value, 'String')}")
        elif m.op == "=~":
            conditions.append(f"match({column}, {params.bind(m.anchored, 'String')})")
        else:
            conditions.append(f"NOT match({column}, {params.bind(m.anchored, 'String')})")
    return "(" + (" AND ".join(conditions) or "1") + ")"


class ClickHouseStore:
    def __init__(
        self,
        client_factory: Callable[[], Any],
        database: str | None = None,
        max_execution_time_s: float = 30.0,
    ) -> None:
        self._client_factory = client_factory
        self._database = database
        self.max_execution_time_s = max_execution_time_s
        self._client: Any = None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _table(self, name: str) -> str:
        return f"`{self._database}`.{name}" if self._database else name

    def _run(self, method: str, sql: str, params: _Params, timeout_s: float | None) -> Any:
        budget = self.max_execution_time_s if timeout_s is None else timeout_s
        settings = {"max_execution_time": max(1, int(np.ceil(budget)))}
        with self._lock:
            try:
                if self._client is None:
                    self._client = self._client_factory()
                return getattr(self._client, method)(
                    sql, parameters=params.values, settings=settings
                )
            except DatabaseError as exc:
                raise _query_error(exc) from exc
            except ClickHouseError as exc:
                self._client = None  # reconnect next time
                raise QueryError("unavailable", f"the metrics store is unavailable: {exc}") from exc

    def _rows(self, sql: str, params: _Params, timeout_s: float | None = None) -> list[Any]:
        try:
            return list(self._run("query", sql, params, timeout_s).result_rows)
        except _EmptyStore:
            return []

    def _series_filter(
        self,
        tenant_id: str,
        selectors: Sequence[Selector],
        start_ms: int | None,
        end_ms: int | None,
        params: _Params,
    ) -> str:
        where = [f"tenant_id = {params.bind(tenant_id, 'UUID')}"]
        if selectors:
            where.append("(" + " OR ".join(_selector_sql(s, params) for s in selectors) + ")")
        if end_ms is not None:
            bound = params.bind(_clamp_ms(end_ms), "Int64")
            where.append(f"first_seen <= fromUnixTimestamp64Milli({bound}, 'UTC')")
        if start_ms is not None:
            bound = params.bind(_clamp_ms(start_ms - LAST_SEEN_LAG_MS), "Int64")
            where.append(f"last_seen >= fromUnixTimestamp64Milli({bound}, 'UTC')")
        return " AND ".join(where)

    def series(
        self,
        tenant_id: str,
        selectors: Sequence[Selector],
        start_ms: int | None,
        end_ms: int | None,
        limit: int,
        after: SeriesCursor | None = None,
    ) -> list[SeriesRef]:
        params = _Params()
        where = self._series_filter(tenant_id, selectors, start_ms, end_ms, params)
        if after is not None:
            metric, series_id = after
            where += (
                f" AND (metric, series_id) > ({params.bind(metric, 'String')},"
                f" {params.bind(series_id, 'UInt64')})"
            )
        rows = self._rows(
            f"SELECT series_id, metric, labels FROM {self._table(SERIES_TABLE)} FINAL"
            f" WHERE {where} ORDER BY metric, series_id LIMIT {params.bind(limit, 'UInt64')}",
            params,
        )
        return [
            SeriesRef(int(sid), tuple(sorted({**labels, METRIC_LABEL: metric}.items())))
            for sid, metric, labels in rows
        ]

    def label_names(
        self,
        tenant_id: str,
        selectors: Sequence[Selector],
        start_ms: int | None,
        end_ms: int | None,
        limit: int,
    ) -> list[str]:
        params = _Params()
        where = self._series_filter(tenant_id, selectors, start_ms, end_ms, params)
        rows = self._rows(
            "SELECT DISTINCT name FROM (SELECT arrayJoin(arrayConcat(['__name__'],"
            f" mapKeys(labels))) AS name FROM {self._table(SERIES_TABLE)} FINAL WHERE {where})"
            f" ORDER BY name LIMIT {params.bind(limit, 'UInt64')}",
            params,
        )
        return [str(r[0]) for r in rows]

    def label_values(
        self,
        tenant_id: str,
        name: str,
        selectors: Sequence[Selector],
        start_ms: int | None,
        end_ms: int | None,
        limit: int,
    ) -> list[str]:
        params = _Params()
        column = "metric" if name == METRIC_LABEL else f"labels[{params.bind(name, 'String')}]"
        where = self._series_filter(tenant_id, selectors, start_ms, end_ms, params)
        rows = self._rows(
            f"SELECT DISTINCT value FROM (SELECT {column} AS value"
            f" FROM {self._table(SERIES_TABLE)} FINAL WHERE {where}) WHERE value != ''"
            f" ORDER BY value LIMIT {params.bind(limit, 'UInt64')}",
            params,
        )
        return [str(r[0]) for r in rows]

    def fetch(
        self,
        tenant_id: str,
        series_ids: Sequence[int],
        tier: Tier,
        start_ms: int,
        end_ms: int,
        grouping: Grouping | None,
        limit: int,
        timeout_s: float | None = None,
    ) -> SampleBlock:
        start_ms, end_ms = _clamp_ms(start_ms), _clamp_ms(end_ms)
        if not series_ids or end_ms < start_ms:
            return SampleBlock.empty()
        params = _Params()
        tenant = params.bind(tenant_id, "UUID")
        ids = params.bind(list(series_ids), "Array(UInt64)")
        if tier.raw and grouping is None:
            sql = (
                "SELECT series_id, toUnixTimestamp64Milli(ts) AS t, t AS b, max(value) AS v,"
                " v AS mn, v AS mx, v AS sm, toFloat64(1) AS cnt"
                f" FROM {self._table(tier.table)} WHERE tenant_id = {tenant}"
                f" AND series_id IN {ids}"
                f" AND ts >= fromUnixTimestamp64Milli({params.bind(start_ms, 'Int64')}, 'UTC')"
                f" AND ts <= fromUnixTimestamp64Milli({params.bind(end_ms, 'Int64')}, 'UTC')"
                " GROUP BY series_id, ts"
            )
        elif tier.raw:
            assert grouping is not None
            origin = params.bind(grouping.origin * 1000, "Int64")
            width = params.bind(grouping.seconds * 1000, "Int64")
            sql = (
                f"SELECT series_id, intDiv(toUnixTimestamp64Milli(ts) - {origin}, {width})"
                f" * {width} + {origin} AS b, max((ts, value)) AS l,"
                " toUnixTimestamp64Milli(l.1) AS t, l.2 AS v, min(value) AS mn,"
                " max(value) AS mx, sum(value) AS sm, toFloat64(count()) AS cnt"
                f" FROM {self._table(tier.table)} WHERE tenant_id = {tenant}"
                f" AND series_id IN {ids}"
                f" AND ts >= fromUnixTimestamp64Milli({params.bind(start_ms, 'Int64')}, 'UTC')"
                f" AND ts <= fromUnixTimestamp64Milli({params.bind(end_ms, 'Int64')}, 'UTC')"
                " GROUP BY series_id, b"
            )
        else:
            group = grouping or Grouping(tier.seconds)
            origin = params.bind(group.origin, "Int64")
            width = params.bind(group.seconds, "Int64")
            sql = (
                f"SELECT series_id, (intDiv(toInt64(toUnixTimestamp(bucket)) - {origin},"
                f" {width}) * {width} + {origin}) * 1000 AS b, max(last) AS l,"
                " toUnixTimestamp64Milli(l.1) AS t, l.2 AS v, min(min) AS mn, max(max) AS mx,"
                " sum(sum) AS sm, toFloat64(sum(count)) AS cnt"
                f" FROM {self._table(tier.table)} WHERE tenant_id = {tenant}"
                f" AND series_id IN {ids}"
                f" AND bucket >= toDateTime({params.bind(start_ms // 1000, 'Int64')}, 'UTC')"
                f" AND bucket <= toDateTime({params.bind(end_ms // 1000, 'Int64')}, 'UTC')"
                " GROUP BY series_id, b"
            )
        sql = (
            "SELECT series_id, b, t, v, mn, mx, sm, cnt FROM (" + sql + ")"
            f" ORDER BY series_id, t LIMIT {params.bind(limit + 1, 'UInt64')}"
        )
        try:
            rows = self._run("query_np", sql, params, timeout_s)
        except _EmptyStore:
            return SampleBlock.empty()
        if len(rows) > limit:
            raise QueryError(
                "execution",
                f"the query would load more than {limit} samples from the {tier.name} tier;"
                " narrow the selector, shorten the range or raise the step",
            )
        if len(rows) == 0:
            return SampleBlock.empty()
        return SampleBlock(
            np.ascontiguousarray(rows["series_id"], dtype=np.uint64),
            np.ascontiguousarray(rows["b"], dtype=np.int64),
            np.ascontiguousarray(rows["t"], dtype=np.int64),
            np.ascontiguousarray(rows["v"], dtype=np.float64),
            np.ascontiguousarray(rows["mn"], dtype=np.float64),
            np.ascontiguousarray(rows["mx"], dtype=np.float64),
            np.ascontiguousarray(rows["sm"], dtype=np.float64),
            np.ascontiguousarray(rows["cnt"], dtype=np.float64),
        )


class _EmptyStore(QueryError):
    """The metric tables do not exist (yet): nothing has been written or migrated."""

    def __init__(self) -> None:
        super().__init__("execution", "the metric tables do not exist")


def _query_error(exc: DatabaseError) -> QueryError:
    code = getattr(exc, "code", None)
    text = str(exc)
    if code is None:  # chDB raises without the parsed code
        for candidate in (
            _UNKNOWN_TABLE,
            _UNKNOWN_DATABASE,
            _TIMEOUT_EXCEEDED,
            _TOO_SLOW,
            _MEMORY_LIMIT_EXCEEDED,
            _CANNOT_COMPILE_REGEXP,
        ):
            if f"Code: {candidate}." in text:
                code = candidate
    if code in (_UNKNOWN_TABLE, _UNKNOWN_DATABASE):
        return _EmptyStore()
    if code in (_TIMEOUT_EXCEEDED, _TOO_SLOW):
        return QueryError("timeout", "the query timed out in the metrics store; narrow it")
    if code == _MEMORY_LIMIT_EXCEEDED:
        return QueryError("execution", "the query needs more memory than allowed; narrow it")
    if code == _CANNOT_COMPILE_REGEXP:
        detail = text.split("DB::Exception:", 1)[-1].split(". (")[0].strip()
        return QueryError("bad_data", f"invalid regular expression: {detail}")
    return QueryError("internal", f"the metrics store failed the query: {text}")
