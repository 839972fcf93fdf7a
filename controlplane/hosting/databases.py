"""MariaDB databases and their users on a tenant's server.

Deleting a database destroys data, so it takes a confirmation: the database's name,
given again as `confirm`. A database with users is not deleted until they are gone,
so that no account is left pointing at nothing.
"""

from __future__ import annotations

import uuid
from typing import Any

from psycopg.errors import UniqueViolation

from controlplane.access.policy import Resource, authorize, not_found
from controlplane.access.principal import TenantAccess
from controlplane.db import Database, UnitOfWork
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
from controlplane.problems import Problem
from controlplane.workflows import RetryPolicy, StepSpec
from yakpanel import identifiers
from yakpanel.ids import new_id
from yakpanel.secretbox import SecretBox

READ, WRITE = "databases:read", "databases:write"
TABLE, USERS = "hosted_databases", "database_users"

# A user may be created while its database is still being created: the node may run the
# user's command first, which fails `database_missing` (retryable). Six attempts with
# waits drawn from up to 2, 4, 8, 16 and 32 s give the database's own step time to land.
USER_CREATE_RETRY = RetryPolicy(max_attempts=6, base_delay_s=2.0)


def database_out(row: dict[str, Any]) -> hm.DatabaseOut:
    return hm.DatabaseOut(
        id=row["id"],
        server_id=row["server_id"],
        engine=row["engine"],
        name=row["name"],
        status=row["status"],
        workflow_id=row["workflow_id"],
        last_error=row["last_error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def user_out(row: dict[str, Any]) -> hm.DatabaseUserOut:
    return hm.DatabaseUserOut(
        id=row["id"],
        database_id=row["database_id"],
        server_id=row["server_id"],
        name=row["name"],
        status=row["status"],
        workflow_id=row["workflow_id"],
        last_error=row["last_error"],
        password_rotated_at=row["password_rotated_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


DATABASE = CredentialKind(TABLE, "database", "database", database_out)
DATABASE_USER = CredentialKind(USERS, "database_user", "database user", user_out)


def drop_payload(name: str) -> dict[str, Any]:
    return {"name": name, "confirm": name}


async def _conflict(uow: UnitOfWork, sql: str, params: tuple[Any, ...], message: str) -> None:
    try:
        async with uow.conn.transaction():
            await uow.conn.execute(sql, params)
    except UniqueViolation:
        raise Problem(409, "conflict", message, field="name") from None


# --- databases ---------------------------------------------------------------------------


async def list_databases(
    db: Database, access: TenantAccess, limit: int, after: uuid.UUID | None
) -> list[hm.DatabaseOut]:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, READ, Resource("database"))
        rows = await (
            await uow.conn.execute(
                """SELECT * FROM hosted_databases WHERE tenant_id = %s
                   AND (%s::uuid IS NULL OR id > %s) ORDER BY id LIMIT %s""",
                (access.tenant_id, after, after, limit + 1),
            )
        ).fetchall()
    return [database_out(r) for r in rows]


async def get_database(
    db: Database, access: TenantAccess, database_id: uuid.UUID
) -> hm.DatabaseOut:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, READ, Resource("database", database_id))
        return database_out(await load(uow, TABLE, database_id, "database"))


async def create_database(
    db: Database, box: SecretBox, access: TenantAccess, body: hm.DatabaseCreate
) -> hm.DatabaseOut:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, WRITE, Resource("databases", creating=True))
        name = checked(identifiers.mariadb_database, body.name, "name")
        await require_server(uow, body.server_id)
        database_id = new_id()
        await _conflict(
            uow,
            "INSERT INTO hosted_databases (id, tenant_id, server_id, name) VALUES (%s, %s, %s, %s)",
            (database_id, access.tenant_id, body.server_id, name),
            f"the server already has a database named {name}",
        )
        step = StepSpec(
            "create",
            body.server_id,
            "db.mariadb.database.create",
            {"name": name},
            compensation=("db.mariadb.database.drop", drop_payload(name)),
        )
        await DATABASE.started(uow, box, DATABASE.create_kind, database_id, step)
        out = database_out(await load(uow, TABLE, database_id, "database"))
        await uow.record(
            "database.created", "database", database_id, None, out.model_dump(mode="json")
        )
    return out


async def delete_database(
    db: Database,
    box: SecretBox,
    access: TenantAccess,
    database_id: uuid.UUID,
    confirm: str | None,
) -> hm.DatabaseOut:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, WRITE, Resource("database", database_id))
        row = await load(uow, TABLE, database_id, "database", lock=True)
        if confirm != row["name"]:
            raise Problem(
                409,
                "confirmation_required",
                "deleting a database destroys its data: repeat the request with"
                f" ?confirm={row['name']} (the database's name)",
                field="confirm",
            )
        if row["status"] == "deleting":
            return database_out(row)
        users = await (
            await uow.conn.execute(
                "SELECT count(*) AS n FROM database_users WHERE database_id = %s", (database_id,)
            )
        ).fetchone()
        if users and users["n"]:
            raise Problem(
                409,
                "database_has_users",
                f"the database still has {users['n']} user(s); delete them first",
                users=users["n"],
            )
        step = StepSpec(
            "drop", row["server_id"], "db.mariadb.database.drop", drop_payload(row["name"])
        )
        out = await DATABASE.delete(uow, box, row, step)
    assert isinstance(out, hm.DatabaseOut)
    return out


# --- users -------------------------------------------------------------------------------


async def _user(uow: UnitOfWork, database_id: uuid.UUID, user_id: uuid.UUID) -> dict[str, Any]:
    await load(uow, TABLE, database_id, "database")
    row = await load(uow, USERS, user_id, "database user", lock=True)
    if row["database_id"] != database_id:
        raise not_found("database user")
    return row


async def list_users(
    db: Database, access: TenantAccess, database_id: uuid.UUID
) -> list[hm.DatabaseUserOut]:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, READ, Resource("database_user"))
        await load(uow, TABLE, database_id, "database")
        rows = await (
            await uow.conn.execute(
                "SELECT * FROM database_users WHERE database_id = %s AND tenant_id = %s"
                " ORDER BY name",
                (database_id, access.tenant_id),
            )
        ).fetchall()
    return [user_out(r) for r in rows]


async def create_user(
    db: Database,
    box: SecretBox,
    access: TenantAccess,
    database_id: uuid.UUID,
    body: hm.DatabaseUserCreate,
) -> hm.DatabaseUserCreated:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, WRITE, Resource("database_users", creating=True))
        name = checked(identifiers.mariadb_user, body.name, "name")
        password = new_password(body.password)
        database = await load(uow, TABLE, database_id, "database", lock=True)
        require_settled(database, "database", ("provisioning", "active"))
        user_id = new_id()
        await _conflict(
            uow,
            """INSERT INTO database_users (id, tenant_id, database_id, server_id, name,
                   password_sealed) VALUES (%s, %s, %s, %s, %s, %s)""",
            (
                user_id,
                access.tenant_id,
                database_id,
                database["server_id"],
                name,
                seal_password(box, USERS, user_id, password),
            ),
            f"the server already has a database user named {name}",
        )
        step = StepSpec(
            "create",
            database["server_id"],
            "db.mariadb.user.create",
            {"user": name, "password": secret(password), "database": database["name"]},
            compensation=("db.mariadb.user.drop", {"user": name}),
            retry=USER_CREATE_RETRY,
        )
        await DATABASE_USER.started(uow, box, DATABASE_USER.create_kind, user_id, step)
        out = user_out(await load(uow, USERS, user_id, "database user"))
        await uow.record(
            "database_user.created", "database_user", user_id, None, out.model_dump(mode="json")
        )
    return hm.DatabaseUserCreated(**out.model_dump(), password=password)


async def rotate_user_password(
    db: Database,
    box: SecretBox,
    access: TenantAccess,
    database_id: uuid.UUID,
    user_id: uuid.UUID,
    body: hm.PasswordRotate,
) -> hm.PasswordRotated:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, WRITE, Resource("database_user", user_id))
        password = new_password(body.password)
        row = await _user(uow, database_id, user_id)
        require_settled(row, "database user")
        step = StepSpec(
            "password",
            row["server_id"],
            "db.mariadb.user.password",
            {"user": row["name"], "password": secret(password)},
        )
        workflow_id = await DATABASE_USER.rotate(uow, box, row, password, step)
    return hm.PasswordRotated(id=user_id, workflow_id=workflow_id, password=password)


async def delete_user(
    db: Database, box: SecretBox, access: TenantAccess, database_id: uuid.UUID, user_id: uuid.UUID
) -> hm.DatabaseUserOut:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, WRITE, Resource("database_user", user_id))
        row = await _user(uow, database_id, user_id)
        if row["status"] == "deleting":
            return user_out(row)
        step = StepSpec("drop", row["server_id"], "db.mariadb.user.drop", {"user": row["name"]})
        out = await DATABASE_USER.delete(uow, box, row, step)
    assert isinstance(out, hm.DatabaseUserOut)
    return out
