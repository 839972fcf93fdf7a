"""Strict grammars for names that end up inside SQL, Redis ACL rules and FTP user lists.

Database, user and key-prefix names cannot be bound as parameters (SQL has no
placeholder for an identifier), so they are checked here against a grammar narrow
enough that quoting can never be escaped: ASCII lowercase letters, digits and a few
separators, nothing else. Unicode look-alikes, quotes, backticks, `;`, `%`, whitespace
and newlines are refused instead of being normalised, so what the user typed is exactly
what gets created. Messages name the field and the rule but never echo the value,
which may have been a password pasted into the wrong box.
"""

from __future__ import annotations

import re
import secrets

__all__ = [
    "InvalidIdentifier",
    "ftp_user",
    "generate_password",
    "mariadb_database",
    "mariadb_user",
    "password",
    "redis_key_prefix",
    "redis_user",
]

_MARIADB_RULE = (
    "must be 1-32 characters: a lowercase ASCII letter followed by lowercase letters, digits or '_'"
)
_MARIADB_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}", re.ASCII)
_REDIS_USER = re.compile(r"[a-z][a-z0-9_-]{0,63}", re.ASCII)
_REDIS_PREFIX = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}:", re.ASCII)
_FTP_USER = re.compile(r"[a-z][a-z0-9_.-]{2,31}", re.ASCII)
_PASSWORD = re.compile(r"[\x21-\x7e]{12,128}", re.ASCII)

# System schemas and accounts a tenant must never own or impersonate. `test` and
# `test_*` are on the list because a stock MariaDB grants every (even anonymous)
# user access to databases matching `test\_%`.
_MARIADB_RESERVED_DATABASES = frozenset(
    {"mysql", "information_schema", "performance_schema", "sys", "test", "phpmyadmin"}
)
_MARIADB_RESERVED_USERS = frozenset(
    {
        "root",
        "mysql",
        "mariadb",
        "mariadb_sys",
        "mysql_sys",
        "mysql_session",
        "mysql_infoschema",
        "debian_sys_maint",
        "admin",
        "public",
        "none",
        "current_user",
        "current_role",
        "test",
    }
)
_REDIS_RESERVED_USERS = frozenset({"default"})


class InvalidIdentifier(ValueError):
    """A name or password broke its grammar; the message names the field and the rule."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


def _require_str(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise InvalidIdentifier(field, "must be a string")
    return value


def _matching(value: object, field: str, grammar: re.Pattern[str], rule: str) -> str:
    """The value when the whole of it matches `grammar`; otherwise the rule, not the value."""
    text = _require_str(value, field)
    if not grammar.fullmatch(text):
        raise InvalidIdentifier(field, rule)
    return text


def mariadb_database(value: object, *, field: str = "database") -> str:
    """A MariaDB schema name a tenant may own."""
    text = _matching(
        value,
        field,
        _MARIADB_NAME,
        _MARIADB_RULE,
    )
    if text in _MARIADB_RESERVED_DATABASES or text.startswith("test_"):
        raise InvalidIdentifier(field, "is a reserved system name; choose another name")
    return text


def mariadb_user(value: object, *, field: str = "user") -> str:
    """A MariaDB account name (the part before `@host`)."""
    text = _matching(
        value,
        field,
        _MARIADB_NAME,
        _MARIADB_RULE,
    )
    if text in _MARIADB_RESERVED_USERS:
        raise InvalidIdentifier(field, "is a reserved system account name; choose another name")
    return text


def redis_user(value: object, *, field: str = "user") -> str:
    """A Redis ACL user name; `default` belongs to the server."""
    text = _matching(
        value,
        field,
        _REDIS_USER,
        "must be 1-64 characters: a lowercase ASCII letter followed by lowercase "
        "letters, digits, '_' or '-'",
    )
    if text in _REDIS_RESERVED_USERS:
        raise InvalidIdentifier(field, "'default' is the server's built-in user; choose another")
    return text


def redis_key_prefix(value: object, *, field: str = "prefix") -> str:
    """A key prefix such as `shop42:`; the trailing colon keeps `a:` from matching `ab:`."""
    text = _matching(
        value,
        field,
        _REDIS_PREFIX,
        "must be 2-64 characters of lowercase ASCII letters, digits, '_', '.' or '-' "
        "(starting with a letter or digit) and end with ':'; glob characters are not "
        "allowed",
    )
    return text


def ftp_user(value: object, *, field: str = "username") -> str:
    """A pure-ftpd virtual user name."""
    text = _matching(
        value,
        field,
        _FTP_USER,
        "must be 3-32 characters: a lowercase ASCII letter followed by lowercase "
        "letters, digits, '_', '.' or '-'",
    )
    if ".." in text or text.endswith((".", "-")):
        raise InvalidIdentifier(field, "may not hold '..' or end with '.' or '-'")
    return text


def password(value: object, *, field: str = "password") -> str:
    """A user-supplied password: 12-128 printable ASCII characters, no whitespace."""
    text = _matching(
        value,
        field,
        _PASSWORD,
        "must be 12-128 printable ASCII characters without spaces or control characters",
    )
    return text


def generate_password() -> str:
    """32 URL-safe random characters (192 bits), valid for every grammar above."""
    return secrets.token_urlsafe(24)
