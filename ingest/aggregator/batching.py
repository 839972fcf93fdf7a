"""Per-partition batching: contiguous offset ranges, cut by size or age.

Each partition has at most one open batch. It is sealed when it holds `max_records`
records or its first record has waited `max_wait_s`, or when the consumer must free
memory (`seal_all`). A batch that opens on a record where an earlier write started a
range (`writer.ClickHouseWriter.recorded_batches`: a crash before the commit, or offsets
rewound) is sealed exactly at that range's end, whatever the size and age rules say, so
the replayed inserts carry the same deduplication tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ingest.aggregator.decode import Headers, SampleBatchBuilder, UndecodableMessage
from ingest.aggregator.writer import BatchSource
from yakpanel.clock import Clock

PartitionKey = tuple[str, int]  # (topic, partition)


@dataclass
class _OpenBatch:
    topic: str
    partition: int
    first_offset: int
    first_timestamp: int
    opened_at: float
    last_offset: int = -1
    records: int = 0
    builder: SampleBatchBuilder = field(default_factory=SampleBatchBuilder)


@dataclass(frozen=True)
class SealedBatch:
    """A closed offset range and its decoded samples, ready to aggregate and write."""

    source: BatchSource
    builder: SampleBatchBuilder
    records: int

    @property
    def rows(self) -> int:
        return len(self.builder)


@dataclass(frozen=True)
class Accepted:
    rows: int
    error: UndecodableMessage | None
    sealed: list[SealedBatch]


class BatchAssembler:
    def __init__(self, max_records: int, max_wait_s: float, clock: Clock) -> None:
        if max_records < 1 or max_wait_s <= 0:
            raise ValueError("max_records must be >= 1 and max_wait_s > 0")
        self.max_records = max_records
        self.max_wait_s = max_wait_s
        self.clock = clock
        self._open: dict[PartitionKey, _OpenBatch] = {}
        # Ranges written before, per partition: (first_offset, first_timestamp) -> last.
        self._recorded: dict[PartitionKey, dict[tuple[int, int], int]] = {}
        # Where the open batch of a partition must end (it replays a recorded range).
        self._boundary: dict[PartitionKey, int] = {}

    @property
    def open_rows(self) -> int:
        return sum(len(b.builder) for b in self._open.values())

    def needs_recorded(self, key: PartitionKey) -> bool:
        """True until the recorded ranges of a (re)assigned partition are known."""
        return key not in self._recorded

    def set_recorded(self, key: PartitionKey, ranges: dict[tuple[int, int], int]) -> None:
        self._recorded[key] = dict(ranges)

    def holding(self) -> set[PartitionKey]:
        """Partitions with an open batch that must grow to its replay boundary first."""
        return {k for k in self._open if k in self._boundary}

    def add(
        self,
        key: PartitionKey,
        offset: int,
        timestamp: int,
        payload: bytes,
        headers: Headers,
    ) -> Accepted:
        """Add one record; an undecodable one still extends the range (it is dead-lettered)."""
        sealed: list[SealedBatch] = []
        current = self._open.get(key)
        if current is not None and offset <= current.last_offset:
            return Accepted(0, None, [])  # fetched twice: ranges stay contiguous
        boundary = self._boundary.get(key)
        recorded = self._recorded.get(key, {})
        if current is not None and (
            (boundary is not None and offset > boundary) or (offset, timestamp) in recorded
        ):
            # A replayed range ended on records that are gone, or a recorded range starts
            # here: close what we have so that the next batch lines up with the old one.
            sealed.append(self._seal(key))
            current = None
        if current is None:
            current = _OpenBatch(key[0], key[1], offset, timestamp, self.clock.monotonic())
            self._open[key] = current
            end = recorded.pop((offset, timestamp), None)
            if end is not None and end >= offset:
                self._boundary[key] = end
        rows = 0
        error: UndecodableMessage | None = None
        try:
            rows = current.builder.add(payload, headers)
        except UndecodableMessage as exc:
            error = exc
        current.last_offset = offset
        current.records += 1
        boundary = self._boundary.get(key)
        if boundary is not None:
            if offset >= boundary:
                sealed.append(self._seal(key))
        elif current.records >= self.max_records:
            sealed.append(self._seal(key))
        return Accepted(rows, error, sealed)

    def due(self) -> list[SealedBatch]:
        """Seal the batches that have waited `max_wait_s` (unless held for a boundary)."""
        now = self.clock.monotonic()
        keys = [
            k
            for k, b in self._open.items()
            if k not in self._boundary and now - b.opened_at >= self.max_wait_s
        ]
        return [self._seal(k) for k in keys]

    def seal_all(self) -> list[SealedBatch]:
        """Seal every batch not held for a replay boundary (to free memory or to stop)."""
        return [self._seal(k) for k in list(self._open) if k not in self._boundary]

    def drop(self, keys: Iterable[PartitionKey]) -> int:
        """Forget partitions (revoked, or the consumer restarts); returns the rows dropped."""
        dropped = 0
        for key in list(keys):
            batch = self._open.pop(key, None)
            if batch is not None:
                dropped += len(batch.builder)
            self._boundary.pop(key, None)
            self._recorded.pop(key, None)
        return dropped

    def drop_all(self) -> int:
        return self.drop(set(self._open) | set(self._recorded))

    def _seal(self, key: PartitionKey) -> SealedBatch:
        batch = self._open.pop(key)
        self._boundary.pop(key, None)
        source = BatchSource(
            batch.topic,
            batch.partition,
            batch.first_offset,
            batch.last_offset,
            batch.first_timestamp,
        )
        return SealedBatch(source, batch.builder, batch.records)
