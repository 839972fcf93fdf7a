"""Aggregation groups and their timers, Alertmanager's way, as a pure clock-driven core.

`Dispatcher` never reads a clock and does no I/O: `on_alerts(alerts, now)` sorts alerts
into groups (one per matching route and set of `group_by` values); `tick(now)` flushes the
groups that are due and returns the `Notification`s to send; `on_delivered(...)` reports
how each went. A group flushes first `group_wait` after it appears, then every
`group_interval`; at each flush silenced and inhibited alerts are left out, and the
notification log decides per receiver integration whether anything is news (new firing
alerts, newly resolved ones, or `repeat_interval` passed). Resolved alerts leave the group
after a flush that delivered them; a failed delivery leaves the log untouched, so the next
flush sends again. `alerting.runner.DispatchRunner` drives it in real time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from alerting.inhibition import InhibitionIndex, SourceAlert
from alerting.notifylog import NotificationLog, NotifyLogEntry, NotifyLogKey, needs_update
from alerting.receivers import SecretURL
from alerting.routing import NotificationConfig, Route
from alerting.silences import Silences


@dataclass(frozen=True)
class Alert:
    """One alert as the dispatcher sees it. Firing while `ends_at` is None or in the
    future; resolved from `ends_at` on. The fingerprint defaults to a hash of the labels."""

    labels: Mapping[str, str]
    starts_at: datetime
    annotations: Mapping[str, str] = field(default_factory=dict)
    ends_at: datetime | None = None
    generator_url: str = ""
    fingerprint: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", dict(self.labels))
        object.__setattr__(self, "annotations", dict(self.annotations))
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", fingerprint(self.labels))

    def resolved_at(self, now: datetime) -> bool:
        return self.ends_at is not None and self.ends_at <= now

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "starts_at": self.starts_at.isoformat(),
            "ends_at": self.ends_at.isoformat() if self.ends_at else None,
            "generator_url": self.generator_url,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Alert:
        ends = data.get("ends_at")
        return cls(
            labels=data["labels"],
            starts_at=datetime.fromisoformat(data["starts_at"]),
            annotations=data.get("annotations") or {},
            ends_at=datetime.fromisoformat(ends) if ends else None,
            generator_url=data.get("generator_url") or "",
            fingerprint=data.get("fingerprint") or "",
        )


def fingerprint(labels: Mapping[str, str]) -> str:
    text = "\xff".join(f"{k}\xfe{v}" for k, v in sorted(labels.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def render_labels(labels: Mapping[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


@dataclass(frozen=True)
class Notification:
    """One message for one receiver integration (one URL of a receiver)."""

    id: str
    tenant_id: str | None
    group_key: str
    receiver: str
    integration: int
    url: SecretURL
    group_labels: Mapping[str, str]
    firing_alerts: tuple[Alert, ...]
    resolved_alerts: tuple[Alert, ...]
    # What the log records once delivered: every unmuted firing / resolved fingerprint.
    firing: frozenset[str]
    resolved: frozenset[str]
    flushed_at: datetime

    @property
    def status(self) -> Literal["firing", "resolved"]:
        return "firing" if self.firing_alerts else "resolved"

    def log_entry(self) -> NotifyLogEntry:
        key = NotifyLogKey(self.group_key, self.receiver, self.integration)
        return NotifyLogEntry(key, self.firing, self.resolved, self.flushed_at)


@dataclass(frozen=True)
class MuteStatus:
    silenced_by: tuple[str, ...] = ()
    inhibited_by: str | None = None

    @property
    def muted(self) -> bool:
        return bool(self.silenced_by) or self.inhibited_by is not None


@dataclass
class _Group:
    key: str
    route: Route
    labels: dict[str, str]
    created_at: datetime
    next_flush_at: datetime
    alerts: dict[str, Alert] = field(default_factory=dict)
    has_flushed: bool = False
    in_flight: set[str] = field(default_factory=set)
    flushed_resolved: dict[str, Alert] = field(default_factory=dict)
    flush_failed: bool = False


class Dispatcher:
    def __init__(
        self,
        config: NotificationConfig,
        *,
        silences: Silences | None = None,
        notify_log: NotificationLog | None = None,
        tenant_id: str | None = None,
    ) -> None:
        self.config = config
        self.silences = silences if silences is not None else Silences()
        self.notify_log = notify_log if notify_log is not None else NotificationLog()
        self.tenant_id = tenant_id
        self._alerts: dict[str, Alert] = {}
        self._groups: dict[str, _Group] = {}

    # --- input ---------------------------------------------------------------------

    def on_alerts(self, alerts: Iterable[Alert], now: datetime) -> None:
        """Take new or updated alerts (a resolved one carries `ends_at`)."""
        for alert in alerts:
            known = self._alerts.get(alert.fingerprint)
            if (
                known is not None
                and not known.resolved_at(now)
                and known.starts_at < alert.starts_at
            ):
                # The same episode re-sent: it started when we first heard of it.
                alert = replace(alert, starts_at=known.starts_at)
            self._alerts[alert.fingerprint] = alert
            for route in self.config.route.match(alert.labels):
                self._insert(route, alert, now)

    def reload(self, config: NotificationConfig, now: datetime) -> None:
        """Switch to a new config: regroup every alert, keeping timers of surviving groups."""
        self.config = config
        self._regroup(self._groups, now)

    # --- output --------------------------------------------------------------------

    def tick(self, now: datetime) -> list[Notification]:
        """Flush every group that is due; the caller delivers what comes back."""
        out: list[Notification] = []
        index: InhibitionIndex | None = None
        for key in sorted(self._groups):
            group = self._groups[key]
            if group.in_flight or group.next_flush_at > now:
                continue
            at = group.next_flush_at
            following = at + group.route.group_interval
            group.next_flush_at = following if following > now else now + group.route.group_interval
            group.has_flushed = True
            if index is None:
                index = self._inhibition(now)
            out.extend(self._flush(group, at, now, index))
        return out

    def on_delivered(self, notification: Notification, delivered: bool, now: datetime) -> None:
        """Report the outcome of a notification `tick` returned."""
        group = self._groups.get(notification.group_key)
        if group is not None and notification.id in group.in_flight:
            group.in_flight.discard(notification.id)
            group.flush_failed |= not delivered
            if not group.in_flight:
                group.next_flush_at = max(group.next_flush_at, now)
                self._finish_flush(group)
        if delivered:
            self.notify_log.record(notification.log_entry())

    def next_flush_at(self) -> datetime | None:
        """When `tick` next has work (None: no groups waiting)."""
        due = [g.next_flush_at for g in self._groups.values() if not g.in_flight]
        return min(due) if due else None

    def mute_status(self, alert: Alert, now: datetime) -> MuteStatus:
        """Why an alert is (or is not) held back right now."""
        silenced = tuple(self.silences.muted_by(alert.labels, now))
        inhibited = self._inhibition(now).inhibited_by(alert.fingerprint, alert.labels)
        return MuteStatus(silenced, inhibited)

    def alerts(self) -> list[Alert]:
        return sorted(self._alerts.values(), key=lambda a: a.fingerprint)

    # --- persistence ---------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The group state (alerts and timers) as JSON-able data; see `restore`."""
        return {
            "alerts": [a.to_dict() for a in self.alerts()],
            "groups": [
                {
                    "key": g.key,
                    "created_at": g.created_at.isoformat(),
                    "next_flush_at": g.next_flush_at.isoformat(),
                    "has_flushed": g.has_flushed,
                }
                for g in sorted(self._groups.values(), key=lambda g: g.key)
            ],
        }

    def restore(self, snapshot: Mapping[str, Any], now: datetime) -> None:
        """Load a `snapshot` taken before a restart (restore the notify log first)."""
        self._alerts = {a.fingerprint: a for a in map(Alert.from_dict, snapshot["alerts"])}
        timers = {
            g["key"]: _Group(
                key=g["key"],
                route=self.config.route,
                labels={},
                created_at=datetime.fromisoformat(g["created_at"]),
                next_flush_at=datetime.fromisoformat(g["next_flush_at"]),
                has_flushed=bool(g["has_flushed"]),
            )
            for g in snapshot["groups"]
        }
        self._regroup(timers, now)

    # --- internals -----------------------------------------------------------------

    def _insert(self, route: Route, alert: Alert, now: datetime) -> None:
        labels = route.group_labels(alert.labels)
        key = f"{route.key}:{render_labels(labels)}"
        group = self._groups.get(key)
        if group is None:
            group = _Group(key, route, labels, now, now + route.group_wait)
            self._groups[key] = group
        group.alerts[alert.fingerprint] = alert
        if not group.has_flushed and alert.starts_at + route.group_wait <= now:
            # Older than group_wait (e.g. re-sent after a restart): no point waiting.
            group.next_flush_at = min(group.next_flush_at, now)

    def _regroup(self, previous: Mapping[str, _Group], now: datetime) -> None:
        self._groups = {}
        for alert in self._alerts.values():
            for route in self.config.route.match(alert.labels):
                self._insert(route, alert, now)
        for key, group in self._groups.items():
            old = previous.get(key)
            if old is not None:
                group.created_at, group.has_flushed = old.created_at, old.has_flushed
                group.next_flush_at = old.next_flush_at
                group.in_flight, group.flushed_resolved = old.in_flight, old.flushed_resolved

    def _inhibition(self, now: datetime) -> InhibitionIndex:
        firing = (
            SourceAlert(a.fingerprint, a.labels)
            for a in self._alerts.values()
            if not a.resolved_at(now)
        )
        return InhibitionIndex(self.config.inhibit_rules, firing)

    def _muted(self, alert: Alert, now: datetime, index: InhibitionIndex) -> bool:
        return bool(self.silences.muted_by(alert.labels, now)) or (
            index.inhibited_by(alert.fingerprint, alert.labels) is not None
        )

    def _flush(
        self, group: _Group, at: datetime, now: datetime, index: InhibitionIndex
    ) -> list[Notification]:
        ordered = sorted(group.alerts.values(), key=lambda a: sorted(a.labels.items()))
        visible = [a for a in ordered if not self._muted(a, now, index)]
        firing = tuple(a for a in visible if not a.resolved_at(now))
        resolved = tuple(a for a in visible if a.resolved_at(now))
        firing_fps = frozenset(a.fingerprint for a in firing)
        resolved_fps = frozenset(a.fingerprint for a in resolved)
        receiver = self.config.receiver(group.route.receiver)
        out: list[Notification] = []
        for integration, url in enumerate(receiver.urls):
            key = NotifyLogKey(group.key, receiver.name, integration)
            entry = self.notify_log.get(key)
            if not needs_update(
                entry,
                firing_fps,
                resolved_fps,
                send_resolved=receiver.send_resolved,
                repeat_interval=group.route.repeat_interval,
                now=at,
            ):
                continue
            sent_resolved = resolved if receiver.send_resolved else ()
            if not firing and not sent_resolved:
                # Nothing the receiver wants to hear; remember the state as Alertmanager does.
                self.notify_log.record(NotifyLogEntry(key, firing_fps, resolved_fps, at))
                continue
            ident = f"{key.group_key}|{key.receiver}|{integration}|{at.isoformat()}"
            out.append(
                Notification(
                    id=hashlib.sha256(ident.encode()).hexdigest()[:24],
                    tenant_id=self.tenant_id,
                    group_key=group.key,
                    receiver=receiver.name,
                    integration=integration,
                    url=url,
                    group_labels=dict(group.labels),
                    firing_alerts=firing,
                    resolved_alerts=sent_resolved,
                    firing=firing_fps,
                    resolved=resolved_fps,
                    flushed_at=at,
                )
            )
        group.flushed_resolved = {a.fingerprint: a for a in ordered if a.resolved_at(now)}
        group.flush_failed = False
        group.in_flight = {n.id for n in out}
        if not out:
            self._finish_flush(group)
        return out

    def _finish_flush(self, group: _Group) -> None:
        if not group.flush_failed:
            for fp, alert in group.flushed_resolved.items():
                if group.alerts.get(fp) == alert:  # unless it fired again meanwhile
                    del group.alerts[fp]
        dropped = [fp for fp in group.flushed_resolved if fp not in group.alerts]
        group.flushed_resolved = {}
        if not group.alerts:
            del self._groups[group.key]
        for fp in dropped:
            if not any(fp in g.alerts for g in self._groups.values()):
                self._alerts.pop(fp, None)
