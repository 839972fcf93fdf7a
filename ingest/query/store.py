"""The store protocol the query layer reads through, and the shapes it returns.

Implementations: `ClickHouseStore` (the metric tables of docs/metrics.md) and
`MemoryStore` (the same semantics over Python lists, for unit tests and fakes). Every
method takes the caller's tenant and must never return another tenant's data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ingest.query.matchers import Selector
from ingest.query.tiers import Tier

Labels = tuple[tuple[str, str], ...]  # sorted by name; "__name__" is the metric
SeriesCursor = tuple[str, int]  # (metric, series_id) of the last series of a page

# `metric_series.last_seen` is rewritten at most every 15 minutes of sample time
# (docs/metrics.md), so a series may have samples up to that long after it.
LAST_SEEN_LAG_MS = 15 * 60 * 1000

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]


@dataclass(frozen=True)
class SeriesRef:
    series_id: int
    labels: Labels

    @property
    def metric(self) -> str:
        return dict(self.labels).get("__name__", "")


@dataclass(frozen=True)
class Grouping:
    """Merge stored rows into groups `[origin + k·seconds, origin + (k+1)·seconds)`."""

    seconds: int
    origin: int = 0


@dataclass(frozen=True)
class SampleBlock:
    """Rows of several series sorted by (series_id, ts), all arrays of one length.

    A row is one raw sample (`bucket` = `ts`, `min` = `max` = `sum` = `value`,
    `count` = 1) or one group of merged rollup partials: `bucket` its start (ms), `ts`
    and `value` its latest sample (the `last` of the partials), and the merged
    `min`, `max`, `sum`, `count`.
    """

    series_id: U64
    bucket: I64
    ts: I64
    value: F64
    min: F64
    max: F64
    sum: F64
    count: F64

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    @staticmethod
    def empty() -> SampleBlock:
        f = np.empty(0, dtype=np.float64)
        i = np.empty(0, dtype=np.int64)
        return SampleBlock(np.empty(0, dtype=np.uint64), i, i, f, f, f, f, f)


class MetricStore(Protocol):
    """Reads series and samples of one tenant at a time.

    Time bounds are unix milliseconds; `None` means unbounded. A series is in a time
    range when it may have samples there (first seen before its end, last seen after its
    start, allowing for the `last_seen` lag).
    """

    def series(
        self,
        tenant_id: str,
        selectors: Sequence[Selector],
        start_ms: int | None,
        end_ms: int | None,
        limit: int,
        after: SeriesCursor | None = None,
    ) -> list[SeriesRef]:
        """Series matching any of `selectors` (each a conjunction of matchers; no
        selectors: every series), ordered by (metric, series_id), at most `limit`."""
        ...

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
        """Rows of `series_ids` from `tier` whose time — the sample time for raw samples,
        the bucket start for rollups — lies in [start_ms, end_ms], merged per group when
        `grouping` is given (rollups are always merged at least per stored bucket).
        Raises `QueryError("execution")` when there would be more than `limit` rows."""
        ...

    def label_names(
        self,
        tenant_id: str,
        selectors: Sequence[Selector],
        start_ms: int | None,
        end_ms: int | None,
        limit: int,
    ) -> list[str]:
        """Sorted label names (`__name__` included) of the selected series."""
        ...

    def label_values(
        self,
        tenant_id: str,
        name: str,
        selectors: Sequence[Selector],
        start_ms: int | None,
        end_ms: int | None,
        limit: int,
    ) -> list[str]:
        """Sorted non-empty values of label `name` among the selected series."""
        ...
