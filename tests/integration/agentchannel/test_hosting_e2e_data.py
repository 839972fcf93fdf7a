"""Databases and Redis users end to end (issue #7): the API stores the desired state and
a workflow, the worker signs and sends the commands, a real agent running the `db`
engine (configured through `YAKPANEL_DB_*`) creates the accounts on a real MariaDB and
a real Redis, and the tenant connects with the password the API returned, over TCP,
as its application would.

The generated password is followed everywhere it must not be: every PostgreSQL table
(as text and hex), the Kafka topics the run produced to, every log record of the run
(API, worker, gateway and agent all log into this process) and the agent's state dir.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
import redis

from engines.db.config import DbSettings
from tests.support.hosting_node import db_env, hosting_agent, read_topic
from tests.support.mariadb import MariaDBServer, MariaDBUnavailable
from tests.support.redis_server import RedisServer, RedisUnavailable
from yakpanel.topics import COMMAND_RESULTS, COMMANDS, EVENTS, PRESENCE

from .conftest import Channel, eventually
from .test_workflows_agent import _tables_holding

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

SETTLED = ("active", "failed")
FINISHED = ("succeeded", "failed", "compensated")


@pytest.fixture(scope="module")
def mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDBServer]:
    server = MariaDBServer(tmp_path_factory.mktemp("e2e-mariadb"))
    try:
        server.start()
    except MariaDBUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("e2e-redis"))
    try:
        server.start()
    except RedisUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


def node_env(mariadb: MariaDBServer | None, redis_server: RedisServer | None) -> dict[str, str]:
    """The node's `YAKPANEL_DB_*`: root over MariaDB's socket, Redis' admin on loopback."""
    settings = DbSettings(
        mariadb_socket=mariadb.socket if mariadb else Path("/nonexistent/mysqld.sock"),
        redis_host="127.0.0.1",
        redis_port=redis_server.port if redis_server else 6379,
        redis_persist_acl=True,
    )
    return db_env(settings)


def name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


class Tenancy:
    """One tenant's API calls, with the polling a client does after a 202."""

    def __init__(self, channel: Channel, tenant: Any) -> None:
        self.owner = tenant.owner
        self.base = f"/v1/tenants/{tenant.id}"

    async def get(self, path: str) -> dict[str, Any]:
        r = await self.owner.get(self.base + path)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = await self.owner.post(self.base + path, json=body)
        assert r.status_code == 202, r.text
        out: dict[str, Any] = r.json()
        return out

    async def settled(self, path: str, timeout_s: float = 60) -> dict[str, Any]:
        body: dict[str, Any] = await eventually(
            lambda: self.get(path), lambda b: b["status"] in SETTLED, timeout_s
        )
        assert body["status"] == "active", body
        return body

    async def workflow_succeeded(self, workflow_id: str) -> None:
        workflow = await eventually(
            lambda: self.get(f"/workflows/{workflow_id}"), lambda w: w["state"] in FINISHED, 60
        )
        assert workflow["state"] == "succeeded", workflow

    async def database_with_user(self, server_id: str, db_name: str, user: str) -> dict[str, Any]:
        database = await self.post("/databases", {"server_id": server_id, "name": db_name})
        await self.settled(f"/databases/{database['id']}")
        created = await self.post(f"/databases/{database['id']}/users", {"name": user})
        users = await eventually(
            lambda: self.owner.get(f"{self.base}/databases/{database['id']}/users"),
            lambda r: r.status_code == 200 and r.json()[0]["status"] in SETTLED,
            60,
        )
        assert users.json()[0]["status"] == "active", users.json()
        return {"database": database, "user": created}


def mysql_as(mariadb: MariaDBServer, user: str, password: str) -> Any:
    """A TCP connection to 127.0.0.1 as the tenant's application makes it."""
    return pymysql.connect(
        host="127.0.0.1",
        port=mariadb.port,
        user=user,
        password=password,
        autocommit=True,
        connect_timeout=5,
    )


def refused(mariadb: MariaDBServer, user: str, password: str) -> bool:
    try:
        mysql_as(mariadb, user, password).close()
    except pymysql.err.OperationalError as exc:
        return bool(exc.args[0] == 1045)  # access denied
    return False


async def kafka_holding(channel: Channel, needles: list[bytes]) -> dict[bytes, list[str]]:
    """For each needle, the topics of this run with a message containing it."""
    hits: dict[bytes, list[str]] = {n: [] for n in needles}
    for topic in (COMMANDS, COMMAND_RESULTS, EVENTS, PRESENCE):
        raw = await read_topic(
            channel.stack.kafka_bootstrap, topic.full_name(channel.stack.topic_prefix)
        )
        for needle in needles:
            if any(needle in value for value in raw):
                hits[needle].append(topic.name)
    return hits


def files_holding(root: Path, needle: bytes) -> list[str]:
    return [
        str(p.relative_to(root))
        for p in sorted(root.rglob("*"))
        if p.is_file() and needle in p.read_bytes()
    ]


@pytest.mark.mariadb
async def test_a_database_user_reaches_its_database_only_and_its_password_stays_secret(
    channel: Channel,
    mariadb: MariaDBServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    other_tenant = await channel.api.create_tenant(plan="business")
    env = node_env(mariadb, None)
    a, b = Tenancy(channel, channel.tenant), Tenancy(channel, other_tenant)
    state_a, state_b = tmp_path / "agent-a", tmp_path / "agent-b"
    async with (
        hosting_agent(channel, channel.tenant, "db-a", state_a, env) as (server_a, _),
        hosting_agent(channel, other_tenant, "db-b", state_b, env) as (server_b, _),
    ):
        own_db, own_user = name("shop_"), name("shop_")
        other_db = name("blog_")
        mine = await a.database_with_user(server_a, own_db, own_user)
        password = mine["user"]["password"]
        assert len(password) >= 12
        theirs = await b.database_with_user(server_b, other_db, name("blog_"))

        # The application's view: its own database, nothing else.
        with mysql_as(mariadb, own_user, password) as conn, conn.cursor() as cur:
            cur.execute(f"USE `{own_db}`")
            cur.execute("CREATE TABLE orders (id INT PRIMARY KEY, item VARCHAR(40))")
            cur.execute("INSERT INTO orders VALUES (1, 'yak wool')")
            cur.execute("SELECT item FROM orders")
            assert cur.fetchall() == (("yak wool",),)
            cur.execute("SHOW DATABASES")
            visible = {row[0] for row in cur.fetchall()}
            assert visible == {own_db, "information_schema"}, visible
            with pytest.raises(pymysql.err.OperationalError) as denied:
                cur.execute(f"USE `{other_db}`")
            assert denied.value.args[0] == 1044, denied.value
            with pytest.raises(pymysql.err.MySQLError) as denied_table:
                cur.execute(f"CREATE TABLE `{other_db}`.stolen (id INT)")
            assert denied_table.value.args[0] in (1044, 1142), denied_table.value
        assert theirs["user"]["password"] != password

        # Rotation: the old password stops working, the new one works.
        user_path = f"/databases/{mine['database']['id']}/users/{mine['user']['id']}"
        rotated = await a.post(f"{user_path}/password", {})
        new_password = rotated["password"]
        assert new_password != password
        await a.workflow_succeeded(rotated["workflow_id"])
        assert refused(mariadb, own_user, password)
        with mysql_as(mariadb, own_user, new_password) as conn, conn.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM `{own_db}`.orders")
            assert cur.fetchone() == (1,)

    # Neither password is anywhere it must not be; the scans do see what is stored or sent.
    secrets = [password, new_password]
    in_kafka = await kafka_holding(channel, [s.encode() for s in [*secrets, own_user]])
    for secret in secrets:
        assert _tables_holding(channel.stack.postgres_dsn, secret) == []
        assert in_kafka[secret.encode()] == []
        assert files_holding(state_a, secret.encode()) == []
        assert files_holding(state_b, secret.encode()) == []
        logged = [r for r in caplog.records if secret in r.getMessage() or secret in str(r.args)]
        assert logged == [], [r.getMessage() for r in logged]
    assert "database_users" in _tables_holding(channel.stack.postgres_dsn, own_user)
    assert in_kafka[own_user.encode()], "the user name travels in the commands"
    loggers = {r.name.split(".")[0] for r in caplog.records}
    assert loggers >= {"agent", "engines"}, sorted(loggers)


@pytest.mark.redis
async def test_a_redis_user_reaches_its_prefix_only(
    channel: Channel, redis_server: RedisServer, tmp_path: Path
) -> None:
    tenant = Tenancy(channel, channel.tenant)
    async with hosting_agent(
        channel, channel.tenant, "cache", tmp_path / "agent", node_env(None, redis_server)
    ) as (server_id, _):
        user, prefix = name("shop-"), name("shop") + ":"
        created = await tenant.post(
            "/redis-users", {"server_id": server_id, "name": user, "prefix": prefix}
        )
        await tenant.settled(f"/redis-users/{created['id']}")
        client = redis.Redis(
            host="127.0.0.1",
            port=redis_server.port,
            username=user,
            password=created["password"],
            socket_timeout=5,
        )
        try:
            assert client.set(f"{prefix}cart:1", "3 yaks") is True
            assert client.get(f"{prefix}cart:1") == b"3 yaks"
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.get("other:cart:1")
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.set("cart:1", "stolen")
        finally:
            client.close()
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(
                host="127.0.0.1",
                port=redis_server.port,
                username=user,
                password=created["password"] + "x",
                socket_timeout=5,
            ).ping()
