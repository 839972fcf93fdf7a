"""PostgreSQL access for the control plane: the pool and the unit of work.

The application's connections run as `yakpanel_app` (no table ownership, no RLS
bypass). A unit of work is one transaction with the tenant context set; the audit
entries and domain events it records commit or roll back with the change itself.
Repositories take the unit's connection and never commit.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from yakpanel.clock import Clock
from yakpanel.ids import new_id

APP_ROLE = "yakpanel_app"

Conn = AsyncConnection[dict[str, Any]]


@dataclass(frozen=True)
class Actor:
    """Who is acting, and from where: recorded on every audit entry and event."""

    kind: str  # user | staff | token | system
    id: uuid.UUID | None
    source_ip: str | None = None
    user_agent: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "id": str(self.id) if self.id else None}


SYSTEM = Actor("system", None)


def _json(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True)


class UnitOfWork:
    def __init__(self, conn: Conn, actor: Actor, tenant_id: uuid.UUID | None, clock: Clock) -> None:
        self.conn = conn
        self.actor = actor
        self.tenant_id = tenant_id
        self.clock = clock

    async def audit(
        self,
        action: str,
        resource_type: str,
        resource_id: object | None,
        before: dict[str, Any] | None = None,
        after: dict[str, Any] | None = None,
        tenant_id: uuid.UUID | None = None,
    ) -> None:
        await self.conn.execute(
            """INSERT INTO audit_log (id, at, tenant_id, actor_kind, actor_id, action,
                   resource_type, resource_id, source_ip, user_agent, before, after)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
            (
                new_id(),
                self.clock.now(),
                tenant_id or self.tenant_id,
                self.actor.kind,
                self.actor.id,
                action,
                resource_type,
                None if resource_id is None else str(resource_id),
                self.actor.source_ip,
                (self.actor.user_agent or "")[:300] or None,
                None if before is None else _json(before),
                None if after is None else _json(after),
            ),
        )

    async def emit(
        self,
        event_type: str,
        aggregate_type: str,
        aggregate_id: object,
        data: dict[str, Any],
        tenant_id: uuid.UUID | None = None,
    ) -> uuid.UUID:
        """Record a domain event in the outbox; the relay publishes it after commit."""
        event_id = new_id()
        occurred_at: datetime = self.clock.now()
        tenant = tenant_id or self.tenant_id
        payload = {
            "event_id": str(event_id),
            "type": event_type,
            "aggregate_type": aggregate_type,
            "aggregate_id": str(aggregate_id),
            "tenant_id": str(tenant) if tenant else None,
            "occurred_at": occurred_at.isoformat(),
            "actor": self.actor.as_json(),
            "data": data,
        }
        await self.conn.execute(
            """INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id,
                   event_type, payload, occurred_at)
               VALUES (%s, %s, %s, %s, %s, %s, %s)""",
            (
                event_id,
                tenant,
                aggregate_type,
                str(aggregate_id),
                event_type,
                _json(payload),
                occurred_at,
            ),
        )
        return event_id

    async def publish(
        self,
        topic: str,
        key: str,
        body: bytes,
        event_type: str,
        aggregate_type: str,
        aggregate_id: object,
    ) -> None:
        """Record a non-event message (e.g. a command envelope) for the relay to publish."""
        await self.conn.execute(
            """INSERT INTO outbox (event_id, tenant_id, aggregate_type, aggregate_id,
                   event_type, topic, message_key, body, occurred_at)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)""",
            (
                new_id(),
                self.tenant_id,
                aggregate_type,
                str(aggregate_id),
                event_type,
                topic,
                key,
                body,
                self.clock.now(),
            ),
        )

    async def record(
        self,
        action: str,
        resource_type: str,
        resource_id: object,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
        tenant_id: uuid.UUID | None = None,
    ) -> None:
        """Audit entry and domain event for one write: the usual pair."""
        await self.audit(action, resource_type, resource_id, before, after, tenant_id)
        await self.emit(
            action, resource_type, resource_id, {"before": before, "after": after}, tenant_id
        )


class Database:
    def __init__(self, dsn: str, clock: Clock, min_size: int = 1, max_size: int = 10) -> None:
        self.dsn = dsn
        self.clock = clock
        self.pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            open=False,
            kwargs={"autocommit": True, "row_factory": dict_row},
            configure=self._configure,
            name="controlplane",
        )

    @staticmethod
    async def _configure(conn: Conn) -> None:
        await conn.execute(f"SET ROLE {APP_ROLE}")

    async def open(self) -> None:
        await self.pool.open(wait=True, timeout=30)

    async def close(self) -> None:
        await self.pool.close()

    @asynccontextmanager
    async def unit_of_work(
        self, actor: Actor, tenant_id: uuid.UUID | None = None, staff_read: bool = False
    ) -> AsyncIterator[UnitOfWork]:
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(
                "SELECT set_config('app.tenant_id', %s, true),"
                " set_config('app.staff_read', %s, true)",
                (str(tenant_id) if tenant_id else "", "on" if staff_read else "off"),
            )
            yield UnitOfWork(conn, actor, tenant_id, self.clock)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        """A plain connection (autocommit) for statements outside any tenant."""
        async with self.pool.connection() as conn:
            yield conn
