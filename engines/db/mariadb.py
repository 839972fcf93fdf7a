"""Tenant databases and accounts on the node's MariaDB (or MySQL), through PyMySQL.

Every name is checked against `yakpanel.identifiers` before any SQL is built; names
are then quoted (backticks for schemas, PyMySQL string literals for `'user'@'host'`)
and passwords always travel as bound parameters. A tenant account receives
`ALL PRIVILEGES` on its own schema only, with `_` escaped in the GRANT: unescaped,
`_` is a wildcard there and a grant on `shop_1` would also open `shopx1`.

An account name is global to the server while tenants are not, so commands refuse to
touch an account that holds anything beyond `USAGE` and its own schema: one tenant
cannot reset another tenant's (or the operator's) account by choosing the same name.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Iterable
from typing import Annotated, Any, TypeVar

import pymysql

from engines.base import EngineError
from engines.db.config import DbSettings
from engines.db.payloads import Password, Payload, checked
from yakpanel import identifiers

log = logging.getLogger(__name__)

Cursor = pymysql.cursors.Cursor
T = TypeVar("T")

# Client-side (2xxx) errors and these server errors mean "try again later".
_RETRYABLE_SERVER_ERRORS = frozenset({1040, 1053, 1205, 1213, 1290})


DatabaseName = Annotated[str, checked(identifiers.mariadb_database, "name")]
UserDatabase = Annotated[str, checked(identifiers.mariadb_database, "database")]
UserName = Annotated[str, checked(identifiers.mariadb_user, "user")]


class DatabaseCreate(Payload):
    name: DatabaseName


class DatabaseDrop(Payload):
    name: DatabaseName
    confirm: str | None = None


class UserCreate(Payload):
    user: UserName
    password: Password
    database: UserDatabase


class UserPassword(Payload):
    user: UserName
    password: Password


class UserDrop(Payload):
    user: UserName


def grant_pattern(database: str) -> str:
    """`shop\\_1`: a validated schema name as GRANT and `mysql.db` spell it, `_` escaped."""
    return database.replace("_", "\\_")


def grant_target(database: str) -> str:
    """`\\`shop\\_1\\`.*`, the object of GRANT/REVOKE for a whole schema."""
    return f"`{grant_pattern(database)}`.*"


def native_password_hash(password: str) -> str:
    """`*` + SHA1(SHA1(password)) in upper-case hex: what mysql_native_password stores."""
    inner = hashlib.sha1(password.encode()).digest()  # noqa: S324 - the plugin's format
    return "*" + hashlib.sha1(inner).hexdigest().upper()  # noqa: S324


def _redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
            text = text.replace(pymysql.converters.escape_string(secret), "***")
    return text


class MariaDbAdmin:
    """One short admin connection per command, run in a worker thread (PyMySQL blocks)."""

    def __init__(self, settings: DbSettings) -> None:
        self._settings = settings

    # --- commands ---------------------------------------------------------------------

    async def create_database(self, p: DatabaseCreate) -> dict[str, Any]:
        def run(cur: Cursor) -> dict[str, Any]:
            existed = _schema_exists(cur, p.name)
            if not existed:
                cur.execute(
                    f"CREATE DATABASE IF NOT EXISTS `{p.name}` "
                    "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
                )
                log.info("mariadb database created", extra={"database": p.name})
            return {"name": p.name, "created": not existed}

        return await self._run(run)

    async def drop_database(self, p: DatabaseDrop) -> dict[str, Any]:
        if p.confirm != p.name:
            raise EngineError(
                "confirmation_required",
                f"dropping database {p.name!r} deletes all its data: repeat its name in "
                "'confirm' to go ahead",
            )

        def run(cur: Cursor) -> dict[str, Any]:
            target = grant_target(p.name)
            # A grant outlives its schema; left behind, it would open a later schema of
            # the same name (another tenant's) to this one's accounts.
            cur.execute("SELECT User, Host FROM mysql.db WHERE Db = %s", (grant_pattern(p.name),))
            revoked = []
            for user, host in cur.fetchall():
                cur.execute(f"REVOKE ALL PRIVILEGES ON {target} FROM %s@%s", (user, host))
                revoked.append(f"{user}@{host}")
            existed = _schema_exists(cur, p.name)
            cur.execute(f"DROP DATABASE IF EXISTS `{p.name}`")
            log.info(
                "mariadb database dropped",
                extra={"database": p.name, "existed": existed, "revoked": revoked},
            )
            return {"name": p.name, "dropped": existed, "revoked": sorted(revoked)}

        return await self._run(run)

    async def create_user(self, p: UserCreate) -> dict[str, Any]:
        hosts = self._settings.mariadb_user_hosts
        identified, secret = self._identified_by(p.password)

        def run(cur: Cursor) -> dict[str, Any]:
            if not _schema_exists(cur, p.database):
                raise EngineError(
                    "database_missing",
                    f"database {p.database!r} does not exist: create it with "
                    "db.mariadb.database.create first",
                    # Retryable: the database may be on its way (its own workflow).
                    retryable=True,
                )
            existing = _existing_hosts(cur, p.user)
            for host in hosts:
                if host in existing:
                    _require_managed(cur, p.user, host, own_database=p.database)
            created = []
            for host in hosts:
                if host not in existing:
                    cur.execute(
                        f"CREATE USER IF NOT EXISTS %s@%s {identified}", (p.user, host, secret)
                    )
                    created.append(host)
                else:
                    cur.execute(f"ALTER USER %s@%s {identified}", (p.user, host, secret))
                cur.execute(
                    f"GRANT ALL PRIVILEGES ON {grant_target(p.database)} TO %s@%s",
                    (p.user, host),
                )
            log.info(
                "mariadb user granted its database",
                extra={"db_user": p.user, "database": p.database, "hosts": list(hosts)},
            )
            return {
                "user": p.user,
                "database": p.database,
                "hosts": list(hosts),
                "created": bool(created),
            }

        return await self._run(run, secrets=(p.password, secret))

    async def set_password(self, p: UserPassword) -> dict[str, Any]:
        identified, secret = self._identified_by(p.password)

        def run(cur: Cursor) -> dict[str, Any]:
            existing = _existing_hosts(cur, p.user)
            if not existing:
                raise EngineError(
                    "user_missing",
                    f"user {p.user!r} does not exist: create it with db.mariadb.user.create",
                )
            for host in sorted(existing):
                _require_managed(cur, p.user, host, own_database=None)
            for host in sorted(existing):
                cur.execute(f"ALTER USER %s@%s {identified}", (p.user, host, secret))
            log.info("mariadb user password changed", extra={"db_user": p.user})
            return {"user": p.user, "hosts": sorted(existing)}

        return await self._run(run, secrets=(p.password, secret))

    async def drop_user(self, p: UserDrop) -> dict[str, Any]:
        def run(cur: Cursor) -> dict[str, Any]:
            existing = _existing_hosts(cur, p.user)
            for host in sorted(existing):
                _require_managed(cur, p.user, host, own_database=None)
            for host in sorted(existing):
                cur.execute("DROP USER IF EXISTS %s@%s", (p.user, host))
            log.info("mariadb user dropped", extra={"db_user": p.user, "hosts": sorted(existing)})
            return {"user": p.user, "dropped": bool(existing)}

        return await self._run(run)

    # --- plumbing ---------------------------------------------------------------------

    def _identified_by(self, password: str) -> tuple[str, str]:
        """The IDENTIFIED clause and the value bound into it.

        MariaDB writes `IDENTIFIED BY '<password>'` verbatim into its general query log
        (and shows it in the process list); sending the stored hash instead keeps the
        password itself off the server.
        """
        if self._settings.mariadb_password_hash:
            return "IDENTIFIED BY PASSWORD %s", native_password_hash(password)
        return "IDENTIFIED BY %s", password

    def _connect(self) -> pymysql.connections.Connection[Cursor]:
        s = self._settings
        common: dict[str, Any] = {
            "user": s.mariadb_admin_user,
            "password": s.mariadb_admin_password or "",
            "connect_timeout": s.mariadb_connect_timeout,
            "read_timeout": 60,
            "write_timeout": 60,
            "autocommit": True,
            "charset": "utf8mb4",
        }
        if s.mariadb_socket is not None:
            return pymysql.connect(unix_socket=str(s.mariadb_socket), **common)
        return pymysql.connect(host=s.mariadb_host, port=s.mariadb_port, **common)

    async def _run(self, work: Callable[[Cursor], T], secrets: tuple[str, ...] = ()) -> T:
        def in_thread() -> T:
            with self._connect() as conn, conn.cursor() as cur:
                return work(cur)

        try:
            return await asyncio.to_thread(in_thread)
        except pymysql.err.MySQLError as exc:
            raise self._engine_error(exc, secrets) from None

    def _engine_error(self, exc: pymysql.err.MySQLError, secrets: tuple[str, ...]) -> EngineError:
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
        detail = str(exc.args[1]) if len(exc.args) > 1 else type(exc).__name__
        # Statements carrying a password may be echoed back ("near '...'"): keep only the
        # error number then, and redact anyway in case a message quotes one elsewhere.
        detail = _redact(detail, secrets)
        if secrets and code == 1064:
            detail = "SQL syntax error"
        s = self._settings
        where = (
            f"socket {s.mariadb_socket}"
            if s.mariadb_socket is not None
            else f"{s.mariadb_host}:{s.mariadb_port}"
        )
        if code >= 2000 or code in _RETRYABLE_SERVER_ERRORS:
            return EngineError(
                "mariadb_unavailable",
                f"MariaDB at {where} is not reachable or busy (error {code}: {detail}); "
                "the command can be retried once the server is up",
                retryable=True,
            )
        if code in (1044, 1045, 1227):
            return EngineError(
                "mariadb_admin_denied",
                f"MariaDB at {where} refused the admin account {s.mariadb_admin_user!r} "
                f"(error {code}: {detail}); check YAKPANEL_DB_MARIADB_ADMIN_USER and "
                "YAKPANEL_DB_MARIADB_ADMIN_PASSWORD",
            )
        return EngineError("mariadb_error", f"MariaDB error {code}: {detail}")


def _schema_exists(cur: Cursor, name: str) -> bool:
    cur.execute("SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", (name,))
    return cur.fetchone() is not None


def _existing_hosts(cur: Cursor, user: str) -> set[str]:
    cur.execute("SELECT Host FROM mysql.user WHERE User = %s", (user,))
    return {str(row[0]) for row in cur.fetchall()}


def _require_managed(cur: Cursor, user: str, host: str, own_database: str | None) -> None:
    """Refuse accounts that hold more than USAGE plus database-level grants.

    With `own_database`, the only database grant accepted is ALL on that database:
    the account then already is what `user.create` would make of it.
    """
    cur.execute("SHOW GRANTS FOR %s@%s", (user, host))
    grantee = f" TO `{user}`@`{host}`"
    allowed_db = f"GRANT ALL PRIVILEGES ON {grant_target(own_database)}" if own_database else None
    for (line,) in cur.fetchall():
        text = str(line)
        if text.startswith("GRANT USAGE ON *.*" + grantee):
            continue
        if allowed_db is not None:
            if text == allowed_db + grantee:
                continue
        elif " ON `" in text and " ON *.*" not in text and not text.startswith("GRANT PROXY"):
            continue
        raise EngineError(
            "user_conflict",
            f"MariaDB account {user!r}@{host!r} already exists with other privileges "
            "(another database, global rights or a role); it is not managed by this "
            "command: choose another user name",
        )
