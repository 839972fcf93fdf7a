"""Hosting passwords (FTP accounts, database users, Redis users): shown once in the
create or rotate response, stored only sealed, and never found in the clear in any
PostgreSQL table, the audit log, the events and commands on Kafka, or the logs — while
the agent the command is for can still open it (issue #7's acceptance)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import uuid

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer
from psycopg import sql
from psycopg.rows import dict_row

from controlplane.hosting.common import password_context
from controlplane.relay import OutboxRelay
from proto import agent_pb2
from yakpanel.sealing import SEALED_KEY, open_sealed
from yakpanel.topics import COMMANDS, EVENTS

from .conftest import Api
from .test_hosting_api import Node, base, db_rows, enrolled_server, node, site_body, steps_of

__all__ = ["node"]  # the fixture, used here by name

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

FTP_PASSWORD = "Ftp-Secret-Pass-7319"
REDIS_PASSWORD = "Redis+Secret+Pass+4421"


def leaks(api: Api, secrets: list[str]) -> list[str]:
    """Every column of every row of every table, as text: where a secret shows in the
    clear (as text, or as the hex PostgreSQL shows bytea in)."""
    found: list[str] = []
    needles = [(s, s.encode().hex()) for s in secrets]
    with psycopg.connect(api.stack.postgres_dsn, row_factory=dict_row) as conn:
        tables = conn.execute(
            """SELECT schemaname, tablename FROM pg_tables
               WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"""
        ).fetchall()
        assert len(tables) > 20, tables
        for t in tables:
            rows = conn.execute(
                sql.SQL("SELECT to_jsonb(x)::text AS row FROM {} x").format(
                    sql.Identifier(t["schemaname"], t["tablename"])
                )
            ).fetchall()
            for r in rows:
                for plain, hexed in needles:
                    if plain in r["row"] or hexed in r["row"]:
                        found.append(f"{t['tablename']}: {r['row'][:200]}")
    return found


async def publish_outbox(api: Api) -> None:
    relay = OutboxRelay(
        api.stack.postgres_dsn, api.stack.kafka_bootstrap, api.stack.topic_prefix, max_backoff_s=0.5
    )
    task = asyncio.create_task(relay.run())
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = db_rows(api, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL")
            if left[0]["n"] == 0:
                return
            await asyncio.sleep(0.2)
        pytest.fail("the outbox relay did not publish everything")
    finally:
        relay.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


async def consume(bootstrap: str, topic: str, want: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    got: list[bytes] = []
    try:
        deadline = time.monotonic() + 30
        while len(got) < want and time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=300)).values():
                got.extend(m.value for m in messages if m.value is not None)
    finally:
        await consumer.stop()
    return got


async def test_passwords_are_shown_once_and_never_stored_in_the_clear(
    api: Api, node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    t = await api.create_tenant()
    server_id, agent_key = await enrolled_server(api, t)
    c = t.owner

    r = await c.post(f"{base(t)}/sites", json=site_body(server_id))
    site_id = r.json()["id"]
    await node.succeed(r.json()["workflow_id"], {"document_root": "/srv/site"})
    r = await c.post(
        f"{base(t)}/sites/{site_id}/ftp-accounts",
        json={"username": "shop-deploy", "password": FTP_PASSWORD},
    )
    assert r.status_code == 202, r.text
    ftp = r.json()
    assert ftp["password"] == FTP_PASSWORD

    r = await c.post(f"{base(t)}/databases", json={"server_id": server_id, "name": "shop"})
    database = r.json()
    await node.succeed(database["workflow_id"], {})
    r = await c.post(f"{base(t)}/databases/{database['id']}/users", json={"name": "shop_app"})
    assert r.status_code == 202, r.text
    user = r.json()
    generated = user["password"]
    assert len(generated) >= 32

    r = await c.post(
        f"{base(t)}/redis-users",
        json={
            "server_id": server_id,
            "name": "shop",
            "prefix": "shop:",
            "password": REDIS_PASSWORD,
        },
    )
    assert r.status_code == 202, r.text
    redis_user = r.json()
    assert redis_user["password"] == REDIS_PASSWORD

    # The commands carry the passwords sealed to the agent, which opens them.
    for workflow_id, field, expected in (
        (ftp["workflow_id"], "password", FTP_PASSWORD),
        (user["workflow_id"], "password", generated),
        (redis_user["workflow_id"], "password", REDIS_PASSWORD),
    ):
        command = await node.pending(workflow_id)
        sealed = command["payload"][field]
        assert set(sealed) == {SEALED_KEY}
        opened = open_sealed(base64.b64decode(sealed[SEALED_KEY]), agent_key, str(command["id"]))
        assert opened.decode() == expected
        await node.report(command, output={"home": "/srv/site"})

    # A rotation: the new password once in the response, stored sealed after the node
    # confirmed it.
    users = f"{base(t)}/databases/{database['id']}/users"
    r = await c.post(f"{users}/{user['id']}/password", json={})
    assert r.status_code == 202, r.text
    rotated = r.json()["password"]
    assert rotated != generated
    (step,) = steps_of(api, r.json()["workflow_id"])
    assert step["command_type"] == "db.mariadb.user.password"
    assert step["payload"]["user"] == "shop_app" and set(step["payload"]["password"]) == {"$boxed"}
    await node.succeed(r.json()["workflow_id"], {})
    row = db_rows(api, "SELECT * FROM database_users WHERE id = %s", uuid.UUID(user["id"]))[0]
    context = password_context("database_users", uuid.UUID(user["id"]))
    assert node.box.open(bytes(row["password_sealed"]), context).decode() == rotated
    assert row["pending_password_sealed"] is None and row["password_rotated_at"] is not None
    row = db_rows(api, "SELECT * FROM ftp_accounts WHERE id = %s", uuid.UUID(ftp["id"]))[0]
    context = password_context("ftp_accounts", uuid.UUID(ftp["id"]))
    assert node.box.open(bytes(row["password_sealed"]), context).decode() == FTP_PASSWORD
    actions = [
        r["action"]
        for r in db_rows(
            api, "SELECT action FROM audit_log WHERE resource_id = %s ORDER BY at", user["id"]
        )
    ]
    assert "database_user.password_rotated" in actions

    secrets = [FTP_PASSWORD, generated, REDIS_PASSWORD, rotated]
    # Reads never show a password again.
    for path in (
        f"sites/{site_id}/ftp-accounts",
        f"databases/{database['id']}/users",
        "redis-users",
        f"redis-users/{redis_user['id']}",
    ):
        r = await c.get(f"{base(t)}/{path}")
        assert r.status_code == 200
        assert not any(s in r.text for s in secrets), path
        assert "password_sealed" not in r.text

    assert leaks(api, secrets) == []

    # Kafka: the events and command envelopes the relay published.
    total = db_rows(api, "SELECT topic, count(*) AS n FROM outbox GROUP BY topic")
    await publish_outbox(api)
    prefix, bootstrap = api.stack.topic_prefix, api.stack.kafka_bootstrap
    published: list[bytes] = []
    for spec in (EVENTS, COMMANDS):
        want = sum(r["n"] for r in total if r["topic"] == spec.name)
        assert want > 0, spec.name
        got = await consume(bootstrap, spec.full_name(prefix), want)
        assert len(got) >= want, spec.name
        published.extend(got)
    commands = [agent_pb2.CommandEnvelope.FromString(b) for b in published if b[:1] != b"{"]
    assert {e.type for e in commands} >= {"site.ftp.create", "db.mariadb.user.create"}
    for message in published:
        assert not any(s.encode() in message for s in secrets)

    # The logs of everything above (API, workflow driver, relay) at DEBUG.
    assert caplog.records, "nothing was logged: the capture is not working"
    logged = caplog.text + "".join(repr(r.__dict__) for r in caplog.records)
    assert not any(s in logged for s in secrets)


async def test_refused_password_is_not_echoed(api: Api) -> None:
    t = await api.create_tenant()
    r = await t.owner.post(f"{base(t)}/servers", json={"name": "web-1"})
    server_id = r.json()["id"]
    r = await t.owner.post(f"{base(t)}/databases", json={"server_id": server_id, "name": "shop"})
    weak = "has space inside it"
    r = await t.owner.post(
        f"{base(t)}/databases/{r.json()['id']}/users", json={"name": "shop", "password": weak}
    )
    assert (r.status_code, r.json()["field"]) == (422, "password")
    assert weak not in r.text
    assert db_rows(api, "SELECT * FROM database_users") == []
    assert leaks(api, [weak]) == []
