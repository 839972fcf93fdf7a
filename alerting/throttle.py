"""`IngestThrottle`: evaluations started by arriving samples, at most one per key (a
tenant's rule group) per interval, and always one after the last arrival."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from yakpanel.clock import Clock, SystemClock

K = TypeVar("K", bound=Hashable)


class IngestThrottle(Generic[K]):
    """Runs `evaluate(key)` soon after `trigger(key)`: at once when the key's last run
    started more than `interval_s` ago, else when that much has passed. Triggers while a
    run is waiting fold into it; a trigger during a run schedules one more, so the last
    samples are always evaluated."""

    def __init__(
        self,
        interval_s: float,
        evaluate: Callable[[K], Awaitable[None]],
        clock: Clock | None = None,
    ) -> None:
        self.interval_s = interval_s
        self._evaluate = evaluate
        self._clock = clock or SystemClock()
        self._waiting: set[K] = set()
        self._last: dict[K, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.runs = 0

    def trigger(self, key: K) -> None:
        if key in self._waiting:
            return
        self._waiting.add(key)
        task = asyncio.create_task(self._run(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: K) -> None:
        try:
            last = self._last.get(key)
            if last is not None:
                wait = last + self.interval_s - self._clock.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
        finally:
            self._waiting.discard(key)
        self._last[key] = self._clock.monotonic()
        self.runs += 1
        await self._evaluate(key)

    def forget(self, keep: Callable[[K], bool]) -> None:
        """Drops the timing of keys no longer wanted (bounded memory)."""
        for key in [k for k in self._last if not keep(k)]:
            del self._last[key]

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
