"""Reading the audit trail (writing it is part of every unit of work)."""

from __future__ import annotations

import uuid

from controlplane.access.policy import Resource, authorize, require_staff
from controlplane.access.principal import Principal, TenantAccess
from controlplane.api import models as m
from controlplane.db import Database


async def tenant_audit(
    db: Database, access: TenantAccess, limit: int, before: uuid.UUID | None, action: str | None
) -> list[m.AuditEntry]:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, "audit:read", Resource("audit"))
        rows = await (
            await uow.conn.execute(
                """SELECT * FROM audit_log WHERE tenant_id = %s
                   AND (%s::uuid IS NULL OR id < %s) AND (%s::text IS NULL OR action = %s)
                   ORDER BY id DESC LIMIT %s""",
                (access.tenant_id, before, before, action, action, limit + 1),
            )
        ).fetchall()
    return [m.AuditEntry(**{k: v for k, v in r.items() if k != "user_agent"}) for r in rows]


async def platform_audit(
    db: Database, principal: Principal, limit: int, before: uuid.UUID | None, action: str | None
) -> list[m.AuditEntry]:
    require_staff(principal, "platform:audit:read")
    async with db.unit_of_work(principal.actor(), staff_read=True) as uow:
        await uow.audit("staff.read", "audit", None)
        rows = await (
            await uow.conn.execute(
                """SELECT * FROM audit_log WHERE (%s::uuid IS NULL OR id < %s)
                   AND (%s::text IS NULL OR action = %s) ORDER BY id DESC LIMIT %s""",
                (before, before, action, action, limit + 1),
            )
        ).fetchall()
    return [m.AuditEntry(**{k: v for k, v in r.items() if k != "user_agent"}) for r in rows]
