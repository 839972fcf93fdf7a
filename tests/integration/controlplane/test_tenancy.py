"""Plans and quotas, tenant lifecycle, roles: enforced at the policy point."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from controlplane.db import Database
from controlplane.tenancy.service import delete_due_tenants

from .conftest import OWNER_PASSWORD, Api

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

TINY = {
    "max_servers": 2,
    "max_sites": 1,
    "max_databases": 1,
    "max_alert_rules": 1,
    "metric_retention_days": 7,
    "api_requests_per_minute": 1000,
}


async def _plan(api: Api, **limits: int) -> str:
    code = f"p-{uuid.uuid4().hex[:8]}"
    staff = await api.staff()
    r = await staff.post("/v1/plans", json={"code": code, "name": code, **{**TINY, **limits}})
    assert r.status_code == 201, r.text
    return code


def _events(dsn: str, aggregate_id: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT event_type FROM outbox WHERE aggregate_id = %s ORDER BY id", (aggregate_id,)
        ).fetchall()
    return [r[0] for r in rows]


async def test_a_full_plan_refuses_with_the_limit_and_the_use(api: Api) -> None:
    t = await api.create_tenant(plan=await _plan(api))
    for name in ("a", "b"):
        r = await t.owner.post(f"/v1/tenants/{t.id}/servers", json={"name": name})
        assert r.status_code == 201, r.text
    r = await t.owner.post(f"/v1/tenants/{t.id}/servers", json={"name": "c"})
    assert r.status_code == 409
    body = r.json()
    assert body["code"] == "quota_exceeded"
    assert body["limit"] == "max_servers"
    assert body["limit_value"] == 2
    assert body["current"] == 2
    assert "2 servers" in body["detail"]
    detail = (await t.owner.get(f"/v1/tenants/{t.id}")).json()
    assert detail["usage"]["servers"] == 2
    assert detail["limits"]["max_servers"] == 2

    # A bigger plan lifts the limit at once.
    staff = await api.staff()
    r = await staff.put(f"/v1/tenants/{t.id}/plan", json={"plan": "business"})
    assert r.status_code == 200, r.text
    r = await t.owner.post(f"/v1/tenants/{t.id}/servers", json={"name": "c"})
    assert r.status_code == 201
    assert "tenant.plan_changed" in _events(api.stack.postgres_dsn, t.id)


async def test_hosting_limits_are_plan_fields_and_their_use_is_shown(api: Api) -> None:
    code = await _plan(api, max_ftp_accounts=3, max_redis_users=0)
    staff = await api.staff()
    plans = (await staff.get("/v1/plans")).json()
    plans = plans["items"] if isinstance(plans, dict) else plans
    plan = next(p for p in plans if p["code"] == code)
    assert (plan["max_ftp_accounts"], plan["max_redis_users"]) == (3, 0)
    assert plan["max_database_users"] == 50  # the default when a plan does not say
    r = await staff.patch(f"/v1/plans/{plan['id']}", json={"max_database_users": 7})
    assert r.status_code == 200, r.text
    assert r.json()["max_database_users"] == 7

    t = await api.create_tenant(plan=code)
    r = await t.owner.post(f"/v1/tenants/{t.id}/servers", json={"name": "web"})
    server_id = r.json()["id"]
    r = await t.owner.post(
        f"/v1/tenants/{t.id}/sites",
        json={"server_id": server_id, "kind": "static", "domains": ["limits.example.com"]},
    )
    assert r.status_code == 202, r.text
    detail = (await t.owner.get(f"/v1/tenants/{t.id}")).json()
    assert detail["limits"]["max_database_users"] == 7
    assert detail["limits"]["max_redis_users"] == 0
    assert detail["usage"]["sites"] == 1 and detail["usage"]["servers"] == 1
    # A zero limit refuses the first one.
    r = await t.owner.post(
        f"/v1/tenants/{t.id}/redis-users",
        json={"server_id": server_id, "name": "cache", "prefix": "cache:"},
    )
    assert r.status_code == 409, r.text
    assert r.json()["limit"] == "max_redis_users"


async def test_concurrent_creates_cannot_overrun_the_quota(api: Api) -> None:
    t = await api.create_tenant(plan=await _plan(api))
    results = await asyncio.gather(
        *(t.owner.post(f"/v1/tenants/{t.id}/servers", json={"name": f"s{i}"}) for i in range(6))
    )
    assert sorted(r.status_code for r in results) == [201, 201, 409, 409, 409, 409]


async def test_requests_past_the_plan_rate_are_refused(api: Api) -> None:
    t = await api.create_tenant(plan=await _plan(api, api_requests_per_minute=5))
    token = await api.token(t, ["servers:read"])
    client = api.token_client(token)
    statuses = [(await client.get(f"/v1/tenants/{t.id}/servers")).status_code for _ in range(8)]
    # The token was created with one request of the same minute: 4 more fit.
    assert statuses.count(200) >= 3
    last = await client.get(f"/v1/tenants/{t.id}/servers")
    assert last.status_code == 429
    body = last.json()
    assert body["code"] == "rate_limited"
    assert body["limit"] == "api_requests_per_minute"
    assert body["limit_value"] == 5
    assert body["current"] > 5
    assert int(last.headers["Retry-After"]) >= 1


async def test_a_suspended_tenant_reads_but_cannot_write(api: Api) -> None:
    t = await api.create_tenant()
    staff = await api.staff()
    r = await staff.post(f"/v1/tenants/{t.id}/suspend", json={"reason": "invoice 42 unpaid"})
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "suspended"

    assert (await t.owner.get(f"/v1/tenants/{t.id}/servers")).status_code == 200
    refused = await t.owner.post(f"/v1/tenants/{t.id}/servers", json={"name": "web"})
    assert refused.status_code == 409
    body = refused.json()
    assert body["code"] == "tenant_suspended"
    assert "invoice 42 unpaid" in body["detail"]
    assert "writes are refused" in body["detail"]

    # The tenant's own members cannot lift a suspension.
    r = await t.owner.post(f"/v1/tenants/{t.id}/resume")
    assert r.status_code == 403
    r = await staff.post(f"/v1/tenants/{t.id}/resume")
    assert r.status_code == 200
    assert (
        await t.owner.post(f"/v1/tenants/{t.id}/servers", json={"name": "web"})
    ).status_code == 201
    events = _events(api.stack.postgres_dsn, t.id)
    assert events.index("tenant.suspended") < events.index("tenant.active")


async def test_deletion_is_scheduled_cancelled_and_carried_out(api: Api) -> None:
    t = await api.create_tenant()
    r = await t.owner.post(f"/v1/tenants/{t.id}/schedule-deletion", json={"after_days": 30})
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "scheduled_for_deletion"
    assert r.json()["deletion_due_at"] is not None
    refused = await t.owner.post(f"/v1/tenants/{t.id}/servers", json={"name": "web"})
    assert refused.json()["code"] == "tenant_scheduled_for_deletion"
    r = await t.owner.post(f"/v1/tenants/{t.id}/cancel-deletion")
    assert r.status_code == 200
    assert r.json()["state"] == "active"

    r = await t.owner.post(f"/v1/tenants/{t.id}/schedule-deletion", json={"after_days": 0})
    assert r.status_code == 200
    db = Database(api.stack.postgres_dsn, api.stack.clock)
    await db.open()
    try:
        assert uuid.UUID(t.id) in await delete_due_tenants(db)
        assert await delete_due_tenants(db) == []
    finally:
        await db.close()
    assert (await t.owner.get(f"/v1/tenants/{t.id}")).status_code == 404
    staff = await api.staff()
    seen = await staff.get(f"/v1/tenants/{t.id}")
    assert seen.status_code == 200
    assert seen.json()["state"] == "deleted"
    events = _events(api.stack.postgres_dsn, t.id)
    assert events[-4:] == [
        "tenant.scheduled_for_deletion",
        "tenant.active",
        "tenant.scheduled_for_deletion",
        "tenant.deleted",
    ]


async def test_nobody_grants_what_they_do_not_hold(api: Api) -> None:
    t = await api.create_tenant()
    r = await t.owner.post(
        f"/v1/tenants/{t.id}/members",
        json={"email": f"admin@{t.slug}.test", "role": "admin", "password": OWNER_PASSWORD},
    )
    assert r.status_code == 201, r.text
    admin = await api.login(f"admin@{t.slug}.test", OWNER_PASSWORD)
    r = await admin.post(
        f"/v1/tenants/{t.id}/roles", json={"name": "payer", "permissions": ["billing:write"]}
    )
    assert r.status_code == 403
    assert r.json()["code"] == "privilege_escalation"
    r = await admin.patch(
        f"/v1/tenants/{t.id}/members/{(await _me(admin))}", json={"role": "owner"}
    )
    assert r.status_code == 403
    r = await admin.post(
        f"/v1/tenants/{t.id}/roles", json={"name": "ops", "permissions": ["servers:write"]}
    )
    assert r.status_code == 201


async def _me(client: object) -> str:
    r = await client.get("/v1/auth/me")  # type: ignore[attr-defined]
    return str(r.json()["id"])


async def test_the_last_owner_stays(api: Api) -> None:
    t = await api.create_tenant()
    owner_id = await _me(t.owner)
    r = await t.owner.patch(f"/v1/tenants/{t.id}/members/{owner_id}", json={"role": "viewer"})
    assert r.status_code == 409
    assert r.json()["code"] == "last_owner"
    r = await t.owner.delete(f"/v1/tenants/{t.id}/members/{owner_id}")
    assert r.status_code == 409


async def test_custom_roles_grant_exactly_their_permissions(api: Api) -> None:
    t = await api.create_tenant()
    r = await t.owner.post(
        f"/v1/tenants/{t.id}/roles",
        json={"name": "server-reader", "permissions": ["servers:read"]},
    )
    assert r.status_code == 201, r.text
    role_id = r.json()["id"]
    r = await t.owner.post(
        f"/v1/tenants/{t.id}/members",
        json={"email": f"r@{t.slug}.test", "role": "server-reader", "password": OWNER_PASSWORD},
    )
    assert r.status_code == 201, r.text
    reader = await api.login(f"r@{t.slug}.test", OWNER_PASSWORD)
    assert (await reader.get(f"/v1/tenants/{t.id}/servers")).status_code == 200
    assert (await reader.get(f"/v1/tenants/{t.id}/members")).status_code == 403
    r = await t.owner.delete(f"/v1/tenants/{t.id}/roles/{role_id}")
    assert r.status_code == 409
    assert r.json()["code"] == "role_in_use"
    r = await t.owner.patch(
        f"/v1/tenants/{t.id}/roles/{role_id}",
        json={"permissions": ["servers:read", "members:read"]},
    )
    assert r.status_code == 200
    assert (await reader.get(f"/v1/tenants/{t.id}/members")).status_code == 200
    builtins = (await t.owner.get(f"/v1/tenants/{t.id}/roles")).json()["items"]
    viewer = next(x for x in builtins if x["name"] == "viewer")
    r = await t.owner.patch(
        f"/v1/tenants/{t.id}/roles/{viewer['id']}", json={"permissions": ["servers:read"]}
    )
    assert r.status_code == 409


async def test_audit_entries_record_who_what_when_and_before_after(api: Api) -> None:
    t = await api.create_tenant()
    r = await t.owner.post(f"/v1/tenants/{t.id}/servers", json={"name": "web", "region": "eu"})
    sid = r.json()["id"]
    await t.owner.patch(f"/v1/tenants/{t.id}/servers/{sid}", json={"region": "us"})
    page = (await t.owner.get(f"/v1/tenants/{t.id}/audit", params={"limit": 1})).json()
    assert len(page["items"]) == 1
    assert page["next_cursor"]
    entries = (
        await t.owner.get(f"/v1/tenants/{t.id}/audit", params={"action": "server.updated"})
    ).json()["items"]
    assert len(entries) == 1
    entry = entries[0]
    assert entry["actor_kind"] == "user"
    assert entry["source_ip"] == "127.0.0.1"
    assert entry["before"]["region"] == "eu"
    assert entry["after"]["region"] == "us"
    # Staff reads of a tenant are themselves audited.
    staff = await api.staff()
    assert (await staff.get(f"/v1/tenants/{t.id}/servers")).status_code == 200
    assert (await staff.post(f"/v1/tenants/{t.id}/servers", json={"name": "x"})).status_code == 403
    reads = (
        await t.owner.get(f"/v1/tenants/{t.id}/audit", params={"action": "staff.read"})
    ).json()["items"]
    assert reads
    assert reads[0]["actor_kind"] == "staff"
