"""`histogram_quantile` over classic `_bucket{le="…"}` series (cumulative counts)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from ingest.query.store import F64, Labels
from ingest.query.vectors import Vector, drop_labels, drop_name


def histogram_quantile(phi: F64, v: Vector) -> Vector:
    """Per label set without `le`: the φ-quantile by linear interpolation inside the
    bucket the rank falls in, as Prometheus computes it (counts forced monotonic; the
    `+Inf` bucket is required; a rank in the `+Inf` bucket answers the largest finite
    upper bound). Series without a numeric `le` are ignored."""
    groups: dict[Labels, dict[float, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, labels in enumerate(v.labels):
        le = dict(labels).get("le")
        try:
            bound = float(le) if le is not None else None
        except ValueError:
            bound = None
        if bound is None or np.isnan(bound):
            continue
        groups[drop_labels(drop_name(labels), ("le",))][bound].append(i)
    out_labels, out_v, out_p = [], [], []
    for key, by_bound in groups.items():
        bounds = np.array(sorted(by_bound))
        rows_of = [by_bound[b] for b in bounds]
        counts = np.array([np.where(v.present[r], v.values[r], 0.0).sum(axis=0) for r in rows_of])
        present = np.array([v.present[by_bound[b]].any(axis=0) for b in bounds])
        values = np.full(v.steps, np.nan)
        patterns, inverse = np.unique(present.T, axis=0, return_inverse=True)
        for p, pattern in enumerate(patterns):
            cols = np.flatnonzero(inverse.ravel() == p)
            rows = np.flatnonzero(pattern)
            if len(rows):
                values[cols] = _quantiles(phi[cols], bounds[rows], counts[np.ix_(rows, cols)])
        any_present = present.any(axis=0)
        if any_present.any():
            out_labels.append(key)
            out_v.append(values)
            out_p.append(any_present)
    if not out_labels:
        return Vector.empty(v.steps)
    return Vector(out_labels, np.array(out_v), np.array(out_p))


def _quantiles(q: F64, bounds: F64, counts: F64) -> F64:
    """Bucket quantiles for columns of cumulative `counts` (one row per bucket)."""
    n_buckets, n_cols = counts.shape
    out = np.full(n_cols, np.nan)
    if n_buckets < 2 or not np.isposinf(bounds[-1]):
        return _edges(q, out)
    counts = np.maximum.accumulate(counts, axis=0)
    observations = counts[-1]
    rank = q * observations
    reached = counts[:-1] >= rank[None, :]
    b = np.where(reached.any(axis=0), reached.argmax(axis=0), n_buckets - 1)
    cols = np.arange(n_cols)
    below = np.where(b > 0, counts[np.maximum(b - 1, 0), cols], 0.0)
    start = np.where(b > 0, bounds[np.maximum(b - 1, 0)], 0.0)
    end = bounds[np.minimum(b, n_buckets - 1)]
    with np.errstate(all="ignore"):
        inside = start + (end - start) * ((rank - below) / (counts[b, cols] - below))
    out = np.where(b == n_buckets - 1, bounds[-2], inside)
    out = np.where((b == 0) & (bounds[0] <= 0), bounds[0], out)
    out = np.where(observations == 0, np.nan, out)
    return _edges(q, out)


def _edges(q: F64, out: F64) -> F64:
    out = np.where(q < 0, -np.inf, out)
    out = np.where(q > 1, np.inf, out)
    return np.asarray(np.where(np.isnan(q), np.nan, out), dtype=np.float64)
