"""The agent's ledger of executed commands: decisions, durability, crash recovery."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from agent.ledger import Conflict, Ledger, LedgerError, Replay, Resume, Run
from proto import agent_pb2
from yakpanel.clock import ManualClock

REPO_ROOT = Path(__file__).resolve().parents[2]


def envelope(
    key: str = "key-1",
    payload: bytes = b'{"seconds": 1}',
    type_: str = "system.sleep",
    command_id: str = "cmd-1",
) -> agent_pb2.CommandEnvelope:
    return agent_pb2.CommandEnvelope(
        command_id=command_id, idempotency_key=key, type=type_, payload=payload
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite3"


def test_a_new_key_runs_and_its_finished_result_replays(path: Path, clock: ManualClock) -> None:
    with Ledger(path, clock) as ledger:
        assert ledger.begin(envelope()) == Run()
        started = ledger.get("key-1")
        assert started is not None
        assert (started.state, started.attempts, started.status) == ("started", 1, None)
        assert started.started_at == clock.now()

        clock.advance(2)
        ledger.finish("key-1", "SUCCEEDED", '{"slept_seconds":1.0}')
        decision = ledger.begin(envelope(command_id="cmd-2"))
        assert isinstance(decision, Replay)
        entry = decision.entry
        assert (entry.state, entry.status, entry.output) == (
            "finished",
            "SUCCEEDED",
            '{"slept_seconds":1.0}',
        )
        assert entry.command_id == "cmd-1"
        assert entry.finished_at == clock.now()
        assert entry.attempts == 1


def test_a_failure_is_replayed_with_its_reason(path: Path, clock: ManualClock) -> None:
    with Ledger(path, clock) as ledger:
        ledger.begin(envelope())
        ledger.finish("key-1", "FAILED", '{"retryable":false}', "nginx_test_failed", "bad conf")
        decision = ledger.begin(envelope())
        assert isinstance(decision, Replay)
        assert (decision.entry.status, decision.entry.error_code, decision.entry.message) == (
            "FAILED",
            "nginx_test_failed",
            "bad conf",
        )


@pytest.mark.parametrize(
    "other",
    [envelope(payload=b'{"seconds": 2}'), envelope(type_="system.ping", payload=b'{"seconds": 1}')],
)
@pytest.mark.parametrize("finished", [False, True])
def test_one_key_for_another_command_is_a_conflict(
    path: Path, clock: ManualClock, other: agent_pb2.CommandEnvelope, finished: bool
) -> None:
    with Ledger(path, clock) as ledger:
        ledger.begin(envelope())
        if finished:
            ledger.finish("key-1", "SUCCEEDED", "{}")
        decision = ledger.begin(other)
        assert isinstance(decision, Conflict)
        assert decision.entry.command_id == "cmd-1"
        # A conflict records nothing.
        entry = ledger.get("key-1")
        assert entry is not None and entry.attempts == 1


def test_a_started_key_seen_again_resumes_and_counts_attempts(
    path: Path, clock: ManualClock
) -> None:
    with Ledger(path, clock) as ledger:
        ledger.begin(envelope())
        clock.advance(60)
        first = ledger.begin(envelope(command_id="cmd-2"))
        assert isinstance(first, Resume)
        assert first.entry.attempts == 2
        assert first.entry.command_id == "cmd-2"
        assert first.entry.started_at == clock.now()
        second = ledger.begin(envelope(command_id="cmd-3"))
        assert isinstance(second, Resume) and second.entry.attempts == 3
        ledger.finish("key-1", "SUCCEEDED", "{}")
        assert isinstance(ledger.begin(envelope()), Replay)


def test_finished_results_survive_reopening_the_file(path: Path, clock: ManualClock) -> None:
    with Ledger(path, clock) as ledger:
        ledger.begin(envelope())
        ledger.finish("key-1", "SUCCEEDED", '{"ok":true}')
    with Ledger(path, clock) as reopened:
        decision = reopened.begin(envelope())
        assert isinstance(decision, Replay)
        assert decision.entry.output == '{"ok":true}'


def test_closing_without_finishing_resumes_after_reopen(path: Path, clock: ManualClock) -> None:
    ledger = Ledger(path, clock)
    ledger.begin(envelope())
    ledger.close()
    with Ledger(path, clock) as reopened:
        decision = reopened.begin(envelope())
        assert isinstance(decision, Resume)
        assert decision.entry.attempts == 2


def test_a_process_killed_after_begin_resumes_in_the_next(path: Path, clock: ManualClock) -> None:
    # The crash is real: SIGKILL right after begin() returned, no close, no atexit.
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from agent.ledger import Ledger, Run
        from proto import agent_pb2
        ledger = Ledger(Path({str(path)!r}))
        env = agent_pb2.CommandEnvelope(
            command_id="cmd-1", idempotency_key="key-1", type="system.sleep",
            payload=b'{{"seconds": 1}}',
        )
        assert ledger.begin(env) == Run()
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, timeout=60
    )
    assert proc.returncode == -9, proc.stderr.decode()
    with Ledger(path, clock) as ledger:
        decision = ledger.begin(envelope())
        assert isinstance(decision, Resume), decision
        assert decision.entry.attempts == 2


def test_finish_refuses_unknown_or_already_finished_keys(path: Path, clock: ManualClock) -> None:
    with Ledger(path, clock) as ledger:
        with pytest.raises(LedgerError):
            ledger.finish("never-begun", "SUCCEEDED", "{}")
        ledger.begin(envelope())
        ledger.finish("key-1", "SUCCEEDED", "{}")
        with pytest.raises(LedgerError):
            ledger.finish("key-1", "FAILED", "{}", "late", "a second outcome")
        entry = ledger.get("key-1")
        assert entry is not None and entry.status == "SUCCEEDED"


def test_prune_forgets_only_old_finished_keys(path: Path, clock: ManualClock) -> None:
    with Ledger(path, clock) as ledger:
        ledger.begin(envelope("old"))
        ledger.finish("old", "SUCCEEDED", "{}")
        ledger.begin(envelope("old-but-running"))
        clock.advance(timedelta(days=40).total_seconds())
        ledger.begin(envelope("recent"))
        ledger.finish("recent", "SUCCEEDED", "{}")
        assert ledger.prune(clock.now() - timedelta(days=30)) == 1
        assert ledger.get("old") is None
        assert ledger.get("old-but-running") is not None
        assert ledger.get("recent") is not None


def test_the_file_is_in_wal_mode(path: Path, clock: ManualClock) -> None:
    Ledger(path, clock).close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1


def test_a_ledger_from_a_newer_agent_is_refused(path: Path, clock: ManualClock) -> None:
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(LedgerError, match="newer agent"):
        Ledger(path, clock)
