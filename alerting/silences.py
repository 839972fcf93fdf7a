"""Silences: matchers muting alerts between starts_at and ends_at, as in Alertmanager.

A silence is pending before `starts_at`, active until `ends_at`, expired after. Expiring
one early ends it now (a pending one collapses to an empty window). Muting is decided at
every group flush, so an alert a silence held back is notified at the first flush after
the silence ends. All time comes in as an argument; nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from alerting.matchers import Matcher, matches_all
from yakpanel.ids import new_id


class SilenceError(ValueError):
    """A silence that cannot be created or changed, with the reason."""


class SilenceNotFound(KeyError):
    pass


class SilenceState(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    EXPIRED = "expired"


@dataclass(frozen=True)
class Silence:
    id: str
    matchers: tuple[Matcher, ...]
    starts_at: datetime
    ends_at: datetime
    created_by: str
    comment: str
    updated_at: datetime

    def state(self, now: datetime) -> SilenceState:
        if now < self.starts_at:
            return SilenceState.PENDING
        if now < self.ends_at:
            return SilenceState.ACTIVE
        return SilenceState.EXPIRED

    def mutes(self, labels: Mapping[str, str], now: datetime) -> bool:
        return self.state(now) is SilenceState.ACTIVE and matches_all(self.matchers, labels)

    def to_dict(self, now: datetime | None = None) -> dict[str, Any]:
        """Alertmanager's v2 API shape (plus `status` when `now` is given)."""
        out: dict[str, Any] = {
            "id": self.id,
            "matchers": [m.to_dict() for m in self.matchers],
            "startsAt": self.starts_at.isoformat(),
            "endsAt": self.ends_at.isoformat(),
            "createdBy": self.created_by,
            "comment": self.comment,
            "updatedAt": self.updated_at.isoformat(),
        }
        if now is not None:
            out["status"] = {"state": self.state(now).value}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Silence:
        return cls(
            id=str(data["id"]),
            matchers=tuple(Matcher.from_dict(m) for m in data["matchers"]),
            starts_at=datetime.fromisoformat(data["startsAt"]),
            ends_at=datetime.fromisoformat(data["endsAt"]),
            created_by=str(data["createdBy"]),
            comment=str(data["comment"]),
            updated_at=datetime.fromisoformat(data["updatedAt"]),
        )


class Silences:
    """The silences of one tenant. `listener` sees every created or changed silence, so a
    store can persist it; `restore` loads them back after a restart."""

    def __init__(
        self,
        *,
        id_factory: Callable[[], str] | None = None,
        listener: Callable[[Silence], None] | None = None,
    ) -> None:
        self._silences: dict[str, Silence] = {}
        self._new_id = id_factory or (lambda: str(new_id()))
        self._listener = listener

    def add(
        self,
        *,
        matchers: Sequence[Matcher],
        starts_at: datetime,
        ends_at: datetime,
        created_by: str,
        comment: str,
        now: datetime,
    ) -> Silence:
        if not matchers:
            raise SilenceError("a silence needs at least one matcher")
        if all(m.matches({}) for m in matchers):
            # Such a silence would mute every alert, the very ones it never names too.
            raise SilenceError("at least one matcher must not match the empty string")
        if not created_by.strip():
            raise SilenceError("a silence needs its author (created_by)")
        if not comment.strip():
            raise SilenceError("a silence needs a comment saying why")
        if ends_at <= starts_at:
            raise SilenceError("ends_at must be after starts_at")
        if ends_at <= now:
            raise SilenceError("ends_at is in the past; the silence would never be active")
        silence = Silence(
            id=self._new_id(),
            matchers=tuple(matchers),
            starts_at=max(starts_at, now),
            ends_at=ends_at,
            created_by=created_by,
            comment=comment,
            updated_at=now,
        )
        self._store(silence)
        return silence

    def expire(self, silence_id: str, now: datetime) -> Silence:
        current = self.get(silence_id)
        state = current.state(now)
        if state is SilenceState.EXPIRED:
            raise SilenceError(f"silence {silence_id} has already expired")
        if state is SilenceState.PENDING:
            expired = replace(current, starts_at=now, ends_at=now, updated_at=now)
        else:
            expired = replace(current, ends_at=now, updated_at=now)
        self._store(expired)
        return expired

    def get(self, silence_id: str) -> Silence:
        try:
            return self._silences[silence_id]
        except KeyError:
            raise SilenceNotFound(silence_id) from None

    def query(self, now: datetime, state: SilenceState | None = None) -> list[Silence]:
        found = [s for s in self._silences.values() if state is None or s.state(now) is state]
        return sorted(found, key=lambda s: (s.starts_at, s.id))

    def muted_by(self, labels: Mapping[str, str], now: datetime) -> list[str]:
        """Ids of the active silences that mute an alert with these labels."""
        return sorted(s.id for s in self._silences.values() if s.mutes(labels, now))

    def gc(self, now: datetime, retention: timedelta) -> int:
        """Forget silences expired for longer than `retention`."""
        old = [k for k, s in self._silences.items() if s.ends_at + retention <= now]
        for key in old:
            del self._silences[key]
        return len(old)

    def restore(self, silences: Iterable[Silence]) -> None:
        for silence in silences:
            self._silences[silence.id] = silence

    def to_dicts(self) -> list[dict[str, Any]]:
        return [s.to_dict() for s in sorted(self._silences.values(), key=lambda s: s.id)]

    def _store(self, silence: Silence) -> None:
        self._silences[silence.id] = silence
        if self._listener is not None:
            self._listener(silence)
