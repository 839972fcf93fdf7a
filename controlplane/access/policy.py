"""The policy point. Every read and write passes `resolve_access` (is this tenant
visible to the principal at all? — 404 when not) and `authorize` (permission, tenant
lifecycle state, plan quota) before it touches anything."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from controlplane.access.permissions import READ_ONLY
from controlplane.access.principal import Principal, TenantAccess
from controlplane.db import Database, UnitOfWork
from controlplane.problems import Problem


@dataclass(frozen=True)
class Resource:
    kind: str
    id: object | None = None
    creating: bool = False


@dataclass(frozen=True)
class Quota:
    limit_column: str
    count_sql: str


# Resources counted against a plan limit when created. Later capabilities add theirs.
QUOTAS: dict[str, Quota] = {
    "servers": Quota("max_servers", "SELECT count(*) AS n FROM servers WHERE tenant_id = %s"),
    # Rules, not groups: one write may add many. The alerting API checks the tenant's
    # whole rule set after the change (`alerting.rules.check_rule_limit`), so it does not
    # go through `check_quota`'s one-more-item test.
    "alert_rules": Quota(
        "max_alert_rules",
        "SELECT coalesce(sum(jsonb_array_length(spec->'rules')), 0) AS n"
        " FROM alert_rule_groups WHERE tenant_id = %s",
    ),
    # Hosting resources (controlplane/hosting): rows being deleted still count until
    # their workflow has removed them from the node.
    "sites": Quota("max_sites", "SELECT count(*) AS n FROM sites WHERE tenant_id = %s"),
    "databases": Quota(
        "max_databases", "SELECT count(*) AS n FROM hosted_databases WHERE tenant_id = %s"
    ),
    "database_users": Quota(
        "max_database_users", "SELECT count(*) AS n FROM database_users WHERE tenant_id = %s"
    ),
    "ftp_accounts": Quota(
        "max_ftp_accounts", "SELECT count(*) AS n FROM ftp_accounts WHERE tenant_id = %s"
    ),
    "redis_users": Quota(
        "max_redis_users", "SELECT count(*) AS n FROM redis_users WHERE tenant_id = %s"
    ),
}

# Writes still allowed in these states, so that a tenant can pay or cancel deletion.
_LIFECYCLE_WRITES = frozenset({"billing:write"})


def not_found(kind: str = "resource") -> Problem:
    return Problem(404, "not_found", f"no such {kind}")


async def resolve_access(db: Database, principal: Principal, tenant_id: uuid.UUID) -> TenantAccess:
    """The principal's access to a tenant, or 404 — a tenant one cannot see does not exist."""
    permissions: frozenset[str] | None = None
    staff_read = False
    if principal.kind in ("user", "token"):
        if principal.kind == "token" and principal.token_tenant_id != tenant_id:
            raise not_found("tenant")
        async with db.connection() as conn:
            rows = await (
                await conn.execute(
                    "SELECT permissions FROM user_memberships(%s) WHERE tenant_id = %s",
                    (principal.user_id, tenant_id),
                )
            ).fetchall()
        if rows:
            permissions = frozenset(rows[0]["permissions"])
            if principal.token_scopes is not None:
                permissions &= principal.token_scopes
    elif "platform:tenants:read" in principal.staff_permissions:
        permissions = READ_ONLY
        staff_read = True
    if permissions is None:
        raise not_found("tenant")

    async with db.unit_of_work(principal.actor(), tenant_id, staff_read=staff_read) as uow:
        tenant = await (
            await uow.conn.execute(
                """SELECT t.state, t.state_reason, p.api_requests_per_minute
                   FROM tenants t JOIN plans p ON p.id = t.plan_id WHERE t.id = %s""",
                (tenant_id,),
            )
        ).fetchone()
        if tenant is None or (tenant["state"] == "deleted" and not staff_read):
            raise not_found("tenant")
        if staff_read:
            await uow.audit("staff.read", "tenant", tenant_id)
        else:
            await _count_request(uow, tenant_id, tenant["api_requests_per_minute"])
    return TenantAccess(
        principal, tenant_id, permissions, tenant["state"], tenant["state_reason"], staff_read
    )


async def _count_request(uow: UnitOfWork, tenant_id: uuid.UUID, limit: int) -> None:
    now = uow.clock.now()
    minute = now.replace(second=0, microsecond=0)
    row = await (
        await uow.conn.execute(
            """INSERT INTO api_request_counts (tenant_id, minute, count) VALUES (%s, %s, 1)
               ON CONFLICT (tenant_id, minute) DO UPDATE SET count = api_request_counts.count + 1
               RETURNING count""",
            (tenant_id, minute),
        )
    ).fetchone()
    used = int(row["count"]) if row else 0
    if used > limit:
        retry = int((minute + timedelta(minutes=1) - now).total_seconds()) + 1
        raise Problem(
            429,
            "rate_limited",
            f"the plan allows {limit} API requests per minute; this is request {used}",
            limit="api_requests_per_minute",
            limit_value=limit,
            current=used,
            retry_after=retry,
        )


async def authorize(uow: UnitOfWork, access: TenantAccess, action: str, resource: Resource) -> None:
    """Permission, then lifecycle state, then quota. Raises a Problem naming the reason."""
    if action not in access.permissions:
        raise Problem(403, "forbidden", f"this needs the permission {action}", permission=action)
    if action.endswith(":read"):
        return
    if access.staff_read:
        raise Problem(403, "forbidden", "platform staff read tenants; they do not write to them")
    if access.tenant_state != "active" and action not in _LIFECYCLE_WRITES:
        state = access.tenant_state.replace("_", " ")
        reason = f": {access.state_reason}" if access.state_reason else ""
        raise Problem(
            409,
            f"tenant_{access.tenant_state}",
            f"the tenant is {state}{reason}; reads are allowed, writes are refused",
            tenant_state=access.tenant_state,
        )
    if resource.creating and resource.kind in QUOTAS:
        await check_quota(uow, access.tenant_id, resource.kind)


async def check_quota(uow: UnitOfWork, tenant_id: uuid.UUID, kind: str) -> None:
    quota = QUOTAS[kind]
    # Lock the tenant row: concurrent creates of the same kind are serialized, so two
    # requests cannot both take the last free slot.
    plan = await (
        await uow.conn.execute(
            f"""SELECT p.{quota.limit_column} AS lim FROM tenants t JOIN plans p ON p.id = t.plan_id
                WHERE t.id = %s FOR UPDATE OF t""",
            (tenant_id,),
        )
    ).fetchone()
    used_row = await (await uow.conn.execute(quota.count_sql, (tenant_id,))).fetchone()
    limit = int(plan["lim"]) if plan else 0
    used = int(used_row["n"]) if used_row else 0
    if used >= limit:
        raise Problem(
            409,
            "quota_exceeded",
            f"the plan allows {limit} {kind}; {used} are in use",
            limit=quota.limit_column,
            limit_value=limit,
            current=used,
        )


def require_staff(principal: Principal, permission: str) -> None:
    if permission not in principal.staff_permissions:
        raise Problem(
            403, "forbidden", f"this needs the permission {permission}", permission=permission
        )


def grantable(access: TenantAccess, wanted: set[str] | frozenset[str]) -> None:
    """Nobody grants what they do not hold (roles, member roles, token scopes)."""
    missing = sorted(set(wanted) - access.permissions)
    if missing:
        raise Problem(
            403,
            "privilege_escalation",
            "you cannot grant permissions you do not hold: " + ", ".join(missing),
            permissions=missing,
        )


def public_row(row: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in drop}
