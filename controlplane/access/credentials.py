"""Credentials: API tokens, login sessions with CSRF, login throttling, TOTP.

Tokens and session cookies are 256-bit random strings. Only their SHA-256 is stored
(they carry full entropy, so a slow hash adds nothing); the clear value is shown once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta

import pyotp

from controlplane.access.principal import Principal
from controlplane.db import Conn, Database
from controlplane.problems import Problem
from yakpanel.clock import Clock
from yakpanel.ids import new_id

TOKEN_PREFIX = "yak_"  # noqa: S105 - a marker, not a secret
SESSION_TTL = timedelta(hours=12)
# Written at most this often per token, so that reads do not all become writes.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_token() -> tuple[str, str, bytes]:
    """(token shown once, display prefix, stored hash)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, token[:12], digest(token)


def unauthorized(code: str, detail: str) -> Problem:
    return Problem(401, code, detail)


async def authenticate_token(db: Database, raw: str, clock: Clock) -> Principal:
    if not raw.startswith(TOKEN_PREFIX) or len(raw) > 200:
        raise unauthorized("token_invalid", "the API token is not valid")
    async with db.connection() as conn:
        row = await (
            await conn.execute("SELECT * FROM find_api_token(%s)", (digest(raw),))
        ).fetchone()
        if row is None:
            raise unauthorized("token_invalid", "the API token is not valid")
        now = clock.now()
        if row["revoked_at"] is not None:
            raise unauthorized("token_revoked", "the API token was revoked")
        if row["expires_at"] <= now:
            raise unauthorized("token_expired", "the API token has expired")
        last = row["last_used_at"]
        if last is None or now - last >= LAST_USED_RESOLUTION:
            await conn.execute("SELECT touch_api_token(%s, %s)", (row["id"], now))
    return Principal(
        "token",
        row["id"],
        user_id=row["user_id"],
        token_tenant_id=row["tenant_id"],
        token_scopes=frozenset(row["scopes"]),
    )


@dataclass(frozen=True)
class NewSession:
    id: uuid.UUID
    token: str
    csrf_token: str
    expires_in: timedelta


async def create_session(
    conn: Conn,
    kind: str,
    principal_id: uuid.UUID,
    clock: Clock,
    source_ip: str | None,
    user_agent: str | None,
) -> NewSession:
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    session_id = new_id()
    await conn.execute(
        """INSERT INTO login_sessions (id, token_hash, csrf_hash, principal_kind, principal_id,
               source_ip, user_agent, created_at, expires_at)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)""",
        (
            session_id,
            digest(token),
            digest(csrf),
            kind,
            principal_id,
            source_ip,
            (user_agent or "")[:300],
            clock.now(),
            clock.now() + SESSION_TTL,
        ),
    )
    return NewSession(session_id, token, csrf, SESSION_TTL)


async def authenticate_session(
    db: Database, token: str, csrf: str | None, needs_csrf: bool, clock: Clock
) -> Principal:
    async with db.connection() as conn:
        row = await (
            await conn.execute(
                """SELECT id, csrf_hash, principal_kind, principal_id FROM login_sessions
                   WHERE token_hash = %s AND revoked_at IS NULL AND expires_at > %s""",
                (digest(token), clock.now()),
            )
        ).fetchone()
        if row is None:
            raise unauthorized("session_invalid", "the session has expired; log in again")
        if needs_csrf and (csrf is None or not hmac.compare_digest(digest(csrf), row["csrf_hash"])):
            raise Problem(403, "csrf_failed", "missing or wrong X-CSRF-Token header")
        if row["principal_kind"] == "staff":
            staff = await (
                await conn.execute(
                    "SELECT permissions FROM platform_staff WHERE id = %s AND disabled_at IS NULL",
                    (row["principal_id"],),
                )
            ).fetchone()
            if staff is None:
                raise unauthorized("session_invalid", "the account is disabled")
            return Principal(
                "staff",
                row["principal_id"],
                staff_permissions=frozenset(staff["permissions"]),
                session_id=row["id"],
            )
        user = await (
            await conn.execute(
                "SELECT id FROM users WHERE id = %s AND disabled_at IS NULL", (row["principal_id"],)
            )
        ).fetchone()
        if user is None:
            raise unauthorized("session_invalid", "the account is disabled")
        return Principal("user", user["id"], user_id=user["id"], session_id=row["id"])


class LoginThrottle:
    """Failed logins per account and per source address in a sliding window.

    While a key is over its limit every attempt is refused, right password or not,
    so guessing cannot continue at full speed.
    """

    def __init__(
        self,
        clock: Clock,
        per_account: int = 5,
        per_address: int = 20,
        window: timedelta = timedelta(minutes=1),
    ) -> None:
        self.clock = clock
        self.per_account = per_account
        self.per_address = per_address
        self.window = window

    def _keys(self, email: str, address: str | None) -> list[tuple[str, int]]:
        keys = [(f"account:{email}", self.per_account)]
        if address:
            keys.append((f"address:{address}", self.per_address))
        return keys

    async def check(self, conn: Conn, email: str, address: str | None) -> None:
        since = self.clock.now() - self.window
        for key, limit in self._keys(email, address):
            row = await (
                await conn.execute(
                    "SELECT count(*) AS n, min(at) AS first FROM login_failures"
                    " WHERE throttle_key = %s AND at > %s",
                    (key, since),
                )
            ).fetchone()
            if row is not None and row["n"] >= limit:
                retry = int((row["first"] + self.window - self.clock.now()).total_seconds()) + 1
                raise Problem(
                    429,
                    "login_throttled",
                    f"too many failed logins; try again in {retry} s",
                    retry_after=max(retry, 1),
                )

    async def failed(self, conn: Conn, email: str, address: str | None) -> None:
        for key, _ in self._keys(email, address):
            await conn.execute(
                "INSERT INTO login_failures (throttle_key, at) VALUES (%s, %s)",
                (key, self.clock.now()),
            )
        await conn.execute(
            "DELETE FROM login_failures WHERE at < %s", (self.clock.now() - 10 * self.window,)
        )

    async def succeeded(self, conn: Conn, email: str) -> None:
        await conn.execute(
            "DELETE FROM login_failures WHERE throttle_key = %s", (f"account:{email}",)
        )


def new_totp_secret() -> str:
    return pyotp.random_base32()


def totp_uri(secret: str, email: str) -> str:
    return pyotp.TOTP(secret).provisioning_uri(name=email, issuer_name="YakPanel")


def totp_step(secret: str, code: str, clock: Clock) -> int | None:
    """The time step (30 s) whose code this is, allowing one step of clock drift."""
    if not code.isdigit() or len(code) != 6:
        return None
    totp = pyotp.TOTP(secret)
    now = int(clock.now().timestamp()) // totp.interval
    for step in (now - 1, now, now + 1):
        if hmac.compare_digest(totp.generate_otp(step), code):
            return step
    return None


async def accept_totp_step(conn: Conn, table: str, account_id: uuid.UUID, step: int) -> bool:
    """Record `step` as used; False when it (or a later one) was already used: a replay."""
    if table not in ("users", "platform_staff"):
        raise ValueError(table)
    updated = await conn.execute(
        f"UPDATE {table} SET totp_last_step = %s WHERE id = %s"
        " AND (totp_last_step IS NULL OR totp_last_step < %s)",
        (step, account_id, step),
    )
    return updated.rowcount == 1
