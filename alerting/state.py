"""Alert state: what the evaluator keeps between evaluations, and the transitions it emits.

Everything here is a frozen dataclass that round-trips through `to_dict`/`from_dict`
(JSON-safe: times are RFC 3339 strings in UTC, non-finite values the strings `NaN`,
`+Inf`, `-Inf`), so the alerting service can keep it in PostgreSQL rows and restore it
after a restart: a restored pending alert keeps its `active_since` (its `for` goes on
from there), a restored firing alert stays firing without a second `firing` transition.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

RuleHealth = Literal["unknown", "ok", "error"]


class AlertState(StrEnum):
    INACTIVE = "inactive"  # only as a transition's from/to: such alerts are not kept
    PENDING = "pending"  # condition true, for less than the rule's `for`
    FIRING = "firing"
    RESOLVED = "resolved"  # kept a while (resolved retention) so the resolution is seen


def fingerprint(tenant_id: str, rule_id: str, labels: Mapping[str, str]) -> str:
    """Stable id of one alert: tenant, rule and the alert's labels (the Kafka key of its
    transitions, the primary key of its row)."""
    h = hashlib.sha256()
    for part in (tenant_id, rule_id, *(f"{k}\x1f{v}" for k, v in sorted(labels.items()))):
        h.update(part.encode())
        h.update(b"\x1e")
    return h.hexdigest()[:32]


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _parse_time(value: object) -> datetime | None:
    if value is None:
        return None
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _required_time(value: object) -> datetime:
    parsed = _parse_time(value)
    if parsed is None:
        raise ValueError("a time is required")
    return parsed


def encode_value(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return value


def decode_value(value: object) -> float:
    if isinstance(value, str):
        return {"NaN": math.nan, "+Inf": math.inf, "-Inf": -math.inf}.get(value, math.nan)
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Alert:
    """One series' alert of one rule. `active_since`: when this episode's condition
    first held; `last_active_at`: the latest evaluation where it held;
    `keep_firing_since`: when a firing alert's condition stopped (held by keep_firing_for)."""

    fingerprint: str
    rule_id: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    state: AlertState
    value: float
    active_since: datetime
    last_active_at: datetime
    fired_at: datetime | None = None
    resolved_at: datetime | None = None
    keep_firing_since: datetime | None = None

    @property
    def alertname(self) -> str:
        return self.labels.get("alertname", "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "rule_id": self.rule_id,
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "state": self.state.value,
            "value": encode_value(self.value),
            "active_since": _time(self.active_since),
            "last_active_at": _time(self.last_active_at),
            "fired_at": _time(self.fired_at),
            "resolved_at": _time(self.resolved_at),
            "keep_firing_since": _time(self.keep_firing_since),
        }

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Alert:
        return Alert(
            fingerprint=str(data["fingerprint"]),
            rule_id=str(data["rule_id"]),
            labels={str(k): str(v) for k, v in data["labels"].items()},
            annotations={str(k): str(v) for k, v in data.get("annotations", {}).items()},
            state=AlertState(data["state"]),
            value=decode_value(data.get("value", "NaN")),
            active_since=_required_time(data["active_since"]),
            last_active_at=_required_time(data.get("last_active_at", data["active_since"])),
            fired_at=_parse_time(data.get("fired_at")),
            resolved_at=_parse_time(data.get("resolved_at")),
            keep_firing_since=_parse_time(data.get("keep_firing_since")),
        )


@dataclass(frozen=True)
class RuleState:
    """A rule's alerts (pending, firing, recently resolved) by fingerprint, and health:
    `error` with `last_error` when its last evaluation failed (alerts then unchanged)."""

    rule_id: str
    alerts: Mapping[str, Alert] = field(default_factory=dict)
    health: RuleHealth = "unknown"
    last_error: str | None = None
    last_evaluated_at: datetime | None = None

    def firing(self) -> list[Alert]:
        return [a for a in self.alerts.values() if a.state == AlertState.FIRING]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule_id": self.rule_id,
            "alerts": [a.to_dict() for a in sorted(self.alerts.values(), key=_by_labels)],
            "health": self.health,
            "last_error": self.last_error,
            "last_evaluated_at": _time(self.last_evaluated_at),
        }

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> RuleState:
        alerts = [Alert.from_dict(a) for a in data.get("alerts", [])]
        health = data.get("health", "unknown")
        if health not in ("unknown", "ok", "error"):
            raise ValueError(f"unknown rule health {health!r}")
        return RuleState(
            rule_id=str(data["rule_id"]),
            alerts={a.fingerprint: a for a in alerts},
            health=health,
            last_error=data.get("last_error"),
            last_evaluated_at=_parse_time(data.get("last_evaluated_at")),
        )


@dataclass(frozen=True)
class GroupState:
    """The states of one group's rules, by rule id."""

    rules: Mapping[str, RuleState] = field(default_factory=dict)

    def rule(self, rule_id: str) -> RuleState:
        return self.rules.get(rule_id) or RuleState(rule_id)

    def alerts(self) -> list[Alert]:
        return [a for r in self.rules.values() for a in r.alerts.values()]

    def to_dict(self) -> dict[str, Any]:
        return {"rules": [self.rules[k].to_dict() for k in sorted(self.rules)]}

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> GroupState:
        states = [RuleState.from_dict(r) for r in data.get("rules", [])]
        return GroupState({s.rule_id: s for s in states})


@dataclass(frozen=True)
class Transition:
    """An alert moving between states: what goes to `yak.alerts.v1` (keyed by
    `fingerprint`) and into the alert state history. `key` is unique per transition, for
    consumers that must process each once."""

    tenant_id: str
    fingerprint: str
    rule_id: str
    group: str
    alertname: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    from_state: AlertState
    to_state: AlertState
    at: datetime
    value: float
    active_since: datetime
    fired_at: datetime | None = None
    resolved_at: datetime | None = None

    @property
    def key(self) -> str:
        ms = int(self.at.timestamp() * 1000)
        return f"{self.fingerprint}:{self.to_state.value}:{ms}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "tenant_id": self.tenant_id,
            "fingerprint": self.fingerprint,
            "rule_id": self.rule_id,
            "group": self.group,
            "alertname": self.alertname,
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "from_state": self.from_state.value,
            "to_state": self.to_state.value,
            "at": _time(self.at),
            "value": encode_value(self.value),
            "active_since": _time(self.active_since),
            "fired_at": _time(self.fired_at),
            "resolved_at": _time(self.resolved_at),
        }

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Transition:
        return Transition(
            tenant_id=str(data["tenant_id"]),
            fingerprint=str(data["fingerprint"]),
            rule_id=str(data["rule_id"]),
            group=str(data["group"]),
            alertname=str(data["alertname"]),
            labels={str(k): str(v) for k, v in data["labels"].items()},
            annotations={str(k): str(v) for k, v in data.get("annotations", {}).items()},
            from_state=AlertState(data["from_state"]),
            to_state=AlertState(data["to_state"]),
            at=_required_time(data["at"]),
            value=decode_value(data.get("value", "NaN")),
            active_since=_required_time(data["active_since"]),
            fired_at=_parse_time(data.get("fired_at")),
            resolved_at=_parse_time(data.get("resolved_at")),
        )


def _by_labels(alert: Alert) -> list[tuple[str, str]]:
    return sorted(alert.labels.items())
