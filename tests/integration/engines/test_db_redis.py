"""The `db` engine against a private real Redis: ACL users confined to their key prefix."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from redis import exceptions as redis_errors
from redis.backoff import NoBackoff
from redis.retry import Retry

from engines.base import CommandContext, EngineError
from engines.db import DbEngine, DbSettings
from tests.support.redis_server import RedisServer, RedisUnavailable
from yakpanel.clock import ManualClock
from yakpanel.embedded import free_port

pytestmark = pytest.mark.redis

PASSWORD = "tenant-Pa$$word-1'\""


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        srv.start()
    except RedisUnavailable as exc:
        pytest.fail(f"the private Redis did not start: {exc}", pytrace=False)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def engine(redis_server: RedisServer) -> DbEngine:
    return DbEngine(DbSettings(redis_host=redis_server.host, redis_port=redis_server.port))


@pytest.fixture
def admin(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(host=redis_server.host, port=redis_server.port, decode_responses=True)
    yield client
    client.close()


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


def as_user(redis_server: RedisServer, user: str, password: str) -> redis.Redis:
    client = redis.Redis(
        host=redis_server.host,
        port=redis_server.port,
        username=user,
        password=password,
        decode_responses=True,
        retry=Retry(NoBackoff(), 0),  # a refused password fails at once, not after backoff
    )
    client.ping()  # authenticates now, so a bad password fails here
    return client


def command_as(client: redis.Redis, *args: str) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def raw_connection(redis_server: RedisServer, user: str, password: str) -> redis.Connection:
    """One connection outside any pool, so a redis_server-side close is seen, not retried."""
    conn = redis.Connection(  # type: ignore[no-untyped-call]
        host=redis_server.host, port=redis_server.port, username=user, password=password
    )
    conn.connect()  # type: ignore[no-untyped-call]
    return conn


def raw_roundtrip(conn: redis.Connection, *args: str) -> Any:
    conn.send_command(*args)  # type: ignore[no-untyped-call]
    return conn.read_response()


async def tenant(engine: DbEngine, password: str = PASSWORD) -> tuple[str, str]:
    user, prefix = f"u-{uuid.uuid4().hex[:10]}", f"{uuid.uuid4().hex[:10]}:"
    out = await run(
        engine, "db.redis.user.create", {"user": user, "password": password, "prefix": prefix}
    )
    assert out == {"user": user, "prefix": prefix, "created": True, "persisted": True}
    return user, prefix


async def test_user_works_on_its_prefix_and_is_refused_elsewhere(
    engine: DbEngine, redis_server: RedisServer, admin: redis.Redis
) -> None:
    user, prefix = await tenant(engine)
    _, other_prefix = await tenant(engine, password="other-tenant-pw")
    admin.set(f"{other_prefix}secret", "theirs")
    admin.set(prefix.rstrip(":") + "x:k", "lookalike")  # same stem, different prefix

    client = as_user(redis_server, user, PASSWORD)
    try:
        key = f"{prefix}greeting"
        assert client.set(key, "hello") is True
        assert client.get(key) == "hello"
        assert client.expire(key, 60) is True
        assert 0 < client.ttl(key) <= 60
        assert client.incr(f"{prefix}counter") == 1
        client.hset(f"{prefix}h", mapping={"a": "1"})
        assert client.hgetall(f"{prefix}h") == {"a": "1"}
        pipe = client.pipeline(transaction=True)
        pipe.set(f"{prefix}m", "1")
        pipe.get(f"{prefix}m")
        assert pipe.execute() == [True, "1"]
        assert client.eval("return redis.call('GET', KEYS[1])", 1, key) == "hello"
        assert client.publish(f"{prefix}events", "x") == 0
        assert client.delete(key) == 1

        refused: list[tuple[Any, ...]] = [
            ("GET", f"{other_prefix}secret"),
            ("SET", f"{other_prefix}secret", "mine"),
            ("DEL", f"{other_prefix}secret"),
            ("GET", prefix.rstrip(":") + "x:k"),
            ("RENAME", key, f"{other_prefix}stolen"),
            ("PUBLISH", f"{other_prefix}events", "x"),
            ("FLUSHALL",),
            ("FLUSHDB",),
            ("CONFIG", "GET", "*"),
            ("KEYS", "*"),
            ("SCAN", "0"),
            ("RANDOMKEY",),
            ("ACL", "LIST"),
            ("ACL", "SETUSER", user, "~*"),
            ("CLIENT", "LIST"),
            ("SAVE",),
            ("SHUTDOWN", "NOSAVE"),
            ("FUNCTION", "FLUSH"),
            ("SCRIPT", "FLUSH"),
            ("PUBSUB", "CHANNELS"),
        ]
        for command in refused:
            with pytest.raises(redis_errors.NoPermissionError):
                command_as(client, *command)
        with pytest.raises(redis_errors.NoPermissionError):
            client.eval("return redis.call('GET', KEYS[1])", 1, f"{other_prefix}secret")
        # A script reaching for a key it did not declare is checked at the call.
        with pytest.raises(redis_errors.ResponseError, match="can't access"):
            client.eval("return redis.call('GET', ARGV[1])", 0, f"{other_prefix}secret")
    finally:
        client.close()
    assert admin.get(f"{other_prefix}secret") == "theirs"


async def test_rotated_password_works_and_the_old_one_does_not(
    engine: DbEngine, redis_server: RedisServer
) -> None:
    user, prefix = await tenant(engine)
    new_password = "rotated-Password-2"
    out = await run(engine, "db.redis.user.password", {"user": user, "password": new_password})
    assert out == {"user": user, "persisted": True}
    with pytest.raises(redis_errors.AuthenticationError):
        as_user(redis_server, user, PASSWORD)
    client = as_user(redis_server, user, new_password)
    try:
        assert client.set(f"{prefix}k", "v") is True  # rights kept
    finally:
        client.close()

    with pytest.raises(EngineError) as err:
        await run(engine, "db.redis.user.password", {"user": "u-missing", "password": PASSWORD})
    assert err.value.code == "user_missing"


async def test_deleted_user_cannot_authenticate_and_is_disconnected(
    engine: DbEngine, redis_server: RedisServer
) -> None:
    user, prefix = await tenant(engine)
    connected = raw_connection(redis_server, user, PASSWORD)
    try:
        out = await run(engine, "db.redis.user.drop", {"user": user})
        assert out == {"user": user, "dropped": True, "persisted": True}
        with pytest.raises(redis_errors.AuthenticationError):
            as_user(redis_server, user, PASSWORD)
        with pytest.raises(redis_errors.ConnectionError):
            raw_roundtrip(connected, "GET", f"{prefix}k")
    finally:
        connected.disconnect()  # type: ignore[no-untyped-call]
    again = await run(engine, "db.redis.user.drop", {"user": user})
    assert again == {"user": user, "dropped": False, "persisted": True}


async def test_create_is_idempotent_and_never_takes_over_another_user(
    engine: DbEngine, redis_server: RedisServer, admin: redis.Redis
) -> None:
    user, prefix = await tenant(engine)
    repeated = await run(
        engine, "db.redis.user.create", {"user": user, "password": PASSWORD, "prefix": prefix}
    )
    assert repeated["created"] is False
    with pytest.raises(EngineError) as err:
        await run(
            engine,
            "db.redis.user.create",
            {"user": user, "password": "attacker-pw-123", "prefix": "attacker:"},
        )
    assert err.value.code == "user_conflict"
    as_user(redis_server, user, PASSWORD).close()  # the original password still works

    command_as(admin, "ACL", "SETUSER", "ops-monitor", "on", ">ops-secret-123", "~*", "+@all")
    for command, payload in (
        ("db.redis.user.password", {"user": "ops-monitor", "password": "tenant-chosen-pw"}),
        ("db.redis.user.drop", {"user": "ops-monitor"}),
        (
            "db.redis.user.create",
            {"user": "ops-monitor", "password": "tenant-chosen-pw", "prefix": "ops:"},
        ),
    ):
        with pytest.raises(EngineError) as err2:
            await run(engine, command, payload)
        assert err2.value.code == "user_conflict"
    as_user(redis_server, "ops-monitor", "ops-secret-123").close()


INJECTED = [
    "x y",
    "x\n",
    "x\r\nFLUSHALL",
    "x;y",
    "x'",
    "x`",
    "x*",
    "x?",
    "x[a]",
    "\u0455hop",  # Cyrillic look-alike
    "\uff53hop",  # fullwidth
    "..",
    "",
    "a" * 65,
    ">pw",
    "~*",
    "+@all",
]


async def test_injection_corpus_is_refused_before_anything_runs(
    engine: DbEngine, redis_server: RedisServer, admin: redis.Redis
) -> None:
    user, _ = await tenant(engine)
    before = sorted(admin.acl_list())
    payloads: list[tuple[str, dict[str, Any]]] = []
    for bad in INJECTED:
        payloads += [
            ("db.redis.user.create", {"user": bad, "password": PASSWORD, "prefix": "ok:"}),
            ("db.redis.user.create", {"user": "ok-user", "password": PASSWORD, "prefix": bad}),
            (
                "db.redis.user.create",
                {"user": "ok-user", "password": PASSWORD, "prefix": bad + ":"},
            ),
            ("db.redis.user.password", {"user": bad, "password": PASSWORD}),
            ("db.redis.user.drop", {"user": bad}),
        ]
    payloads += [
        ("db.redis.user.create", {"user": "default", "password": PASSWORD, "prefix": "ok:"}),
        ("db.redis.user.password", {"user": "default", "password": PASSWORD}),
        ("db.redis.user.drop", {"user": "default"}),
        ("db.redis.user.password", {"user": user, "password": "pw with ~* +@all"}),
        ("db.redis.user.password", {"user": user, "password": "short"}),
        ("db.redis.user.create", {"user": "ok-user", "password": PASSWORD, "prefix": "*"}),
        ("db.redis.user.create", {"user": "ok-user", "password": PASSWORD, "prefix": "ok"}),
        ("db.redis.user.create", {"user": "ok-user", "password": PASSWORD}),
        (
            "db.redis.user.create",
            {"user": "ok-user", "password": PASSWORD, "prefix": "ok:", "rules": ["+@admin"]},
        ),
    ]
    for command, payload in payloads:
        with pytest.raises(EngineError) as err:
            await run(engine, command, payload)
        assert err.value.code == "invalid_payload", (command, payload)
    assert sorted(admin.acl_list()) == before
    as_user(redis_server, user, PASSWORD).close()


async def test_password_never_appears_in_logs_outputs_errors_or_the_acl(
    engine: DbEngine,
    redis_server: RedisServer,
    admin: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret, rotated = "Sekr3t-redis-pass", "R0tated-redis-pass"
    user, prefix = f"u-{uuid.uuid4().hex[:10]}", f"{uuid.uuid4().hex[:10]}:"
    seen = [
        repr(
            await run(
                engine, "db.redis.user.create", {"user": user, "password": secret, "prefix": prefix}
            )
        ),
        repr(await run(engine, "db.redis.user.password", {"user": user, "password": rotated})),
    ]
    for command, bad in (
        ("db.redis.user.create", {"user": user, "password": secret, "prefix": "other:"}),
        ("db.redis.user.create", {"user": "x y", "password": secret, "prefix": prefix}),
        ("db.redis.user.password", {"user": user, "password": rotated + " x"}),
        ("db.redis.user.password", {"user": "u-missing", "password": rotated}),
    ):
        with pytest.raises(EngineError) as err:
            await run(engine, command, bad)
        seen += [err.value.message, repr(err.value.__cause__)]
    as_user(redis_server, user, rotated).close()
    acl = " ".join(str(rule) for rule in admin.acl_list()) + str(admin.acl_getuser(user))
    aclfile = redis_server.aclfile.read_text()
    everything = (
        caplog.text + "".join(str(r.__dict__) for r in caplog.records) + "".join(seen) + acl
    )
    assert caplog.records, "the engine logs what it does"
    for pw in (secret, rotated):
        assert pw not in everything
        assert pw not in aclfile


async def test_users_survive_a_redis_restart(engine: DbEngine, redis_server: RedisServer) -> None:
    user, prefix = await tenant(engine)
    redis_server.restart()
    client = as_user(redis_server, user, PASSWORD)
    try:
        assert client.set(f"{prefix}k", "v") is True
        with pytest.raises(redis_errors.NoPermissionError):
            command_as(client, "KEYS", "*")
    finally:
        client.close()


async def test_unreachable_or_refusing_server_gives_clear_errors(redis_server: RedisServer) -> None:
    down = DbEngine(DbSettings(redis_port=free_port(), redis_connect_timeout=2.0))
    with pytest.raises(EngineError) as err:
        await run(
            down, "db.redis.user.create", {"user": "u-x", "password": PASSWORD, "prefix": "x:"}
        )
    assert err.value.code == "redis_unavailable"
    assert err.value.retryable is True

    wrong_admin = DbEngine(
        DbSettings(
            redis_port=redis_server.port,
            redis_admin_user="nobody",
            redis_admin_password="not-it-1234",
        )
    )
    with pytest.raises(EngineError) as err2:
        await run(wrong_admin, "db.redis.user.drop", {"user": "u-x"})
    assert err2.value.code == "redis_admin_denied"
    assert err2.value.retryable is False
    assert "not-it-1234" not in err2.value.message
