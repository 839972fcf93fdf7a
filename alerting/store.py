"""PostgreSQL persistence of alerting: rule groups, evaluator state, the alert state
history with its outbox messages, notification config (receiver URLs sealed),
silences, the notification log and delivery attempts (tables of
`controlplane/schema/0006_alerting.sql`).

Every method runs as the application role with `app.tenant_id` set to the tenant it
names, so row-level security holds here as everywhere else. `save_evaluation` is the
evaluator's one transaction: new state, history rows and outbox messages together.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from alerting.evaluator import GroupEvaluation
from alerting.notifylog import DeliveryAttempt, NotifyLogEntry
from alerting.receivers import Sealer, SecretURL
from alerting.routing import NotificationConfig, parse_config
from alerting.rules import RuleError, RuleGroup, parse_rule_groups, rules_to_dict
from alerting.silences import Silence
from alerting.state import AlertState, GroupState, Transition
from yakpanel.ids import new_id
from yakpanel.topics import ALERTS

APP_ROLE = "yakpanel_app"
SEALED = "$sealed"
TRANSITION_EVENT = "alert.transition"
ALERT_RESOLVED = "alert resolved"  # the resolution of an incident its alert resolved

Conn = AsyncConnection[dict[str, Any]]


@dataclass(frozen=True)
class StoredGroup:
    group: RuleGroup
    updated_at: datetime


@dataclass(frozen=True)
class StoredState:
    state: GroupState
    evaluated_at: datetime


@dataclass(frozen=True)
class StoredConfig:
    config: NotificationConfig
    updated_at: datetime


def receiver_context(tenant_id: str, receiver: str, index: int) -> str:
    """What a sealed receiver URL is bound to: a copy in another row does not open."""
    return f"alerting:receiver:{tenant_id}:{receiver}:{index}"


class AlertStore:
    def __init__(
        self, dsn: str, sealer: Sealer | None = None, min_size: int = 1, max_size: int = 4
    ) -> None:
        self.dsn = dsn
        self.sealer = sealer
        self.min_size, self.max_size = min_size, max_size
        self._pool: AsyncConnectionPool[Conn] | None = None

    @staticmethod
    async def _configure(conn: Conn) -> None:
        await conn.execute(f"SET ROLE {APP_ROLE}")

    async def open(self) -> None:
        """Connect (again, after `close`)."""
        if self._pool is None:
            pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
                self.dsn,
                min_size=self.min_size,
                max_size=self.max_size,
                open=False,
                kwargs={"autocommit": True, "row_factory": dict_row},
                configure=self._configure,
                name="alerting",
            )
            await pool.open(wait=True, timeout=30)
            self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @asynccontextmanager
    async def tenant(self, tenant_id: str) -> AsyncIterator[Conn]:
        """One transaction in the tenant's context."""
        if self._pool is None:
            raise RuntimeError("the alert store is not open")
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(
                "SELECT set_config('app.tenant_id', %s, true),"
                " set_config('app.staff_read', 'off', true)",
                (str(uuid.UUID(tenant_id)),),
            )
            yield conn

    # --- rule groups ---------------------------------------------------------------

    async def save_rule_group(self, tenant_id: str, group: RuleGroup, now: datetime) -> None:
        spec = rules_to_dict([group])["groups"][0]
        async with self.tenant(tenant_id) as conn:
            await conn.execute(
                """INSERT INTO alert_rule_groups (tenant_id, name, spec, eval_interval,
                       evaluation_delay, updated_at) VALUES (%s, %s, %s, %s, %s, %s)
                   ON CONFLICT (tenant_id, name) DO UPDATE SET spec = excluded.spec,
                       eval_interval = excluded.eval_interval,
                       evaluation_delay = excluded.evaluation_delay,
                       updated_at = excluded.updated_at""",
                (tenant_id, group.name, Jsonb(spec), group.interval, group.evaluation_delay, now),
            )

    async def delete_rule_group(self, tenant_id: str, name: str) -> None:
        async with self.tenant(tenant_id) as conn:
            await conn.execute(
                "DELETE FROM alert_rule_groups WHERE tenant_id = %s AND name = %s",
                (tenant_id, name),
            )

    async def rule_groups(self, tenant_id: str) -> tuple[list[StoredGroup], dict[str, str]]:
        """The tenant's groups, and the names of stored groups that no longer load, with
        the reason (the API validates on write; a later, stricter loader may refuse one)."""
        async with self.tenant(tenant_id) as conn:
            rows = await (
                await conn.execute(
                    "SELECT name, spec, updated_at FROM alert_rule_groups"
                    " WHERE tenant_id = %s ORDER BY name",
                    (tenant_id,),
                )
            ).fetchall()
        groups, broken = [], {}
        for row in rows:
            source = f"tenant {tenant_id} rule group {row['name']}"
            try:
                (group,) = parse_rule_groups({"groups": [row["spec"]]}, source)
            except RuleError as exc:
                broken[row["name"]] = "; ".join(exc.problems)
                continue
            groups.append(StoredGroup(group, row["updated_at"]))
        return groups, broken

    # --- evaluator state and history -----------------------------------------------

    async def group_states(self, tenant_id: str) -> dict[str, StoredState]:
        async with self.tenant(tenant_id) as conn:
            rows = await (
                await conn.execute(
                    "SELECT group_name, state, evaluated_at FROM alert_group_state"
                    " WHERE tenant_id = %s",
                    (tenant_id,),
                )
            ).fetchall()
        return {
            r["group_name"]: StoredState(GroupState.from_dict(r["state"]), r["evaluated_at"])
            for r in rows
        }

    async def save_evaluation(
        self, tenant_id: str, group: str, evaluation: GroupEvaluation
    ) -> list[Transition]:
        """The group's new state, its transitions in the history and in the outbox for
        `yak.alerts.v1`, in one transaction. Returns the transitions newly recorded (one
        already in the history is neither recorded nor published again)."""
        async with self.tenant(tenant_id) as conn:
            await conn.execute(
                """INSERT INTO alert_group_state (tenant_id, group_name, state, evaluated_at)
                   VALUES (%s, %s, %s, %s) ON CONFLICT (tenant_id, group_name)
                   DO UPDATE SET state = excluded.state, evaluated_at = excluded.evaluated_at""",
                (tenant_id, group, Jsonb(evaluation.state.to_dict()), evaluation.at),
            )
            return await _record(conn, tenant_id, evaluation.transitions)

    async def retire_group(
        self, tenant_id: str, group: str, transitions: Sequence[Transition]
    ) -> list[Transition]:
        """A group that was removed: its state goes, its alerts' last transitions
        (pending → inactive, firing → resolved) are recorded and published."""
        async with self.tenant(tenant_id) as conn:
            await conn.execute(
                "DELETE FROM alert_group_state WHERE tenant_id = %s AND group_name = %s",
                (tenant_id, group),
            )
            return await _record(conn, tenant_id, transitions)

    async def transitions(self, tenant_id: str, limit: int = 1000) -> list[Transition]:
        """The state history, oldest first."""
        async with self.tenant(tenant_id) as conn:
            rows = await (
                await conn.execute(
                    """SELECT * FROM alert_transitions WHERE tenant_id = %s
                       ORDER BY at, key LIMIT %s""",
                    (tenant_id, limit),
                )
            ).fetchall()
        return [_transition(tenant_id, r) for r in rows]

    # --- notification config -------------------------------------------------------

    async def save_notification_config(
        self, tenant_id: str, config: NotificationConfig, now: datetime
    ) -> None:
        data = config.to_dict(reveal=False)
        for receiver in data["receivers"]:
            urls = config.receivers[receiver["name"]].urls
            receiver["urls"] = [
                {SEALED: base64.b64encode(self._seal(url, tenant_id, receiver["name"], i)).decode()}
                for i, url in enumerate(urls)
            ]
        async with self.tenant(tenant_id) as conn:
            await conn.execute(
                """INSERT INTO alert_notification_config (tenant_id, config, updated_at)
                   VALUES (%s, %s, %s) ON CONFLICT (tenant_id)
                   DO UPDATE SET config = excluded.config, updated_at = excluded.updated_at""",
                (tenant_id, Jsonb(data), now),
            )

    async def notification_config(self, tenant_id: str) -> StoredConfig | None:
        async with self.tenant(tenant_id) as conn:
            row = await (
                await conn.execute(
                    "SELECT config, updated_at FROM alert_notification_config WHERE tenant_id = %s",
                    (tenant_id,),
                )
            ).fetchone()
        if row is None:
            return None
        data = row["config"]
        for receiver in data.get("receivers", []):
            receiver["urls"] = [
                self._open(url, tenant_id, receiver["name"], i)
                for i, url in enumerate(receiver.get("urls", []))
            ]
        return StoredConfig(parse_config(data), row["updated_at"])

    def _seal(self, url: SecretURL, tenant_id: str, receiver: str, index: int) -> bytes:
        if self.sealer is None:
            raise RuntimeError("storing receiver URLs needs the master key (a sealer)")
        return url.seal(self.sealer, receiver_context(tenant_id, receiver, index))

    def _open(self, stored: Mapping[str, str], tenant_id: str, receiver: str, index: int) -> str:
        if self.sealer is None:
            raise RuntimeError("reading receiver URLs needs the master key (a sealer)")
        sealed = base64.b64decode(stored[SEALED])
        context = receiver_context(tenant_id, receiver, index)
        return SecretURL.unseal(self.sealer, sealed, context).reveal()

    # --- silences, notification log, attempts --------------------------------------

    async def save_silence(self, tenant_id: str, silence: Silence) -> None:
        async with self.tenant(tenant_id) as conn:
            await conn.execute(
                """INSERT INTO alert_silences (tenant_id, id, silence, ends_at, updated_at)
                   VALUES (%s, %s, %s, %s, %s) ON CONFLICT (tenant_id, id)
                   DO UPDATE SET silence = excluded.silence, ends_at = excluded.ends_at,
                       updated_at = excluded.updated_at""",
                (
                    tenant_id,
                    silence.id,
                    Jsonb(silence.to_dict()),
                    silence.ends_at,
                    silence.updated_at,
                ),
            )

    async def silences(self, tenant_id: str) -> list[Silence]:
        async with self.tenant(tenant_id) as conn:
            rows = await (
                await conn.execute(
                    "SELECT silence FROM alert_silences WHERE tenant_id = %s", (tenant_id,)
                )
            ).fetchall()
        return [Silence.from_dict(r["silence"]) for r in rows]

    async def save_notify_log_entry(self, tenant_id: str, entry: NotifyLogEntry) -> None:
        """Upsert by (group key, receiver, integration); an older entry never overwrites
        a newer one (a late write after a restart)."""
        async with self.tenant(tenant_id) as conn:
            await conn.execute(
                """INSERT INTO alert_notification_log (tenant_id, group_key, receiver,
                       integration, firing, resolved, sent_at)
                   VALUES (%s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (tenant_id, group_key, receiver, integration) DO UPDATE
                   SET firing = excluded.firing, resolved = excluded.resolved,
                       sent_at = excluded.sent_at
                   WHERE alert_notification_log.sent_at <= excluded.sent_at""",
                (
                    tenant_id,
                    entry.key.group_key,
                    entry.key.receiver,
                    entry.key.integration,
                    Jsonb(sorted(entry.firing)),
                    Jsonb(sorted(entry.resolved)),
                    entry.sent_at,
                ),
            )

    async def notify_log_entries(self, tenant_id: str) -> list[NotifyLogEntry]:
        async with self.tenant(tenant_id) as conn:
            rows = await (
                await conn.execute(
                    """SELECT group_key, receiver, integration, firing, resolved, sent_at
                       FROM alert_notification_log WHERE tenant_id = %s""",
                    (tenant_id,),
                )
            ).fetchall()
        return [NotifyLogEntry.from_dict({**r, "sent_at": r["sent_at"].isoformat()}) for r in rows]

    async def save_attempt(self, tenant_id: str, attempt: DeliveryAttempt) -> None:
        async with self.tenant(tenant_id) as conn:
            await conn.execute(
                """INSERT INTO alert_delivery_attempts (tenant_id, notification_id, attempt, at,
                       group_key, receiver, integration, target, duration_seconds, outcome,
                       error, final)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT DO NOTHING""",
                (
                    tenant_id,
                    attempt.notification_id,
                    attempt.attempt,
                    attempt.at,
                    attempt.group_key,
                    attempt.receiver,
                    attempt.integration,
                    attempt.target,
                    attempt.duration_seconds,
                    attempt.outcome,
                    attempt.error,
                    attempt.final,
                ),
            )

    async def attempts(self, tenant_id: str) -> list[dict[str, Any]]:
        async with self.tenant(tenant_id) as conn:
            return await (
                await conn.execute(
                    "SELECT * FROM alert_delivery_attempts WHERE tenant_id = %s ORDER BY at",
                    (tenant_id,),
                )
            ).fetchall()


async def _record(
    conn: Conn, tenant_id: str, transitions: Sequence[Transition]
) -> list[Transition]:
    recorded: list[Transition] = []
    for t in transitions:
        cur = await conn.execute(
            """INSERT INTO alert_transitions (tenant_id, key, fingerprint, rule_id,
                   group_name, alertname, labels, annotations, from_state, to_state,
                   at, value, active_since, fired_at, resolved_at)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT DO NOTHING""",
            (
                tenant_id,
                t.key,
                t.fingerprint,
                t.rule_id,
                t.group,
                t.alertname,
                Jsonb(dict(t.labels)),
                Jsonb(dict(t.annotations)),
                t.from_state.value,
                t.to_state.value,
                t.at,
                t.value,
                t.active_since,
                t.fired_at,
                t.resolved_at,
            ),
        )
        if cur.rowcount != 1:
            continue
        recorded.append(t)
        await conn.execute(
            """INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id,
                   event_type, topic, message_key, body, occurred_at)
               VALUES (%s, %s, 'alert', %s, %s, %s, %s, %s, %s)""",
            (
                uuid.uuid4(),
                tenant_id,
                t.fingerprint,
                TRANSITION_EVENT,
                ALERTS.name,
                t.fingerprint,
                json.dumps(t.to_dict(), sort_keys=True).encode(),
                t.at,
            ),
        )
        await _incident(conn, tenant_id, t)
    return recorded


async def _incident(conn: Conn, tenant_id: str, t: Transition) -> None:
    """The incident side of a newly recorded transition (table `incidents` of
    `controlplane/schema/0007_incidents.sql`): an alert that starts firing opens an
    incident unless one is unresolved (its timeline notes the new firing then); an alert
    that resolves resolves its incident (resolution 'alert resolved')."""
    if t.to_state is AlertState.FIRING:
        row = await _unresolved_incident(conn, tenant_id, t.fingerprint)
        if row is not None:
            await _incident_event(
                conn, tenant_id, row["id"], "reopened", f"the alert fired again ({t.key})", t.at
            )
            return
        incident = new_id()
        await conn.execute(
            """INSERT INTO incidents (tenant_id, id, fingerprint, alertname, labels, severity,
                   state, opened_at) VALUES (%s, %s, %s, %s, %s, %s, 'open', %s)""",
            (
                tenant_id,
                incident,
                t.fingerprint,
                t.alertname,
                Jsonb(dict(t.labels)),
                t.labels.get("severity"),
                t.at,
            ),
        )
        await _incident_event(conn, tenant_id, incident, "opened", f"{t.alertname} firing", t.at)
        await _domain_event(
            conn,
            tenant_id,
            incident,
            "incident.opened",
            {"fingerprint": t.fingerprint, "alertname": t.alertname, "labels": dict(t.labels)},
            t.at,
        )
    elif t.to_state is AlertState.RESOLVED:
        row = await _unresolved_incident(conn, tenant_id, t.fingerprint)
        if row is None:
            return
        await _incident_event(conn, tenant_id, row["id"], "alert_resolved", None, t.at)
        await conn.execute(
            """UPDATE incidents SET state = 'resolved', resolved_at = %s, resolved_by = NULL,
                   resolution = %s WHERE tenant_id = %s AND id = %s""",
            (t.at, ALERT_RESOLVED, tenant_id, row["id"]),
        )
        await _incident_event(conn, tenant_id, row["id"], "resolved", ALERT_RESOLVED, t.at)
        await _domain_event(
            conn,
            tenant_id,
            row["id"],
            "incident.resolved",
            {"fingerprint": t.fingerprint, "alertname": t.alertname, "resolution": ALERT_RESOLVED},
            t.at,
        )


async def _unresolved_incident(conn: Conn, tenant_id: str, fp: str) -> dict[str, Any] | None:
    return await (
        await conn.execute(
            """SELECT id FROM incidents WHERE tenant_id = %s AND fingerprint = %s
               AND state <> 'resolved' FOR UPDATE""",
            (tenant_id, fp),
        )
    ).fetchone()


async def _incident_event(
    conn: Conn, tenant_id: str, incident: Any, kind: str, text: str | None, at: datetime
) -> None:
    await conn.execute(
        """INSERT INTO incident_events (tenant_id, id, incident_id, kind, author, text, at)
           VALUES (%s, %s, %s, %s, NULL, %s, %s)""",
        (tenant_id, new_id(), incident, kind, text, at),
    )


async def _domain_event(
    conn: Conn, tenant_id: str, incident: Any, event_type: str, data: dict[str, Any], at: datetime
) -> None:
    """An incident event for `yak.events.v1` through the outbox, in the envelope every
    domain event has (docs/api.md "Audit log and events"); the actor is the system."""
    event_id = new_id()
    payload = {
        "event_id": str(event_id),
        "type": event_type,
        "aggregate_type": "incident",
        "aggregate_id": str(incident),
        "tenant_id": tenant_id,
        "occurred_at": at.isoformat(),
        "actor": {"kind": "system", "id": None},
        "data": data,
    }
    await conn.execute(
        """INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id, event_type,
               payload, occurred_at) VALUES (%s, %s, 'incident', %s, %s, %s, %s)""",
        (event_id, tenant_id, str(incident), event_type, json.dumps(payload, sort_keys=True), at),
    )


def _transition(tenant_id: str, r: Mapping[str, Any]) -> Transition:
    return Transition.from_dict(
        {
            "tenant_id": tenant_id,
            "fingerprint": r["fingerprint"],
            "rule_id": r["rule_id"],
            "group": r["group_name"],
            "alertname": r["alertname"],
            "labels": r["labels"],
            "annotations": r["annotations"],
            "from_state": r["from_state"],
            "to_state": r["to_state"],
            "at": r["at"].isoformat(),
            "value": r["value"],
            "active_since": r["active_since"].isoformat(),
            "fired_at": r["fired_at"].isoformat() if r["fired_at"] else None,
            "resolved_at": r["resolved_at"].isoformat() if r["resolved_at"] else None,
        }
    )
