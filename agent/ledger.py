"""The ledger of executed commands, keyed by idempotency key (SQLite, durable).

Delivery is at-least-once, so the same envelope can arrive many times, including after
the agent was killed mid-command. Before running anything the processor asks the ledger
what to do (`begin`), and records the outcome (`finish`); both commit, with a full
fsync, before they return. Methods are thread-safe so the event loop can call them
through `asyncio.to_thread`.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Literal

from proto import agent_pb2
from yakpanel.clock import Clock, SystemClock

FinalStatus = Literal["SUCCEEDED", "FAILED"]

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS executed_commands (
    key            TEXT PRIMARY KEY,
    command_id     TEXT NOT NULL,
    type           TEXT NOT NULL,
    payload_sha256 TEXT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('started', 'finished')),
    status         TEXT CHECK (status IN ('SUCCEEDED', 'FAILED')),
    output         TEXT,
    error_code     TEXT,
    message        TEXT,
    attempts       INTEGER NOT NULL,
    started_at     TEXT NOT NULL,
    finished_at    TEXT
);
CREATE INDEX IF NOT EXISTS executed_commands_finished_at
    ON executed_commands (finished_at) WHERE state = 'finished';
"""
_COLUMNS = (
    "key, command_id, type, payload_sha256, state, status, output, error_code, message, "
    "attempts, started_at, finished_at"
)


@dataclass(frozen=True)
class LedgerEntry:
    """One idempotency key as recorded."""

    key: str
    command_id: str
    type: str
    payload_sha256: str
    state: Literal["started", "finished"]
    status: FinalStatus | None
    output: str | None
    error_code: str | None
    message: str | None
    attempts: int
    started_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class Run:
    """A key never seen: it is now recorded as started (attempt 1); run the command."""


@dataclass(frozen=True)
class Replay:
    """The key already finished with the same payload: send the stored result again."""

    entry: LedgerEntry


@dataclass(frozen=True)
class Resume:
    """The key started but never finished (the agent died mid-command); attempts was
    incremented. Re-run only if the command is idempotent."""

    entry: LedgerEntry


@dataclass(frozen=True)
class Conflict:
    """The key was used for a different command type or payload: refuse."""

    entry: LedgerEntry


Decision = Run | Replay | Resume | Conflict


def payload_sha256(envelope: agent_pb2.CommandEnvelope) -> str:
    return hashlib.sha256(envelope.payload).hexdigest()


class LedgerError(Exception):
    """The ledger cannot record what was asked (unknown key, already finished)."""


class Ledger:
    """Durable record of executed commands in one SQLite file."""

    def __init__(self, path: Path, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self._lock = threading.Lock()
        # Autocommit mode: every transaction below is an explicit BEGIN IMMEDIATE … COMMIT.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            self._db.close()
            raise LedgerError(
                f"{path} was written by a newer agent (schema {version}); upgrade this agent"
            )
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    def begin(self, envelope: agent_pb2.CommandEnvelope) -> Decision:
        """Decide what to do with this envelope, recording a new or resumed start."""
        digest = payload_sha256(envelope)
        now = _stamp(self._clock.now())
        with self._lock, self._transaction():
            entry = self._get(envelope.idempotency_key)
            if entry is None:
                self._db.execute(
                    "INSERT INTO executed_commands (key, command_id, type, payload_sha256, "
                    "state, attempts, started_at) VALUES (?, ?, ?, ?, 'started', 1, ?)",
                    (envelope.idempotency_key, envelope.command_id, envelope.type, digest, now),
                )
                return Run()
            if entry.type != envelope.type or entry.payload_sha256 != digest:
                return Conflict(entry)
            if entry.state == "finished":
                return Replay(entry)
            self._db.execute(
                "UPDATE executed_commands SET attempts = attempts + 1, command_id = ?, "
                "started_at = ? WHERE key = ?",
                (envelope.command_id, now, envelope.idempotency_key),
            )
            resumed = self._get(envelope.idempotency_key)
            assert resumed is not None
            return Resume(resumed)

    def finish(
        self,
        key: str,
        status: FinalStatus,
        output: str,
        error_code: str = "",
        message: str = "",
    ) -> None:
        """Record the final result of a started key; `output` is JSON text."""
        now = _stamp(self._clock.now())
        with self._lock, self._transaction():
            updated = self._db.execute(
                "UPDATE executed_commands SET state = 'finished', status = ?, output = ?, "
                "error_code = ?, message = ?, finished_at = ? "
                "WHERE key = ? AND state = 'started'",
                (status, output, error_code, message, now, key),
            ).rowcount
            if updated != 1:
                raise LedgerError(f"idempotency key {key!r} is not a started command")

    def get(self, key: str) -> LedgerEntry | None:
        with self._lock:
            return self._get(key)

    def prune(self, finished_before: datetime) -> int:
        """Forget finished keys older than a cutoff (past any redelivery window)."""
        with self._lock, self._transaction():
            return self._db.execute(
                "DELETE FROM executed_commands WHERE state = 'finished' AND finished_at < ?",
                (_stamp(finished_before),),
            ).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _get(self, key: str) -> LedgerEntry | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM executed_commands WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        return LedgerEntry(
            key=row[0],
            command_id=row[1],
            type=row[2],
            payload_sha256=row[3],
            state=row[4],
            status=row[5],
            output=row[6],
            error_code=row[7],
            message=row[8],
            attempts=row[9],
            started_at=datetime.fromisoformat(row[10]),
            finished_at=datetime.fromisoformat(row[11]) if row[11] else None,
        )


def _stamp(moment: datetime) -> str:
    # One fixed-width UTC form, so stamps also sort correctly as text.
    return moment.astimezone(UTC).isoformat(timespec="microseconds")
