"""Use cases of the server registry (enrollment and presence come with the agent channel)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from psycopg.errors import UniqueViolation

from controlplane.access.policy import Resource, authorize, not_found
from controlplane.access.principal import TenantAccess
from controlplane.api import models as m
from controlplane.db import Database, UnitOfWork
from controlplane.problems import Problem
from yakpanel.ids import new_id


def _server(row: dict[str, Any]) -> m.ServerOut:
    return m.ServerOut(
        id=row["id"],
        name=row["name"],
        region=row["region"],
        labels=row["labels"],
        presence=row["presence"],
        presence_changed_at=row["presence_changed_at"],
        last_seen_at=row["last_seen_at"],
        hostname=row["hostname"],
        agent_version=row["agent_version"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


async def list_servers(
    db: Database, access: TenantAccess, limit: int, after: uuid.UUID | None
) -> list[m.ServerOut]:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, "servers:read", Resource("server"))
        rows = await (
            await uow.conn.execute(
                """SELECT * FROM servers WHERE tenant_id = %s AND (%s::uuid IS NULL OR id > %s)
                   ORDER BY id LIMIT %s""",
                (access.tenant_id, after, after, limit + 1),
            )
        ).fetchall()
    return [_server(r) for r in rows]


async def _load(uow: UnitOfWork, server_id: uuid.UUID, lock: bool = False) -> dict[str, Any]:
    row = await (
        await uow.conn.execute(
            "SELECT * FROM servers WHERE id = %s AND tenant_id = %s"
            + (" FOR UPDATE" if lock else ""),
            (server_id, uow.tenant_id),
        )
    ).fetchone()
    if row is None:
        raise not_found("server")
    return row


async def get_server(db: Database, access: TenantAccess, server_id: uuid.UUID) -> m.ServerOut:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, "servers:read", Resource("server", server_id))
        return _server(await _load(uow, server_id))


async def create_server(db: Database, access: TenantAccess, body: m.ServerCreate) -> m.ServerOut:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, "servers:write", Resource("servers", creating=True))
        try:
            async with uow.conn.transaction():
                row = await (
                    await uow.conn.execute(
                        """INSERT INTO servers (id, tenant_id, name, region, labels)
                           VALUES (%s, %s, %s, %s, %s) RETURNING *""",
                        (
                            new_id(),
                            access.tenant_id,
                            body.name,
                            body.region,
                            json.dumps(body.labels),
                        ),
                    )
                ).fetchone()
        except UniqueViolation:
            raise Problem(409, "conflict", f"a server named {body.name!r} exists") from None
        assert row is not None
        server = _server(row)
        await uow.record(
            "server.created", "server", server.id, None, server.model_dump(mode="json")
        )
    return server


async def update_server(
    db: Database, access: TenantAccess, server_id: uuid.UUID, body: m.ServerUpdate
) -> m.ServerOut:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, "servers:write", Resource("server", server_id))
        before = _server(await _load(uow, server_id, lock=True))
        region = body.region if body.region is not None else before.region
        labels = body.labels if body.labels is not None else before.labels
        row = await (
            await uow.conn.execute(
                """UPDATE servers SET region = %s, labels = %s, updated_at = now()
                   WHERE id = %s RETURNING *""",
                (region, json.dumps(labels), server_id),
            )
        ).fetchone()
        assert row is not None
        after = _server(row)
        await uow.record(
            "server.updated",
            "server",
            server_id,
            before.model_dump(mode="json"),
            after.model_dump(mode="json"),
        )
    return after


async def delete_server(db: Database, access: TenantAccess, server_id: uuid.UUID) -> None:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, "servers:write", Resource("server", server_id))
        before = _server(await _load(uow, server_id, lock=True))
        # The agent's certificates stop working with the server they were issued for.
        await uow.conn.execute(
            "UPDATE agent_certificates SET revoked_at = %s, revoked_reason = 'server deleted'"
            " WHERE server_id = %s AND revoked_at IS NULL",
            (uow.clock.now(), server_id),
        )
        await uow.conn.execute("DELETE FROM servers WHERE id = %s", (server_id,))
        await uow.record(
            "server.deleted", "server", server_id, before.model_dump(mode="json"), None
        )
