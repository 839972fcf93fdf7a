"""The server registry."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from controlplane.api.common import AUTHED, WRITES, Cursor, Limit, after
from controlplane.api.deps import ControlPlaneDep, TenantScope
from controlplane.api.models import Page, ServerCreate, ServerOut, ServerUpdate, page_of
from controlplane.registry import servers

router = APIRouter(prefix="/v1/tenants/{tenant_id}/servers", tags=["servers"])


@router.get("", responses=AUTHED)
async def list_servers(
    access: TenantScope, cp: ControlPlaneDep, limit: Limit = 50, cursor: Cursor = None
) -> Page[ServerOut]:
    items = await servers.list_servers(cp.db, access, limit, after(cursor))
    return page_of(items, limit, lambda s: s.id)


@router.post("", status_code=201, responses=WRITES)
async def create_server(access: TenantScope, body: ServerCreate, cp: ControlPlaneDep) -> ServerOut:
    """Counts against the plan's `max_servers`."""
    return await servers.create_server(cp.db, access, body)


@router.get("/{server_id}", responses=AUTHED)
async def get_server(access: TenantScope, server_id: uuid.UUID, cp: ControlPlaneDep) -> ServerOut:
    return await servers.get_server(cp.db, access, server_id)


@router.patch("/{server_id}", responses=WRITES)
async def update_server(
    access: TenantScope, server_id: uuid.UUID, body: ServerUpdate, cp: ControlPlaneDep
) -> ServerOut:
    return await servers.update_server(cp.db, access, server_id, body)


@router.delete("/{server_id}", status_code=204, responses=WRITES)
async def delete_server(access: TenantScope, server_id: uuid.UUID, cp: ControlPlaneDep) -> None:
    await servers.delete_server(cp.db, access, server_id)
