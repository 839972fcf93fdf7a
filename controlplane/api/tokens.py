"""API tokens: scoped, expiring, revocable; the secret is shown once."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from controlplane.access import service
from controlplane.api.common import AUTHED, WRITES, Cursor, Limit, after
from controlplane.api.deps import ControlPlaneDep, TenantScope
from controlplane.api.models import Page, TokenCreate, TokenCreated, TokenOut, page_of

router = APIRouter(prefix="/v1/tenants/{tenant_id}/tokens", tags=["tokens"])


@router.get("", responses=AUTHED)
async def list_tokens(
    access: TenantScope, cp: ControlPlaneDep, limit: Limit = 50, cursor: Cursor = None
) -> Page[TokenOut]:
    items = await service.list_tokens(cp.db, access, limit, after(cursor))
    return page_of(items, limit, lambda t: t.id)


@router.post("", status_code=201, responses=WRITES)
async def create_token(access: TenantScope, body: TokenCreate, cp: ControlPlaneDep) -> TokenCreated:
    """Scopes must be permissions the caller holds. The `token` field is shown only here."""
    return await service.create_token(cp.db, access, body)


@router.get("/{token_id}", responses=AUTHED)
async def get_token(access: TenantScope, token_id: uuid.UUID, cp: ControlPlaneDep) -> TokenOut:
    return await service.get_token(cp.db, access, token_id)


@router.delete("/{token_id}", responses=WRITES)
async def revoke_token(access: TenantScope, token_id: uuid.UUID, cp: ControlPlaneDep) -> TokenOut:
    """Revokes the token at once; the record stays for the audit trail."""
    return await service.revoke_token(cp.db, access, token_id)
