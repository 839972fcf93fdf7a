"""The `db` engine: tenant databases and accounts on the node's MariaDB and Redis.

Every payload is validated (pydantic, `extra="forbid"`, the grammars of
`yakpanel.identifiers`) before a connection is opened, so a rejected name never
reaches a server. Passwords arrive opened from `{"$secret": …}`; they are bound as
SQL parameters or hashed for Redis and never appear in logs, outputs or errors.
"""

from __future__ import annotations

import asyncio
from typing import Any

from engines.base import CommandContext, CommandSpec, parse_payload
from engines.db import mariadb, redis
from engines.db.config import DbSettings


class DbEngine:
    """Built from `DbSettings.from_env()` unless given settings (tests, embedding)."""

    name = "db"

    def __init__(self, settings: DbSettings | None = None) -> None:
        self.settings = settings if settings is not None else DbSettings.from_env()
        self._mariadb = mariadb.MariaDbAdmin(self.settings)
        self._redis = redis.RedisAcl(self.settings)
        # Commands check an account and then change it; one at a time per server keeps
        # two commands for the same name from interleaving between check and change.
        self._mariadb_lock = asyncio.Lock()
        self._redis_lock = asyncio.Lock()

    def commands(self) -> dict[str, CommandSpec]:
        return {
            "db.mariadb.database.create": CommandSpec(
                self.mariadb_database_create,
                idempotent=True,
                description="Create a MariaDB database (utf8mb4) if it does not exist.",
            ),
            "db.mariadb.database.drop": CommandSpec(
                self.mariadb_database_drop,
                idempotent=True,
                description="Drop a MariaDB database and revoke its grants; "
                "'confirm' must repeat the name.",
            ),
            "db.mariadb.user.create": CommandSpec(
                self.mariadb_user_create,
                idempotent=True,
                description="Create a MariaDB user with ALL PRIVILEGES on one database only.",
            ),
            "db.mariadb.user.password": CommandSpec(
                self.mariadb_user_password,
                idempotent=True,
                description="Set a new password for a MariaDB user.",
            ),
            "db.mariadb.user.drop": CommandSpec(
                self.mariadb_user_drop,
                idempotent=True,
                description="Drop a MariaDB user on every configured host.",
            ),
            "db.redis.user.create": CommandSpec(
                self.redis_user_create,
                idempotent=True,
                description="Create a Redis ACL user limited to one key prefix.",
            ),
            "db.redis.user.password": CommandSpec(
                self.redis_user_password,
                idempotent=True,
                description="Replace a Redis user's password.",
            ),
            "db.redis.user.drop": CommandSpec(
                self.redis_user_drop,
                idempotent=True,
                description="Delete a Redis ACL user and close its connections.",
            ),
        }

    async def mariadb_database_create(
        self, ctx: CommandContext, payload: dict[str, Any]
    ) -> dict[str, Any]:
        p = parse_payload(mariadb.DatabaseCreate, payload)
        async with self._mariadb_lock:
            return await self._mariadb.create_database(p)

    async def mariadb_database_drop(
        self, ctx: CommandContext, payload: dict[str, Any]
    ) -> dict[str, Any]:
        p = parse_payload(mariadb.DatabaseDrop, payload)
        async with self._mariadb_lock:
            return await self._mariadb.drop_database(p)

    async def mariadb_user_create(
        self, ctx: CommandContext, payload: dict[str, Any]
    ) -> dict[str, Any]:
        p = parse_payload(mariadb.UserCreate, payload)
        async with self._mariadb_lock:
            return await self._mariadb.create_user(p)

    async def mariadb_user_password(
        self, ctx: CommandContext, payload: dict[str, Any]
    ) -> dict[str, Any]:
        p = parse_payload(mariadb.UserPassword, payload)
        async with self._mariadb_lock:
            return await self._mariadb.set_password(p)

    async def mariadb_user_drop(
        self, ctx: CommandContext, payload: dict[str, Any]
    ) -> dict[str, Any]:
        p = parse_payload(mariadb.UserDrop, payload)
        async with self._mariadb_lock:
            return await self._mariadb.drop_user(p)

    async def redis_user_create(
        self, ctx: CommandContext, payload: dict[str, Any]
    ) -> dict[str, Any]:
        p = parse_payload(redis.RedisUserCreate, payload)
        async with self._redis_lock:
            return await self._redis.create_user(p)

    async def redis_user_password(
        self, ctx: CommandContext, payload: dict[str, Any]
    ) -> dict[str, Any]:
        p = parse_payload(redis.RedisUserPassword, payload)
        async with self._redis_lock:
            return await self._redis.set_password(p)

    async def redis_user_drop(self, ctx: CommandContext, payload: dict[str, Any]) -> dict[str, Any]:
        p = parse_payload(redis.RedisUserDrop, payload)
        async with self._redis_lock:
            return await self._redis.drop_user(p)
