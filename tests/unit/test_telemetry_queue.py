"""The agent's telemetry queue: bounded by bytes and entries, oldest dropped first and
counted, FIFO across reopen, safe between a producer thread and a consumer."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from agent.telemetry.queue import QueueClosedError, TelemetryQueue, inspect_queue


def payload(i: int, size: int = 100) -> bytes:
    head = f"{i:08d}:".encode()
    return head + b"x" * (size - len(head))


def number(data: bytes) -> int:
    return int(data.split(b":", 1)[0])


def drain(queue: TelemetryQueue) -> list[int]:
    got = []
    while (entry := queue.oldest()) is not None:
        got.append(number(entry.payload))
        assert queue.remove(entry.id)
    return got


def test_bound_by_bytes_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    with TelemetryQueue(path, max_bytes=1000, max_entries=1000) as queue:
        dropped = [queue.append(payload(i, 300)) for i in range(10)]
        assert dropped == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
        assert queue.depth == 3
        assert queue.size_bytes == 900
        assert queue.dropped() == {"queue_full": 7, "rejected": 0}

    # The count and the newest entries survive a restart, in order.
    with TelemetryQueue(path, max_bytes=1000, max_entries=1000) as queue:
        assert queue.dropped() == {"queue_full": 7, "rejected": 0}
        assert (queue.depth, queue.size_bytes) == (3, 900)
        assert drain(queue) == [7, 8, 9]
        assert (queue.depth, queue.size_bytes) == (0, 0)


def test_one_large_append_evicts_as_many_old_entries_as_it_needs(tmp_path: Path) -> None:
    with TelemetryQueue(tmp_path / "q.sqlite3", max_bytes=1000, max_entries=100) as queue:
        for i in range(9):
            queue.append(payload(i, 100))
        assert queue.append(payload(9, 450)) == 4
        assert drain(queue) == [4, 5, 6, 7, 8, 9]
        assert queue.dropped()["queue_full"] == 4


def test_a_payload_larger_than_the_bound_is_dropped_itself(tmp_path: Path) -> None:
    with TelemetryQueue(tmp_path / "q.sqlite3", max_bytes=500, max_entries=100) as queue:
        queue.append(payload(0, 200))
        assert queue.append(payload(1, 501)) == 1
        assert drain(queue) == [0]
        assert queue.dropped()["queue_full"] == 1


def test_bound_by_entries(tmp_path: Path) -> None:
    with TelemetryQueue(tmp_path / "q.sqlite3", max_bytes=10**6, max_entries=4) as queue:
        for i in range(6):
            queue.append(payload(i))
        assert queue.depth == 4
        assert drain(queue) == [2, 3, 4, 5]
        assert queue.dropped()["queue_full"] == 2


def test_fifo_order_and_ids_keep_growing_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    with TelemetryQueue(path, max_bytes=10**6, max_entries=1000) as queue:
        for i in range(5):
            queue.append(payload(i))
        first = queue.oldest()
        assert first is not None
        assert number(first.payload) == 0
        assert queue.remove(first.id)
    with TelemetryQueue(path, max_bytes=10**6, max_entries=1000) as queue:
        ids, numbers = [], []
        while (entry := queue.oldest()) is not None:
            ids.append(entry.id)
            numbers.append(number(entry.payload))
            queue.remove(entry.id)
        assert numbers == [1, 2, 3, 4]
        queue.append(payload(5))
        entry = queue.oldest()
        assert entry is not None
        # An emptied queue does not reuse ids, so order holds across restarts.
        assert entry.id > max(ids)
        assert number(entry.payload) == 5


def test_a_lowered_bound_applies_at_reopen(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    with TelemetryQueue(path, max_bytes=10**6, max_entries=1000) as queue:
        for i in range(10):
            queue.append(payload(i, 100))
    with TelemetryQueue(path, max_bytes=350, max_entries=1000) as queue:
        assert drain(queue) == [7, 8, 9]
        assert queue.dropped()["queue_full"] == 7


def test_rejected_entries_are_counted_separately(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    with TelemetryQueue(path, max_bytes=10**6, max_entries=1000) as queue:
        queue.append(payload(0))
        queue.append(payload(1))
        entry = queue.oldest()
        assert entry is not None
        assert queue.reject(entry.id)
        assert not queue.reject(entry.id), "already gone"
        assert not queue.remove(entry.id)
        assert queue.dropped() == {"queue_full": 0, "rejected": 1}
        assert drain(queue) == [1]
    status = inspect_queue(path)
    assert status is not None
    assert (status.depth, status.size_bytes, status.dropped) == (
        0,
        0,
        {"queue_full": 0, "rejected": 1},
    )


def test_inspect_reads_a_queue_in_use(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    assert inspect_queue(path) is None
    with TelemetryQueue(path, max_bytes=10**6, max_entries=1000) as queue:
        queue.append(payload(0, 120))
        queue.append(payload(1, 80))
        status = inspect_queue(path)
        assert status is not None
        assert (status.depth, status.size_bytes) == (2, 200)
        assert status.oldest_enqueued_at_ms is not None


def test_a_closed_queue_refuses_work(tmp_path: Path) -> None:
    queue = TelemetryQueue(tmp_path / "q.sqlite3", max_bytes=1000, max_entries=10)
    queue.close()
    with pytest.raises(QueueClosedError):
        queue.append(payload(0))
    with pytest.raises(QueueClosedError):
        queue.oldest()


@pytest.mark.parametrize(("max_bytes", "total"), [(10**7, 2000), (2_000, 2000)])
def test_a_producer_thread_and_a_consumer_see_fifo_and_lose_nothing_uncounted(
    tmp_path: Path, max_bytes: int, total: int
) -> None:
    queue = TelemetryQueue(tmp_path / "q.sqlite3", max_bytes=max_bytes, max_entries=10**6)
    done = threading.Event()
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            for i in range(total):
                queue.append(payload(i, 100))
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    received: list[int] = []
    producer = threading.Thread(target=produce)
    producer.start()
    try:
        while not (done.is_set() and queue.depth == 0):
            entry = queue.oldest()
            if entry is None:
                continue
            received.append(number(entry.payload))
            # Dropped for room while we held it: still delivered once, counted as dropped.
            queue.remove(entry.id)
    finally:
        producer.join(10)
        queue.close()
    assert not errors
    assert received == sorted(set(received)), "delivered oldest first, each once"
    dropped = queue.dropped()["queue_full"]
    if max_bytes >= 100 * total:
        assert received == list(range(total))
        assert dropped == 0
    else:
        # Every entry was either delivered or counted as dropped (an entry evicted while
        # the consumer held it is both).
        assert set(received) | set(range(total)) == set(range(total))
        assert len(received) + dropped >= total
        assert received[-1] == total - 1, "the newest entry is never the one dropped"
