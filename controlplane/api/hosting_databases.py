"""MariaDB databases and users, Redis users. Reads need `databases:read`, writes
`databases:write`. Writes answer 202: the desired state is stored and a workflow
started; `status` and `workflow_id` follow it. Passwords are shown once."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Path, Query

from controlplane.api.common import AUTHED, WRITES, Cursor, Limit, after
from controlplane.api.deps import ControlPlaneDep, TenantScope
from controlplane.api.models import Page, page_of
from controlplane.hosting import databases, redis
from controlplane.hosting import models as hm

router = APIRouter(prefix="/v1/tenants/{tenant_id}", tags=["databases"])

DatabaseId = Annotated[uuid.UUID, Path(description="the database")]
UserId = Annotated[uuid.UUID, Path(description="the database user")]
RedisUserId = Annotated[uuid.UUID, Path(description="the Redis user")]


@router.get("/databases", responses=AUTHED)
async def list_databases(
    access: TenantScope, cp: ControlPlaneDep, limit: Limit = 50, cursor: Cursor = None
) -> Page[hm.DatabaseOut]:
    items = await databases.list_databases(cp.db, access, limit, after(cursor))
    return page_of(items, limit, lambda d: d.id)


@router.post("/databases", status_code=202, responses=WRITES)
async def create_database(
    access: TenantScope, body: hm.DatabaseCreate, cp: ControlPlaneDep
) -> hm.DatabaseOut:
    """Counts against `max_databases`."""
    return await databases.create_database(cp.db, cp.secrets, access, body)


@router.get("/databases/{database_id}", responses=AUTHED)
async def get_database(
    access: TenantScope, database_id: DatabaseId, cp: ControlPlaneDep
) -> hm.DatabaseOut:
    return await databases.get_database(cp.db, access, database_id)


@router.delete("/databases/{database_id}", status_code=202, responses=WRITES)
async def delete_database(
    access: TenantScope,
    database_id: DatabaseId,
    cp: ControlPlaneDep,
    confirm: Annotated[
        str | None, Query(max_length=200, description="the database's name, to confirm")
    ] = None,
    body: Annotated[hm.DatabaseDelete | None, Body()] = None,
) -> hm.DatabaseOut:
    """Destroys the data: needs `?confirm=<name>` (or `{"confirm": "<name>"}`); without
    it 409 `confirmation_required`. A database with users: 409 `database_has_users`."""
    given = confirm if confirm is not None else (body.confirm if body else None)
    return await databases.delete_database(cp.db, cp.secrets, access, database_id, given)


@router.get("/databases/{database_id}/users", responses=AUTHED)
async def list_database_users(
    access: TenantScope, database_id: DatabaseId, cp: ControlPlaneDep
) -> list[hm.DatabaseUserOut]:
    return await databases.list_users(cp.db, access, database_id)


@router.post("/databases/{database_id}/users", status_code=202, responses=WRITES)
async def create_database_user(
    access: TenantScope, database_id: DatabaseId, body: hm.DatabaseUserCreate, cp: ControlPlaneDep
) -> hm.DatabaseUserCreated:
    """ALL PRIVILEGES on this database only. Counts against `max_database_users`."""
    return await databases.create_user(cp.db, cp.secrets, access, database_id, body)


@router.post(
    "/databases/{database_id}/users/{database_user_id}/password", status_code=202, responses=WRITES
)
async def rotate_database_user_password(
    access: TenantScope,
    database_id: DatabaseId,
    database_user_id: UserId,
    body: hm.PasswordRotate,
    cp: ControlPlaneDep,
) -> hm.PasswordRotated:
    return await databases.rotate_user_password(
        cp.db, cp.secrets, access, database_id, database_user_id, body
    )


@router.delete(
    "/databases/{database_id}/users/{database_user_id}", status_code=202, responses=WRITES
)
async def delete_database_user(
    access: TenantScope, database_id: DatabaseId, database_user_id: UserId, cp: ControlPlaneDep
) -> hm.DatabaseUserOut:
    return await databases.delete_user(cp.db, cp.secrets, access, database_id, database_user_id)


# --- Redis users -----------------------------------------------------------------------------


@router.get("/redis-users", responses=AUTHED)
async def list_redis_users(
    access: TenantScope, cp: ControlPlaneDep, limit: Limit = 50, cursor: Cursor = None
) -> Page[hm.RedisUserOut]:
    items = await redis.list_users(cp.db, access, limit, after(cursor))
    return page_of(items, limit, lambda u: u.id)


@router.post("/redis-users", status_code=202, responses=WRITES)
async def create_redis_user(
    access: TenantScope, body: hm.RedisUserCreate, cp: ControlPlaneDep
) -> hm.RedisUserCreated:
    """Confined to keys and channels under `prefix`. Counts against `max_redis_users`."""
    return await redis.create_user(cp.db, cp.secrets, access, body)


@router.get("/redis-users/{redis_user_id}", responses=AUTHED)
async def get_redis_user(
    access: TenantScope, redis_user_id: RedisUserId, cp: ControlPlaneDep
) -> hm.RedisUserOut:
    return await redis.get_user(cp.db, access, redis_user_id)


@router.post("/redis-users/{redis_user_id}/password", status_code=202, responses=WRITES)
async def rotate_redis_user_password(
    access: TenantScope, redis_user_id: RedisUserId, body: hm.PasswordRotate, cp: ControlPlaneDep
) -> hm.PasswordRotated:
    return await redis.rotate_password(cp.db, cp.secrets, access, redis_user_id, body)


@router.delete("/redis-users/{redis_user_id}", status_code=202, responses=WRITES)
async def delete_redis_user(
    access: TenantScope, redis_user_id: RedisUserId, cp: ControlPlaneDep
) -> hm.RedisUserOut:
    return await redis.delete_user(cp.db, cp.secrets, access, redis_user_id)
