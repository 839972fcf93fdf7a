"""What was sent, and every attempt to send it.

`NotificationLog` is Alertmanager's nflog: one entry per (group key, receiver,
integration) holding the fingerprints of the firing and resolved alerts last delivered
and when. The dispatcher consults it before every send, so a process restarted with the
log restored sends nothing twice within repeat_interval (`needs_update`).

`AttemptLog` keeps every delivery attempt (success or failure, with the redacted error)
so that a failing receiver is visible, never silently dropped.

Both are in memory; a store persists them through the `listener` hooks and restores them
with `restore` (entries are plain JSON-able dicts via `to_dict`/`from_dict`).
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class NotifyLogKey:
    group_key: str
    receiver: str
    integration: int


@dataclass(frozen=True)
class NotifyLogEntry:
    key: NotifyLogKey
    firing: frozenset[str]
    resolved: frozenset[str]
    sent_at: datetime

    @property
    def digest(self) -> str:
        """A hash of the firing/resolved sets, for display and cheap comparison."""
        text = "|".join(sorted(self.firing)) + "#" + "|".join(sorted(self.resolved))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "group_key": self.key.group_key,
            "receiver": self.key.receiver,
            "integration": self.key.integration,
            "firing": sorted(self.firing),
            "resolved": sorted(self.resolved),
            "sent_at": self.sent_at.isoformat(),
            "digest": self.digest,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NotifyLogEntry:
        return cls(
            key=NotifyLogKey(
                str(data["group_key"]), str(data["receiver"]), int(data["integration"])
            ),
            firing=frozenset(data["firing"]),
            resolved=frozenset(data["resolved"]),
            sent_at=datetime.fromisoformat(data["sent_at"]),
        )


def needs_update(
    entry: NotifyLogEntry | None,
    firing: frozenset[str],
    resolved: frozenset[str],
    *,
    send_resolved: bool,
    repeat_interval: timedelta,
    now: datetime,
) -> bool:
    """Alertmanager's dedup decision for one receiver integration of one group."""
    if entry is None:
        # Never told about this group: only firing alerts are news.
        return bool(firing)
    if not firing <= entry.firing:
        return True
    if not firing:
        # Everything resolved: tell the receiver once (even without send_resolved, so
        # the log forgets the firing set); nothing to say if it never heard of them.
        return bool(entry.firing)
    if send_resolved and not resolved <= entry.resolved:
        return True
    return entry.sent_at + repeat_interval <= now


class NotificationLog:
    def __init__(self, listener: Callable[[NotifyLogEntry], None] | None = None) -> None:
        self._entries: dict[NotifyLogKey, NotifyLogEntry] = {}
        self._listener = listener
        self.listener_errors = 0

    def get(self, key: NotifyLogKey) -> NotifyLogEntry | None:
        return self._entries.get(key)

    def record(self, entry: NotifyLogEntry) -> None:
        current = self._entries.get(entry.key)
        if current is not None and current.sent_at > entry.sent_at:
            return  # a late completion of an older flush never overwrites a newer one
        self._entries[entry.key] = entry
        self.listener_errors += _notify(self._listener, entry)

    def entries(self) -> list[NotifyLogEntry]:
        return [self._entries[k] for k in sorted(self._entries)]

    def restore(self, entries: Iterable[NotifyLogEntry]) -> None:
        for entry in entries:
            current = self._entries.get(entry.key)
            if current is None or current.sent_at <= entry.sent_at:
                self._entries[entry.key] = entry

    def gc(self, now: datetime, retention: timedelta) -> int:
        """Forget entries older than `retention` (keep it above every repeat_interval)."""
        old = [k for k, e in self._entries.items() if e.sent_at + retention <= now]
        for key in old:
            del self._entries[key]
        return len(old)

    def to_dicts(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.entries()]

    @classmethod
    def from_dicts(cls, rows: Iterable[Mapping[str, Any]]) -> NotificationLog:
        log = cls()
        log.restore(NotifyLogEntry.from_dict(r) for r in rows)
        return log


Outcome = Literal["success", "failure"]


@dataclass(frozen=True)
class DeliveryAttempt:
    """One try at handing one notification to one receiver integration."""

    notification_id: str
    tenant_id: str | None
    group_key: str
    receiver: str
    integration: int
    target: str  # the receiver URL, redacted
    attempt: int  # 1-based within this notification
    at: datetime
    duration_seconds: float
    outcome: Outcome
    error: str | None = None  # redacted
    final: bool = False  # the last attempt for this notification (success or given up)

    def to_dict(self) -> dict[str, Any]:
        return {
            "notification_id": self.notification_id,
            "tenant_id": self.tenant_id,
            "group_key": self.group_key,
            "receiver": self.receiver,
            "integration": self.integration,
            "target": self.target,
            "attempt": self.attempt,
            "at": self.at.isoformat(),
            "duration_seconds": self.duration_seconds,
            "outcome": self.outcome,
            "error": self.error,
            "final": self.final,
        }


class AttemptLog:
    """Recent delivery attempts (bounded) and running totals per receiver."""

    def __init__(
        self,
        limit: int = 10_000,
        listener: Callable[[DeliveryAttempt], None] | None = None,
    ) -> None:
        self._recent: deque[DeliveryAttempt] = deque(maxlen=limit)
        self._listener = listener
        self.attempts_total: dict[str, int] = {}
        self.failed_attempts_total: dict[str, int] = {}
        self.failed_notifications_total: dict[str, int] = {}
        self.listener_errors = 0

    def record(self, attempt: DeliveryAttempt) -> None:
        self._recent.append(attempt)
        receiver = attempt.receiver
        self.attempts_total[receiver] = self.attempts_total.get(receiver, 0) + 1
        if attempt.outcome == "failure":
            self.failed_attempts_total[receiver] = self.failed_attempts_total.get(receiver, 0) + 1
            if attempt.final:
                self.failed_notifications_total[receiver] = (
                    self.failed_notifications_total.get(receiver, 0) + 1
                )
        self.listener_errors += _notify(self._listener, attempt)

    def attempts(
        self, *, receiver: str | None = None, group_key: str | None = None
    ) -> list[DeliveryAttempt]:
        return [
            a
            for a in self._recent
            if (receiver is None or a.receiver == receiver)
            and (group_key is None or a.group_key == group_key)
        ]


def _notify(listener: Callable[[Any], None] | None, item: object) -> int:
    """Hand `item` to a store's listener. The in-memory record is already made, so a
    failing store is counted (`listener_errors`) and logged rather than undoing a
    delivery that happened; the store is expected to retry its own writes."""
    if listener is None:
        return 0
    try:
        listener(item)
    except Exception:
        log.exception("storing %s failed", type(item).__name__)
        return 1
    return 0
