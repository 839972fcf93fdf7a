"""What streaming evaluation reads: the series selectors and the look-back of each rule
(from its parsed PromQL), and per tenant the plan of its hot window — which groups it
serves and how long it keeps samples — and its loading from ClickHouse at warm-up."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import promql_parser as pp

from alerting.rules import RuleGroup
from ingest.query import (
    DEFAULT_LOOKBACK_MS,
    TIERS,
    MetricStore,
    QueryError,
    Selector,
    SeriesRef,
)
from ingest.query.errors import unsupported
from ingest.query.promql import parse, selector_of

RAW = next(t for t in TIERS if t.raw)

# --- what a rule reads ------------------------------------------------------------------


@dataclass(frozen=True)
class ExpressionReads:
    """The series selectors of an expression and how far back it reads (range + offset,
    not counting the lookback of instant selectors)."""

    selectors: tuple[Selector, ...]
    window_ms: int


def _ms(delta: timedelta | None) -> int:
    return 0 if delta is None else int(delta.total_seconds() * 1000)


def expression_reads(expr: str) -> ExpressionReads:
    """Walks the parsed PromQL; raises `QueryError` for what the hot window cannot serve
    (the `@` modifier, subqueries, `or` between matchers, a parse error)."""
    selectors: list[Selector] = []
    window = 0

    def vector(vs: pp.VectorSelector, range_ms: int) -> None:
        nonlocal window
        if vs.at is not None:
            raise unsupported("the @ modifier")
        selectors.append(selector_of(vs))
        window = max(window, range_ms + max(0, _ms(vs.offset)))

    def walk(node: pp.Expr) -> None:
        if isinstance(node, pp.VectorSelector):
            vector(node, 0)
        elif isinstance(node, pp.MatrixSelector):
            vector(node.vector_selector, _ms(node.range))
        elif isinstance(node, pp.Call):
            for arg in node.args:
                walk(arg)
        elif isinstance(node, pp.AggregateExpr):
            walk(node.expr)
            if node.param is not None:
                walk(node.param)
        elif isinstance(node, pp.BinaryExpr):
            walk(node.lhs)
            walk(node.rhs)
        elif isinstance(node, pp.ParenExpr | pp.UnaryExpr):
            walk(node.expr)
        elif isinstance(node, pp.NumberLiteral | pp.StringLiteral):
            return
        else:
            raise unsupported(f"{type(node).__name__} in a streamed rule")

    walk(parse(expr))
    return ExpressionReads(tuple(dict.fromkeys(selectors)), window)


@dataclass(frozen=True)
class StreamPlan:
    """What a tenant's hot window holds: the selectors of each stream-evaluated group and
    the retention that serves all of them. `on_clickhouse`: groups left there, and why."""

    selectors: Mapping[str, tuple[Selector, ...]]
    retention_ms: int
    on_clickhouse: Mapping[str, str]

    @property
    def groups(self) -> frozenset[str]:
        return frozenset(self.selectors)

    def all_selectors(self) -> list[Selector]:
        return list(dict.fromkeys(s for group in self.selectors.values() for s in group))


def plan_groups(groups: Iterable[RuleGroup], max_window: timedelta) -> StreamPlan:
    """Per group: stream it (its selectors) or leave it on ClickHouse (the reason). The
    retention is the longest read + the instant lookback + the group's evaluation delay,
    plus one lookback of margin for a sample arriving late."""
    selectors: dict[str, tuple[Selector, ...]] = {}
    clickhouse: dict[str, str] = {}
    retention = 0
    limit = _ms(max_window)
    for group in groups:
        found: list[Selector] = []
        need = 0
        reason = None
        for rule in group.rules:
            try:
                reads = expression_reads(rule.expr)
            except QueryError as exc:
                reason = f"rule {rule.alert}: {exc.message}"
                break
            found.extend(reads.selectors)
            need = max(need, reads.window_ms + DEFAULT_LOOKBACK_MS)
        if reason is None and need > limit:
            reason = f"reads {need // 1000} s back, more than the stream's {limit // 1000} s"
        if reason is not None:
            clickhouse[group.name] = reason
            continue
        selectors[group.name] = tuple(dict.fromkeys(found))
        retention = max(retention, need + _ms(group.evaluation_delay) + DEFAULT_LOOKBACK_MS)
    return StreamPlan(selectors, retention, clickhouse)


# --- warm-up from ClickHouse --------------------------------------------------------------


def load_window(
    store: MetricStore,
    tenant_id: str,
    selectors: Sequence[Selector],
    start_ms: int,
    end_ms: int,
    limit: int,
) -> list[tuple[SeriesRef, list[tuple[int, float]]]]:
    """The raw samples of the selected series in [start_ms, end_ms] (blocking: run it on
    the ClickHouse thread). Raises `QueryError("execution")` past `limit` samples."""
    if not selectors:
        return []
    refs = store.series(tenant_id, selectors, start_ms, end_ms, limit + 1)
    if len(refs) > limit:
        raise QueryError("execution", f"more than {limit} series")
    if not refs:
        return []
    block = store.fetch(tenant_id, [r.series_id for r in refs], RAW, start_ms, end_ms, None, limit)
    by_id = {r.series_id: r for r in refs}
    points: dict[int, list[tuple[int, float]]] = {}
    for sid, ts, value in zip(
        block.series_id.tolist(), block.ts.tolist(), block.value.tolist(), strict=True
    ):
        points.setdefault(int(sid), []).append((int(ts), float(value)))
    return [(by_id[sid], pts) for sid, pts in points.items() if sid in by_id]
