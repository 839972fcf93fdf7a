"""`MetricStore` in memory: raw samples in lists, rollups computed on read with the same
bucketing and merge rules as the aggregator and the ClickHouse store. For unit tests and
as a reference implementation; retention is not enforced."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ingest.aggregator.decode import series_id_of
from ingest.query.errors import QueryError
from ingest.query.matchers import METRIC_LABEL, Selector, selector_matches
from ingest.query.store import (
    LAST_SEEN_LAG_MS,
    Grouping,
    SampleBlock,
    SeriesCursor,
    SeriesRef,
)
from ingest.query.tiers import Tier


@dataclass
class _Series:
    tenant_id: str
    ref: SeriesRef
    samples: dict[int, float] = field(default_factory=dict)  # ts ms -> value

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.ref.labels)


class MemoryStore:
    def __init__(self) -> None:
        self._series: dict[tuple[str, int], _Series] = {}

    def add(
        self,
        tenant_id: str,
        metric: str,
        labels: Mapping[str, str],
        samples: Iterable[tuple[int, float]],
    ) -> int:
        """Store samples (ts ms, value) of one series; returns its series id. A repeated
        timestamp keeps the larger value, as the rollups' `last` does."""
        tenant_id = str(uuid.UUID(tenant_id))
        pairs = tuple(sorted(labels.items()))
        sid = series_id_of(tenant_id, metric, pairs)
        key = (tenant_id, sid)
        if key not in self._series:
            ref = SeriesRef(sid, tuple(sorted({**dict(pairs), METRIC_LABEL: metric}.items())))
            self._series[key] = _Series(tenant_id, ref)
        stored = self._series[key].samples
        for ts, value in samples:
            stored[ts] = max(value, stored.get(ts, value))
        return sid

    def _selected(
        self,
        tenant_id: str,
        selectors: Sequence[Selector],
        start_ms: int | None,
        end_ms: int | None,
    ) -> list[_Series]:
        tenant_id = str(uuid.UUID(tenant_id))
        out = []
        for s in self._series.values():
            if s.tenant_id != tenant_id or not s.samples:
                continue
            if selectors and not any(selector_matches(sel, s.labels) for sel in selectors):
                continue
            if end_ms is not None and min(s.samples) > end_ms:
                continue
            if start_ms is not None and max(s.samples) < start_ms - LAST_SEEN_LAG_MS:
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
        found = [s.ref for s in self._selected(tenant_id, selectors, start_ms, end_ms)]
        if after is not None:
            found = [r for r in found if (r.metric, r.series_id) > after]
        return found[:limit]

    def label_names(
        self,
        tenant_id: str,
        selectors: Sequence[Selector],
        start_ms: int | None,
        end_ms: int | None,
        limit: int,
    ) -> list[str]:
        selected = self._selected(tenant_id, selectors, start_ms, end_ms)
        names = {n for s in selected for n in s.labels}
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
        values = {
            s.labels.get(name, "") for s in self._selected(tenant_id, selectors, start_ms, end_ms)
        }
        return sorted(v for v in values if v)[:limit]

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
        tenant_id = str(uuid.UUID(tenant_id))
        rows: list[tuple[int, int, int, float, float, float, float, float]] = []
        for sid in sorted(set(series_ids)):
            s = self._series.get((tenant_id, sid))
            if s is None:
                continue
            points = sorted(s.samples.items())
            if tier.raw and grouping is None:
                rows.extend(
                    (sid, ts, ts, v, v, v, v, 1.0) for ts, v in points if start_ms <= ts <= end_ms
                )
                continue
            # Tier buckets first (a row's time is its bucket start), then the groups.
            width_ms = tier.seconds * 1000
            if grouping is None:
                grouping = Grouping(tier.seconds)
            groups: dict[int, list[tuple[int, float]]] = defaultdict(list)
            for ts, v in points:
                at = ts if tier.raw else ts // width_ms * width_ms
                if not start_ms <= at <= end_ms:
                    continue
                g_ms, o_ms = grouping.seconds * 1000, grouping.origin * 1000
                groups[(at - o_ms) // g_ms * g_ms + o_ms].append((ts, v))
            for bucket, pts in sorted(groups.items()):
                values = [v for _, v in pts]
                last_ts, last_v = max(pts)
                rows.append(
                    (sid, bucket, last_ts, last_v, min(values), max(values), sum(values), len(pts))
                )
        if len(rows) > limit:
            raise QueryError(
                "execution",
                f"the query would load more than {limit} samples from the {tier.name} tier;"
                " narrow the selector, shorten the range or raise the step",
            )
        if not rows:
            return SampleBlock.empty()
        rows.sort(key=lambda r: (r[0], r[2]))
        cols = list(zip(*rows, strict=True))
        return SampleBlock(
            np.array(cols[0], dtype=np.uint64),
            np.array(cols[1], dtype=np.int64),
            np.array(cols[2], dtype=np.int64),
            *(np.array(c, dtype=np.float64) for c in cols[3:]),
        )
