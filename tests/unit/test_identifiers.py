"""The grammars that stand between user input and SQL, Redis ACL rules and FTP users."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from yakpanel import identifiers
from yakpanel.identifiers import InvalidIdentifier

# Values an attacker or a confused user might send as a name; none may pass anywhere.
INJECTION_CORPUS = [
    "",
    "shop`; DROP DATABASE mysql; --",
    "shop'",
    'shop"',
    "shop;drop",
    "shop\n",
    "shop\nx",
    "sh op",
    "shop%",
    "shop_%",
    "sh*p",
    "shop\\",
    "shop\x00",
    "\u0455hop",  # Cyrillic dze, looks like Latin s
    "\uff53\uff48\uff4f\uff50",  # fullwidth "shop"
    "shöp",
    "..",
    "../etc",
    "Shop",
    "1shop",
    "_shop",
    "a" * 65,
]


@pytest.mark.parametrize(
    "check",
    [
        identifiers.mariadb_database,
        identifiers.mariadb_user,
        identifiers.redis_user,
        identifiers.redis_key_prefix,
        identifiers.ftp_user,
    ],
)
@pytest.mark.parametrize("value", INJECTION_CORPUS)
def test_injection_corpus_is_refused_by_every_name_grammar(
    check: Callable[[object], str], value: str
) -> None:
    with pytest.raises(InvalidIdentifier):
        check(value)


@pytest.mark.parametrize("value", ["shop", "a", "shop_1", "s" * 32, "wp_site42"])
def test_mariadb_names_accept_plain_lowercase_names(value: str) -> None:
    assert identifiers.mariadb_database(value) == value
    assert identifiers.mariadb_user(value) == value


@pytest.mark.parametrize(
    "value", ["mysql", "information_schema", "performance_schema", "sys", "test", "test_shop"]
)
def test_mariadb_system_schemas_and_test_wildcard_space_are_reserved(value: str) -> None:
    with pytest.raises(InvalidIdentifier, match="reserved"):
        identifiers.mariadb_database(value)


@pytest.mark.parametrize("value", ["root", "mysql", "mariadb_sys", "debian_sys_maint"])
def test_mariadb_system_accounts_are_reserved(value: str) -> None:
    with pytest.raises(InvalidIdentifier, match="reserved"):
        identifiers.mariadb_user(value)


def test_mariadb_names_stop_at_32_characters() -> None:
    with pytest.raises(InvalidIdentifier):
        identifiers.mariadb_database("s" * 33)
    with pytest.raises(InvalidIdentifier):
        identifiers.mariadb_user("s" * 33)


def test_redis_user_grammar_and_reserved_default() -> None:
    assert identifiers.redis_user("shop-42_cache") == "shop-42_cache"
    assert identifiers.redis_user("r" * 64) == "r" * 64
    with pytest.raises(InvalidIdentifier):
        identifiers.redis_user("r" * 65)
    with pytest.raises(InvalidIdentifier, match="built-in"):
        identifiers.redis_user("default")


@pytest.mark.parametrize("value", ["shop:", "42:", "shop.cache-1_a:"])
def test_redis_prefix_accepts_names_ending_in_colon(value: str) -> None:
    assert identifiers.redis_key_prefix(value) == value


@pytest.mark.parametrize("value", ["shop", "shop:*", "sh?p:", "sh[o]p:", ":", "-shop:", "Shop:"])
def test_redis_prefix_refuses_globs_and_missing_colon(value: str) -> None:
    with pytest.raises(InvalidIdentifier):
        identifiers.redis_key_prefix(value)


def test_ftp_user_grammar() -> None:
    assert identifiers.ftp_user("shop.ftp-1") == "shop.ftp-1"
    for bad in ["ab", "f" * 33, "1abc", "a..b.com", "shop.", "shop-"]:
        with pytest.raises(InvalidIdentifier):
            identifiers.ftp_user(bad)


@pytest.mark.parametrize("value", ["correct-horse-1", "P@ss'w\"o`r;d%\\12", "x" * 128, "!" * 12])
def test_password_accepts_printable_ascii_12_to_128(value: str) -> None:
    assert identifiers.password(value) == value


@pytest.mark.parametrize(
    "value",
    ["short-pw", "x" * 129, "with space 123", "tab\tinside123", "newline\n12345", "pässwörter123"],
)
def test_password_refuses_short_long_whitespace_and_non_ascii(value: str) -> None:
    with pytest.raises(InvalidIdentifier):
        identifiers.password(value)


def test_generated_passwords_are_valid_and_distinct() -> None:
    generated = {identifiers.generate_password() for _ in range(50)}
    assert len(generated) == 50
    for pw in generated:
        assert len(pw) == 32
        assert identifiers.password(pw) == pw


def test_errors_name_the_field_and_never_echo_the_value() -> None:
    secret = "hunter2 with spaces"
    with pytest.raises(InvalidIdentifier) as err:
        identifiers.password(secret, field="new_password")
    assert str(err.value).startswith("new_password:")
    assert err.value.field == "new_password"
    assert secret not in str(err.value)
    with pytest.raises(InvalidIdentifier) as err2:
        identifiers.mariadb_user("Robert'); DROP TABLE students;--")
    assert "DROP" not in str(err2.value)
    assert str(err2.value).startswith("user:")


def test_non_strings_are_refused() -> None:
    for value in (None, 42, b"shop", ["shop"]):
        with pytest.raises(InvalidIdentifier, match="must be a string"):
            identifiers.mariadb_database(value)
