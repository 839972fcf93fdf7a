"""`MetricsQueries`: the published query functions, bound to one store and clock.

Every method takes the caller's tenant (from its resolved identity, never from a request
alone) and is synchronous: the store does blocking I/O and evaluation is CPU work, so
HTTP front ends call these from a worker thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
import promql_parser as pp

from ingest.query.errors import QueryError, bad_data, unsupported
from ingest.query.matchers import METRIC_LABEL, Selector
from ingest.query.promql import (
    Evaluation,
    Limits,
    RangeSamples,
    ResultType,
    parse,
    result_type,
    selector_of,
    value_order,
)
from ingest.query.store import (
    F64,
    I64,
    Grouping,
    Labels,
    MetricStore,
    SampleBlock,
    SeriesCursor,
    SeriesRef,
)
from ingest.query.tiers import TIERS, exact_tier
from ingest.query.vectors import Scalar, Vector
from yakpanel.clock import Clock, SystemClock

MAX_POINTS_PER_SERIES = 11_000
Aggregation = Literal["avg", "min", "max", "sum", "count", "last"]
AGGREGATIONS: tuple[Aggregation, ...] = ("avg", "min", "max", "sum", "count", "last")


@dataclass(frozen=True)
class SeriesValues:
    labels: dict[str, str]
    timestamps_ms: I64
    values: F64


@dataclass(frozen=True)
class QueryResult:
    """`series` for vector and matrix answers; `scalar` = (time ms, value) otherwise."""

    result_type: ResultType
    series: list[SeriesValues]
    scalar: tuple[int, float] | None = None
    tiers: tuple[str, ...] = ()
    samples_loaded: int = 0


@dataclass(frozen=True)
class BucketSeries:
    labels: dict[str, str]
    buckets_s: I64  # bucket starts, unix seconds
    values: F64


@dataclass(frozen=True)
class BucketResult:
    tier: str
    step_s: int
    start_s: int
    end_s: int
    aggregation: Aggregation
    series: list[BucketSeries]


def parse_selectors(match: Sequence[str]) -> list[Selector]:
    """`match[]` series selectors in PromQL syntax."""
    return [selector_of(parse(m)) for m in match]


def _as_dict(labels: Labels) -> dict[str, str]:
    return dict(labels)


class MetricsQueries:
    def __init__(
        self,
        store: MetricStore,
        clock: Clock | None = None,
        limits: Limits | None = None,
        timeout_s: float = 30.0,
        max_points_per_series: int = MAX_POINTS_PER_SERIES,
    ) -> None:
        self.store = store
        self.clock = clock or SystemClock()
        self.limits = limits or Limits()
        self.timeout_s = timeout_s
        self.max_points_per_series = max_points_per_series

    def _now_ms(self) -> int:
        return int(self.clock.now().timestamp() * 1000)

    def _evaluation(
        self,
        tenant_id: str,
        eval_ms: I64,
        step_ms: int,
        lookback_ms: int | None,
        timeout_s: float | None,
    ) -> Evaluation:
        budget = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        deadline = self.clock.monotonic() + budget

        def check_deadline() -> None:
            if self.clock.monotonic() > deadline:
                raise QueryError("timeout", f"query timed out after {budget:g} s; narrow it")

        limits = self.limits
        if lookback_ms is not None:
            if lookback_ms <= 0:
                raise bad_data("lookback_delta must be positive")
            limits = dataclasses.replace(limits, lookback_ms=lookback_ms)
        return Evaluation(
            self.store, tenant_id, eval_ms, step_ms, self._now_ms(), limits, check_deadline, budget
        )

    # --- PromQL -------------------------------------------------------------------------

    def instant(
        self,
        tenant_id: str,
        query: str,
        time_ms: int | None = None,
        lookback_ms: int | None = None,
        timeout_s: float | None = None,
    ) -> QueryResult:
        """The value of `query` at one time (default: now)."""
        expr = parse(query)
        kind = result_type(expr)
        at = self._now_ms() if time_ms is None else time_ms
        ev = self._evaluation(tenant_id, np.array([at], dtype=np.int64), 0, lookback_ms, timeout_s)
        if kind == "matrix":
            inner = expr
            while isinstance(inner, pp.ParenExpr):
                inner = inner.expr
            if not isinstance(inner, pp.MatrixSelector):
                raise unsupported("subqueries (expr[range:step])")
            samples = ev.range_samples(inner)
            return self._matrix_result(samples, ev)
        value = ev.eval(expr)
        tiers, loaded = tuple(ev.tiers), ev.samples_loaded
        if isinstance(value, Scalar):
            return QueryResult("scalar", [], (at, float(value.values[0])), tiers, loaded)
        series = self._series_of(value.compact(), ev.eval_ms)
        order = value_order(expr)
        if order is None:
            series.sort(key=lambda s: sorted(s.labels.items()))
        else:
            series.sort(
                key=lambda s: _order_key(float(s.values[0]), order == "desc"),
            )
        return QueryResult("vector", series, None, tiers, loaded)

    def range(
        self,
        tenant_id: str,
        query: str,
        start_ms: int,
        end_ms: int,
        step_ms: int,
        lookback_ms: int | None = None,
        timeout_s: float | None = None,
    ) -> QueryResult:
        """`query` evaluated at start, start + step, … ≤ end (a matrix answer)."""
        if end_ms < start_ms:
            raise bad_data("end timestamp must not be before start time")
        if step_ms <= 0:
            raise bad_data(
                "zero or negative query resolution step widths are not accepted."
                " Try a positive integer"
            )
        points = (end_ms - start_ms) // step_ms + 1
        if points > self.max_points_per_series:
            raise bad_data(
                f"exceeded maximum resolution of {self.max_points_per_series:,} points per"
                " timeseries. Try decreasing the query resolution (?step=XX)"
            )
        expr = parse(query)
        kind = result_type(expr)
        if kind == "matrix":
            raise bad_data(
                'invalid expression type "range vector" for range query, must be Scalar or'
                " instant Vector"
            )
        eval_ms = start_ms + step_ms * np.arange(points, dtype=np.int64)
        ev = self._evaluation(tenant_id, eval_ms, step_ms, lookback_ms, timeout_s)
        value = ev.eval(expr)
        if isinstance(value, Scalar):
            value = Vector([()], value.values[None, :], np.ones((1, len(eval_ms)), dtype=bool))
        series = self._series_of(value.compact(), eval_ms)
        series.sort(key=lambda s: sorted(s.labels.items()))
        return QueryResult("matrix", series, None, tuple(ev.tiers), ev.samples_loaded)

    @staticmethod
    def _series_of(vector: Vector, eval_ms: I64) -> list[SeriesValues]:
        out = []
        for i, labels in enumerate(vector.labels):
            mask = vector.present[i]
            out.append(SeriesValues(_as_dict(labels), eval_ms[mask], vector.values[i][mask]))
        return out

    @staticmethod
    def _matrix_result(samples: RangeSamples, ev: Evaluation) -> QueryResult:
        series = [
            SeriesValues(_as_dict(lb), ts, v)
            for lb, ts, v in zip(samples.labels, samples.ts, samples.values, strict=True)
        ]
        series.sort(key=lambda s: sorted(s.labels.items()))
        return QueryResult("matrix", series, None, tuple(ev.tiers), ev.samples_loaded)

    # --- series and labels --------------------------------------------------------------

    def series(
        self,
        tenant_id: str,
        selectors: Sequence[Selector],
        start_ms: int | None = None,
        end_ms: int | None = None,
        limit: int | None = None,
        after: SeriesCursor | None = None,
    ) -> list[SeriesRef]:
        """Series matching any selector (none: all), ordered by (metric, series id)."""
        cap = self.limits.max_series if limit is None else min(limit, self.limits.max_series)
        return self.store.series(tenant_id, selectors, start_ms, end_ms, cap, after)

    def label_names(
        self,
        tenant_id: str,
        selectors: Sequence[Selector] = (),
        start_ms: int | None = None,
        end_ms: int | None = None,
        limit: int | None = None,
    ) -> list[str]:
        cap = self.limits.max_series if limit is None else min(limit, self.limits.max_series)
        return self.store.label_names(tenant_id, selectors, start_ms, end_ms, cap)

    def label_values(
        self,
        tenant_id: str,
        name: str,
        selectors: Sequence[Selector] = (),
        start_ms: int | None = None,
        end_ms: int | None = None,
        limit: int | None = None,
    ) -> list[str]:
        cap = self.limits.max_series if limit is None else min(limit, self.limits.max_series)
        return self.store.label_values(tenant_id, name, selectors, start_ms, end_ms, cap)

    # --- bucketed (the structured API) ----------------------------------------------------

    def buckets(
        self,
        tenant_id: str,
        selector: Selector,
        start_s: int,
        end_s: int,
        step_s: int,
        aggregation: Aggregation,
        group_by: Sequence[str] | None = None,
        timeout_s: float | None = None,
    ) -> BucketResult:
        """Per series (or per `group_by` label set), one value per step-aligned bucket
        [b, b + step): the `aggregation` of every sample in it, exact at every tier (the
        tier's resolution divides the step; partial rows are merged)."""
        if aggregation not in AGGREGATIONS:
            raise bad_data(f"unknown aggregation {aggregation!r}")
        if step_s <= 0:
            raise bad_data("step must be a positive number of seconds")
        if end_s < start_s:
            raise bad_data("end must not be before start")
        first, last = start_s // step_s * step_s, end_s // step_s * step_s
        points = (last - first) // step_s + 1
        if points > self.max_points_per_series:
            raise bad_data(
                f"{points} buckets per series; the limit is {self.max_points_per_series}:"
                " raise the step or shorten the range"
            )
        tier = exact_tier(step_s, first * 1000, self._now_ms())
        if tier is None:
            now = self._now_ms()
            usable = ", ".join(
                f"{t.seconds} s" for t in TIERS if not t.raw and t.covers(first * 1000, now)
            )
            raise bad_data(
                f"no stored resolution serves a step of {step_s} s from that start exactly;"
                f" use a multiple of one of: {usable}"
            )
        refs = self.store.series(
            tenant_id, [selector], first * 1000, (last + step_s) * 1000, self.limits.max_series + 1
        )
        if len(refs) > self.limits.max_series:
            raise QueryError(
                "execution",
                f"the query selects more than {self.limits.max_series} series; add label matchers",
            )
        block = self.store.fetch(
            tenant_id,
            [r.series_id for r in refs],
            tier,
            first * 1000,
            (last + step_s) * 1000 - 1,
            Grouping(step_s, 0),
            self.limits.max_samples,
            timeout_s=self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s),
        )
        series = _bucket_series(refs, block, aggregation, group_by, first, last)
        return BucketResult(tier.name, step_s, first, last, aggregation, series)


def _order_key(value: float, descending: bool) -> tuple[int, float]:
    if np.isnan(value):
        return (1, 0.0)
    return (0, -value if descending else value)


def _bucket_series(
    refs: list[SeriesRef],
    block: SampleBlock,
    aggregation: Aggregation,
    group_by: Sequence[str] | None,
    first: int,
    last: int,
) -> list[BucketSeries]:
    if len(block) == 0:
        return []
    keys: dict[int, Labels] = {}
    for r in refs:
        labels = tuple(p for p in r.labels if p[0] != METRIC_LABEL)
        if group_by is not None:
            wanted = set(group_by)
            labels = tuple(p for p in labels if p[0] in wanted)
        keys[r.series_id] = labels
    group_of = {labels: i for i, labels in enumerate(dict.fromkeys(keys.values()))}
    group_labels = list(group_of)
    ids = np.array(list(keys), dtype=np.uint64)
    groups = np.array([group_of[keys[int(s)]] for s in ids], dtype=np.int64)
    order = np.argsort(ids)
    where = order[np.searchsorted(ids[order], block.series_id)]
    frame = pl.DataFrame(
        {
            "g": groups[where],
            "b": block.bucket // 1000,
            "ts": block.ts,
            "value": block.value,
            "min": block.min,
            "max": block.max,
            "sum": block.sum,
            "count": block.count,
        }
    ).filter((pl.col("b") >= first) & (pl.col("b") <= last))
    merged = (
        frame.group_by("g", "b")
        .agg(
            pl.col("min").min(),
            pl.col("max").max(),
            pl.col("sum").sum(),
            pl.col("count").sum(),
            pl.col("value").sort_by("ts", "value").last().alias("last"),
        )
        .sort("g", "b")
    )
    value = {
        "avg": pl.col("sum") / pl.col("count"),
        "min": pl.col("min"),
        "max": pl.col("max"),
        "sum": pl.col("sum"),
        "count": pl.col("count"),
        "last": pl.col("last"),
    }[aggregation]
    merged = merged.with_columns(value.alias("v"))
    out = []
    for (g,), part in merged.partition_by("g", as_dict=True, maintain_order=True).items():
        out.append(
            BucketSeries(
                _as_dict(group_labels[int(g)]),
                part["b"].to_numpy().astype(np.int64),
                part["v"].to_numpy().astype(np.float64),
            )
        )
    out.sort(key=lambda s: sorted(s.labels.items()))
    return out
