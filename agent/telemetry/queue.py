"""A bounded, persistent FIFO of encoded OTLP requests (SQLite in WAL mode).

The metric reader's thread appends; the sender on the event loop reads the oldest entry
and removes it only once the gateway took it. The queue is bounded by payload bytes and by
entries: when an append goes over either bound the OLDEST entries go, because the newest
samples matter most once the gateway is back. Every drop is counted under a reason and the
counts are stored with the entries, so they survive restarts and go out as the cumulative
`yakpanel.agent.telemetry.queue.dropped{reason}`.

One connection, guarded by a lock: every method is safe from any thread. The byte bound
counts payloads; the file is somewhat larger (pages, WAL) and reuses freed pages.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

QUEUE_FULL = "queue_full"
REJECTED = "rejected"
DROP_REASONS = (QUEUE_FULL, REJECTED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    enqueued_at_ms INTEGER NOT NULL,
    size           INTEGER NOT NULL,
    payload        BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""
T = TypeVar("T")

# How many of the oldest rows one eviction step looks at.
_EVICT_BATCH = 256


class QueueClosedError(Exception):
    """The queue was closed (the agent is stopping)."""


@dataclass(frozen=True)
class QueuedRequest:
    id: int
    enqueued_at_ms: int
    payload: bytes


class TelemetryQueue:
    def __init__(self, path: Path, *, max_bytes: int, max_entries: int) -> None:
        if max_bytes < 1 or max_entries < 1:
            raise ValueError("a queue needs room for at least one entry")
        self.path = path
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db: sqlite3.Connection | None = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=30
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        # Metrics, not money: a power cut may lose the last commits, never the file.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA journal_size_limit=4194304")
        self._db.executescript(_SCHEMA)
        count, total = self._db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM entries"
        ).fetchone()
        self._depth = int(count)
        self._bytes = int(total)
        self._dropped = dict.fromkeys(DROP_REASONS, 0)
        for name, value in self._db.execute("SELECT name, value FROM counters"):
            if name in self._dropped:
                self._dropped[name] = int(value)
        # Bounds may have been lowered since the last run.
        with self._lock:
            self._transaction(lambda db: self._evict(db))

    # --- reads ------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Entries waiting to be sent."""
        return self._depth

    @property
    def size_bytes(self) -> int:
        """Payload bytes waiting to be sent."""
        return self._bytes

    def dropped(self) -> dict[str, int]:
        """Entries dropped since the queue file was created, per reason."""
        with self._lock:
            return dict(self._dropped)

    def oldest(self) -> QueuedRequest | None:
        with self._lock:
            row = (
                self._conn()
                .execute("SELECT id, enqueued_at_ms, payload FROM entries ORDER BY id LIMIT 1")
                .fetchone()
            )
        return QueuedRequest(int(row[0]), int(row[1]), bytes(row[2])) if row else None

    # --- writes -----------------------------------------------------------------------

    def append(self, payload: bytes) -> int:
        """Add `payload` as the newest entry; returns how many entries were dropped to keep
        the bounds (the payload itself counts as dropped when it alone exceeds them)."""
        size = len(payload)
        with self._lock:
            if size > self.max_bytes:
                self._transaction(lambda db: self._count(db, QUEUE_FULL, 1))
                return 1

            def insert(db: sqlite3.Connection) -> int:
                db.execute(
                    "INSERT INTO entries (enqueued_at_ms, size, payload) VALUES (?, ?, ?)",
                    (int(time.time() * 1000), size, payload),
                )
                self._depth += 1
                self._bytes += size
                return self._evict(db)

            return self._transaction(insert)

    def remove(self, entry_id: int) -> bool:
        """Forget an entry the gateway accepted. False if it was already gone (dropped
        for room while it was being sent)."""
        with self._lock:
            return self._transaction(lambda db: self._delete(db, entry_id))

    def reject(self, entry_id: int) -> bool:
        """Forget an entry the gateway refused for good, counting it as `rejected`."""
        with self._lock:

            def drop(db: sqlite3.Connection) -> bool:
                if not self._delete(db, entry_id):
                    return False
                self._count(db, REJECTED, 1)
                return True

            return self._transaction(drop)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> TelemetryQueue:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- inside the lock --------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise QueueClosedError(f"the telemetry queue {self.path} is closed")
        return self._db

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        db = self._conn()
        depth, size, dropped = self._depth, self._bytes, dict(self._dropped)
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._depth, self._bytes, self._dropped = depth, size, dropped
            raise
        return result

    def _delete(self, db: sqlite3.Connection, entry_id: int) -> bool:
        row = db.execute("SELECT size FROM entries WHERE id = ?", (entry_id,)).fetchone()
        if row is None:
            return False
        db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
        self._depth -= 1
        self._bytes -= int(row[0])
        return True

    def _evict(self, db: sqlite3.Connection) -> int:
        evicted = 0
        while self._depth > self.max_entries or self._bytes > self.max_bytes:
            last_id = None
            for entry_id, size in db.execute(
                "SELECT id, size FROM entries ORDER BY id LIMIT ?", (_EVICT_BATCH,)
            ).fetchall():
                if self._depth <= self.max_entries and self._bytes <= self.max_bytes:
                    break
                last_id = entry_id
                self._depth -= 1
                self._bytes -= int(size)
                evicted += 1
            if last_id is None:
                break
            db.execute("DELETE FROM entries WHERE id <= ?", (last_id,))
        if evicted:
            self._count(db, QUEUE_FULL, evicted)
        return evicted

    def _count(self, db: sqlite3.Connection, reason: str, n: int) -> None:
        self._dropped[reason] += n
        db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?)"
            " ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (reason, self._dropped[reason]),
        )


@dataclass(frozen=True)
class QueueStatus:
    depth: int
    size_bytes: int
    oldest_enqueued_at_ms: int | None
    dropped: dict[str, int]


def inspect_queue(path: Path) -> QueueStatus | None:
    """The queue's state read-only (safe while the agent runs); None if there is none."""
    if not path.exists():
        return None
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        depth, size, oldest = db.execute(
            "SELECT count(*), coalesce(sum(size), 0), min(enqueued_at_ms) FROM entries"
        ).fetchone()
        dropped = dict.fromkeys(DROP_REASONS, 0)
        for name, value in db.execute("SELECT name, value FROM counters"):
            dropped[str(name)] = int(value)
    finally:
        db.close()
    return QueueStatus(int(depth), int(size), None if oldest is None else int(oldest), dropped)
