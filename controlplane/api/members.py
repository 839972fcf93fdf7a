"""Members of a tenant: users with a role there."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from controlplane.access import service
from controlplane.api.common import AUTHED, WRITES, Cursor, Limit, after
from controlplane.api.deps import ControlPlaneDep, TenantScope
from controlplane.api.models import MemberAdd, MemberOut, MemberUpdate, Page, page_of

router = APIRouter(prefix="/v1/tenants/{tenant_id}/members", tags=["members"])


@router.get("", responses=AUTHED)
async def list_members(
    access: TenantScope, cp: ControlPlaneDep, limit: Limit = 50, cursor: Cursor = None
) -> Page[MemberOut]:
    items = await service.list_members(cp.db, access, limit, after(cursor))
    return page_of(items, limit, lambda x: x.user_id)


@router.post("", status_code=201, responses=WRITES)
async def add_member(access: TenantScope, body: MemberAdd, cp: ControlPlaneDep) -> MemberOut:
    """Adds an existing user, or creates the account (then `password` is required)."""
    return await service.add_member(cp.db, access, body)


@router.get("/{user_id}", responses=AUTHED)
async def get_member(access: TenantScope, user_id: uuid.UUID, cp: ControlPlaneDep) -> MemberOut:
    return await service.get_member(cp.db, access, user_id)


@router.patch("/{user_id}", responses=WRITES)
async def update_member(
    access: TenantScope, user_id: uuid.UUID, body: MemberUpdate, cp: ControlPlaneDep
) -> MemberOut:
    return await service.update_member(cp.db, access, user_id, body)


@router.delete("/{user_id}", status_code=204, responses=WRITES)
async def remove_member(access: TenantScope, user_id: uuid.UUID, cp: ControlPlaneDep) -> None:
    """Removes the membership and revokes the member's tokens in this tenant."""
    await service.remove_member(cp.db, access, user_id)
