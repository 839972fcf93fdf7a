"""Use cases of logging in and of one's own account: login, logout, me, password, TOTP."""

from __future__ import annotations

import uuid

from controlplane.access.credentials import (
    NewSession,
    accept_totp_step,
    create_session,
    new_totp_secret,
    totp_step,
    totp_uri,
)
from controlplane.access.principal import Principal
from controlplane.api import models as m
from controlplane.context import ControlPlane
from controlplane.db import UnitOfWork
from controlplane.passwords import hash_password, hash_password_async, verify_password_async
from controlplane.problems import Problem

# Verified against when the account does not exist, so both paths cost the same.
_DUMMY_HASH = hash_password("no such account, constant work")


def _wrong() -> Problem:
    return Problem(401, "login_failed", "wrong email, password or code")


async def login(
    cp: ControlPlane, body: m.LoginBody, source_ip: str | None, user_agent: str | None
) -> tuple[NewSession, m.MeOut]:
    email = body.email.strip().lower()
    async with cp.db.connection() as conn:
        await cp.throttle.check(conn, email, source_ip)
        account = await (
            await conn.execute(
                """SELECT 'staff' AS kind, id, password_hash, totp_secret FROM platform_staff
                   WHERE email = %s AND disabled_at IS NULL
                   UNION ALL
                   SELECT 'user', id, password_hash, totp_secret FROM users
                   WHERE email = %s AND disabled_at IS NULL LIMIT 1""",
                (email, email),
            )
        ).fetchone()
        ok = await verify_password_async(
            account["password_hash"] if account else _DUMMY_HASH, body.password
        )
        if ok and account is not None and account["totp_secret"] is not None:
            secret = cp.secrets.open(
                account["totp_secret"], f"{account['kind']}:{account['id']}:totp"
            ).decode()
            if body.totp_code is None:
                # Right password but no code: not counted as a failure, but no session.
                raise Problem(401, "totp_required", "this account needs its one-time code")
            step = totp_step(secret, body.totp_code, cp.clock)
            table = "platform_staff" if account["kind"] == "staff" else "users"
            ok = step is not None and await accept_totp_step(conn, table, account["id"], step)
        if not ok or account is None:
            await cp.throttle.failed(conn, email, source_ip)
            raise _wrong()
        await cp.throttle.succeeded(conn, email)
        async with conn.transaction():
            session = await create_session(
                conn, account["kind"], account["id"], cp.clock, source_ip, user_agent
            )
            await conn.execute(
                """INSERT INTO audit_log (id, at, actor_kind, actor_id, action, resource_type,
                       resource_id, source_ip, user_agent)
                   VALUES (%s, %s, %s, %s, 'session.created', 'session', %s, %s, %s)""",
                (
                    session.id,
                    cp.clock.now(),
                    account["kind"],
                    account["id"],
                    str(session.id),
                    source_ip,
                    (user_agent or "")[:300],
                ),
            )
    kind = account["kind"]
    principal = Principal(kind, account["id"], user_id=account["id"] if kind == "user" else None)
    if kind == "staff":
        async with cp.db.connection() as conn:
            row = await (
                await conn.execute(
                    "SELECT permissions FROM platform_staff WHERE id = %s", (account["id"],)
                )
            ).fetchone()
        principal = Principal(
            "staff", account["id"], staff_permissions=frozenset(row["permissions"] if row else [])
        )
    return session, await me(cp, principal)


async def logout(cp: ControlPlane, principal: Principal) -> None:
    if principal.session_id is None:
        return
    async with cp.db.connection() as conn:
        await conn.execute(
            "UPDATE login_sessions SET revoked_at = %s WHERE id = %s",
            (cp.clock.now(), principal.session_id),
        )


async def me(cp: ControlPlane, principal: Principal) -> m.MeOut:
    async with cp.db.connection() as conn:
        if principal.kind == "staff":
            row = await (
                await conn.execute(
                    "SELECT email, totp_secret FROM platform_staff WHERE id = %s", (principal.id,)
                )
            ).fetchone()
            memberships: list[m.MembershipOut] = []
        else:
            row = await (
                await conn.execute(
                    "SELECT email, totp_secret FROM users WHERE id = %s", (principal.user_id,)
                )
            ).fetchone()
            rows = await (
                await conn.execute(
                    "SELECT * FROM user_memberships(%s) WHERE tenant_state <> 'deleted'"
                    " ORDER BY tenant_id",
                    (principal.user_id,),
                )
            ).fetchall()
            memberships = []
            for r in rows:
                perms = set(r["permissions"])
                if principal.kind == "token":
                    if r["tenant_id"] != principal.token_tenant_id:
                        continue
                    perms &= principal.token_scopes or set()
                memberships.append(
                    m.MembershipOut(
                        tenant_id=r["tenant_id"],
                        permissions=sorted(perms),
                        tenant_state=r["tenant_state"],
                    )
                )
    return m.MeOut(
        kind=principal.kind,
        id=principal.id,
        email=row["email"] if row else None,
        totp_enabled=bool(row and row["totp_secret"] is not None),
        staff_permissions=sorted(principal.staff_permissions),
        memberships=memberships,
    )


def _require_user(principal: Principal) -> uuid.UUID:
    if principal.kind != "user" or principal.user_id is None:
        raise Problem(403, "forbidden", "only a logged-in user can change their own account")
    return principal.user_id


async def change_password(cp: ControlPlane, principal: Principal, body: m.PasswordChange) -> None:
    user_id = _require_user(principal)
    async with cp.db.unit_of_work(principal.actor()) as uow:
        row = await (
            await uow.conn.execute(
                "SELECT password_hash FROM users WHERE id = %s FOR UPDATE", (user_id,)
            )
        ).fetchone()
        if row is None or not await verify_password_async(
            row["password_hash"], body.current_password
        ):
            raise Problem(403, "wrong_password", "the current password is wrong")
        await uow.conn.execute(
            "UPDATE users SET password_hash = %s WHERE id = %s",
            (await hash_password_async(body.new_password), user_id),
        )
        # Other sessions end: a changed password usually means a suspected leak.
        await uow.conn.execute(
            "UPDATE login_sessions SET revoked_at = %s WHERE principal_id = %s AND id <> %s"
            " AND revoked_at IS NULL",
            (uow.clock.now(), user_id, principal.session_id),
        )
        await uow.audit("user.password_changed", "user", user_id)


async def begin_totp(cp: ControlPlane, principal: Principal) -> m.TotpEnrollment:
    user_id = _require_user(principal)
    secret = new_totp_secret()
    async with cp.db.unit_of_work(principal.actor()) as uow:
        row = await (
            await uow.conn.execute(
                "UPDATE users SET totp_pending_secret = %s WHERE id = %s RETURNING email",
                (cp.secrets.seal(secret.encode(), f"user:{user_id}:totp"), user_id),
            )
        ).fetchone()
        assert row is not None
    return m.TotpEnrollment(secret=secret, otpauth_uri=totp_uri(secret, row["email"]))


async def _locked_totp_secret(
    cp: ControlPlane, uow: UnitOfWork, user_id: uuid.UUID, column: str, missing: Problem
) -> str:
    """The user's (pending or active) TOTP secret, opened; the row stays locked."""
    if column not in ("totp_secret", "totp_pending_secret"):
        raise ValueError(column)
    row = await (
        await uow.conn.execute(f"SELECT {column} FROM users WHERE id = %s FOR UPDATE", (user_id,))
    ).fetchone()
    if row is None or row[column] is None:
        raise missing
    return cp.secrets.open(row[column], f"user:{user_id}:totp").decode()


async def confirm_totp(cp: ControlPlane, principal: Principal, body: m.TotpCode) -> None:
    user_id = _require_user(principal)
    async with cp.db.unit_of_work(principal.actor()) as uow:
        secret = await _locked_totp_secret(
            cp,
            uow,
            user_id,
            "totp_pending_secret",
            Problem(409, "no_enrollment", "start the enrollment first"),
        )
        step = totp_step(secret, body.code, cp.clock)
        if step is None:
            raise Problem(422, "wrong_code", "the code does not match; check the device clock")
        await uow.conn.execute(
            "UPDATE users SET totp_secret = totp_pending_secret, totp_pending_secret = NULL,"
            " totp_last_step = %s WHERE id = %s",
            (step, user_id),
        )
        await uow.audit("user.totp_enabled", "user", user_id)


async def disable_totp(cp: ControlPlane, principal: Principal, body: m.TotpCode) -> None:
    user_id = _require_user(principal)
    async with cp.db.unit_of_work(principal.actor()) as uow:
        secret = await _locked_totp_secret(
            cp,
            uow,
            user_id,
            "totp_secret",
            Problem(409, "totp_not_enabled", "the second factor is not enabled"),
        )
        step = totp_step(secret, body.code, cp.clock)
        if step is None or not await accept_totp_step(uow.conn, "users", user_id, step):
            raise Problem(422, "wrong_code", "the code does not match")
        await uow.conn.execute("UPDATE users SET totp_secret = NULL WHERE id = %s", (user_id,))
        await uow.audit("user.totp_disabled", "user", user_id)
