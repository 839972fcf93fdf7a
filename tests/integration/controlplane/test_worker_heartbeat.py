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


async def _fresh(path: Path, timeout_s: float = 20.0) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (mtime := _mtime(path)) is not None:
            return mtime
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} was never written")


async def test_heartbeat_stops_when_a_worker_loop_dies(
    api: Api, stack: Stack, tmp_path: Path
) -> None:
    beat = tmp_path / "worker.alive"
    stack.settings.worker_heartbeat_file = beat
    worker = ControlPlaneWorker(stack, housekeeping_interval_s=0.1)
    await worker.start()
    try:
        first = await _fresh(beat)
        await asyncio.sleep(0.5)
        assert (_mtime(beat) or 0) > first, "a healthy worker keeps its heartbeat fresh"

        driver = next(t for t in worker._tasks if t.get_name() == "workflow-driver")
        driver.cancel()
        await asyncio.sleep(0.3)
        stale = _mtime(beat)
        await asyncio.sleep(0.8)
        assert _mtime(beat) == stale, "a worker without its workflow driver is unhealthy"
    finally:
        await worker.stop()
