"""Instant vectors over all evaluation steps at once, and the PromQL operators on them.

A `Vector` holds S series over T steps: `values` (S, T) and `present` (S, T) — a series
has a sample at a step only where `present` is true. A `Scalar` is one value per step.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ingest.query.errors import QueryError
from ingest.query.matchers import METRIC_LABEL
from ingest.query.store import F64, Labels

Bool = npt.NDArray[np.bool_]


@dataclass
class Vector:
    labels: list[Labels]
    values: F64
    present: Bool

    @staticmethod
    def empty(steps: int) -> Vector:
        return Vector([], np.zeros((0, steps)), np.zeros((0, steps), dtype=bool))

    @property
    def steps(self) -> int:
        return int(self.values.shape[1])

    def compact(self) -> Vector:
        """Without the series that have no sample at any step."""
        keep = self.present.any(axis=1)
        if keep.all():
            return self
        idx = np.flatnonzero(keep)
        return Vector([self.labels[i] for i in idx], self.values[idx], self.present[idx])


@dataclass
class Scalar:
    values: F64


def drop_name(labels: Labels) -> Labels:
    return tuple(p for p in labels if p[0] != METRIC_LABEL)


def keep_only(labels: Labels, names: Sequence[str]) -> Labels:
    wanted = set(names)
    return tuple(p for p in labels if p[0] in wanted)


def drop_labels(labels: Labels, names: Sequence[str]) -> Labels:
    unwanted = set(names)
    return tuple(p for p in labels if p[0] not in unwanted)


def format_labels(labels: Labels) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in labels) + "}"


def merge_same_labels(vector: Vector) -> Vector:
    """One series per label set: series that became equal (a dropped metric name) merge
    when their samples never meet at a step; at a shared step PromQL has no answer."""
    groups: dict[Labels, list[int]] = defaultdict(list)
    for i, labels in enumerate(vector.labels):
        groups[labels].append(i)
    if len(groups) == len(vector.labels):
        return vector
    out_labels, rows_v, rows_p = [], [], []
    for labels, rows in groups.items():
        present = vector.present[rows]
        if (present.sum(axis=0) > 1).any():
            raise QueryError(
                "execution",
                f"vector cannot contain metrics with the same labelset {format_labels(labels)}",
            )
        out_labels.append(labels)
        rows_p.append(present.any(axis=0))
        rows_v.append(np.where(present, vector.values[rows], 0.0).sum(axis=0))
    return Vector(out_labels, np.array(rows_v), np.array(rows_p))


# --- binary operators ---------------------------------------------------------------------

ARITHMETIC = ("+", "-", "*", "/", "%", "^", "atan2")
COMPARISON = ("==", "!=", ">", "<", ">=", "<=")
SET_OPERATORS = ("and", "or", "unless")


_BINARY: dict[str, Callable[[F64, F64], npt.NDArray[np.generic]]] = {
    "+": np.add,
    "-": np.subtract,
    "*": np.multiply,
    "/": np.true_divide,
    "%": np.fmod,  # Go's math.Mod: the sign of the dividend
    "^": np.power,
    "atan2": np.arctan2,
    "==": np.equal,
    "!=": np.not_equal,
    ">": np.greater,
    "<": np.less,
    ">=": np.greater_equal,
    "<=": np.less_equal,
}


def apply_op(op: str, lhs: F64, rhs: F64) -> F64:
    """Element-wise; comparisons give 1.0 / 0.0."""
    fn = _BINARY.get(op)
    if fn is None:
        raise QueryError("bad_data", f"unknown binary operator {op}")
    with np.errstate(all="ignore"):
        return np.asarray(fn(lhs, rhs), dtype=np.float64)


def vector_scalar(op: str, vector: Vector, scalar: F64, scalar_left: bool, bool_: bool) -> Vector:
    row = scalar[None, :]
    lhs, rhs = (row, vector.values) if scalar_left else (vector.values, row)
    out = apply_op(op, np.broadcast_to(lhs, vector.values.shape), rhs)
    if op in COMPARISON:
        if bool_:
            result = Vector([drop_name(lb) for lb in vector.labels], out, vector.present.copy())
            return merge_same_labels(result)
        # A filter keeps the vector's own value, on whichever side it is.
        return Vector(vector.labels, vector.values, vector.present & (out == 1.0))
    return merge_same_labels(Vector([drop_name(lb) for lb in vector.labels], out, vector.present))


@dataclass(frozen=True)
class Matching:
    on: bool
    labels: tuple[str, ...]

    def signature(self, labels: Labels) -> Labels:
        if self.on:
            return keep_only(labels, self.labels)
        return drop_labels(drop_name(labels), self.labels)

    def result_labels(self, labels: Labels, drop_metric: bool) -> Labels:
        out = keep_only(labels, self.labels) if self.on else drop_labels(labels, self.labels)
        return drop_name(out) if drop_metric else out


def _by_signature(vector: Vector, matching: Matching) -> dict[Labels, list[int]]:
    groups: dict[Labels, list[int]] = defaultdict(list)
    for i, labels in enumerate(vector.labels):
        groups[matching.signature(labels)].append(i)
    return groups


def _one_side(vector: Vector, groups: dict[Labels, list[int]], side: str) -> None:
    for sig, rows in groups.items():
        if len(rows) > 1 and (vector.present[rows].sum(axis=0) > 1).any():
            raise QueryError(
                "execution",
                f"found duplicate series for the match group {format_labels(sig)} on the {side}"
                " hand-side of the operation; many-to-many matching not allowed: matching"
                " labels must be unique on one side",
            )


def vector_vector(op: str, lhs: Vector, rhs: Vector, matching: Matching, bool_: bool) -> Vector:
    """One-to-one matching (`on`/`ignoring`) for arithmetic and comparison operators."""
    left, right = _by_signature(lhs, matching), _by_signature(rhs, matching)
    _one_side(lhs, left, "left")
    _one_side(rhs, right, "right")
    steps = lhs.steps
    drop_metric = op in ARITHMETIC or bool_
    out_labels, out_v, out_p = [], [], []
    for sig, rows in left.items():
        match = right.get(sig)
        if match is None:
            continue
        r_present = rhs.present[match]
        r_values = np.where(r_present, rhs.values[match], 0.0).sum(axis=0)
        r_any = r_present.any(axis=0)
        for i in rows:
            both = lhs.present[i] & r_any
            if not both.any():
                continue
            out = apply_op(op, lhs.values[i], r_values)
            if op in COMPARISON and not bool_:
                both &= out == 1.0
                out = lhs.values[i]
            out_labels.append(matching.result_labels(lhs.labels[i], drop_metric))
            out_v.append(out)
            out_p.append(both)
    if not out_labels:
        return Vector.empty(steps)
    return merge_same_labels(Vector(out_labels, np.array(out_v), np.array(out_p)))


def set_operation(op: str, lhs: Vector, rhs: Vector, matching: Matching) -> Vector:
    """`and`, `or`, `unless`: many-to-many, by signature, step by step."""

    def presence(vector: Vector) -> dict[Labels, Bool]:
        out: dict[Labels, Bool] = {}
        for sig, rows in _by_signature(vector, matching).items():
            out[sig] = np.asarray(vector.present[rows].any(axis=0))
        return out

    r_sigs = presence(rhs)
    none = np.zeros(lhs.steps, dtype=bool)
    if op in ("and", "unless"):
        present = lhs.present.copy()
        for i, labels in enumerate(lhs.labels):
            other = r_sigs.get(matching.signature(labels), none)
            present[i] &= other if op == "and" else ~other
        return Vector(lhs.labels, lhs.values, present).compact()
    l_sigs = presence(lhs)
    r_present = rhs.present.copy()
    for i, labels in enumerate(rhs.labels):
        r_present[i] &= ~l_sigs.get(matching.signature(labels), none)
    return Vector(
        lhs.labels + rhs.labels,
        np.concatenate([lhs.values, rhs.values]),
        np.concatenate([lhs.present, r_present]),
    ).compact()


# --- aggregation ----------------------------------------------------------------------------


def grouping_key(labels: Labels, by: Sequence[str] | None, without: Sequence[str] | None) -> Labels:
    if by is not None:
        return keep_only(labels, by)
    return drop_labels(drop_name(labels), without or ())


def aggregate(
    op: str,
    vector: Vector,
    by: Sequence[str] | None,
    without: Sequence[str] | None,
    param: F64 | None,
) -> Vector:
    groups: dict[Labels, list[int]] = defaultdict(list)
    for i, labels in enumerate(vector.labels):
        groups[grouping_key(labels, by, without)].append(i)
    if op in ("topk", "bottomk"):
        assert param is not None
        return _k_extremes(vector, groups, param, largest=op == "topk")
    out_labels, out_v, out_p = [], [], []
    for key, rows in groups.items():
        values, present = vector.values[rows], vector.present[rows]
        count = present.sum(axis=0)
        with np.errstate(all="ignore"):
            out = _AGGREGATES[op](values, present, count, param)
        out_labels.append(key)
        out_v.append(out)
        out_p.append(count > 0)
    if not out_labels:
        return Vector.empty(vector.steps)
    return Vector(out_labels, np.array(out_v), np.array(out_p))


def _masked(values: F64, present: Bool, fill: float) -> F64:
    return np.where(present, values, fill)


def _quantile(values: F64, present: Bool, count: npt.NDArray[np.int64], q: F64 | None) -> F64:
    assert q is not None
    data = _masked(values, present, np.nan)
    ok = count > 0
    out = np.full(values.shape[1], np.nan)
    if ok.any():
        phi = np.clip(q[ok], 0.0, 1.0)
        cols = data[:, ok]
        ordered = np.sort(cols, axis=0)  # NaN (absent) last
        n = count[ok]
        rank = phi * (n - 1)
        below = np.floor(rank).astype(np.int64)
        above = np.minimum(below + 1, n - 1)
        idx = np.arange(cols.shape[1])
        weight = rank - below
        out[ok] = ordered[below, idx] * (1 - weight) + ordered[above, idx] * weight
    out = np.where(q < 0, -np.inf, out)
    return np.where(q > 1, np.inf, out)


_Aggregate = Callable[[F64, Bool, npt.NDArray[np.int64], F64 | None], F64]
_AGGREGATES: dict[str, _Aggregate] = {
    "sum": lambda v, p, n, _: _masked(v, p, 0.0).sum(axis=0),
    "count": lambda v, p, n, _: n.astype(np.float64),
    "avg": lambda v, p, n, _: _masked(v, p, 0.0).sum(axis=0) / np.maximum(n, 1),
    "min": lambda v, p, n, _: _extreme(v, p, np.minimum),
    "max": lambda v, p, n, _: _extreme(v, p, np.maximum),
    "group": lambda v, p, n, _: np.ones(v.shape[1]),
    "stddev": lambda v, p, n, _: np.sqrt(_variance(v, p, n)),
    "stdvar": lambda v, p, n, _: _variance(v, p, n),
    "quantile": _quantile,
}


def _extreme(values: F64, present: Bool, ufunc: np.ufunc) -> F64:
    """min/max ignoring NaN unless every sample is NaN (as Prometheus)."""
    numbers = present & ~np.isnan(values)
    fill = np.inf if ufunc is np.minimum else -np.inf
    out = ufunc.reduce(np.where(numbers, values, fill), axis=0)
    return np.asarray(np.where(numbers.any(axis=0), out, np.nan), dtype=np.float64)


def _variance(values: F64, present: Bool, count: npt.NDArray[np.int64]) -> F64:
    n = np.maximum(count, 1)
    mean = _masked(values, present, 0.0).sum(axis=0) / n
    return np.asarray(_masked((values - mean) ** 2, present, 0.0).sum(axis=0) / n)


def _k_extremes(vector: Vector, groups: dict[Labels, list[int]], k: F64, largest: bool) -> Vector:
    """`topk`/`bottomk`: per group and step the k largest (smallest) samples, keeping
    the series' own labels."""
    keep = np.zeros_like(vector.present)
    wanted = np.floor(np.nan_to_num(k, nan=0.0, posinf=1e18, neginf=0.0))
    for rows in groups.values():
        values = vector.values[rows]
        present = vector.present[rows]
        # Present samples first, NaN after every number, as Prometheus orders them.
        key = -values if largest else values.copy()
        key = np.where(np.isnan(key), np.inf, key)
        ranked = np.lexsort((key, ~present), axis=0)
        rank = np.empty_like(ranked)
        np.put_along_axis(rank, ranked, np.arange(len(rows))[:, None], axis=0)
        keep[rows] = present & (rank < wanted[None, :])
    return Vector(vector.labels, vector.values, keep).compact()
