"""Which stored resolution serves a query: raw samples or one of the rollup tiers.

Every tier keeps min(plan retention, its cap) days, and coarser tiers never keep less
than finer ones, so "does this tier still hold data that old?" can be answered from the
caps alone: a plan with shorter retention leaves every tier equally empty.
"""

from __future__ import annotations

from dataclasses import dataclass

from ingest.aggregator.rollup import TIERS as ROLLUP_TIERS
from ingest.metrics_schema import RAW_RETENTION_DAYS, RAW_TABLE

DAY_MS = 86_400_000


@dataclass(frozen=True)
class Tier:
    """A stored resolution. `seconds` is 0 for raw samples."""

    name: str
    seconds: int
    table: str
    retention_ms: int | None  # None: as long as the tenant's plan

    @property
    def raw(self) -> bool:
        return self.seconds == 0

    def covers(self, oldest_ms: int, now_ms: int) -> bool:
        return self.retention_ms is None or oldest_ms >= now_ms - self.retention_ms


RAW = Tier("raw", 0, RAW_TABLE, RAW_RETENTION_DAYS * DAY_MS)
TIERS: tuple[Tier, ...] = (
    RAW,
    *(
        Tier(
            t.name,
            t.seconds,
            t.table,
            None if t.max_retention_days is None else t.max_retention_days * DAY_MS,
        )
        for t in ROLLUP_TIERS
    ),
)
BY_NAME = {t.name: t for t in TIERS}


def choose_tier(target_s: float, oldest_ms: int, now_ms: int) -> Tier:
    """The coarsest tier with resolution ≤ `target_s` that still holds data from
    `oldest_ms`; when every such tier has expired that far back, the finest one that has
    not (its resolution is then coarser than asked)."""
    covering = [t for t in TIERS if t.covers(oldest_ms, now_ms)]
    fitting = [t for t in covering if t.seconds <= target_s]
    if fitting:
        return fitting[-1]
    return covering[0]


def exact_tier(step_s: int, oldest_ms: int, now_ms: int) -> Tier | None:
    """The coarsest tier whose buckets tile a `step_s` bucket exactly (its resolution
    divides the step) and that holds data from `oldest_ms`; None if there is none."""
    fitting = [
        t for t in TIERS if t.covers(oldest_ms, now_ms) and (t.raw or step_s % t.seconds == 0)
    ]
    return fitting[-1] if fitting else None


def group_seconds(tier: Tier, target_s: float, step_ms: int, range_ms: int) -> int:
    """How wide the groups of `tier` buckets merged in the query are: the widest multiple
    of the tier's resolution that is ≤ `target_s`, preferring widths that divide the step
    and the range window (so that windows are unions of whole groups)."""
    if tier.raw:
        return 0
    most = max(1, int(target_s // tier.seconds))
    for k in range(most, 0, -1):
        width_ms = k * tier.seconds * 1000
        if step_ms % width_ms == 0 and range_ms % width_ms == 0:
            return k * tier.seconds
    return tier.seconds
