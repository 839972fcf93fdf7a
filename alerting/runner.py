"""Real-time drivers: `Notifier` (delivery with retries) and `DispatchRunner` (the loop).

The `Dispatcher` decides; these two act. The runner sleeps until the next group is due
(or until woken by new alerts, a silence change, a finished delivery), flushes, and hands
each notification to the notifier as its own task, so a slow receiver holds up neither
the loop nor the other receivers. Every attempt is recorded; a notification that still
fails when the retry policy gives up is reported undelivered, which leaves the
notification log unchanged, so the next group_interval flush sends it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta

from alerting.dispatch import Alert, Dispatcher, Notification
from alerting.notifylog import AttemptLog, DeliveryAttempt
from alerting.receivers import WEBHOOK_SCHEMES, AppriseSender, Sender, WebhookSender, redact_text
from yakpanel.clock import Clock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded by attempts and by elapsed seconds. Keep
    `max_elapsed` below group_interval so one flush's retries end before the next."""

    max_attempts: int = 5
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2
    max_elapsed: float = 120.0
    attempt_timeout: float = 15.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.initial_backoff < 0 or self.multiplier < 1:
            raise ValueError("retry policy: max_attempts >= 1, backoff >= 0, multiplier >= 1")
        if not 0 <= self.jitter < 1 or self.attempt_timeout <= 0:
            raise ValueError("retry policy: 0 <= jitter < 1 and attempt_timeout > 0")

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """The pause after failed attempt number `attempt` (1-based)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return base * (1 + rng.uniform(-self.jitter, self.jitter))


class Notifier:
    """Delivers one notification with retries; every attempt goes to the AttemptLog."""

    def __init__(
        self,
        *,
        clock: Clock,
        attempts: AttemptLog,
        policy: RetryPolicy | None = None,
        webhook: Sender | None = None,
        other: Sender | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock
        self.attempts = attempts
        self.policy = policy or RetryPolicy()
        self._webhook = webhook or WebhookSender(timeout=self.policy.attempt_timeout)
        self._other = other or AppriseSender(timeout=self.policy.attempt_timeout)
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security

    def sender_for(self, notification: Notification) -> Sender:
        return self._webhook if notification.url.scheme in WEBHOOK_SCHEMES else self._other

    async def deliver(self, n: Notification) -> bool:
        """Try until delivered or the policy gives up; True when the receiver took it."""
        policy, sender, target = self.policy, self.sender_for(n), str(n.url)
        started = self._clock.monotonic()
        for attempt in range(1, policy.max_attempts + 1):
            at, t0 = self._clock.now(), self._clock.monotonic()
            error: str | None = None
            try:
                async with asyncio.timeout(policy.attempt_timeout):
                    await sender.send(n)
            except TimeoutError:
                error = f"timed out after {policy.attempt_timeout:g}s"
            except Exception as exc:  # noqa: BLE001 - recorded below, then retried
                error = redact_text(f"{type(exc).__name__}: {exc}", n.url.reveal())
            delay = policy.backoff(attempt, self._rng)
            spent = self._clock.monotonic() - started
            final = error is None or attempt == policy.max_attempts
            final = final or spent + delay > policy.max_elapsed
            self.attempts.record(
                DeliveryAttempt(
                    notification_id=n.id,
                    tenant_id=n.tenant_id,
                    group_key=n.group_key,
                    receiver=n.receiver,
                    integration=n.integration,
                    target=target,
                    attempt=attempt,
                    at=at,
                    duration_seconds=round(self._clock.monotonic() - t0, 6),
                    outcome="success" if error is None else "failure",
                    error=error,
                    final=final,
                )
            )
            if error is None:
                return True
            log.warning(
                "notification %s to receiver %s (%s) failed, attempt %d%s: %s",
                n.id,
                n.receiver,
                target,
                attempt,
                "; giving up until the next group_interval" if final else "",
                error,
            )
            if final:
                break
            await self._sleep(delay)
        return False

    async def aclose(self) -> None:
        for sender in (self._webhook, self._other):
            close = getattr(sender, "aclose", None)
            if close is not None:
                await close()


class DispatchRunner:
    """Runs a Dispatcher against the real clock until stopped."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        notifier: Notifier,
        clock: Clock,
        *,
        max_concurrent: int = 16,
        max_sleep: float = 1.0,
        retention: timedelta = timedelta(hours=120),
        maintenance_every: float = 600.0,
    ) -> None:
        self.dispatcher = dispatcher
        self.notifier = notifier
        self._clock = clock
        self._slots = asyncio.Semaphore(max_concurrent)
        self._max_sleep = max_sleep
        self._retention = retention
        self._maintenance_every = maintenance_every
        self._wake = asyncio.Event()
        self._deliveries: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.delivery_errors = 0  # failures outside the notifier's own accounting

    def push(self, alerts: Iterable[Alert]) -> None:
        """Hand new or updated alerts to the dispatcher (call from the event loop)."""
        self.dispatcher.on_alerts(alerts, self._clock.now())
        self._wake.set()

    def wake(self) -> None:
        """Re-check now (after a silence change or a config reload)."""
        self._wake.set()

    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self.run(), name="alert-dispatch")

    async def stop(self, grace: float = 5.0) -> None:
        """Stop flushing; give in-flight deliveries `grace` seconds, then cancel them.
        A cancelled delivery is not logged, so it is sent again after a restart."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._deliveries:
            _, pending = await asyncio.wait(set(self._deliveries), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.notifier.aclose()

    async def run(self) -> None:
        try:
            await self._loop()
        except Exception:
            log.exception("the alert dispatch loop stopped on an error")
            raise

    async def _loop(self) -> None:
        last_maintenance = self._clock.monotonic()
        while not self._stopping:
            self._wake.clear()
            now = self._clock.now()
            for notification in self.dispatcher.tick(now):
                task = asyncio.create_task(self._deliver(notification))
                self._deliveries.add(task)
                task.add_done_callback(self._deliveries.discard)
            if self._clock.monotonic() - last_maintenance >= self._maintenance_every:
                last_maintenance = self._clock.monotonic()
                self.dispatcher.notify_log.gc(now, self._retention)
                self.dispatcher.silences.gc(now, self._retention)
            due = self.dispatcher.next_flush_at()
            wait = self._max_sleep
            if due is not None:
                wait = min(wait, max(0.0, (due - self._clock.now()).total_seconds()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)

    async def _deliver(self, notification: Notification) -> None:
        delivered = False
        async with self._slots:
            try:
                delivered = await self.notifier.deliver(notification)
            except Exception:
                # The notifier records its own failures; anything here is a defect, which
                # is counted and logged, and the notification retried at the next flush.
                self.delivery_errors += 1
                log.exception("delivering notification %s failed", notification.id)
        self.dispatcher.on_delivered(notification, delivered, self._clock.now())
        self._wake.set()
