"""Tenants: creation by staff, reading, renaming, plan and lifecycle."""

from __future__ import annotations

from fastapi import APIRouter

from controlplane.api.common import AUTHED, WRITES, Cursor, Limit, after
from controlplane.api.deps import ControlPlaneDep, CurrentPrincipal, TenantScope
from controlplane.api.models import (
    Page,
    PlanChange,
    ScheduleDeletionBody,
    SuspendBody,
    TenantCreate,
    TenantDetail,
    TenantOut,
    TenantUpdate,
    page_of,
)
from controlplane.tenancy import service

router = APIRouter(prefix="/v1/tenants", tags=["tenants"])


@router.post("", status_code=201, responses=WRITES)
async def create_tenant(
    body: TenantCreate, principal: CurrentPrincipal, cp: ControlPlaneDep
) -> TenantOut:
    """Staff only (`platform:tenants:write`): a tenant on a plan, with its first owner."""
    return await service.create_tenant(cp.db, principal, body)


@router.get("", responses=AUTHED)
async def list_tenants(
    principal: CurrentPrincipal, cp: ControlPlaneDep, limit: Limit = 50, cursor: Cursor = None
) -> Page[TenantOut]:
    """The caller's tenants; for staff with `platform:tenants:read`, all (audited)."""
    items = await service.list_tenants(cp.db, principal, limit, after(cursor))
    return page_of(items, limit, lambda t: t.id)


@router.get("/{tenant_id}", responses=AUTHED)
async def get_tenant(access: TenantScope, cp: ControlPlaneDep) -> TenantDetail:
    return await service.get_tenant(cp.db, access)


@router.patch("/{tenant_id}", responses=WRITES)
async def rename_tenant(access: TenantScope, body: TenantUpdate, cp: ControlPlaneDep) -> TenantOut:
    return await service.rename_tenant(cp.db, access, body)


@router.post("/{tenant_id}/suspend", responses=WRITES)
async def suspend_tenant(access: TenantScope, body: SuspendBody, cp: ControlPlaneDep) -> TenantOut:
    """Staff only. Writes are refused with the reason; reads keep working."""
    return await service.transition_tenant(cp.db, access, "suspend", reason=body.reason)


@router.post("/{tenant_id}/resume", responses=WRITES)
async def resume_tenant(access: TenantScope, cp: ControlPlaneDep) -> TenantOut:
    """Staff only."""
    return await service.transition_tenant(cp.db, access, "resume")


@router.post("/{tenant_id}/schedule-deletion", responses=WRITES)
async def schedule_deletion(
    access: TenantScope, body: ScheduleDeletionBody, cp: ControlPlaneDep
) -> TenantOut:
    """`billing:write` or staff. The tenant is deleted when `deletion_due_at` passes."""
    return await service.transition_tenant(
        cp.db, access, "schedule_deletion", reason="deletion requested", after_days=body.after_days
    )


@router.post("/{tenant_id}/cancel-deletion", responses=WRITES)
async def cancel_deletion(access: TenantScope, cp: ControlPlaneDep) -> TenantOut:
    """`billing:write` or staff."""
    return await service.transition_tenant(cp.db, access, "cancel_deletion")


@router.put("/{tenant_id}/plan", responses=WRITES)
async def change_plan(access: TenantScope, body: PlanChange, cp: ControlPlaneDep) -> TenantOut:
    """Staff only (`platform:tenants:write`)."""
    return await service.change_plan(cp.db, access, body)
