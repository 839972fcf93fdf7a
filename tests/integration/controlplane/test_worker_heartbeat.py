"""The worker's heartbeat file (the container health check) goes stale when any of its
loops dies, not only the outbox relay: a dead workflow driver leaves hosting changes
stuck and must not look healthy."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from controlplane.worker import ControlPlaneWorker
from yakpanel.services import Stack

from .conftest import Api

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]


def _mtime(path: Path) -> float | None:
    return path.stat().st_mtime if path.exists() else None


async def _fresh(path: Path, after: float = 0.0, timeout_s: float = 20.0) -> float:
    """The file's mtime once it is later than `after` (a round of housekeeping may be slow
    on a busy CI machine, so the wait is generous)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (mtime := _mtime(path)) is not None and mtime > after:
            return mtime
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} was not written after {after}")


async def test_heartbeat_stops_when_a_worker_loop_dies(
    api: Api, stack: Stack, tmp_path: Path
) -> None:
    beat = tmp_path / "worker.alive"
    stack.settings.worker_heartbeat_file = beat
    worker = ControlPlaneWorker(stack, housekeeping_interval_s=0.1)
    await worker.start()
    try:
        first = await _fresh(beat)
        dead = {t.get_name(): t for t in worker._tasks if t.done()}
        assert not dead, f"worker loops died: {dead}"
        await _fresh(beat, after=first)  # a healthy worker keeps its heartbeat fresh

        driver = next(t for t in worker._tasks if t.get_name() == "workflow-driver")
        driver.cancel()
        await asyncio.sleep(0.5)
        stale = _mtime(beat)
        await asyncio.sleep(1.5)
        assert _mtime(beat) == stale, "a worker without its workflow driver is unhealthy"
    finally:
        await worker.stop()
