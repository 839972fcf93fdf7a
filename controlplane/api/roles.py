"""Roles: built-in ones (read-only) and the tenant's custom roles."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from controlplane.access import service
from controlplane.api.common import AUTHED, WRITES, Cursor, Limit, after
from controlplane.api.deps import ControlPlaneDep, CurrentPrincipal, TenantScope
from controlplane.api.models import Page, PermissionOut, RoleCreate, RoleOut, RoleUpdate, page_of

router = APIRouter(prefix="/v1", tags=["roles"])


@router.get("/permissions", responses=AUTHED)
async def list_permissions(principal: CurrentPrincipal) -> list[PermissionOut]:
    """The permission catalogue roles and token scopes are made of."""
    return service.permission_catalogue()


@router.get("/tenants/{tenant_id}/roles", responses=AUTHED)
async def list_roles(
    access: TenantScope, cp: ControlPlaneDep, limit: Limit = 50, cursor: Cursor = None
) -> Page[RoleOut]:
    items = await service.list_roles(cp.db, access, limit, after(cursor))
    return page_of(items, limit, lambda r: r.id)


@router.post("/tenants/{tenant_id}/roles", status_code=201, responses=WRITES)
async def create_role(access: TenantScope, body: RoleCreate, cp: ControlPlaneDep) -> RoleOut:
    return await service.create_role(cp.db, access, body)


@router.get("/tenants/{tenant_id}/roles/{role_id}", responses=AUTHED)
async def get_role(access: TenantScope, role_id: uuid.UUID, cp: ControlPlaneDep) -> RoleOut:
    return await service.get_role(cp.db, access, role_id)


@router.patch("/tenants/{tenant_id}/roles/{role_id}", responses=WRITES)
async def update_role(
    access: TenantScope, role_id: uuid.UUID, body: RoleUpdate, cp: ControlPlaneDep
) -> RoleOut:
    return await service.update_role(cp.db, access, role_id, body)


@router.delete("/tenants/{tenant_id}/roles/{role_id}", status_code=204, responses=WRITES)
async def delete_role(access: TenantScope, role_id: uuid.UUID, cp: ControlPlaneDep) -> None:
    await service.delete_role(cp.db, access, role_id)
