"""The `db` engine against a private real MariaDB: tenants reach their own database only."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pymysql
import pytest

from engines.base import CommandContext, EngineError, EngineRegistry, load_engine
from engines.db import DbEngine, DbSettings, DbSettingsError
from engines.db.mariadb import MariaDbAdmin, native_password_hash
from tests.support.mariadb import MariaDBServer, MariaDBUnavailable
from yakpanel.clock import ManualClock
from yakpanel.embedded import free_port

pytestmark = pytest.mark.mariadb

ODD_PASSWORD = "Pa'ss\"w`o;r%d\\-Z9"  # every quoting hazard a password may legally carry


@pytest.fixture(scope="module")
def mariadb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDBServer]:
    srv = MariaDBServer(tmp_path_factory.mktemp("mariadb"))
    try:
        srv.start()
    except MariaDBUnavailable as exc:
        pytest.fail(f"the private MariaDB did not start: {exc}", pytrace=False)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def engine(mariadb_server: MariaDBServer) -> DbEngine:
    return DbEngine(
        DbSettings(
            mariadb_socket=mariadb_server.socket, mariadb_user_hosts=("localhost", "127.0.0.1")
        )
    )


def ctx() -> CommandContext:
    clock = ManualClock()

    async def report(percent: int, message: str) -> None:
        return None

    return CommandContext(
        command_id="cmd-1",
        idempotency_key="key-1",
        deadline=clock.now() + timedelta(minutes=5),
        clock=clock,
        report=report,
    )


async def run(engine: DbEngine, command_type: str, payload: dict[str, Any]) -> dict[str, Any]:
    return await engine.commands()[command_type].handler(ctx(), payload)


def name(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def connect(
    mariadb_server: MariaDBServer,
    user: str,
    password: str,
    *,
    tcp: bool,
    database: str | None = None,
) -> pymysql.connections.Connection[pymysql.cursors.Cursor]:
    where: dict[str, Any] = (
        {"host": mariadb_server.host, "port": mariadb_server.port}
        if tcp
        else {"unix_socket": str(mariadb_server.socket)}
    )
    return pymysql.connect(
        user=user, password=password, database=database, autocommit=True, **where
    )


def refused(exc: BaseException) -> bool:
    return isinstance(exc, pymysql.err.OperationalError) and exc.args[0] in (1044, 1045, 1142)


def admin_query(mariadb_server: MariaDBServer, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
    with mariadb_server.admin_connect() as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return list(cur.fetchall())


def server_state(mariadb_server: MariaDBServer) -> tuple[Any, ...]:
    return (
        admin_query(mariadb_server, "SHOW DATABASES"),
        admin_query(mariadb_server, "SELECT User, Host FROM mysql.user ORDER BY User, Host"),
        admin_query(mariadb_server, "SELECT Db, User, Host FROM mysql.db ORDER BY Db, User, Host"),
    )


async def tenant(engine: DbEngine, password: str = ODD_PASSWORD) -> tuple[str, str]:
    db, user = name("db"), name("u")
    await run(engine, "db.mariadb.database.create", {"name": db})
    await run(
        engine, "db.mariadb.user.create", {"user": user, "password": password, "database": db}
    )
    return db, user


@pytest.mark.parametrize("tcp", [True, False], ids=["tcp", "socket"])
async def test_user_works_in_its_own_database_and_sees_nothing_else(
    engine: DbEngine, mariadb_server: MariaDBServer, tcp: bool
) -> None:
    db, user = await tenant(engine)
    other_db, _ = await tenant(engine, password="other-tenant-pw-1")

    with (
        connect(mariadb_server, user, ODD_PASSWORD, tcp=tcp, database=db) as conn,
        conn.cursor() as cur,
    ):
        cur.execute("CREATE TABLE posts (id INT PRIMARY KEY, title VARCHAR(50))")
        cur.execute("INSERT INTO posts VALUES (%s, %s)", (1, "hello"))
        cur.execute("SELECT title FROM posts WHERE id = 1")
        assert cur.fetchone() == ("hello",)
        cur.execute("SHOW DATABASES")
        assert {row[0] for row in cur.fetchall()} == {db, "information_schema"}
        for forbidden in (other_db, "mysql"):
            with pytest.raises(pymysql.err.OperationalError) as err:
                cur.execute(f"USE `{forbidden}`")
            assert refused(err.value)
        with pytest.raises(pymysql.err.MySQLError) as err2:
            cur.execute(f"CREATE TABLE `{other_db}`.sneaky (id INT)")
        assert refused(err2.value)
        with pytest.raises(pymysql.err.MySQLError):
            cur.execute("CREATE DATABASE sneaky_new")
        with pytest.raises(pymysql.err.MySQLError):
            cur.execute("SELECT User FROM mysql.user")

    with pytest.raises(pymysql.err.OperationalError) as err3:
        connect(mariadb_server, user, ODD_PASSWORD, tcp=tcp, database=other_db)
    assert refused(err3.value)


async def test_underscore_in_database_name_is_not_a_grant_wildcard(
    engine: DbEngine, mariadb_server: MariaDBServer
) -> None:
    stem = uuid.uuid4().hex[:8]
    mine, lookalike = f"s{stem}_a", f"s{stem}xa"  # `_` would match the `x` as a wildcard
    user = name("u")
    await run(engine, "db.mariadb.database.create", {"name": mine})
    await run(engine, "db.mariadb.database.create", {"name": lookalike})
    await run(
        engine,
        "db.mariadb.user.create",
        {"user": user, "password": ODD_PASSWORD, "database": mine},
    )
    with connect(mariadb_server, user, ODD_PASSWORD, tcp=True) as conn, conn.cursor() as cur:
        cur.execute(f"USE `{mine}`")
        with pytest.raises(pymysql.err.OperationalError) as err:
            cur.execute(f"USE `{lookalike}`")
        assert refused(err.value)


async def test_password_rotation_refuses_the_old_password(
    engine: DbEngine, mariadb_server: MariaDBServer
) -> None:
    db, user = await tenant(engine)
    new_password = "n3w-Password-'quoted'"
    out = await run(engine, "db.mariadb.user.password", {"user": user, "password": new_password})
    assert out == {"user": user, "hosts": ["127.0.0.1", "localhost"]}
    for tcp in (True, False):
        with pytest.raises(pymysql.err.OperationalError) as err:
            connect(mariadb_server, user, ODD_PASSWORD, tcp=tcp, database=db)
        assert err.value.args[0] == 1045
        with connect(mariadb_server, user, new_password, tcp=tcp, database=db) as conn:
            conn.ping()
    # Rotation keeps the privileges.
    with (
        connect(mariadb_server, user, new_password, tcp=True, database=db) as conn,
        conn.cursor() as cur,
    ):
        cur.execute("CREATE TABLE t (id INT)")

    with pytest.raises(EngineError) as missing:
        await run(engine, "db.mariadb.user.password", {"user": name("u"), "password": new_password})
    assert missing.value.code == "user_missing"


async def test_drop_needs_the_name_repeated_and_then_drops_and_revokes(
    engine: DbEngine, mariadb_server: MariaDBServer
) -> None:
    db, user = await tenant(engine)
    with (
        connect(mariadb_server, user, ODD_PASSWORD, tcp=True, database=db) as conn,
        conn.cursor() as cur,
    ):
        cur.execute("CREATE TABLE keep (id INT)")
        cur.execute("INSERT INTO keep VALUES (7)")

    for payload in ({"name": db}, {"name": db, "confirm": db + "x"}, {"name": db, "confirm": ""}):
        with pytest.raises(EngineError) as err:
            await run(engine, "db.mariadb.database.drop", payload)
        assert err.value.code == "confirmation_required"
        assert err.value.retryable is False
    assert admin_query(mariadb_server, f"SELECT id FROM `{db}`.keep") == [(7,)]

    out = await run(engine, "db.mariadb.database.drop", {"name": db, "confirm": db})
    assert out["dropped"] is True
    assert sorted(out["revoked"]) == [f"{user}@127.0.0.1", f"{user}@localhost"]
    assert admin_query(mariadb_server, "SHOW DATABASES LIKE %s", (db,)) == []
    assert admin_query(mariadb_server, "SELECT User FROM mysql.db WHERE User = %s", (user,)) == []

    # A later database of the same name (another tenant's) is not opened to the old user.
    await run(engine, "db.mariadb.database.create", {"name": db})
    with pytest.raises(pymysql.err.OperationalError) as err2:
        connect(mariadb_server, user, ODD_PASSWORD, tcp=True, database=db)
    assert refused(err2.value)

    again = await run(engine, "db.mariadb.database.drop", {"name": db, "confirm": db})
    assert again["dropped"] is True
    gone = await run(engine, "db.mariadb.database.drop", {"name": db, "confirm": db})
    assert gone == {"name": db, "dropped": False, "revoked": []}


async def test_create_commands_are_idempotent(
    engine: DbEngine, mariadb_server: MariaDBServer
) -> None:
    db, user = name("db"), name("u")
    first = await run(engine, "db.mariadb.database.create", {"name": db})
    second = await run(engine, "db.mariadb.database.create", {"name": db})
    assert (first["created"], second["created"]) == (True, False)
    payload = {"user": user, "password": ODD_PASSWORD, "database": db}
    created = await run(engine, "db.mariadb.user.create", payload)
    repeated = await run(engine, "db.mariadb.user.create", payload)
    assert (created["created"], repeated["created"]) == (True, False)
    assert repeated["hosts"] == ["localhost", "127.0.0.1"]
    with connect(mariadb_server, user, ODD_PASSWORD, tcp=True, database=db) as conn:
        conn.ping()


async def test_an_existing_account_of_another_database_is_not_taken_over(
    engine: DbEngine, mariadb_server: MariaDBServer
) -> None:
    victim_db, victim = await tenant(engine)
    attacker_db = name("db")
    await run(engine, "db.mariadb.database.create", {"name": attacker_db})
    with pytest.raises(EngineError) as err:
        await run(
            engine,
            "db.mariadb.user.create",
            {"user": victim, "password": "attacker-chosen-pw", "database": attacker_db},
        )
    assert err.value.code == "user_conflict"
    # The victim's password and privileges are untouched.
    with connect(mariadb_server, victim, ODD_PASSWORD, tcp=True, database=victim_db) as conn:
        conn.ping()
    with pytest.raises(pymysql.err.OperationalError):
        connect(mariadb_server, victim, ODD_PASSWORD, tcp=True, database=attacker_db)


async def test_operator_accounts_are_not_managed(
    engine: DbEngine, mariadb_server: MariaDBServer
) -> None:
    operator = name("op")
    admin_query(
        mariadb_server, "CREATE USER %s@'localhost' IDENTIFIED BY 'operator-secret-1'", (operator,)
    )
    admin_query(mariadb_server, f"GRANT RELOAD ON *.* TO `{operator}`@`localhost`")
    for command, payload in (
        ("db.mariadb.user.password", {"user": operator, "password": "tenant-chosen-pw"}),
        ("db.mariadb.user.drop", {"user": operator}),
    ):
        with pytest.raises(EngineError) as err:
            await run(engine, command, payload)
        assert err.value.code == "user_conflict"
    with pymysql.connect(
        unix_socket=str(mariadb_server.socket), user=operator, password="operator-secret-1"
    ) as conn:
        conn.ping()


async def test_user_needs_an_existing_database(
    engine: DbEngine, mariadb_server: MariaDBServer
) -> None:
    user = name("u")
    with pytest.raises(EngineError) as err:
        await run(
            engine,
            "db.mariadb.user.create",
            {"user": user, "password": ODD_PASSWORD, "database": name("db")},
        )
    assert err.value.code == "database_missing"
    assert err.value.retryable  # its database may still be on its way
    assert admin_query(mariadb_server, "SELECT User FROM mysql.user WHERE User = %s", (user,)) == []


async def test_dropped_user_cannot_log_in(engine: DbEngine, mariadb_server: MariaDBServer) -> None:
    db, user = await tenant(engine)
    out = await run(engine, "db.mariadb.user.drop", {"user": user})
    assert out == {"user": user, "dropped": True}
    for tcp in (True, False):
        with pytest.raises(pymysql.err.OperationalError) as err:
            connect(mariadb_server, user, ODD_PASSWORD, tcp=tcp, database=db)
        assert err.value.args[0] == 1045
    assert await run(engine, "db.mariadb.user.drop", {"user": user}) == {
        "user": user,
        "dropped": False,
    }


INJECTED_NAMES = [
    "x`; DROP DATABASE mysql; --",
    "x'",
    'x"',
    "x;y",
    "x\n",
    "x\nGRANT",
    "x%",
    "x_%",
    "\u0455hop",  # Cyrillic look-alike of "shop"
    "\uff53hop",  # fullwidth s
    "..",
    "../x",
    "a" * 33,
    "",
    "mysql",
    "Shop",
]
RESERVED_DATABASES = ["information_schema", "performance_schema", "sys", "test", "test_x"]
RESERVED_USERS = ["root", "mariadb_sys", "debian_sys_maint"]


async def test_injection_corpus_is_refused_before_anything_runs(
    engine: DbEngine, mariadb_server: MariaDBServer
) -> None:
    db, user = await tenant(engine)
    before = server_state(mariadb_server)
    payloads: list[tuple[str, dict[str, Any]]] = []
    for bad in INJECTED_NAMES:
        payloads += [
            ("db.mariadb.database.create", {"name": bad}),
            ("db.mariadb.database.drop", {"name": bad, "confirm": bad}),
            (
                "db.mariadb.user.create",
                {"user": bad, "password": ODD_PASSWORD, "database": db},
            ),
            (
                "db.mariadb.user.create",
                {"user": name("u"), "password": ODD_PASSWORD, "database": bad},
            ),
            ("db.mariadb.user.password", {"user": bad, "password": ODD_PASSWORD}),
            ("db.mariadb.user.drop", {"user": bad}),
        ]
    for reserved in RESERVED_DATABASES:
        payloads += [
            ("db.mariadb.database.create", {"name": reserved}),
            ("db.mariadb.database.drop", {"name": reserved, "confirm": reserved}),
            (
                "db.mariadb.user.create",
                {"user": name("u"), "password": ODD_PASSWORD, "database": reserved},
            ),
        ]
    for reserved in RESERVED_USERS:
        payloads += [
            (
                "db.mariadb.user.create",
                {"user": reserved, "password": ODD_PASSWORD, "database": db},
            ),
            ("db.mariadb.user.password", {"user": reserved, "password": ODD_PASSWORD}),
            ("db.mariadb.user.drop", {"user": reserved}),
        ]
    payloads += [
        ("db.mariadb.user.password", {"user": user, "password": "short"}),
        ("db.mariadb.user.password", {"user": user, "password": "has space in it"}),
        ("db.mariadb.user.password", {"user": user, "password": "new\nline-password"}),
        ("db.mariadb.user.password", {"user": user, "password": 123456789012345}),
        ("db.mariadb.database.create", {"name": db, "charset": "latin1"}),
        ("db.mariadb.user.drop", {"user": user, "host": "%"}),
        ("db.mariadb.user.drop", {}),
    ]
    for command, payload in payloads:
        with pytest.raises(EngineError) as err:
            await run(engine, command, payload)
        assert err.value.code == "invalid_payload", (command, payload)
        assert err.value.retryable is False
    assert server_state(mariadb_server) == before
    with connect(mariadb_server, user, ODD_PASSWORD, tcp=True, database=db) as conn:
        conn.ping()


async def test_password_never_appears_in_logs_outputs_or_errors(
    engine: DbEngine,
    mariadb_server: MariaDBServer,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "Sekr3t-'quoted';`tick`"
    rotated = "R0tated-%s-%%-secret"
    db, user = name("db"), name("u")
    seen: list[str] = []
    # The server's own general query log records every statement as received.
    general_log = tmp_path / "general.log"
    admin_query(mariadb_server, "SET GLOBAL general_log_file = %s", (str(general_log),))
    admin_query(mariadb_server, "SET GLOBAL general_log = 1")
    seen.append(repr(await run(engine, "db.mariadb.database.create", {"name": db})))
    payload = {"user": user, "password": secret, "database": db}
    seen.append(repr(await run(engine, "db.mariadb.user.create", payload)))
    seen.append(repr(await run(engine, "db.mariadb.user.create", payload)))
    seen.append(
        repr(await run(engine, "db.mariadb.user.password", {"user": user, "password": rotated}))
    )
    failing: list[tuple[str, dict[str, Any]]] = [
        ("db.mariadb.user.create", {"user": name("u"), "password": secret, "database": "nope"}),
        ("db.mariadb.user.create", {"user": "x'", "password": secret, "database": db}),
        ("db.mariadb.user.create", {"user": user, "password": secret + " ", "database": db}),
        ("db.mariadb.user.password", {"user": name("u"), "password": rotated}),
        ("db.mariadb.user.create", {"user": user, "password": secret, "database": db, "x": 1}),
    ]
    for command, bad in failing:
        with pytest.raises(EngineError) as err:
            await run(engine, command, bad)
        seen += [err.value.message, str(err.value), repr(err.value.__cause__)]
    admin_query(mariadb_server, "SET GLOBAL general_log = 0")
    with connect(mariadb_server, user, rotated, tcp=True, database=db) as conn:
        conn.ping()  # the rotated password really is the one in force
    assert caplog.records, "the engine logs what it does"
    everything = caplog.text + "".join(str(r.__dict__) for r in caplog.records) + "".join(seen)
    server_log = general_log.read_text(errors="replace")
    assert f"'{user}'@'localhost'" in server_log  # the log did record the statements
    for pw in (secret, rotated, pymysql.converters.escape_string(secret)):
        assert pw not in everything
        assert pw not in server_log
    for pw in (secret, rotated):
        assert native_password_hash(pw) not in everything


async def test_plain_password_mode_for_servers_without_native_hashes(
    mariadb_server: MariaDBServer,
) -> None:
    plain = DbEngine(DbSettings(mariadb_socket=mariadb_server.socket, mariadb_password_hash=False))
    db, user = name("db"), name("u")
    await run(plain, "db.mariadb.database.create", {"name": db})
    await run(
        plain, "db.mariadb.user.create", {"user": user, "password": ODD_PASSWORD, "database": db}
    )
    with connect(mariadb_server, user, ODD_PASSWORD, tcp=False, database=db) as conn:
        conn.ping()
    await run(plain, "db.mariadb.user.password", {"user": user, "password": "plain-rotated-1"})
    with connect(mariadb_server, user, "plain-rotated-1", tcp=True, database=db) as conn:
        conn.ping()


async def test_unreachable_server_fails_retryable(tmp_path: Path) -> None:
    down = DbEngine(
        DbSettings(mariadb_socket=None, mariadb_port=free_port(), mariadb_connect_timeout=2.0)
    )
    with pytest.raises(EngineError) as err:
        await run(down, "db.mariadb.database.create", {"name": name("db")})
    assert err.value.code == "mariadb_unavailable"
    assert err.value.retryable is True


async def test_admin_over_tcp_works_too(mariadb_server: MariaDBServer) -> None:
    tcp_engine = DbEngine(
        DbSettings(
            mariadb_socket=None, mariadb_host=mariadb_server.host, mariadb_port=mariadb_server.port
        )
    )
    db = name("db")
    assert (await run(tcp_engine, "db.mariadb.database.create", {"name": db}))["created"] is True
    assert admin_query(mariadb_server, "SHOW DATABASES LIKE %s", (db,)) == [(db,)]


def test_settings_from_env() -> None:
    settings = DbSettings.from_env(
        {
            "YAKPANEL_DB_MARIADB_SOCKET": "",
            "YAKPANEL_DB_MARIADB_PORT": "3307",
            "YAKPANEL_DB_MARIADB_ADMIN_PASSWORD": "admin-secret",
            "YAKPANEL_DB_MARIADB_USER_HOSTS": '["localhost", "%"]',
            "YAKPANEL_DB_REDIS_PERSIST_ACL": "false",
        }
    )
    assert settings.mariadb_socket is None
    assert settings.mariadb_port == 3307
    assert settings.mariadb_user_hosts == ("localhost", "%")
    assert settings.redis_persist_acl is False
    assert "admin-secret" not in repr(settings)
    for bad in (
        {"YAKPANEL_DB_MARIADB_USER_HOSTS": '["local host"]'},
        {"YAKPANEL_DB_MARIADB_USER_HOSTS": '["x\'"]'},
        {"YAKPANEL_DB_MARIADB_PORT": "http"},
        {"YAKPANEL_DB_MARIADB_SOCKET": "relative.sock"},
    ):
        with pytest.raises(DbSettingsError):
            DbSettings.from_env(bad)


def test_server_error_messages_are_redacted_of_passwords() -> None:
    admin = MariaDbAdmin(DbSettings(mariadb_socket=None))
    secret = "Sekr3t-'quoted'-pw"
    escaped = pymysql.converters.escape_string(secret)
    for exc in (
        pymysql.err.ProgrammingError(1064, f"syntax error near '{escaped}' at line 1"),
        pymysql.err.OperationalError(1396, f"Operation ALTER USER failed for {secret}"),
        pymysql.err.OperationalError(2013, f"Lost connection while sending '{escaped}'"),
    ):
        err = admin._engine_error(exc, (secret,))
        assert secret not in err.message
        assert escaped not in err.message
        assert str(exc.args[0]) in err.message  # the error number stays for diagnosis


def test_engine_loads_from_its_import_string_with_every_command() -> None:
    registry = EngineRegistry([load_engine("engines.db:DbEngine")])
    assert registry.types() == sorted(
        [
            "db.mariadb.database.create",
            "db.mariadb.database.drop",
            "db.mariadb.user.create",
            "db.mariadb.user.password",
            "db.mariadb.user.drop",
            "db.redis.user.create",
            "db.redis.user.password",
            "db.redis.user.drop",
        ]
    )
    assert all(registry.get(t).idempotent for t in registry.types())  # type: ignore[union-attr]
