"""Where the `db` engine finds the node's MariaDB and Redis, and as whom it acts.

Read once when the engine is built (`DbSettings.from_env()`), from `YAKPANEL_DB_<FIELD>`
variables: `YAKPANEL_DB_MARIADB_SOCKET=/run/mysqld/mysqld.sock`,
`YAKPANEL_DB_MARIADB_USER_HOSTS='["localhost", "127.0.0.1"]'` (tuples as JSON lists),
an empty value for an optional field means "not set".
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "YAKPANEL_DB_"

# Account hosts are operator configuration, but they still end up in `'user'@'host'`.
_HOST = re.compile(r"[A-Za-z0-9.:%_-]{1,255}", re.ASCII)


class DbSettingsError(ValueError):
    """A `YAKPANEL_DB_*` value cannot be used; the message names the variable."""


@dataclass(frozen=True)
class DbSettings:
    """Admin connections to the node's database servers.

    MariaDB: `mariadb_socket` wins over host/port when set (the Debian default lets
    root in over the socket without a password). Tenant accounts are created once per
    entry of `mariadb_user_hosts` (`localhost` is the socket and, with name resolution,
    loopback TCP; add `%` only when applications connect from other machines).

    `mariadb_password_hash` sends the mysql_native_password hash rather than the
    password, so the password never reaches the server's query logs; turn it off for
    servers whose accounts use another plugin (MySQL 8's caching_sha2_password).

    Redis: `redis_socket` wins over host/port; the admin user needs `+@admin` (ACL).
    `redis_persist_acl` saves users with `ACL SAVE` (aclfile) or `CONFIG REWRITE`
    after each change, so they survive a Redis restart.
    """

    mariadb_socket: Path | None = Path("/run/mysqld/mysqld.sock")
    mariadb_host: str = "127.0.0.1"
    mariadb_port: int = 3306
    mariadb_admin_user: str = "root"
    mariadb_admin_password: str | None = field(default=None, repr=False)
    mariadb_user_hosts: tuple[str, ...] = ("localhost", "127.0.0.1")
    mariadb_connect_timeout: float = 5.0
    mariadb_password_hash: bool = True
    redis_socket: Path | None = None
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    redis_admin_user: str | None = None
    redis_admin_password: str | None = field(default=None, repr=False)
    redis_connect_timeout: float = 5.0
    redis_persist_acl: bool = True

    def __post_init__(self) -> None:
        if not self.mariadb_user_hosts:
            raise DbSettingsError("mariadb_user_hosts needs at least one host")
        for host in self.mariadb_user_hosts:
            if not isinstance(host, str) or not _HOST.fullmatch(host):
                raise DbSettingsError(
                    "mariadb_user_hosts: each host must be a host name, an IP address or a "
                    "MariaDB host pattern of letters, digits and . : % _ -"
                )
        for name in ("mariadb_port", "redis_port"):
            port = getattr(self, name)
            if not 1 <= port <= 65535:
                raise DbSettingsError(f"{name} must be a TCP port (1-65535)")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DbSettings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = ENV_PREFIX + f.name.upper()
            raw = env.get(key)
            if raw is None:
                continue
            values[f.name] = _parse(key, f.name, raw)
        return cls(**values)


_OPTIONAL = {
    "mariadb_socket",
    "mariadb_admin_password",
    "redis_socket",
    "redis_admin_user",
    "redis_admin_password",
}
_PATHS = {"mariadb_socket", "redis_socket"}
_INTS = {"mariadb_port", "redis_port"}
_FLOATS = {"mariadb_connect_timeout", "redis_connect_timeout"}
_BOOLS = {"redis_persist_acl", "mariadb_password_hash"}
_TUPLES = {"mariadb_user_hosts"}


def _parse(key: str, name: str, raw: str) -> Any:
    if name in _OPTIONAL and raw == "":
        return None
    if name in _PATHS:
        path = Path(raw)
        if not path.is_absolute():
            raise DbSettingsError(f"{key} must be an absolute path")
        return path
    if name in _INTS:
        try:
            return int(raw)
        except ValueError:
            raise DbSettingsError(f"{key} must be an integer") from None
    if name in _FLOATS:
        try:
            return float(raw)
        except ValueError:
            raise DbSettingsError(f"{key} must be a number of seconds") from None
    if name in _BOOLS:
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise DbSettingsError(f"{key} must be true or false")
    if name in _TUPLES:
        try:
            items = json.loads(raw)
        except json.JSONDecodeError:
            raise DbSettingsError(
                f'{key} must be a JSON list of strings, e.g. ["localhost"]'
            ) from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise DbSettingsError(f'{key} must be a JSON list of strings, e.g. ["localhost"]')
        return tuple(items)
    return raw
