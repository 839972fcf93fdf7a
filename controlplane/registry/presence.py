"""Presence reported by gateways: a server is online while one session holds it.

A gateway announces `online` for a new session and `offline` for a session that ended
(after three missed heartbeats, or a grace period after a disconnect). An `offline`
for a session that is no longer current — the agent already reconnected, perhaps to
another gateway — changes nothing, so brief reconnects do not flap. Nor does an
`online` for a session already announced offline: sessions never come back, so it can
only be a late "still connected" refresh.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from controlplane.db import SYSTEM, Database
from proto import agent_pb2


async def apply_presence(db: Database, event: agent_pb2.PresenceEvent) -> str | None:
    try:
        tenant_id = uuid.UUID(event.tenant_id)
        server_id = uuid.UUID(event.server_id)
    except ValueError:
        return None
    at = event.at.ToDatetime(tzinfo=UTC) if event.HasField("at") else datetime.now(UTC)
    async with db.unit_of_work(SYSTEM, tenant_id) as uow:
        row = await (
            await uow.conn.execute(
                "SELECT presence, presence_session FROM servers WHERE id = %s AND tenant_id = %s"
                " FOR UPDATE",
                (server_id, tenant_id),
            )
        ).fetchone()
        if row is None:
            return None
        await uow.conn.execute(
            """INSERT INTO presence_history (tenant_id, server_id, online, session_id,
                   gateway_id, reason, at) VALUES (%s, %s, %s, %s, %s, %s, %s)""",
            (
                tenant_id,
                server_id,
                event.online,
                event.session_id,
                event.gateway_id,
                event.reason[:200],
                at,
            ),
        )
        if event.online:
            if row["presence"] == "offline" and row["presence_session"] == event.session_id:
                return None  # a late refresh of a session that was already announced ended
            await uow.conn.execute(
                """UPDATE servers SET presence = 'online', presence_session = %s,
                       last_seen_at = %s,
                       presence_changed_at = CASE WHEN presence = 'online'
                           THEN presence_changed_at ELSE %s END
                   WHERE id = %s""",
                (event.session_id, at, at, server_id),
            )
            if row["presence"] == "online":
                return None
            await uow.record(
                "server.online",
                "server",
                server_id,
                {"presence": row["presence"]},
                {"presence": "online", "session_id": event.session_id},
            )
            return "online"
        if row["presence"] != "online" or row["presence_session"] != event.session_id:
            return None
        await uow.conn.execute(
            """UPDATE servers SET presence = 'offline', presence_changed_at = %s,
                   last_seen_at = %s WHERE id = %s""",
            (at, at, server_id),
        )
        await uow.record(
            "server.offline",
            "server",
            server_id,
            {"presence": "online"},
            {"presence": "offline", "reason": event.reason[:200]},
        )
        return "offline"
