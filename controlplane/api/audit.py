"""The audit trail: newest first, cursor-paginated."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from controlplane import audit
from controlplane.api.common import AUTHED, Cursor, Limit, after
from controlplane.api.deps import ControlPlaneDep, CurrentPrincipal, TenantScope
from controlplane.api.models import AuditEntry, Page, page_of

router = APIRouter(prefix="/v1", tags=["audit"])

Action = Annotated[str | None, Query(max_length=100, pattern=r"^[a-z_.]+$")]


@router.get("/tenants/{tenant_id}/audit", responses=AUTHED)
async def tenant_audit(
    access: TenantScope,
    cp: ControlPlaneDep,
    limit: Limit = 50,
    cursor: Cursor = None,
    action: Action = None,
) -> Page[AuditEntry]:
    items = await audit.tenant_audit(cp.db, access, limit, after(cursor), action)
    return page_of(items, limit, lambda e: e.id)


@router.get("/audit", responses=AUTHED)
async def platform_audit(
    principal: CurrentPrincipal,
    cp: ControlPlaneDep,
    limit: Limit = 50,
    cursor: Cursor = None,
    action: Action = None,
) -> Page[AuditEntry]:
    """Staff only (`platform:audit:read`): every tenant's and the platform's entries."""
    items = await audit.platform_audit(cp.db, principal, limit, after(cursor), action)
    return page_of(items, limit, lambda e: e.id)
