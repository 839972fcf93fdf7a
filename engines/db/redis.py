"""Redis ACL users confined to one key prefix, through redis.asyncio.

A tenant user gets these rules (`ACL SETUSER <user> reset on #<sha256> ~<prefix>* &<prefix>*`
followed by `TENANT_COMMAND_RULES`):

- `+@all -@dangerous -@admin`: every data command (strings, hashes, lists, sets,
  sorted sets, streams, bitmaps, geo, HyperLogLog, pub/sub, transactions, Lua with
  per-command ACL checks) on its own keys and channels; no KEYS, FLUSHALL/FLUSHDB,
  CONFIG, ACL, DEBUG, MONITOR, INFO, CLIENT LIST/KILL, SORT, SWAPDB, SHUTDOWN ….
- `-scan -randomkey -dbsize`: they are not key-checked and would list or count other
  tenants' keys. Applications address their keys by name (or keep an index set).
- `-function -script|flush -script|kill -pubsub`: server-wide state (loaded libraries,
  the script cache, other clients' scripts, every channel name) shared by all
  tenants. FCALL/EVAL of the tenant's own code still work.

Arguments go to Redis as separate protocol arguments, so a space in a value cannot
add a rule; names are still validated first. The password is sent as its SHA-256
(`#<hex>`), so the plaintext never leaves this process, not even towards Redis.
A password change leaves already-authenticated connections open (applications
reconnect with the new password at their pace); deleting a user closes them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from engines.base import EngineError
from engines.db.config import DbSettings
from engines.db.payloads import Password, Payload, checked
from yakpanel import identifiers

log = logging.getLogger(__name__)

TENANT_COMMAND_RULES: tuple[str, ...] = (
    "+@all",
    "-@dangerous",
    "-@admin",
    "-scan",
    "-randomkey",
    "-dbsize",
    "-function",
    "-script|flush",
    "-script|kill",
    "-pubsub",
)


RedisUserName = Annotated[str, checked(identifiers.redis_user, "user")]
KeyPrefix = Annotated[str, checked(identifiers.redis_key_prefix, "prefix")]


class RedisUserCreate(Payload):
    user: RedisUserName
    password: Password
    prefix: KeyPrefix


class RedisUserPassword(Payload):
    user: RedisUserName
    password: Password


class RedisUserDrop(Payload):
    user: RedisUserName


def password_rule(password: str) -> str:
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def tenant_rules(prefix: str) -> list[str]:
    return ["reset", "on", f"~{prefix}*", f"&{prefix}*", *TENANT_COMMAND_RULES]


class RedisAcl:
    """One short admin connection per command."""

    def __init__(self, settings: DbSettings) -> None:
        self._settings = settings

    async def create_user(self, p: RedisUserCreate) -> dict[str, Any]:
        async with self._admin() as client:
            existing = await client.acl_getuser(p.user)
            if existing is not None and not _owns_prefix(existing, p.prefix):
                raise EngineError(
                    "user_conflict",
                    f"Redis user {p.user!r} already exists with other keys or rights; it is "
                    "not managed by this command: choose another user name",
                )
            await _command(
                client,
                "ACL",
                "SETUSER",
                p.user,
                *tenant_rules(p.prefix),
                password_rule(p.password),
            )
            persisted = await self._persist(client)
        log.info(
            "redis user set up",
            extra={"redis_user": p.user, "prefix": p.prefix, "persisted": persisted},
        )
        return {
            "user": p.user,
            "prefix": p.prefix,
            "created": existing is None,
            "persisted": persisted,
        }

    async def set_password(self, p: RedisUserPassword) -> dict[str, Any]:
        async with self._admin() as client:
            existing = await client.acl_getuser(p.user)
            if existing is None:
                raise EngineError(
                    "user_missing",
                    f"Redis user {p.user!r} does not exist: create it with db.redis.user.create",
                )
            if not _is_tenant_user(existing):
                raise EngineError(
                    "user_conflict",
                    f"Redis user {p.user!r} is not a tenant user of this panel; its password "
                    "is not changed here",
                )
            await _command(client, "ACL", "SETUSER", p.user, "resetpass", password_rule(p.password))
            persisted = await self._persist(client)
        log.info("redis user password changed", extra={"redis_user": p.user})
        return {"user": p.user, "persisted": persisted}

    async def drop_user(self, p: RedisUserDrop) -> dict[str, Any]:
        async with self._admin() as client:
            existing = await client.acl_getuser(p.user)
            if existing is not None and not _is_tenant_user(existing):
                raise EngineError(
                    "user_conflict",
                    f"Redis user {p.user!r} is not a tenant user of this panel; it is not "
                    "deleted here",
                )
            # ACL DELUSER also closes the connections authenticated as this user.
            deleted = await _command(client, "ACL", "DELUSER", p.user)
            persisted = await self._persist(client)
        log.info("redis user deleted", extra={"redis_user": p.user})
        return {"user": p.user, "dropped": bool(deleted), "persisted": persisted}

    # --- plumbing ---------------------------------------------------------------------

    @asynccontextmanager
    async def _admin(self) -> AsyncIterator[aioredis.Redis]:
        """An admin connection; Redis failures inside the block become EngineErrors."""
        s = self._settings
        common: dict[str, Any] = {
            "username": s.redis_admin_user,
            "password": s.redis_admin_password,
            "socket_connect_timeout": s.redis_connect_timeout,
            "socket_timeout": 30,
            "decode_responses": True,
            "single_connection_client": True,
            # The agent decides about retrying (EngineError.retryable); a silent
            # client-side retry would only delay a clear answer.
            "retry": Retry(NoBackoff(), 0),
        }
        if s.redis_socket is not None:
            client = aioredis.Redis(unix_socket_path=str(s.redis_socket), **common)
        else:
            client = aioredis.Redis(host=s.redis_host, port=s.redis_port, **common)
        try:
            async with client:
                yield client
        except (redis_errors.AuthenticationError, redis_errors.NoPermissionError) as exc:
            raise EngineError(
                "redis_admin_denied",
                f"Redis at {self._where()} refused the admin account ({_first_line(exc)}); "
                "check YAKPANEL_DB_REDIS_ADMIN_USER and YAKPANEL_DB_REDIS_ADMIN_PASSWORD",
            ) from None
        except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
            raise EngineError(
                "redis_unavailable",
                f"Redis at {self._where()} is not reachable ({type(exc).__name__}); the "
                "command can be retried once the server is up",
                retryable=True,
            ) from None
        except redis_errors.RedisError as exc:
            raise EngineError("redis_error", f"Redis error: {_first_line(exc)}") from None

    def _where(self) -> str:
        s = self._settings
        if s.redis_socket is not None:
            return f"socket {s.redis_socket}"
        return f"{s.redis_host}:{s.redis_port}"

    async def _persist(self, client: aioredis.Redis) -> bool:
        """Write the ACL where Redis loads it from at start; False when it has nowhere."""
        if not self._settings.redis_persist_acl:
            return False
        try:
            await _command(client, "ACL", "SAVE")
            return True
        except redis_errors.ResponseError:
            pass  # no aclfile: users live in redis.conf, if there is one
        try:
            await _command(client, "CONFIG", "REWRITE")
            return True
        except redis_errors.ResponseError as exc:
            log.warning(
                "redis ACL change is not persisted: the server has neither an aclfile nor a "
                "config file; it is lost when Redis restarts",
                extra={"reason": _first_line(exc)},
            )
            return False
        except redis_errors.RedisError as exc:
            raise EngineError(
                "redis_error", f"Redis did not persist the ACL: {_first_line(exc)}"
            ) from None


async def _command(client: aioredis.Redis, *args: str) -> Any:
    # redis-py leaves execute_command untyped; this is the one place that calls it.
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


def _first_line(exc: BaseException) -> str:
    # Redis error replies can quote a rule back; rules carry only a hash, never the
    # password, but keep messages short and free of arguments all the same.
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def _owns_prefix(user: dict[str, Any], prefix: str) -> bool:
    return _tenant_prefix(user) == prefix


def _is_tenant_user(user: dict[str, Any]) -> bool:
    return _tenant_prefix(user) is not None


def _tenant_prefix(user: dict[str, Any]) -> str | None:
    """The prefix of a user shaped as `create_user` leaves it, else None (an operator's).

    Redis rewrites the command rules it is given into an equivalent compact list
    (`-@admin` disappears inside `-@dangerous`), so only the key and channel patterns
    and the dangerous-commands ban are compared.
    """
    keys = list(user.get("keys") or [])
    channels = list(user.get("channels") or [])
    if len(keys) != 1 or not keys[0].startswith("~") or not keys[0].endswith("*"):
        return None
    prefix = str(keys[0])[1:-1]
    try:
        identifiers.redis_key_prefix(prefix)
    except identifiers.InvalidIdentifier:
        return None
    if channels != [f"&{prefix}*"] or "-@dangerous" not in (user.get("categories") or []):
        return None
    return prefix
