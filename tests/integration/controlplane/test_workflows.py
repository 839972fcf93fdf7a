"""Workflows in the control plane on real PostgreSQL: the driver's transitions, retries of
commands that expire while the agent is offline, secrets at rest, concurrent drivers,
and the read API (filters, pagination, permissions, tenant isolation).

No agent runs here, so commands never finish by themselves; the end-to-end runs with a
real agent are in tests/integration/agentchannel/test_workflows_agent.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from controlplane.crypto import SecretBox, load_master_key
from controlplane.db import SYSTEM, Database
from controlplane.keys import load_platform_keys
from controlplane.problems import Problem
from controlplane.registry.commands import expire_overdue
from controlplane.workflows import RetryPolicy, StepSpec, WorkflowDriver, start_workflow

from .conftest import Api, Tenant

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

SECRET = "cp-Secret-" + uuid.uuid4().hex


@pytest.fixture
async def db(api: Api) -> AsyncIterator[Database]:
    database = Database(api.stack.postgres_dsn, api.stack.clock, max_size=4)
    await database.open()
    try:
        yield database
    finally:
        await database.close()


def make_driver(api: Api, db: Database) -> WorkflowDriver:
    box = SecretBox(load_master_key(api.stack.settings))
    keys = load_platform_keys(api.stack.postgres_dsn, box)
    return WorkflowDriver(db, keys.signing_key, box, jitter=lambda cap: cap)


@pytest.fixture
def driver(api: Api, db: Database) -> WorkflowDriver:
    return make_driver(api, db)


async def new_server(t: Tenant, name: str = "web-1") -> uuid.UUID:
    r = await t.owner.post(f"/v1/tenants/{t.id}/servers", json={"name": name})
    assert r.status_code == 201, r.text
    return uuid.UUID(r.json()["id"])


async def start(
    db: Database, t: Tenant, steps: list[StepSpec], kind: str = "site.create", **kw: Any
) -> uuid.UUID:
    tenant_id = uuid.UUID(t.id)
    async with db.unit_of_work(SYSTEM, tenant_id) as uow:
        return await start_workflow(
            uow,
            tenant_id,
            kind,
            kw.get("subject_type", "site"),
            kw.get("subject", uuid.uuid4()),
            steps,
        )


def ping(server_id: uuid.UUID, name: str = "configure", **kw: Any) -> StepSpec:
    return StepSpec(name, server_id, "system.ping", {"who": name}, **kw)


async def run_until_finished(
    api: Api, db: Database, driver: WorkflowDriver, t: Tenant, workflow_id: uuid.UUID
) -> dict[str, Any]:
    """Drive the workflow as the worker would: driver rounds and command expiry."""
    deadline = time.monotonic() + 30
    while True:
        await driver.tick()
        await expire_overdue(db, api.stack.clock.now())
        r = await t.owner.get(f"/v1/tenants/{t.id}/workflows/{workflow_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        if body["state"] not in ("running", "compensating"):
            return body
        assert time.monotonic() < deadline, f"workflow did not finish: {body}"
        await asyncio.sleep(0.1)


def events(dsn: str, workflow_id: uuid.UUID) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        rows = conn.execute(
            "SELECT payload FROM outbox WHERE aggregate_type = 'workflow' AND aggregate_id = %s"
            " ORDER BY id",
            (str(workflow_id),),
        ).fetchall()
    return [r["payload"] for r in rows]


async def test_the_api_shows_steps_and_commands_filters_pages_and_isolates_tenants(
    api: Api, db: Database, driver: WorkflowDriver
) -> None:
    a, b = await api.create_tenant(plan="business"), await api.create_tenant(plan="business")
    server_a, server_b = await new_server(a), await new_server(b)
    subject = uuid.uuid4()
    first = await start(db, a, [ping(server_a), ping(server_a, "reload")], subject=subject)
    second = await start(db, a, [ping(server_a)], kind="database.create", subject_type="db")
    theirs = await start(db, b, [ping(server_b)])

    r = await a.owner.get(f"/v1/tenants/{a.id}/workflows/{first}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["state"] == "running" and body["progress"] == 0
    assert [s["state"] for s in body["steps"]] == ["pending", "pending"]

    assert await driver.tick() == 3
    r = await a.owner.get(f"/v1/tenants/{a.id}/workflows/{first}")
    body = r.json()
    configure, reload = body["steps"]
    assert (configure["state"], configure["attempts"], reload["state"]) == (
        "running",
        1,
        "pending",
    )
    r = await a.owner.get(f"/v1/tenants/{a.id}/commands/{configure['command_id']}")
    assert r.status_code == 200, r.text
    command = r.json()
    assert command["idempotency_key"] == f"wf:{first}:0:1"
    assert (command["type"], command["payload"]) == ("system.ping", {"who": "configure"})
    assert configure["command_ids"] == [command["id"]]
    # Nothing changed since: another round moves nothing and issues nothing twice.
    assert await driver.tick() == 0

    base = f"/v1/tenants/{a.id}/workflows"
    r = await a.owner.get(base)
    assert [w["id"] for w in r.json()["items"]] == [str(second), str(first)]
    r = await a.owner.get(base, params={"subject_type": "site", "subject_id": str(subject)})
    assert [w["id"] for w in r.json()["items"]] == [str(first)]
    r = await a.owner.get(base, params={"state": "succeeded"})
    assert r.json()["items"] == []
    r = await a.owner.get(base, params={"limit": 1})
    page = r.json()
    assert [w["id"] for w in page["items"]] == [str(second)] and page["next_cursor"]
    r = await a.owner.get(base, params={"limit": 1, "cursor": page["next_cursor"]})
    assert [w["id"] for w in r.json()["items"]] == [str(first)]
    r = await a.owner.get(base, params={"state": "bogus"})
    assert r.status_code == 422

    # B's workflow is invisible to A: the same 404 as a workflow that exists nowhere.
    missing = await a.owner.get(f"{base}/{uuid.uuid4()}")
    assert missing.status_code == 404
    cross = await a.owner.get(f"{base}/{theirs}")
    assert cross.status_code == 404
    assert cross.json()["detail"] == missing.json()["detail"]
    r = await a.owner.get(f"/v1/tenants/{b.id}/workflows/{theirs}")
    assert r.status_code == 404
    assert str(theirs) not in (await a.owner.get(base)).text

    # The permission: a token without workflows:read is refused, one with it reads.
    without = api.token_client(await api.token(a, ["servers:read"]))
    r = await without.get(base)
    assert r.status_code == 403 and r.json()["permission"] == "workflows:read"
    reader = api.token_client(await api.token(a, ["workflows:read"]))
    r = await reader.get(f"{base}/{first}")
    assert r.status_code == 200 and r.json()["id"] == str(first)


async def test_a_command_that_expires_while_the_agent_is_offline_is_retried_then_fails(
    api: Api, db: Database, driver: WorkflowDriver
) -> None:
    t = await api.create_tenant(plan="business")
    server = await new_server(t)  # never enrolled: nobody receives its commands
    policy = RetryPolicy(max_attempts=2, base_delay_s=0.1, max_delay_s=1)
    workflow_id = await start(db, t, [ping(server, retry=policy, timeout_s=1)])

    done = await run_until_finished(api, db, driver, t, workflow_id)

    [configure] = done["steps"]
    assert configure["state"] == "failed"
    assert configure["attempts"] == 2 and len(configure["command_ids"]) == 2
    assert configure["error_code"] == "expired"
    # Nothing had succeeded, so nothing was left behind: the workflow is rolled back.
    assert done["state"] == "compensated"
    assert "step 1 (configure) failed after 2 attempts" in done["error"]
    types = [e["type"] for e in events(api.stack.postgres_dsn, workflow_id)]
    assert types == [
        "workflow.started",
        "workflow.step.running",
        "workflow.step.retry_scheduled",
        "workflow.step.running",
        "workflow.step.failed",
        "workflow.compensating",
        "workflow.compensated",
    ]
    keys = []
    for command_id in configure["command_ids"]:
        r = await t.owner.get(f"/v1/tenants/{t.id}/commands/{command_id}")
        assert r.json()["state"] == "expired"
        keys.append(r.json()["idempotency_key"])
    assert keys == [f"wf:{workflow_id}:0:1", f"wf:{workflow_id}:0:2"]


async def test_secrets_are_sealed_at_rest_and_need_an_enrolled_agent(
    api: Api, db: Database, driver: WorkflowDriver
) -> None:
    t = await api.create_tenant(plan="business")
    server = await new_server(t)
    policy = RetryPolicy(max_attempts=2, base_delay_s=0.05, max_delay_s=0.05)
    step = StepSpec(
        "create user",
        server,
        "db.mariadb.user.create",
        {"user": "shop", "password": {"$secret": SECRET}, "database": "shop"},
        compensation=("db.mariadb.user.drop", {"user": "shop"}),
        retry=policy,
    )
    workflow_id = await start(db, t, [step], kind="database.create")

    done = await run_until_finished(api, db, driver, t, workflow_id)

    [create] = done["steps"]
    assert create["error_code"] == "server_not_enrolled"
    assert create["attempts"] == 2, "an agent may enroll later: the refusal is retried"
    assert create["command_ids"] == []
    assert "enroll the agent first" in done["error"]
    with psycopg.connect(api.stack.postgres_dsn) as conn:
        [(payload,)] = conn.execute(
            "SELECT payload FROM workflow_steps WHERE workflow_id = %s", (workflow_id,)
        ).fetchall()
        assert set(payload["password"]) == {"$boxed"}
        for table in ("workflows", "workflow_steps", "commands", "audit_log", "outbox"):
            hit = conn.execute(
                psycopg.sql.SQL("SELECT count(*) FROM {} t WHERE strpos(t::text, %s) > 0").format(
                    psycopg.sql.Identifier(table)
                ),
                (SECRET,),
            ).fetchone()
            assert hit == (0,), f"{table} holds the plaintext secret"


async def test_two_drivers_at_once_issue_each_attempt_exactly_once(
    api: Api, db: Database, driver: WorkflowDriver
) -> None:
    t = await api.create_tenant(plan="business")
    server = await new_server(t)
    ids = [await start(db, t, [ping(server), ping(server, "reload")]) for _ in range(6)]
    other_db = Database(api.stack.postgres_dsn, api.stack.clock, max_size=4)
    await other_db.open()
    try:
        other = make_driver(api, other_db)
        for _ in range(3):
            await asyncio.gather(driver.tick(), other.tick(), driver.tick(), other.tick())
    finally:
        await other_db.close()

    with psycopg.connect(api.stack.postgres_dsn, row_factory=dict_row) as conn:
        keys = [
            r["idempotency_key"]
            for r in conn.execute(
                "SELECT idempotency_key FROM commands WHERE tenant_id = %s ORDER BY 1", (t.id,)
            ).fetchall()
        ]
        steps = conn.execute(
            "SELECT attempts, state, command_ids FROM workflow_steps WHERE tenant_id = %s"
            " AND index = 0",
            (t.id,),
        ).fetchall()
        running_events = conn.execute(
            "SELECT count(*) AS n FROM outbox WHERE event_type = 'workflow.step.running'"
            " AND tenant_id = %s",
            (t.id,),
        ).fetchone()
    assert keys == sorted(f"wf:{w}:0:1" for w in ids)
    assert [(s["attempts"], s["state"], len(s["command_ids"])) for s in steps] == [
        (1, "running", 1)
    ] * 6
    assert running_events == {"n": 6}


async def test_start_refuses_a_server_of_another_tenant_and_stores_nothing(
    api: Api, db: Database
) -> None:
    a, b = await api.create_tenant(plan="business"), await api.create_tenant(plan="business")
    foreign = await new_server(b)
    with pytest.raises(Problem) as refused:
        await start(db, a, [ping(foreign)])
    assert (refused.value.status, refused.value.code) == (422, "unknown_server")
    server = await new_server(a)
    with pytest.raises(ValueError, match="unique"):
        await start(db, a, [ping(server), ping(server)])
    with psycopg.connect(api.stack.postgres_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM workflows").fetchone() == (0,)


async def test_removing_the_server_under_a_running_step_fails_the_workflow_instead_of_hanging(
    api: Api, db: Database, driver: WorkflowDriver
) -> None:
    t = await api.create_tenant(plan="business")
    server = await new_server(t)
    workflow_id = await start(db, t, [ping(server)])
    await driver.tick()
    r = await t.owner.delete(f"/v1/tenants/{t.id}/servers/{server}")
    assert r.status_code == 204, r.text

    done = await run_until_finished(api, db, driver, t, workflow_id)

    [configure] = done["steps"]
    assert (configure["state"], configure["error_code"]) == ("failed", "command_lost")
    assert configure["attempts"] == 1
    assert done["state"] == "compensated"
    assert "no longer exists" in done["error"]
