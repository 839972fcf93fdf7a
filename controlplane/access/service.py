"""Use cases of identity and access: members, roles, API tokens."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from psycopg.errors import UniqueViolation

from controlplane.access.credentials import new_token
from controlplane.access.permissions import BUILTIN_ROLES, TENANT_PERMISSIONS
from controlplane.access.policy import Resource, authorize, grantable, not_found
from controlplane.access.principal import TenantAccess
from controlplane.api import models as m
from controlplane.db import Database, UnitOfWork
from controlplane.problems import Problem
from controlplane.tenancy.service import ensure_user, role_id_by_name
from yakpanel.ids import new_id

# --- roles ----------------------------------------------------------------------------


def _role(row: dict[str, Any]) -> m.RoleOut:
    return m.RoleOut(
        id=row["id"],
        name=row["name"],
        description=row["description"],
        permissions=sorted(row["permissions"]),
        built_in=row["tenant_id"] is None,
    )


async def list_roles(
    db: Database, access: TenantAccess, limit: int, after: uuid.UUID | None
) -> list[m.RoleOut]:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, "roles:read", Resource("role"))
        rows = await (
            await uow.conn.execute(
                """SELECT * FROM roles WHERE (tenant_id = %s OR tenant_id IS NULL)
                   AND (%s::uuid IS NULL OR id > %s) ORDER BY id LIMIT %s""",
                (access.tenant_id, after, after, limit + 1),
            )
        ).fetchall()
    return [_role(r) for r in rows]


async def _load_role(uow: UnitOfWork, role_id: uuid.UUID, lock: bool = False) -> dict[str, Any]:
    row = await (
        await uow.conn.execute(
            "SELECT * FROM roles WHERE id = %s AND (tenant_id = %s OR tenant_id IS NULL)"
            + (" FOR UPDATE" if lock else ""),
            (role_id, uow.tenant_id),
        )
    ).fetchone()
    if row is None:
        raise not_found("role")
    return row


async def get_role(db: Database, access: TenantAccess, role_id: uuid.UUID) -> m.RoleOut:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, "roles:read", Resource("role", role_id))
        return _role(await _load_role(uow, role_id))


async def create_role(db: Database, access: TenantAccess, body: m.RoleCreate) -> m.RoleOut:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, "roles:write", Resource("role", creating=True))
        grantable(access, set(body.permissions))
        if body.name in BUILTIN_ROLES:
            raise Problem(409, "conflict", f"{body.name!r} is a built-in role")
        try:
            async with uow.conn.transaction():
                row = await (
                    await uow.conn.execute(
                        """INSERT INTO roles (id, tenant_id, name, description, permissions)
                           VALUES (%s, %s, %s, %s, %s) RETURNING *""",
                        (new_id(), access.tenant_id, body.name, body.description, body.permissions),
                    )
                ).fetchone()
        except UniqueViolation:
            raise Problem(409, "conflict", f"a role named {body.name!r} exists") from None
        assert row is not None
        role = _role(row)
        await uow.record("role.created", "role", role.id, None, role.model_dump(mode="json"))
    return role


async def update_role(
    db: Database, access: TenantAccess, role_id: uuid.UUID, body: m.RoleUpdate
) -> m.RoleOut:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, "roles:write", Resource("role", role_id))
        if (await _load_role(uow, role_id))["tenant_id"] is None:
            raise Problem(409, "built_in_role", "built-in roles cannot be changed")
        row = await _load_role(uow, role_id, lock=True)
        before = _role(row)
        permissions = body.permissions if body.permissions is not None else row["permissions"]
        grantable(access, set(permissions))
        description = body.description if body.description is not None else row["description"]
        updated = await (
            await uow.conn.execute(
                """UPDATE roles SET permissions = %s, description = %s, updated_at = now()
                   WHERE id = %s RETURNING *""",
                (permissions, description, role_id),
            )
        ).fetchone()
        assert updated is not None
        after = _role(updated)
        await uow.record(
            "role.updated",
            "role",
            role_id,
            before.model_dump(mode="json"),
            after.model_dump(mode="json"),
        )
    return after


async def delete_role(db: Database, access: TenantAccess, role_id: uuid.UUID) -> None:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, "roles:write", Resource("role", role_id))
        if (await _load_role(uow, role_id))["tenant_id"] is None:
            raise Problem(409, "built_in_role", "built-in roles cannot be deleted")
        row = await _load_role(uow, role_id, lock=True)
        used = await (
            await uow.conn.execute(
                "SELECT count(*) AS n FROM memberships WHERE role_id = %s", (role_id,)
            )
        ).fetchone()
        if used and used["n"]:
            raise Problem(
                409, "role_in_use", f"{used['n']} member(s) have this role; change theirs first"
            )
        await uow.conn.execute("DELETE FROM roles WHERE id = %s", (role_id,))
        await uow.record("role.deleted", "role", role_id, _role(row).model_dump(mode="json"), None)


def permission_catalogue() -> list[m.PermissionOut]:
    return [m.PermissionOut(name=k, description=v) for k, v in TENANT_PERMISSIONS.items()]


# --- members --------------------------------------------------------------------------

_MEMBER_SQL = """SELECT mb.user_id, u.email, u.display_name, r.name AS role,
    mb.created_at AS joined_at, r.permissions
    FROM memberships mb JOIN users u ON u.id = mb.user_id JOIN roles r ON r.id = mb.role_id
    WHERE mb.tenant_id = %s"""


def _member(row: dict[str, Any]) -> m.MemberOut:
    return m.MemberOut(**{k: v for k, v in row.items() if k != "permissions"})


async def list_members(
    db: Database, access: TenantAccess, limit: int, after: uuid.UUID | None
) -> list[m.MemberOut]:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, "members:read", Resource("member"))
        rows = await (
            await uow.conn.execute(
                _MEMBER_SQL
                + " AND (%s::uuid IS NULL OR mb.user_id > %s) ORDER BY mb.user_id LIMIT %s",
                (access.tenant_id, after, after, limit + 1),
            )
        ).fetchall()
    return [_member(r) for r in rows]


async def _load_member(uow: UnitOfWork, user_id: uuid.UUID, lock: bool = False) -> dict[str, Any]:
    row = await (
        await uow.conn.execute(
            _MEMBER_SQL + " AND mb.user_id = %s" + (" FOR UPDATE OF mb" if lock else ""),
            (uow.tenant_id, user_id),
        )
    ).fetchone()
    if row is None:
        raise not_found("member")
    return row


async def get_member(db: Database, access: TenantAccess, user_id: uuid.UUID) -> m.MemberOut:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, "members:read", Resource("member", user_id))
        return _member(await _load_member(uow, user_id))


async def _role_permissions(uow: UnitOfWork, role_id: uuid.UUID) -> set[str]:
    row = await _load_role(uow, role_id)
    return set(row["permissions"])


async def add_member(db: Database, access: TenantAccess, body: m.MemberAdd) -> m.MemberOut:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, "members:write", Resource("member", creating=True))
        role_id = await role_id_by_name(uow, body.role)
        grantable(access, await _role_permissions(uow, role_id))
        user_id = await ensure_user(uow, body.email, body.password, body.display_name)
        try:
            async with uow.conn.transaction():
                await uow.conn.execute(
                    "INSERT INTO memberships (id, tenant_id, user_id, role_id)"
                    " VALUES (%s, %s, %s, %s)",
                    (new_id(), access.tenant_id, user_id, role_id),
                )
        except UniqueViolation:
            raise Problem(409, "conflict", f"{body.email} is already a member") from None
        member = _member(await _load_member(uow, user_id))
        await uow.record("member.added", "member", user_id, None, member.model_dump(mode="json"))
    return member


async def _owners(uow: UnitOfWork) -> int:
    row = await (
        await uow.conn.execute(
            """SELECT count(*) AS n FROM memberships mb JOIN roles r ON r.id = mb.role_id
               WHERE mb.tenant_id = %s AND r.tenant_id IS NULL AND r.name = 'owner'""",
            (uow.tenant_id,),
        )
    ).fetchone()
    return int(row["n"]) if row else 0


async def update_member(
    db: Database, access: TenantAccess, user_id: uuid.UUID, body: m.MemberUpdate
) -> m.MemberOut:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, "members:write", Resource("member", user_id))
        row = await _load_member(uow, user_id, lock=True)
        before = _member(row)
        role_id = await role_id_by_name(uow, body.role)
        grantable(access, await _role_permissions(uow, role_id))
        grantable(access, set(row["permissions"]))
        if before.role == "owner" and body.role != "owner" and await _owners(uow) <= 1:
            raise Problem(409, "last_owner", "a tenant keeps at least one owner")
        await uow.conn.execute(
            "UPDATE memberships SET role_id = %s, updated_at = now()"
            " WHERE tenant_id = %s AND user_id = %s",
            (role_id, access.tenant_id, user_id),
        )
        after = _member(await _load_member(uow, user_id))
        await uow.record(
            "member.role_changed",
            "member",
            user_id,
            before.model_dump(mode="json"),
            after.model_dump(mode="json"),
        )
    return after


async def remove_member(db: Database, access: TenantAccess, user_id: uuid.UUID) -> None:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, "members:write", Resource("member", user_id))
        row = await _load_member(uow, user_id, lock=True)
        grantable(access, set(row["permissions"]))
        if row["role"] == "owner" and await _owners(uow) <= 1:
            raise Problem(409, "last_owner", "a tenant keeps at least one owner")
        await uow.conn.execute(
            "DELETE FROM memberships WHERE tenant_id = %s AND user_id = %s",
            (access.tenant_id, user_id),
        )
        # Tokens act for their user in this tenant; without the membership they stop.
        await uow.conn.execute(
            "UPDATE api_tokens SET revoked_at = %s WHERE tenant_id = %s AND user_id = %s"
            " AND revoked_at IS NULL",
            (uow.clock.now(), access.tenant_id, user_id),
        )
        await uow.record(
            "member.removed", "member", user_id, _member(row).model_dump(mode="json"), None
        )


# --- API tokens -----------------------------------------------------------------------


def _token(row: dict[str, Any]) -> m.TokenOut:
    return m.TokenOut(
        id=row["id"],
        name=row["name"],
        prefix=row["prefix"],
        scopes=sorted(row["scopes"]),
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        last_used_at=row["last_used_at"],
        created_at=row["created_at"],
    )


async def list_tokens(
    db: Database, access: TenantAccess, limit: int, after: uuid.UUID | None
) -> list[m.TokenOut]:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, "tokens:read", Resource("token"))
        rows = await (
            await uow.conn.execute(
                """SELECT * FROM api_tokens WHERE tenant_id = %s
                   AND (%s::uuid IS NULL OR id > %s) ORDER BY id LIMIT %s""",
                (access.tenant_id, after, after, limit + 1),
            )
        ).fetchall()
    return [_token(r) for r in rows]


async def _load_token(uow: UnitOfWork, token_id: uuid.UUID, lock: bool = False) -> dict[str, Any]:
    row = await (
        await uow.conn.execute(
            "SELECT * FROM api_tokens WHERE id = %s AND tenant_id = %s"
            + (" FOR UPDATE" if lock else ""),
            (token_id, uow.tenant_id),
        )
    ).fetchone()
    if row is None:
        raise not_found("token")
    return row


async def get_token(db: Database, access: TenantAccess, token_id: uuid.UUID) -> m.TokenOut:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, "tokens:read", Resource("token", token_id))
        return _token(await _load_token(uow, token_id))


async def create_token(db: Database, access: TenantAccess, body: m.TokenCreate) -> m.TokenCreated:
    principal = access.principal
    if principal.user_id is None:
        raise Problem(403, "forbidden", "tokens belong to a tenant user")
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, "tokens:write", Resource("token", creating=True))
        grantable(access, set(body.scopes))
        token, prefix, token_hash = new_token()
        now = uow.clock.now()
        row = await (
            await uow.conn.execute(
                """INSERT INTO api_tokens (id, tenant_id, user_id, name, prefix, token_hash,
                       scopes, expires_at, created_at)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING *""",
                (
                    new_id(),
                    access.tenant_id,
                    principal.user_id,
                    body.name,
                    prefix,
                    token_hash,
                    body.scopes,
                    now + timedelta(days=body.expires_in_days),
                    now,
                ),
            )
        ).fetchone()
        assert row is not None
        out = _token(row)
        await uow.record("token.created", "token", out.id, None, out.model_dump(mode="json"))
    return m.TokenCreated(**out.model_dump(), token=token)


async def revoke_token(db: Database, access: TenantAccess, token_id: uuid.UUID) -> m.TokenOut:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, "tokens:write", Resource("token", token_id))
        row = await _load_token(uow, token_id, lock=True)
        before = _token(row)
        if row["revoked_at"] is not None:
            return before
        updated = await (
            await uow.conn.execute(
                "UPDATE api_tokens SET revoked_at = %s WHERE id = %s RETURNING *",
                (uow.clock.now(), token_id),
            )
        ).fetchone()
        assert updated is not None
        after = _token(updated)
        await uow.record(
            "token.revoked",
            "token",
            token_id,
            before.model_dump(mode="json"),
            after.model_dump(mode="json"),
        )
    return after
