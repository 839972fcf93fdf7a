"""Redis users: ACL users on a tenant's server, confined to one key prefix."""

from __future__ import annotations

import uuid
from typing import Any

from psycopg.errors import UniqueViolation

from controlplane.access.policy import Resource, authorize
from controlplane.access.principal import TenantAccess
from controlplane.db import Database
from controlplane.hosting import models as hm
from controlplane.hosting.common import (
    checked,
    load,
    new_password,
    require_server,
    require_settled,
    seal_password,
    secret,
)
from controlplane.hosting.credentials import CredentialKind
from controlplane.hosting.databases import READ, WRITE
from controlplane.problems import Problem
from controlplane.workflows import StepSpec
from yakpanel import identifiers
from yakpanel.ids import new_id
from yakpanel.secretbox import SecretBox

TABLE = "redis_users"


def redis_user_out(row: dict[str, Any]) -> hm.RedisUserOut:
    return hm.RedisUserOut(
        id=row["id"],
        server_id=row["server_id"],
        name=row["name"],
        prefix=row["prefix"],
        status=row["status"],
        workflow_id=row["workflow_id"],
        last_error=row["last_error"],
        password_rotated_at=row["password_rotated_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


REDIS_USER = CredentialKind(TABLE, "redis_user", "Redis user", redis_user_out)


async def list_users(
    db: Database, access: TenantAccess, limit: int, after: uuid.UUID | None
) -> list[hm.RedisUserOut]:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, READ, Resource("redis_user"))
        rows = await (
            await uow.conn.execute(
                """SELECT * FROM redis_users WHERE tenant_id = %s
                   AND (%s::uuid IS NULL OR id > %s) ORDER BY id LIMIT %s""",
                (access.tenant_id, after, after, limit + 1),
            )
        ).fetchall()
    return [redis_user_out(r) for r in rows]


async def get_user(db: Database, access: TenantAccess, user_id: uuid.UUID) -> hm.RedisUserOut:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, READ, Resource("redis_user", user_id))
        return redis_user_out(await load(uow, TABLE, user_id, "Redis user"))


async def create_user(
    db: Database, box: SecretBox, access: TenantAccess, body: hm.RedisUserCreate
) -> hm.RedisUserCreated:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, WRITE, Resource("redis_users", creating=True))
        name = checked(identifiers.redis_user, body.name, "name")
        prefix = checked(identifiers.redis_key_prefix, body.prefix, "prefix")
        password = new_password(body.password)
        await require_server(uow, body.server_id)
        user_id = new_id()
        try:
            async with uow.conn.transaction():
                await uow.conn.execute(
                    """INSERT INTO redis_users (id, tenant_id, server_id, name, prefix,
                           password_sealed) VALUES (%s, %s, %s, %s, %s, %s)""",
                    (
                        user_id,
                        access.tenant_id,
                        body.server_id,
                        name,
                        prefix,
                        seal_password(box, TABLE, user_id, password),
                    ),
                )
        except UniqueViolation:
            raise Problem(
                409,
                "conflict",
                f"the server already has a Redis user named {name} or one with prefix {prefix}",
            ) from None
        step = StepSpec(
            "create",
            body.server_id,
            "db.redis.user.create",
            {"user": name, "password": secret(password), "prefix": prefix},
            compensation=("db.redis.user.drop", {"user": name}),
        )
        await REDIS_USER.started(uow, box, REDIS_USER.create_kind, user_id, step)
        out = redis_user_out(await load(uow, TABLE, user_id, "Redis user"))
        await uow.record(
            "redis_user.created", "redis_user", user_id, None, out.model_dump(mode="json")
        )
    return hm.RedisUserCreated(**out.model_dump(), password=password)


async def rotate_password(
    db: Database, box: SecretBox, access: TenantAccess, user_id: uuid.UUID, body: hm.PasswordRotate
) -> hm.PasswordRotated:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, WRITE, Resource("redis_user", user_id))
        password = new_password(body.password)
        row = await load(uow, TABLE, user_id, "Redis user", lock=True)
        require_settled(row, "Redis user")
        step = StepSpec(
            "password",
            row["server_id"],
            "db.redis.user.password",
            {"user": row["name"], "password": secret(password)},
        )
        workflow_id = await REDIS_USER.rotate(uow, box, row, password, step)
    return hm.PasswordRotated(id=user_id, workflow_id=workflow_id, password=password)


async def delete_user(
    db: Database, box: SecretBox, access: TenantAccess, user_id: uuid.UUID
) -> hm.RedisUserOut:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, WRITE, Resource("redis_user", user_id))
        row = await load(uow, TABLE, user_id, "Redis user", lock=True)
        if row["status"] == "deleting":
            return redis_user_out(row)
        step = StepSpec("drop", row["server_id"], "db.redis.user.drop", {"user": row["name"]})
        out = await REDIS_USER.delete(uow, box, row, step)
    assert isinstance(out, hm.RedisUserOut)
    return out
