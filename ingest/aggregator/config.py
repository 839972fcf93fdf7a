"""Settings and counters of the aggregator service."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ingest.aggregator.rollup import LatePolicy


@dataclass(frozen=True)
class AggregatorConfig:
    """Batching (`max_records` per partition batch, `max_wait_s`), the bound on decoded rows
    waiting to be written, the late policy, and Kafka/retry timings."""

    max_records: int = 1000
    max_wait_s: float = 2.0
    max_pending_rows: int = 1_000_000
    late: LatePolicy = field(default_factory=LatePolicy)
    fetch_max_records: int = 500
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 1_000
    retry_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    drain_timeout_s: float = 15.0
    publish_rollups: bool = True
    # Touched while the consume loop runs (container health checks); None: no file.
    heartbeat_file: Path | None = None


@dataclass
class AggregatorStats:
    """Counters since start; `committed` is the next offset per (topic, partition)."""

    records: int = 0
    samples: int = 0
    series: int = 0
    late_dropped: int = 0
    future_dropped: int = 0
    skipped_points: int = 0
    dlq: int = 0
    batches: int = 0
    insert_seconds: float = 0.0
    write_retries: int = 0
    commit_failures: int = 0
    rollups_published: int = 0
    publish_failures: int = 0
    pauses: int = 0
    consumer_restarts: int = 0
    partitions: int = 0  # currently assigned
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
