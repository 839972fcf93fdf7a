"""Per-partition batching: size and age cuts, replayed ranges, dead-lettered records."""

from __future__ import annotations

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from ingest.aggregator.batching import BatchAssembler, SealedBatch
from yakpanel.clock import ManualClock

P0 = ("yak.metrics.v1", 0)
P1 = ("yak.metrics.v1", 1)
HEADERS = [
    ("tenant_id", b"6f1c2a4e-0000-4000-8000-000000000001"),
    ("server_id", b"0b7e3a51-1111-4111-8111-111111111111"),
    ("received_at", b"1767225600000"),
    ("retention_days", b"30"),
]


def payload(n_points: int = 1) -> bytes:
    req = ExportMetricsServiceRequest()
    metric = req.resource_metrics.add().scope_metrics.add().metrics.add(name="load")
    for i in range(n_points):
        metric.gauge.data_points.add(time_unix_nano=1_767_225_600_000_000_000 + i, as_double=i)
    return req.SerializeToString()


def ranges(batches: list[SealedBatch]) -> list[tuple[int, int, int]]:
    return [(b.source.partition, b.source.first_offset, b.source.last_offset) for b in batches]


def feed(
    assembler: BatchAssembler, key: tuple[str, int], offsets: range, ts: int = 1000
) -> list[SealedBatch]:
    sealed: list[SealedBatch] = []
    for offset in offsets:
        sealed += assembler.add(key, offset, ts + offset, payload(), HEADERS).sealed
    return sealed


def test_batches_are_cut_by_size_per_partition() -> None:
    assembler = BatchAssembler(max_records=3, max_wait_s=60, clock=ManualClock())
    sealed = feed(assembler, P0, range(0, 7)) + feed(assembler, P1, range(10, 12))
    assert ranges(sealed) == [(0, 0, 2), (0, 3, 5)]
    assert assembler.open_rows == 3
    assert ranges(assembler.seal_all()) == [(0, 6, 6), (1, 10, 11)]
    assert assembler.open_rows == 0


def test_batches_are_cut_by_age() -> None:
    clock = ManualClock()
    assembler = BatchAssembler(max_records=100, max_wait_s=2.0, clock=clock)
    feed(assembler, P0, range(0, 2))
    clock.advance(1.0)
    feed(assembler, P1, range(0, 1))
    assert assembler.due() == []
    clock.advance(1.0)
    assert ranges(assembler.due()) == [(0, 0, 1)]
    clock.advance(1.0)
    assert ranges(assembler.due()) == [(1, 0, 0)]


def test_a_recorded_range_is_replayed_exactly_whatever_the_size_rule() -> None:
    clock = ManualClock()
    assembler = BatchAssembler(max_records=2, max_wait_s=1.0, clock=clock)
    # An earlier run wrote 5-9 and 10-10 (timestamps are 1000 + offset) but never committed.
    assembler.set_recorded(P0, {(5, 1005): 9, (10, 1010): 10})
    assert not assembler.needs_recorded(P0)
    sealed = feed(assembler, P0, range(5, 9))
    assert sealed == []
    clock.advance(5)
    assert assembler.due() == []  # held until the range is complete
    assert assembler.seal_all() == []
    assert assembler.holding() == {P0}
    sealed = feed(assembler, P0, range(9, 14))
    assert ranges(sealed) == [(0, 5, 9), (0, 10, 10), (0, 11, 12)]
    assert sealed[0].records == 5


def test_a_recorded_range_of_another_log_incarnation_is_ignored() -> None:
    assembler = BatchAssembler(max_records=2, max_wait_s=1.0, clock=ManualClock())
    # Same offsets, other first-record timestamp: the broker restarted and offsets began again.
    assembler.set_recorded(P0, {(0, 999_999): 9})
    assert ranges(feed(assembler, P0, range(0, 4))) == [(0, 0, 1), (0, 2, 3)]


def test_an_open_batch_stops_where_a_recorded_range_starts() -> None:
    # Offsets rewound into the middle of old batches: later batches line up again.
    assembler = BatchAssembler(max_records=10, max_wait_s=1.0, clock=ManualClock())
    assembler.set_recorded(P0, {(4, 1004): 6})
    assert ranges(feed(assembler, P0, range(2, 8))) == [(0, 2, 3), (0, 4, 6)]


def test_a_replayed_range_whose_records_are_gone_is_closed_at_the_gap() -> None:
    assembler = BatchAssembler(max_records=10, max_wait_s=1.0, clock=ManualClock())
    assembler.set_recorded(P0, {(0, 1000): 5})
    sealed = feed(assembler, P0, range(0, 3)) + feed(assembler, P0, range(8, 9))
    assert ranges(sealed) == [(0, 0, 2)]


def test_undecodable_records_extend_the_range_but_add_no_rows() -> None:
    assembler = BatchAssembler(max_records=3, max_wait_s=1.0, clock=ManualClock())
    assembler.add(P0, 0, 1, payload(4), HEADERS)
    bad = assembler.add(P0, 1, 1, b"\xff\xffgarbage", HEADERS)
    assert bad.error is not None and bad.rows == 0
    no_identity = assembler.add(P0, 2, 1, payload(), HEADERS[1:])
    assert no_identity.error is not None
    assert ranges(no_identity.sealed) == [(0, 0, 2)]
    assert no_identity.sealed[0].rows == 4


def test_dropping_a_partition_forgets_its_batch_and_recorded_ranges() -> None:
    assembler = BatchAssembler(max_records=10, max_wait_s=1.0, clock=ManualClock())
    assembler.set_recorded(P0, {})
    feed(assembler, P0, range(0, 3))
    feed(assembler, P1, range(0, 1))
    assert assembler.drop([P0]) == 3
    assert assembler.needs_recorded(P0)
    assert ranges(assembler.seal_all()) == [(1, 0, 0)]


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_records"):
        BatchAssembler(max_records=0, max_wait_s=1.0, clock=ManualClock())


def test_a_record_fetched_twice_is_not_added_twice() -> None:
    assembler = BatchAssembler(max_records=10, max_wait_s=1.0, clock=ManualClock())
    feed(assembler, P0, range(0, 3))
    assert feed(assembler, P0, range(1, 5)) == []
    (batch,) = assembler.seal_all()
    assert (batch.source.first_offset, batch.source.last_offset, batch.records) == (0, 4, 5)
    assert batch.rows == 5
