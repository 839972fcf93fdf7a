"""Pure transforms from decoded samples to partial rollups (no I/O).

A rollup row is a *partial* aggregate of one series over one bucket: several batches may
hold samples of the same bucket, and each writes its own row. Partials combine with
min of `min`, max of `max`, sum of `sum` and `count`, and max of `last` = (ts, value) —
the value at the latest timestamp (ties broken by the larger value, as ClickHouse compares
tuples) — in any order, which is what the AggregatingMergeTree tables and the queries do.

Late policy: a batch's reference time is the largest `received_at` among its samples
(gateway time, so catching up on a backlog drops nothing). Samples older than
`late_window_ms` before it, or newer than `future_window_ms` after it, are dropped from
raw samples and rollups alike and counted (`late_dropped`, `future_dropped`): a partial
for a bucket that live views and alert rules have already moved past would change history
under them, and far-future timestamps come from broken clocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from ingest.metrics_schema import ROLLUP_1H_TABLE, ROLLUP_1M_TABLE, ROLLUP_10S_TABLE

ROLLUP_KEYS = ("tenant_id", "series_id", "bucket")


@dataclass(frozen=True)
class RollupTier:
    """One rollup resolution and where it is stored."""

    name: str
    seconds: int
    table: str
    max_retention_days: int | None

    def retention_days(self, plan_days: pl.Expr) -> pl.Expr:
        """This tier keeps the plan's days, capped by the tier's own maximum."""
        if self.max_retention_days is None:
            return plan_days
        return pl.min_horizontal(plan_days, pl.lit(self.max_retention_days)).cast(pl.UInt16)


TIERS: tuple[RollupTier, ...] = (
    RollupTier("10s", 10, ROLLUP_10S_TABLE, 3),
    RollupTier("1m", 60, ROLLUP_1M_TABLE, 30),
    RollupTier("1h", 3600, ROLLUP_1H_TABLE, None),
)
FINEST = TIERS[0]


@dataclass(frozen=True)
class LatePolicy:
    late_window_ms: int = 10 * 60 * 1000
    future_window_ms: int = 10 * 60 * 1000


@dataclass(frozen=True)
class AggregateBatch:
    """What one batch writes: the samples kept, and each tier's partial rollups.

    `series` describes the batch's series (series_id, tenant_id, server_id, metric,
    labels) when `samples` lacks those columns (`SampleBatchBuilder.samples()`).
    """

    samples: pl.DataFrame
    rollups: dict[str, pl.DataFrame]
    late_dropped: int
    future_dropped: int
    series: pl.DataFrame | None = None

    @property
    def row_count(self) -> int:
        return self.samples.height + sum(r.height for r in self.rollups.values())


def split_by_time(samples: pl.DataFrame, policy: LatePolicy) -> tuple[pl.DataFrame, int, int]:
    """(kept samples, late count, future count) under the late policy."""
    if samples.is_empty():
        return samples, 0, 0
    reference = samples["received_at"].max()
    assert isinstance(reference, int)
    late = pl.col("ts") < reference - policy.late_window_ms
    future = pl.col("ts") > reference + policy.future_window_ms
    counts = samples.select(late.sum().alias("late"), future.sum().alias("future"))
    n_late, n_future = int(counts["late"][0]), int(counts["future"][0])
    if n_late == 0 and n_future == 0:
        return samples, 0, 0  # the usual case: no copy of the (wide) frame
    return samples.filter(~late & ~future), n_late, n_future


def rollup(samples: pl.DataFrame, tier_seconds: int) -> pl.DataFrame:
    """Partial aggregates per (tenant_id, series_id, bucket).

    `bucket` is the bucket start in unix seconds; `last_ts` (ms) and `last_value` are the
    sample with the largest (ts, value); `retention_days` is the largest plan retention.
    """
    width_ms = tier_seconds * 1000
    return (
        samples.with_columns(bucket=(pl.col("ts") // width_ms) * tier_seconds)
        .group_by(list(ROLLUP_KEYS))
        .agg(
            min=pl.col("value").min(),
            max=pl.col("value").max(),
            sum=pl.col("value").sum(),
            count=pl.len().cast(pl.UInt64),
            last_ts=pl.col("ts").max(),
            last_value=pl.col("value").sort_by(["ts", "value"]).last(),
            retention_days=pl.col("retention_days").max(),
        )
        .sort(list(ROLLUP_KEYS))
    )


def merge_partials(partials: pl.DataFrame, tier_seconds: int) -> pl.DataFrame:
    """Partials of a finer tier merged into `tier_seconds` buckets, which must be whole
    multiples of the finer ones: the same rows `rollup` makes from the samples (up to
    the order of floating-point additions in `sum`), from fewer input rows."""
    return (
        partials.with_columns(bucket=(pl.col("bucket") // tier_seconds) * tier_seconds)
        .group_by(list(ROLLUP_KEYS))
        .agg(
            min=pl.col("min").min(),
            max=pl.col("max").max(),
            sum=pl.col("sum").sum(),
            count=pl.col("count").sum(),
            last_ts=pl.col("last_ts").max(),
            last_value=pl.col("last_value").sort_by(["last_ts", "last_value"]).last(),
            retention_days=pl.col("retention_days").max(),
        )
        .sort(list(ROLLUP_KEYS))
    )


def aggregate(
    samples: pl.DataFrame,
    policy: LatePolicy = LatePolicy(),
    tiers: tuple[RollupTier, ...] = TIERS,
    series: pl.DataFrame | None = None,
) -> AggregateBatch:
    kept, late, future = split_by_time(samples, policy)
    rollups: dict[str, pl.DataFrame] = {}
    finest: tuple[int, pl.DataFrame] | None = None
    for tier in tiers:
        if finest is not None and tier.seconds % finest[0] == 0:
            # A coarser tier merges the finest partials: fewer rows than the samples.
            rollups[tier.name] = merge_partials(finest[1], tier.seconds)
        else:
            rollups[tier.name] = rollup(kept, tier.seconds)
            if finest is None:
                finest = (tier.seconds, rollups[tier.name])
    return AggregateBatch(kept, rollups, late, future, series)
