"""`HotWindow`: one tenant's recent samples of the series its streamed rules select, as a
`MetricStore` the query layer evaluates PromQL over.

Built for being read on every arriving sample: each series keeps its timestamps and
values in two sorted arrays, so the raw reads the alert rules make (instant selectors
and range functions up to an hour, `RAW_INSTANT_WINDOW_MS`) are two binary searches and
a copy per series. Rollup tiers, asked for only by longer windows than the stream plans,
are served by `MemoryStore` over the same samples (same bucketing as ClickHouse). A
repeated timestamp keeps the larger value, as the rollups' `last` does, so reloading
what the stream already holds changes nothing.

Thread safety: the stream writes on the event loop while an evaluation may read on a
worker thread; every method holds the window's lock for its own short run (a query sees
each series as of its read, as a query against ClickHouse sees concurrent inserts).
"""

from __future__ import annotations

import threading
import uuid
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ingest.aggregator.decode import series_id_of
from ingest.query import METRIC_LABEL, MemoryStore, QueryError, Selector, SeriesRef, Tier
from ingest.query.matchers import selector_matches
from ingest.query.store import LAST_SEEN_LAG_MS, Grouping, SampleBlock, SeriesCursor


@dataclass
class _Series:
    ref: SeriesRef
    labels: dict[str, str]  # with __name__
    ts: array[int] = field(default_factory=lambda: array("q"))
    values: array[float] = field(default_factory=lambda: array("d"))


class HotWindow:
    def __init__(self, tenant_id: str) -> None:
        self.tenant_id = str(uuid.UUID(tenant_id))
        self.samples = 0
        self._series: dict[int, _Series] = {}
        self._ids: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._series)

    # --- writing --------------------------------------------------------------------

    def put(
        self, metric: str, labels: Mapping[str, str], points: Sequence[tuple[int, float]]
    ) -> int:
        """Adds samples of one series (labels without `__name__`); returns how many were new."""
        with self._lock:
            return self._put(metric, labels, points)

    def _put(
        self, metric: str, labels: Mapping[str, str], points: Sequence[tuple[int, float]]
    ) -> int:
        pairs = tuple(sorted(labels.items()))
        key = (metric, pairs)
        sid = self._ids.get(key)
        if sid is None:
            sid = self._ids[key] = series_id_of(self.tenant_id, metric, pairs)
        s = self._series.get(sid)
        if s is None:
            named = {**dict(pairs), METRIC_LABEL: metric}
            s = self._series[sid] = _Series(SeriesRef(sid, tuple(sorted(named.items()))), named)
        added = 0
        ts, values = s.ts, s.values
        for t, v in points:
            if not ts or t > ts[-1]:
                ts.append(t)
                values.append(v)
                added += 1
                continue
            i = bisect_left(ts, t)
            if i < len(ts) and ts[i] == t:
                values[i] = max(values[i], v)
            else:
                ts.insert(i, t)
                values.insert(i, v)
                added += 1
        self.samples += added
        return added

    def put_ref(self, ref: SeriesRef, points: Sequence[tuple[int, float]]) -> int:
        labels = {k: v for k, v in ref.labels if k != METRIC_LABEL}
        return self.put(ref.metric, labels, points)

    def trim(self, before_ms: int) -> int:
        """Drops samples older than `before_ms` (and series left empty); returns how many."""
        with self._lock:
            return self._trim(before_ms)

    def _trim(self, before_ms: int) -> int:
        dropped = 0
        for sid in list(self._series):
            s = self._series[sid]
            i = bisect_left(s.ts, before_ms)
            if i:
                del s.ts[:i]
                del s.values[:i]
                dropped += i
            if not s.ts:
                del self._series[sid]
                key = (s.ref.metric, tuple((k, v) for k, v in s.ref.labels if k != METRIC_LABEL))
                self._ids.pop(key, None)
        self.samples -= dropped
        return dropped

    # --- MetricStore ------------------------------------------------------------------

    def _check(self, tenant_id: str) -> bool:
        return str(uuid.UUID(tenant_id)) == self.tenant_id

    def _selected(
        self, selectors: Sequence[Selector], start_ms: int | None, end_ms: int | None
    ) -> list[_Series]:
        out = []
        with self._lock:
            candidates = list(self._series.values())
        for s in candidates:
            if selectors and not any(selector_matches(sel, s.labels) for sel in selectors):
                continue
            with self._lock:
                if not s.ts:
                    continue
                first, last = s.ts[0], s.ts[-1]
            if end_ms is not None and first > end_ms:
                continue
            if start_ms is not None and last < start_ms - LAST_SEEN_LAG_MS:
                continue
            out.append(s)
        return sorted(out, key=lambda s: (s.ref.metric, s.ref.series_id))

    def series(
        self,
        tenant_id: str,
        selectors: Sequence[Selector],
        start_ms: int | None,
        end_ms: int | None,
        limit: int,
        after: SeriesCursor | None = None,
    ) -> list[SeriesRef]:
        if not self._check(tenant_id):
            return []
        found = [s.ref for s in self._selected(selectors, start_ms, end_ms)]
        if after is not None:
            found = [r for r in found if (r.metric, r.series_id) > after]
        return found[:limit]

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
        if not self._check(tenant_id):
            return SampleBlock.empty()
        if not tier.raw or grouping is not None:
            return self._memory(series_ids).fetch(
                tenant_id, series_ids, tier, start_ms, end_ms, grouping, limit, timeout_s
            )
        ids: list[np.ndarray] = []
        ts: list[np.ndarray] = []
        values: list[np.ndarray] = []
        rows = 0
        for sid in sorted(set(series_ids)):
            with self._lock:
                s = self._series.get(sid)
                if s is None:
                    continue
                lo, hi = bisect_left(s.ts, start_ms), bisect_right(s.ts, end_ms)
                # (Copies: a view would pin the arrays, which then could not grow.)
                part_ts, part_values = s.ts[lo:hi], s.values[lo:hi]
            if hi <= lo:
                continue
            rows += hi - lo
            if rows > limit:
                raise QueryError(
                    "execution",
                    f"the query would load more than {limit} samples from the raw tier;"
                    " narrow the selector, shorten the range or raise the step",
                )
            ts.append(np.frombuffer(part_ts, dtype=np.int64))
            values.append(np.frombuffer(part_values, dtype=np.float64))
            ids.append(np.full(hi - lo, sid, dtype=np.uint64))
        if not rows:
            return SampleBlock.empty()
        t = np.concatenate(ts)
        v = np.concatenate(values)
        return SampleBlock(np.concatenate(ids), t, t, v, v, v, v, np.ones(rows))

    def label_names(
        self,
        tenant_id: str,
        selectors: Sequence[Selector],
        start_ms: int | None,
        end_ms: int | None,
        limit: int,
    ) -> list[str]:
        if not self._check(tenant_id):
            return []
        names = {n for s in self._selected(selectors, start_ms, end_ms) for n in s.labels}
        return sorted(names)[:limit]

    def label_values(
        self,
        tenant_id: str,
        name: str,
        selectors: Sequence[Selector],
        start_ms: int | None,
        end_ms: int | None,
        limit: int,
    ) -> list[str]:
        if not self._check(tenant_id):
            return []
        found = {s.labels.get(name, "") for s in self._selected(selectors, start_ms, end_ms)}
        return sorted(v for v in found if v)[:limit]

    def _memory(self, series_ids: Sequence[int]) -> MemoryStore:
        store = MemoryStore()
        for sid in set(series_ids):
            with self._lock:
                s = self._series.get(sid)
                points = [] if s is None else list(zip(s.ts, s.values, strict=True))
            if s is not None:
                labels = {k: v for k, v in s.labels.items() if k != METRIC_LABEL}
                store.add(self.tenant_id, s.ref.metric, labels, points)
        return store
