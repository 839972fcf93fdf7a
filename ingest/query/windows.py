"""Range-window functions over the samples of many series at many evaluation times,
vectorised with numpy.

Samples of S series are flat arrays sorted by (series, ts). For each series s and
evaluation time t the window (t - range, t] is the index range [lo, hi) found with one
`searchsorted` over keys `s · 2^44 + (ts - base)`, so every function below works on
(S, T) index arrays with no Python loop over series or steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ingest.query.store import F64, I64, Labels, SampleBlock, SeriesRef

_SLOT_BITS = 44  # 2^44 ms ≈ 557 years of sample times per series slot
Bool = npt.NDArray[np.bool_]


@dataclass
class Samples:
    """Rows of `SampleBlock` for `labels[i]`, i = `index` (flat, sorted by index, ts)."""

    labels: list[Labels]
    index: I64
    ts: I64
    value: F64
    min: F64
    max: F64
    sum: F64
    count: F64

    @staticmethod
    def of(refs: list[SeriesRef], block: SampleBlock) -> Samples:
        ids = np.array([r.series_id for r in refs], dtype=np.uint64)
        order = np.argsort(ids, kind="stable")
        pos = np.searchsorted(ids[order], block.series_id)
        index = order[np.minimum(pos, len(ids) - 1)].astype(np.int64) if len(ids) else pos
        # Blocks come sorted by series id; re-sort by the position in `refs`.
        perm = np.lexsort((block.ts, index))
        return Samples(
            [r.labels for r in refs],
            np.ascontiguousarray(index[perm], dtype=np.int64),
            block.ts[perm],
            block.value[perm],
            block.min[perm],
            block.max[perm],
            block.sum[perm],
            block.count[perm],
        )

    def __len__(self) -> int:
        return int(self.ts.shape[0])


@dataclass
class Windows:
    """For each (series, evaluation time): samples [lo, hi) with t - range < ts <= t."""

    lo: I64
    hi: I64

    @property
    def count(self) -> I64:
        return self.hi - self.lo

    @staticmethod
    def of(samples: Samples, eval_ms: I64, range_ms: int) -> Windows:
        s_count = len(samples.labels)
        if len(samples) == 0:
            zeros = np.zeros((s_count, eval_ms.shape[0]), dtype=np.int64)
            return Windows(zeros, zeros)
        base = int(samples.ts.min()) - 1
        span = (1 << _SLOT_BITS) - 1
        keys = (samples.index << _SLOT_BITS) + (samples.ts - base)
        slots = (np.arange(s_count, dtype=np.int64) << _SLOT_BITS)[:, None]
        ends = np.clip(eval_ms - base, 0, span)[None, :]
        starts = np.clip(eval_ms - range_ms - base, 0, span)[None, :]
        hi = np.searchsorted(keys, slots + ends, side="right")
        lo = np.searchsorted(keys, slots + starts, side="right")
        return Windows(lo.astype(np.int64), hi.astype(np.int64))


def _take(values: npt.NDArray[np.generic], idx: I64, ok: Bool) -> npt.NDArray[np.generic]:
    return values[np.where(ok, idx, 0)] if len(values) else np.zeros(idx.shape, values.dtype)


def last_value(s: Samples, w: Windows) -> tuple[F64, Bool]:
    ok = w.count > 0
    return np.asarray(_take(s.value, w.hi - 1, ok), dtype=np.float64), ok


def _prefix(values: F64) -> npt.NDArray[np.longdouble]:
    # Extended precision keeps differences of large prefix sums accurate.
    out = np.zeros(len(values) + 1, dtype=np.longdouble)
    np.cumsum(values, dtype=np.longdouble, out=out[1:])
    return out


def window_sum(values: F64, w: Windows) -> F64:
    prefix = _prefix(values)
    return np.asarray(prefix[w.hi] - prefix[w.lo], dtype=np.float64)


def _range_extreme(values: F64, w: Windows, ufunc: np.ufunc) -> F64:
    """min or max over each window: an O(n log n) sparse table, levels as deep as the
    widest window needs."""
    ok = w.count > 0
    if not len(values):
        return np.zeros(w.lo.shape, dtype=np.float64)
    widest = int(w.count.max()) if w.count.size else 0
    table = [values]
    level = 1
    while (1 << level) <= widest:
        prev = table[-1]
        half = 1 << (level - 1)
        table.append(ufunc(prev[:-half], prev[half:]) if len(prev) > half else prev[:0])
        level += 1
    count = np.where(ok, w.count, 1)
    k = np.floor(np.log2(count)).astype(np.int64)
    out = np.empty(w.lo.shape, dtype=np.float64)
    lo = np.where(ok, w.lo, 0)
    for lvl in np.unique(k):
        sel = k == lvl
        row = table[int(lvl)]
        a = lo[sel]
        b = lo[sel] + count[sel] - (1 << int(lvl))
        out[sel] = ufunc(row[a], row[b])
    return out


def over_time(s: Samples, w: Windows, fn: str) -> tuple[F64, Bool]:
    """`<fn>_over_time` from the rows' aggregates, so that rollup rows give the same
    answer as the raw samples they merge (exactly, when windows hold whole rows)."""
    ok = w.count > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        if fn == "sum":
            out = window_sum(s.sum, w)
        elif fn == "count":
            out = window_sum(s.count, w)
        elif fn == "avg":
            out = window_sum(s.sum, w) / window_sum(s.count, w)
        elif fn == "min":
            out = _range_extreme(s.min, w, np.minimum)
        elif fn == "max":
            out = _range_extreme(s.max, w, np.maximum)
        elif fn == "last":
            out, _ = last_value(s, w)
        elif fn == "present":
            out = np.ones(w.lo.shape, dtype=np.float64)
        else:
            raise ValueError(fn)
    return np.asarray(out, dtype=np.float64), ok


def _reset_corrections(s: Samples) -> npt.NDArray[np.longdouble]:
    """Cumulative counter-reset corrections: a drop adds the value before it.

    A rollup group whose last value is below its max had a reset inside it: the peak
    before the reset is its max (exact for one reset per group). Raw samples have
    max = value, so this is Prometheus's rule there."""
    v, peak = s.value, s.max
    drop = np.zeros(len(v), dtype=np.longdouble)
    if len(v) > 1:
        same = s.index[1:] == s.index[:-1]
        inside = same & (v[1:] < peak[1:])
        between = same & (v[1:] < v[:-1])
        drop[1:] = np.where(inside, peak[1:], np.where(between, v[:-1], 0.0))
    return np.cumsum(drop, dtype=np.longdouble)


def extrapolated_rate(
    s: Samples, w: Windows, eval_ms: I64, range_ms: int, counter: bool, per_second: bool
) -> tuple[F64, Bool]:
    """`rate`, `increase` (counter) and `delta` (gauge) as Prometheus computes them:
    the change between the first and last sample of the window (counter resets added
    back), extrapolated towards the window's edges unless a sample is far from the edge
    (more than 1.1 times the average interval: then half an interval), and never below the
    counter's zero point."""
    n = w.count
    ok = n >= 2
    first = np.where(ok, w.lo, 0)
    last = np.where(ok, w.hi - 1, 0)
    if not len(s):
        return np.zeros(n.shape, dtype=np.float64), ok
    t0, t1 = s.ts[first], s.ts[last]
    v0, v1 = s.value[first], s.value[last]
    ok &= t1 > t0
    result = v1 - v0
    if counter:
        corrections = _reset_corrections(s)
        result = result + np.asarray(corrections[last] - corrections[first], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        sampled = (t1 - t0) / 1000.0
        to_start = (t0 - (eval_ms - range_ms)[None, :]) / 1000.0
        to_end = (eval_ms[None, :] - t1) / 1000.0
        average = sampled / np.maximum(n - 1, 1)
        threshold = average * 1.1
        to_start = np.where(to_start >= threshold, average / 2, to_start)
        if counter:
            # A first group that restarted inside itself started the window at its
            # pre-reset peak, not at its (post-reset) last value.
            v0 = np.where(v0 < s.max[first], s.max[first], v0)
            to_zero = sampled * (v0 / result)
            use_zero = (result > 0) & (v0 >= 0) & (to_zero < to_start)
            to_start = np.where(use_zero, to_zero, to_start)
        to_end = np.where(to_end >= threshold, average / 2, to_end)
        factor = (sampled + to_start + to_end) / sampled
        if per_second:
            factor = factor / (range_ms / 1000.0)
        out = np.where(ok, result * factor, 0.0)
    return np.asarray(out, dtype=np.float64), ok


def instant_rate(s: Samples, w: Windows, per_second: bool) -> tuple[F64, Bool]:
    """`irate` (counter, per second) and `idelta` (gauge) from the last two samples."""
    ok = w.count >= 2
    last = np.where(ok, w.hi - 1, 1)
    prev = last - 1
    if not len(s):
        return np.zeros(w.lo.shape, dtype=np.float64), ok
    v1, v0 = s.value[last], s.value[prev]
    dt = (s.ts[last] - s.ts[prev]) / 1000.0
    ok &= dt > 0
    result = v1 - v0
    with np.errstate(invalid="ignore", divide="ignore"):
        if per_second:
            result = np.where(v1 < v0, v1, result) / dt
        out = np.where(ok, result, 0.0)
    return np.asarray(out, dtype=np.float64), ok


def value_changes(s: Samples, w: Windows, resets_only: bool) -> tuple[F64, Bool]:
    """`changes` (the value differs from the previous sample) and `resets` (it dropped)
    counted over consecutive samples inside each window. A rollup group whose last value
    is below its max restarted inside itself: `resets` counts that too."""
    ok = w.count > 0
    flags = np.zeros(len(s), dtype=np.float64)
    if len(s) > 1:
        v = s.value
        same = s.index[1:] == s.index[:-1]
        if resets_only:
            flags[1:] = same & ((v[1:] < v[:-1]) | (v[1:] < s.max[1:]))
        else:
            both_nan = np.isnan(v[1:]) & np.isnan(v[:-1])
            flags[1:] = same & (v[1:] != v[:-1]) & ~both_nan
    prefix = np.concatenate([[0.0], np.cumsum(flags)])
    first = np.minimum(w.lo + 1, w.hi)  # pairs (j - 1, j) with both samples in the window
    out = np.where(ok, prefix[w.hi] - prefix[first], 0.0)
    return np.asarray(out, dtype=np.float64), ok


def linear_regression(s: Samples, w: Windows) -> tuple[F64, Bool]:
    """`deriv`: the least-squares slope (per second) of value over time in each window
    with at least two samples. Times are centred per window before summing, so long
    ranges far from the epoch keep full precision."""
    slope = np.zeros(w.lo.shape, dtype=np.float64)
    ok = w.count >= 2
    for i in np.flatnonzero(ok.any(axis=1)):
        n = np.where(ok[i], w.count[i], 0)
        lo = np.where(ok[i], w.lo[i], 0)
        widest = int(n.max())
        inside = np.arange(widest)[None, :] < n[:, None]
        idx = np.where(inside, lo[:, None] + np.arange(widest)[None, :], 0)
        t = np.where(inside, (s.ts[idx] - s.ts[lo][:, None]) / 1000.0, 0.0)
        v = np.where(inside, s.value[idx], 0.0)
        count = np.maximum(n, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            dt = np.where(inside, t - (t.sum(axis=1) / count)[:, None], 0.0)
            dv = np.where(inside, v - (v.sum(axis=1) / count)[:, None], 0.0)
            slope[i] = (dt * dv).sum(axis=1) / (dt * dt).sum(axis=1)
    return slope, ok
