"""Use cases of tenants and plans: create, read, rename, plan change, lifecycle."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from psycopg.errors import UniqueViolation

from controlplane.access.policy import QUOTAS, Resource, authorize, not_found, require_staff
from controlplane.access.principal import Principal, TenantAccess
from controlplane.api import models as m
from controlplane.db import SYSTEM, Database, UnitOfWork
from controlplane.passwords import hash_password_async
from controlplane.problems import Problem
from yakpanel.ids import new_id

_PLAN_FIELDS = (
    "max_servers",
    "max_sites",
    "max_databases",
    "max_alert_rules",
    "metric_retention_days",
    "api_requests_per_minute",
    "max_database_users",
    "max_ftp_accounts",
    "max_redis_users",
)

_TENANT_SQL = """SELECT t.id, t.slug, t.name, p.code AS plan, t.state, t.state_reason,
    t.deletion_due_at, t.created_at FROM tenants t JOIN plans p ON p.id = t.plan_id"""


# --- plans ----------------------------------------------------------------------------


async def list_plans(db: Database, principal: Principal) -> list[m.PlanOut]:
    async with db.connection() as conn:
        rows = await (await conn.execute("SELECT * FROM plans ORDER BY code")).fetchall()
    return [m.PlanOut(**r) for r in rows]


async def create_plan(db: Database, principal: Principal, body: m.PlanCreate) -> m.PlanOut:
    require_staff(principal, "platform:plans:write")
    async with db.unit_of_work(principal.actor()) as uow:
        exists = await (
            await uow.conn.execute("SELECT 1 FROM plans WHERE code = %s", (body.code,))
        ).fetchone()
        if exists:
            raise Problem(409, "conflict", f"a plan with code {body.code!r} exists")
        row = await (
            await uow.conn.execute(
                f"""INSERT INTO plans (id, code, name, {", ".join(_PLAN_FIELDS)})
                    VALUES (%s, %s, %s, {", ".join(["%s"] * len(_PLAN_FIELDS))}) RETURNING *""",
                (new_id(), body.code, body.name, *[getattr(body, f) for f in _PLAN_FIELDS]),
            )
        ).fetchone()
        assert row is not None
        plan = m.PlanOut(**row)
        await uow.record("plan.created", "plan", plan.id, None, plan.model_dump(mode="json"))
    return plan


async def update_plan(
    db: Database, principal: Principal, plan_id: uuid.UUID, body: m.PlanUpdate
) -> m.PlanOut:
    require_staff(principal, "platform:plans:write")
    changes = body.model_dump(exclude_none=True)
    async with db.unit_of_work(principal.actor()) as uow:
        before = await (
            await uow.conn.execute("SELECT * FROM plans WHERE id = %s FOR UPDATE", (plan_id,))
        ).fetchone()
        if before is None:
            raise not_found("plan")
        if not changes:
            return m.PlanOut(**before)
        sets = ", ".join(f"{k} = %s" for k in changes)
        row = await (
            await uow.conn.execute(
                f"UPDATE plans SET {sets}, updated_at = now() WHERE id = %s RETURNING *",
                (*changes.values(), plan_id),
            )
        ).fetchone()
        assert row is not None
        plan = m.PlanOut(**row)
        await uow.record(
            "plan.updated",
            "plan",
            plan_id,
            m.PlanOut(**before).model_dump(mode="json"),
            plan.model_dump(mode="json"),
        )
    return plan


# --- tenants --------------------------------------------------------------------------


async def _plan_by_code(uow: UnitOfWork, code: str) -> dict[str, Any]:
    plan = await (await uow.conn.execute("SELECT * FROM plans WHERE code = %s", (code,))).fetchone()
    if plan is None:
        raise Problem(422, "unknown_plan", f"there is no plan {code!r}")
    return plan


async def _tenant(uow: UnitOfWork, tenant_id: uuid.UUID, lock: bool = False) -> m.TenantOut:
    sql = _TENANT_SQL + " WHERE t.id = %s" + (" FOR UPDATE OF t" if lock else "")
    row = await (await uow.conn.execute(sql, (tenant_id,))).fetchone()
    if row is None:
        raise not_found("tenant")
    return m.TenantOut(**row)


async def create_tenant(db: Database, principal: Principal, body: m.TenantCreate) -> m.TenantOut:
    require_staff(principal, "platform:tenants:write")
    tenant_id = new_id()
    email = body.owner_email.lower()
    async with db.unit_of_work(principal.actor(), tenant_id) as uow:
        plan = await _plan_by_code(uow, body.plan)
        try:
            async with uow.conn.transaction():
                await uow.conn.execute(
                    "INSERT INTO tenants (id, slug, name, plan_id) VALUES (%s, %s, %s, %s)",
                    (tenant_id, body.slug, body.name, plan["id"]),
                )
        except UniqueViolation:
            raise Problem(409, "conflict", f"the slug {body.slug!r} is taken") from None
        user_id = await ensure_user(uow, email, body.owner_password, "")
        owner_role = await role_id_by_name(uow, "owner")
        await uow.conn.execute(
            "INSERT INTO memberships (id, tenant_id, user_id, role_id) VALUES (%s, %s, %s, %s)",
            (new_id(), tenant_id, user_id, owner_role),
        )
        tenant = await _tenant(uow, tenant_id)
        await uow.record(
            "tenant.created", "tenant", tenant_id, None, tenant.model_dump(mode="json")
        )
        await uow.record(
            "member.added",
            "member",
            user_id,
            None,
            {"user_id": str(user_id), "email": email, "role": "owner"},
        )
    return tenant


async def ensure_user(
    uow: UnitOfWork, email: str, password: str | None, display_name: str
) -> uuid.UUID:
    row = await (
        await uow.conn.execute("SELECT id FROM users WHERE email = %s", (email,))
    ).fetchone()
    if row is not None:
        return uuid.UUID(str(row["id"]))
    if password is None:
        raise Problem(422, "password_required", f"{email} has no account yet: give a password")
    user_id = new_id()
    await uow.conn.execute(
        "INSERT INTO users (id, email, display_name, password_hash) VALUES (%s, %s, %s, %s)",
        (user_id, email, display_name, await hash_password_async(password)),
    )
    await uow.audit("user.created", "user", user_id, None, {"email": email})
    return user_id


async def role_id_by_name(uow: UnitOfWork, name: str) -> uuid.UUID:
    row = await (
        await uow.conn.execute(
            "SELECT id FROM roles WHERE name = %s AND (tenant_id = %s OR tenant_id IS NULL)"
            " ORDER BY tenant_id NULLS LAST LIMIT 1",
            (name, uow.tenant_id),
        )
    ).fetchone()
    if row is None:
        raise Problem(422, "unknown_role", f"there is no role {name!r}")
    return uuid.UUID(str(row["id"]))


async def list_tenants(
    db: Database, principal: Principal, limit: int, after: uuid.UUID | None
) -> list[m.TenantOut]:
    staff_read = "platform:tenants:read" in principal.staff_permissions
    if principal.is_staff and not staff_read:
        require_staff(principal, "platform:tenants:read")
    async with db.unit_of_work(principal.actor(), staff_read=staff_read) as uow:
        if staff_read:
            await uow.audit("staff.read", "tenant", None)
            sql = _TENANT_SQL + " WHERE (%s::uuid IS NULL OR t.id > %s) ORDER BY t.id LIMIT %s"
            rows = await (await uow.conn.execute(sql, (after, after, limit + 1))).fetchall()
            return [m.TenantOut(**r) for r in rows]
        mine = await (
            await uow.conn.execute(
                "SELECT tenant_id FROM user_memberships(%s) WHERE tenant_state <> 'deleted'",
                (principal.user_id,),
            )
        ).fetchall()
    ids = sorted(uuid.UUID(str(r["tenant_id"])) for r in mine)
    if principal.kind == "token":
        ids = [i for i in ids if i == principal.token_tenant_id]
    out = []
    for tenant_id in ids:
        if after is not None and tenant_id <= after:
            continue
        async with db.unit_of_work(principal.actor(), tenant_id) as uow:
            out.append(await _tenant(uow, tenant_id))
        if len(out) > limit:
            break
    return out


async def get_tenant(db: Database, access: TenantAccess) -> m.TenantDetail:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, "tenants:read", Resource("tenant", access.tenant_id))
        tenant = await _tenant(uow, access.tenant_id)
        plan = await _plan_by_code(uow, tenant.plan)
        usage: dict[str, int] = {}
        for name, quota in QUOTAS.items():
            row = await (await uow.conn.execute(quota.count_sql, (access.tenant_id,))).fetchone()
            usage[name] = int(row["n"]) if row else 0
    return m.TenantDetail(
        **tenant.model_dump(),
        limits=m.PlanLimits(**{f: plan[f] for f in _PLAN_FIELDS}),
        usage=m.Usage(**usage),
    )


async def rename_tenant(db: Database, access: TenantAccess, body: m.TenantUpdate) -> m.TenantOut:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, "tenants:write", Resource("tenant", access.tenant_id))
        before = await _tenant(uow, access.tenant_id, lock=True)
        if body.name is None or body.name == before.name:
            return before
        await uow.conn.execute(
            "UPDATE tenants SET name = %s, updated_at = now(), version = version + 1 WHERE id = %s",
            (body.name, access.tenant_id),
        )
        after = await _tenant(uow, access.tenant_id)
        await uow.record(
            "tenant.renamed",
            "tenant",
            access.tenant_id,
            before.model_dump(mode="json"),
            after.model_dump(mode="json"),
        )
    return after


# Lifecycle: which transitions exist, who may make them (tenant permission, or staff).
_TRANSITIONS: dict[str, tuple[frozenset[str], str, str | None]] = {
    "suspend": (frozenset({"active"}), "suspended", None),
    "resume": (frozenset({"suspended"}), "active", None),
    "schedule_deletion": (
        frozenset({"active", "suspended"}),
        "scheduled_for_deletion",
        "billing:write",
    ),
    "cancel_deletion": (frozenset({"scheduled_for_deletion"}), "active", "billing:write"),
}


def _authorize_lifecycle(access: TenantAccess, tenant_permission: str | None) -> None:
    principal = access.principal
    if principal.is_staff:
        require_staff(principal, "platform:tenants:write")
        return
    if tenant_permission is None or tenant_permission not in access.permissions:
        needed = tenant_permission or "platform:tenants:write"
        raise Problem(403, "forbidden", f"this needs the permission {needed}", permission=needed)


async def transition_tenant(
    db: Database,
    access: TenantAccess,
    action: str,
    reason: str | None = None,
    after_days: int | None = None,
) -> m.TenantOut:
    allowed_from, target, tenant_permission = _TRANSITIONS[action]
    _authorize_lifecycle(access, tenant_permission)
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        before = await _tenant(uow, access.tenant_id, lock=True)
        if before.state not in allowed_from:
            raise Problem(
                409,
                "invalid_transition",
                f"a tenant that is {before.state} cannot {action}".replace("_", " "),
                tenant_state=before.state,
            )
        due = None
        if target == "scheduled_for_deletion":
            due = uow.clock.now() + timedelta(days=after_days or 0)
        await uow.conn.execute(
            """UPDATE tenants SET state = %s, state_reason = %s, deletion_due_at = %s,
                   updated_at = now(), version = version + 1 WHERE id = %s""",
            (target, reason, due, access.tenant_id),
        )
        after = await _tenant(uow, access.tenant_id)
        await uow.record(
            f"tenant.{target}",
            "tenant",
            access.tenant_id,
            before.model_dump(mode="json"),
            after.model_dump(mode="json"),
        )
    return after


async def change_plan(db: Database, access: TenantAccess, body: m.PlanChange) -> m.TenantOut:
    _authorize_lifecycle(access, None)
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        before = await _tenant(uow, access.tenant_id, lock=True)
        plan = await _plan_by_code(uow, body.plan)
        await uow.conn.execute(
            "UPDATE tenants SET plan_id = %s, updated_at = now(), version = version + 1"
            " WHERE id = %s",
            (plan["id"], access.tenant_id),
        )
        after = await _tenant(uow, access.tenant_id)
        await uow.record(
            "tenant.plan_changed",
            "tenant",
            access.tenant_id,
            before.model_dump(mode="json"),
            after.model_dump(mode="json"),
        )
    return after


async def delete_due_tenants(db: Database) -> list[uuid.UUID]:
    """Move tenants whose deletion date passed to `deleted` (run by the worker)."""
    deleted: list[uuid.UUID] = []
    async with db.unit_of_work(SYSTEM, staff_read=True) as uow:
        rows = await (
            await uow.conn.execute(
                "SELECT id FROM tenants WHERE state = 'scheduled_for_deletion'"
                " AND deletion_due_at <= %s",
                (uow.clock.now(),),
            )
        ).fetchall()
    for row in rows:
        tenant_id = uuid.UUID(str(row["id"]))
        async with db.unit_of_work(SYSTEM, tenant_id) as uow:
            before = await _tenant(uow, tenant_id, lock=True)
            if before.state != "scheduled_for_deletion":
                continue
            await uow.conn.execute(
                "UPDATE tenants SET state = 'deleted', updated_at = now(),"
                " version = version + 1 WHERE id = %s",
                (tenant_id,),
            )
            after = await _tenant(uow, tenant_id)
            await uow.record(
                "tenant.deleted",
                "tenant",
                tenant_id,
                before.model_dump(mode="json"),
                after.model_dump(mode="json"),
            )
        deleted.append(tenant_id)
    return deleted
