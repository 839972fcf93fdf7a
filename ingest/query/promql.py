"""PromQL: parse with promql-parser, evaluate the supported subset over a `MetricStore`.

Evaluation is vectorised: every node evaluates at all steps at once (a range query is T
steps; an instant query is one). Selectors read the tier chosen for what they feed:

- an instant selector (lookback 5 min) reads the coarsest tier with resolution ≤ step
  (raw samples in an instant query);
- `rate`, `increase`, `delta`, `irate`, `idelta` (and `changes`, `resets`, `deriv`) read
  one with resolution ≤ min(step, range/4), so that a window holds several samples;
- `<aggr>_over_time` read one with resolution ≤ min(step, range): they use the groups'
  min/max/sum/count, so whole groups inside a window give exact answers;
- in an instant query, range functions over windows up to an hour read raw samples.

A tier must still hold data from the start of what is read, else the finest one that
does is used.

Tier buckets are merged in the query into groups as wide as that target allows, aligned
on the evaluation times. A group is one sample at its latest sample time with its
latest value (for selectors and rates) and carries its aggregates (for `*_over_time`).
Everything not listed in docs/query.md is refused with a `bad_data` error naming it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

import numpy as np
import promql_parser as pp

from ingest.query.errors import QueryError, bad_data, unsupported
from ingest.query.histograms import histogram_quantile
from ingest.query.matchers import METRIC_LABEL, LabelMatcher, MatchOp, Selector
from ingest.query.store import F64, I64, Grouping, Labels, MetricStore
from ingest.query.tiers import choose_tier, group_seconds
from ingest.query.vectors import (
    SET_OPERATORS,
    Matching,
    Scalar,
    Vector,
    aggregate,
    apply_op,
    drop_name,
    merge_same_labels,
    set_operation,
    vector_scalar,
    vector_vector,
)
from ingest.query.windows import (
    Samples,
    Windows,
    extrapolated_rate,
    instant_rate,
    last_value,
    linear_regression,
    over_time,
    value_changes,
)

DEFAULT_LOOKBACK_MS = 5 * 60 * 1000
MAX_QUERY_LENGTH = 64 * 1024
# Instant queries (alert rules, table panels) over windows up to this long read raw
# samples while they are kept: a few hundred samples per series, Prometheus-exact.
RAW_INSTANT_WINDOW_MS = 60 * 60 * 1000

_MS = timedelta(milliseconds=1)
_OPS = (
    (pp.MatchOp.Equal, "="),
    (pp.MatchOp.NotEqual, "!="),
    (pp.MatchOp.Re, "=~"),
    (pp.MatchOp.NotRe, "!~"),
)  # MatchOp is not hashable

# Range functions: how they read their window, and the tier resolution they can use.
_SAMPLE_FUNCTIONS = {"rate", "increase", "delta", "irate", "idelta"}
# Read sample by sample too: rollup groups count as one sample (their last value).
_TREND_FUNCTIONS = {"changes", "resets", "deriv"}
_OVER_TIME = {
    "avg_over_time": "avg",
    "min_over_time": "min",
    "max_over_time": "max",
    "sum_over_time": "sum",
    "count_over_time": "count",
    "last_over_time": "last",
    "present_over_time": "present",
}
_MATH: dict[str, Callable[[F64], F64]] = {
    "abs": np.abs,
    "ceil": np.ceil,
    "floor": np.floor,
    "exp": np.exp,
    "ln": np.log,
    "log2": np.log2,
    "log10": np.log10,
    "sqrt": np.sqrt,
    "sgn": np.sign,
}
_AGGREGATIONS = {
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
}


def parse(query: str) -> pp.Expr:
    """The AST of `query`, or `bad_data` with the parser's message."""
    if len(query) > MAX_QUERY_LENGTH:
        raise bad_data(
            f"the query is {len(query)} characters long; the limit is {MAX_QUERY_LENGTH}"
        )
    if not query.strip():
        raise bad_data("empty query")
    try:
        return pp.parse(query)
    except ValueError as exc:
        raise bad_data(f"invalid PromQL: {exc}") from None
    except BaseException as exc:  # the Rust parser's panics are BaseExceptions
        if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
        raise bad_data(f"invalid PromQL: the parser failed on this query ({exc})") from None


def selector_of(expr: pp.Expr) -> Selector:
    """The matchers of a series selector (`metric{…}` or `{…}`), for `match[]`."""
    if not isinstance(expr, pp.VectorSelector):
        raise bad_data('a series selector is expected (for example up{job="node"})')
    return _matchers(expr)


def _matchers(vs: pp.VectorSelector) -> Selector:
    if vs.matchers.or_matchers:
        raise unsupported("`or` between label matchers")
    found = [LabelMatcher(m.name, _op(m.op), m.value) for m in vs.matchers.matchers]
    if vs.name is not None:
        found.insert(0, LabelMatcher(METRIC_LABEL, "=", vs.name))
    return tuple(found)


def _op(op: pp.MatchOp) -> MatchOp:
    for candidate, text in _OPS:
        if op == candidate:
            return text  # type: ignore[return-value]
    raise unsupported(f"the label matcher operator {op}")


def _ms(delta: timedelta | None) -> int:
    return 0 if delta is None else delta // _MS


@dataclass(frozen=True)
class Limits:
    max_series: int = 10_000
    max_samples: int = 10_000_000  # rows loaded from the store per query
    max_points: int = 20_000_000  # series times steps held in memory by a node
    lookback_ms: int = DEFAULT_LOOKBACK_MS


@dataclass
class RangeSamples:
    """The raw answer of a range selector (`foo[5m]` as an instant query)."""

    labels: list[Labels]
    ts: list[I64]
    values: list[F64]


Value = Vector | Scalar | RangeSamples


@dataclass
class Evaluation:
    """One query's evaluation state: where and when it runs, what it has loaded."""

    store: MetricStore
    tenant_id: str
    eval_ms: I64  # evaluation timestamps, ascending
    step_ms: int  # 0 for an instant query
    now_ms: int
    limits: Limits
    check_deadline: Callable[[], None]
    timeout_s: float | None = None
    tiers: list[str] = field(default_factory=list)
    series_loaded: int = 0
    samples_loaded: int = 0

    @property
    def steps(self) -> int:
        return int(self.eval_ms.shape[0])

    # --- selectors ----------------------------------------------------------------------

    def _load(
        self, vs: pp.VectorSelector, range_ms: int, target_s: float
    ) -> tuple[Samples, I64, int]:
        """(samples, shifted evaluation times, window length) for a selector."""
        if vs.at is not None:
            raise unsupported("the @ modifier")
        selector = _matchers(vs)
        eval_ms = self.eval_ms - _ms(vs.offset)
        window = range_ms or self.limits.lookback_ms
        first, last = int(eval_ms[0]) - window, int(eval_ms[-1])
        tier = choose_tier(target_s, first, self.now_ms)
        width = group_seconds(tier, target_s, self.step_ms, range_ms)
        if not tier.raw and range_ms == 0:
            # The latest group ending at or before t may hold samples up to a group
            # width older than the latest raw sample: widen the lookback by that much.
            window += width * 1000
            first -= width * 1000
        self.tiers.append(tier.name)
        refs = self.store.series(
            self.tenant_id, [selector], first, last, self.limits.max_series - self.series_loaded + 1
        )
        self.series_loaded += len(refs)
        if self.series_loaded > self.limits.max_series:
            raise QueryError(
                "execution",
                f"the query selects more than {self.limits.max_series} series; narrow the"
                " selectors (more label matchers) or split the query",
            )
        if len(refs) * self.steps > self.limits.max_points:
            raise self._too_many_points(len(refs) * self.steps)
        grouping = None
        start = first + 1
        if not tier.raw:
            origin = (int(eval_ms[0]) // 1000) % width // tier.seconds * tier.seconds
            grouping = Grouping(width, origin)
            start = ((first // 1000 - origin) // width * width + origin) * 1000
        block = self.store.fetch(
            self.tenant_id,
            [r.series_id for r in refs],
            tier,
            start,
            last,
            grouping,
            self.limits.max_samples - self.samples_loaded,
            timeout_s=self.timeout_s,
        )
        self.samples_loaded += len(block)
        self.check_deadline()
        return Samples.of(refs, block), eval_ms, window

    def _too_many_points(self, n: int) -> QueryError:
        return QueryError(
            "execution",
            f"query processing would load too many samples into memory ({n} series-steps;"
            f" the limit is {self.limits.max_points}); narrow the selectors or raise the step",
        )

    def instant_selector(self, vs: pp.VectorSelector) -> Vector:
        samples, eval_ms, window = self._load(vs, 0, self.step_ms / 1000)
        values, present = last_value(samples, Windows.of(samples, eval_ms, window))
        return Vector(samples.labels, values, present).compact()

    def range_function(self, name: str, ms: pp.MatrixSelector) -> Vector:
        range_ms = _ms(ms.range)
        step_s = self.step_ms / 1000 if self.step_ms else math.inf
        if not self.step_ms and range_ms <= RAW_INSTANT_WINDOW_MS:
            target = 0.0  # an instant query over a short window: exact raw samples
        elif name in _SAMPLE_FUNCTIONS or name in _TREND_FUNCTIONS:
            target = min(step_s, range_ms / 4000)
        else:
            target = min(step_s, range_ms / 1000)
        samples, eval_ms, _ = self._load(ms.vector_selector, range_ms, target)
        w = Windows.of(samples, eval_ms, range_ms)
        if name == "rate":
            values, present = extrapolated_rate(samples, w, eval_ms, range_ms, True, True)
        elif name == "increase":
            values, present = extrapolated_rate(samples, w, eval_ms, range_ms, True, False)
        elif name == "delta":
            values, present = extrapolated_rate(samples, w, eval_ms, range_ms, False, False)
        elif name == "irate":
            values, present = instant_rate(samples, w, True)
        elif name == "idelta":
            values, present = instant_rate(samples, w, False)
        elif name in ("changes", "resets"):
            values, present = value_changes(samples, w, name == "resets")
        elif name == "deriv":
            values, present = linear_regression(samples, w)
        else:
            values, present = over_time(samples, w, _OVER_TIME[name])
        labels = samples.labels
        if name != "last_over_time":
            labels = [drop_name(lb) for lb in labels]
        return merge_same_labels(Vector(labels, values, present).compact())

    def range_samples(self, ms: pp.MatrixSelector) -> RangeSamples:
        range_ms = _ms(ms.range)
        samples, eval_ms, _ = self._load(ms.vector_selector, range_ms, 0)
        w = Windows.of(samples, eval_ms, range_ms)
        out = RangeSamples([], [], [])
        for i, labels in enumerate(samples.labels):
            lo, hi = int(w.lo[i, -1]), int(w.hi[i, -1])
            if hi > lo:
                out.labels.append(labels)
                out.ts.append(samples.ts[lo:hi])
                out.values.append(samples.value[lo:hi])
        return out

    # --- expressions --------------------------------------------------------------------

    def eval(self, expr: pp.Expr) -> Vector | Scalar:
        value = self._eval(expr)
        self.check_deadline()
        return value

    def _eval(self, expr: pp.Expr) -> Vector | Scalar:
        if isinstance(expr, pp.NumberLiteral):
            return Scalar(np.full(self.steps, float(expr.val)))
        if isinstance(expr, pp.ParenExpr):
            return self.eval(expr.expr)
        if isinstance(expr, pp.VectorSelector):
            return self.instant_selector(expr)
        if isinstance(expr, pp.UnaryExpr):
            return _negate(self.eval(expr.expr))
        if isinstance(expr, pp.Call):
            return self.call(expr)
        if isinstance(expr, pp.AggregateExpr):
            return self.aggregation(expr)
        if isinstance(expr, pp.BinaryExpr):
            return self.binary(expr)
        if isinstance(expr, pp.SubqueryExpr):
            raise unsupported("subqueries (expr[range:step])")
        if isinstance(expr, pp.StringLiteral):
            raise unsupported("a string expression")
        if isinstance(expr, pp.MatrixSelector):
            raise bad_data("a range vector cannot be evaluated here; pass it to a function")
        raise unsupported(f"the expression {expr}")

    def _scalar(self, expr: pp.Expr, what: str) -> F64:
        value = self.eval(expr)
        if not isinstance(value, Scalar):
            raise bad_data(f"{what} must be a scalar")
        return value.values

    def _vector(self, expr: pp.Expr, what: str) -> Vector:
        value = self.eval(expr)
        if not isinstance(value, Vector):
            raise bad_data(f"{what} must be an instant vector")
        return value

    def call(self, expr: pp.Call) -> Vector | Scalar:
        name = expr.func.name
        args = list(expr.args)
        if name in _SAMPLE_FUNCTIONS or name in _OVER_TIME or name in _TREND_FUNCTIONS:
            return self.range_function(name, self._range_arg(name, args[0]))
        if name == "absent_over_time":
            arg = self._range_arg(name, args[0])
            seen = self.range_function("present_over_time", arg)
            missing = np.asarray(~seen.present.any(axis=0))
            labels = _absent_labels(arg.vector_selector)
            return Vector([labels], np.ones((1, self.steps)), missing[None, :]).compact()
        if name in _MATH:
            return _map(self._vector(args[0], f"the argument of {name}()"), _MATH[name])
        if name == "time":
            return Scalar(self.eval_ms / 1000.0)
        if name == "pi":
            return Scalar(np.full(self.steps, math.pi))
        if name == "vector":
            s = self._scalar(args[0], "the argument of vector()")
            return Vector([()], s[None, :].copy(), np.ones((1, self.steps), dtype=bool))
        if name == "scalar":
            v = self._vector(args[0], "the argument of scalar()")
            one = v.present.sum(axis=0) == 1
            picked = np.where(v.present, v.values, 0.0).sum(axis=0)
            return Scalar(np.where(one, picked, np.nan))
        if name == "round":
            v = self._vector(args[0], "the argument of round()")
            nearest = self._scalar(args[1], "to_nearest") if len(args) > 1 else np.ones(self.steps)
            inverse = 1.0 / nearest
            return _map(v, lambda x: np.floor(x * inverse + 0.5) / inverse)
        if name in ("clamp", "clamp_min", "clamp_max"):
            return self._clamp(name, args)
        if name == "absent":
            return self._absent(args[0])
        if name in ("sort", "sort_desc"):
            # Ordering only shows in an instant query's answer; the engine orders it.
            return self._vector(args[0], f"the argument of {name}()")
        if name == "histogram_quantile":
            phi = self._scalar(args[0], "the quantile of histogram_quantile()")
            return histogram_quantile(phi, self._vector(args[1], "the buckets"))
        raise unsupported(f"the function {name}()")

    @staticmethod
    def _range_arg(name: str, arg: pp.Expr) -> pp.MatrixSelector:
        if isinstance(arg, pp.SubqueryExpr):
            raise unsupported("subqueries (expr[range:step])")
        if not isinstance(arg, pp.MatrixSelector):
            raise bad_data(f"{name}() expects a range vector selector such as foo[5m]")
        return arg

    def _clamp(self, name: str, args: list[pp.Expr]) -> Vector:
        v = self._vector(args[0], f"the argument of {name}()")
        if name == "clamp":
            low = self._scalar(args[1], "min")
            high = self._scalar(args[2], "max")
            out = _map(v, lambda x: np.minimum(np.maximum(x, low), high))
            out.present &= (low <= high)[None, :]
            return out.compact()
        bound = self._scalar(args[1], "the bound")
        if name == "clamp_min":
            return _map(v, lambda x: np.maximum(x, bound))
        return _map(v, lambda x: np.minimum(x, bound))

    def _absent(self, arg: pp.Expr) -> Vector:
        v = self._vector(arg, "the argument of absent()")
        labels = _absent_labels(arg) if isinstance(arg, pp.VectorSelector) else ()
        missing = np.asarray(~v.present.any(axis=0))
        return Vector([labels], np.ones((1, self.steps)), missing[None, :]).compact()

    def aggregation(self, expr: pp.AggregateExpr) -> Vector:
        op = str(expr.op)
        if op not in _AGGREGATIONS:
            raise unsupported(f"the aggregation {op}")
        by: list[str] | None = []  # no clause: one group
        without: list[str] | None = None
        if expr.modifier is not None:
            if expr.modifier.type == pp.AggModifierType.By:
                by = list(expr.modifier.labels)
            else:
                by, without = None, list(expr.modifier.labels)
        param = None
        if op in ("topk", "bottomk", "quantile"):
            if expr.param is None:
                raise bad_data(f"{op} needs a parameter")
            param = self._scalar(expr.param, f"the parameter of {op}")
        v = self._vector(expr.expr, f"the argument of {op}")
        return aggregate(op, v, by, without, param)

    def binary(self, expr: pp.BinaryExpr) -> Vector | Scalar:
        op = str(expr.op)
        modifier = expr.modifier
        return_bool = bool(modifier and modifier.return_bool)
        if modifier is not None and modifier.card in (
            pp.VectorMatchCardinality.ManyToOne,
            pp.VectorMatchCardinality.OneToMany,
        ):
            raise unsupported("group_left/group_right (many-to-one matching)")
        fill = modifier.fill_values if modifier is not None else None
        if fill is not None and (fill.lhs is not None or fill.rhs is not None):
            raise unsupported("fill modifiers in vector matching")
        lhs, rhs = self.eval(expr.lhs), self.eval(expr.rhs)
        if isinstance(lhs, Scalar) and isinstance(rhs, Scalar):
            return Scalar(apply_op(op, lhs.values, rhs.values))
        if isinstance(lhs, Vector) and isinstance(rhs, Scalar):
            return vector_scalar(op, lhs, rhs.values, False, return_bool)
        if isinstance(lhs, Scalar) and isinstance(rhs, Vector):
            return vector_scalar(op, rhs, lhs.values, True, return_bool)
        assert isinstance(lhs, Vector)
        assert isinstance(rhs, Vector)
        matching = Matching(False, ())
        if modifier is not None and modifier.matching is not None:
            matching = Matching(
                modifier.matching.type == pp.LabelModifierType.Include,
                tuple(modifier.matching.labels),
            )
        if op in SET_OPERATORS:
            return set_operation(op, lhs, rhs, matching)
        return vector_vector(op, lhs, rhs, matching, return_bool)


def _absent_labels(vs: pp.VectorSelector) -> Labels:
    """What `absent`/`absent_over_time` answer with: the selector's equality matchers
    (a label also matched by another operator or twice is left out), as Prometheus."""
    equal: dict[str, str] = {}
    has: set[str] = set()
    for m in _matchers(vs):
        if m.name == METRIC_LABEL:
            continue
        if m.op == "=" and m.name not in has:
            equal[m.name] = m.value
            has.add(m.name)
        else:
            equal.pop(m.name, None)
    return tuple(sorted(equal.items()))


def _map(v: Vector, fn: Callable[[F64], F64]) -> Vector:
    with np.errstate(all="ignore"):
        values = np.asarray(fn(v.values), dtype=np.float64)
    return merge_same_labels(Vector([drop_name(lb) for lb in v.labels], values, v.present.copy()))


def _negate(value: Vector | Scalar) -> Vector | Scalar:
    if isinstance(value, Scalar):
        return Scalar(-value.values)
    return _map(value, np.negative)


ResultType = Literal["vector", "matrix", "scalar"]


def value_order(expr: pp.Expr) -> Literal["asc", "desc"] | None:
    """How an instant query's answer is ordered when its root orders by value (sort,
    sort_desc, topk, bottomk); None: by labels."""
    while isinstance(expr, pp.ParenExpr):
        expr = expr.expr
    if isinstance(expr, pp.Call) and expr.func.name in ("sort", "sort_desc"):
        return "asc" if expr.func.name == "sort" else "desc"
    if isinstance(expr, pp.AggregateExpr) and str(expr.op) in ("topk", "bottomk"):
        return "desc" if str(expr.op) == "topk" else "asc"
    return None


def result_type(expr: pp.Expr) -> ResultType:
    """What a query's answer is, before evaluating it (for error messages)."""
    inner = expr
    while isinstance(inner, pp.ParenExpr):
        inner = inner.expr
    if isinstance(inner, pp.MatrixSelector | pp.SubqueryExpr):
        return "matrix"
    if isinstance(inner, pp.NumberLiteral):
        return "scalar"
    if isinstance(inner, pp.StringLiteral):
        raise unsupported("a string expression")
    if isinstance(inner, pp.Call) and inner.func.return_type == pp.ValueType.Scalar:
        return "scalar"
    if isinstance(inner, pp.BinaryExpr):
        sides = {result_type(inner.lhs), result_type(inner.rhs)}
        return "scalar" if sides == {"scalar"} else "vector"
    if isinstance(inner, pp.UnaryExpr):
        return result_type(inner.expr)
    return "vector"
