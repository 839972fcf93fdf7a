"""One change at a time per hosting resource, against the real control plane and
PostgreSQL: while a workflow for a resource runs, another write gets 409
`resource_busy` naming it, so the node never receives two commands for one resource
that it could run in either order. Also: certificates whose issuance half-succeeded,
database users created while their database is still being created, and domain changes
on sites that serve HTTPS.

The agent's part is played by the workflow driver and `apply_result`, as in
test_hosting_api.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from controlplane.crypto import SecretBox, load_master_key
from controlplane.db import Database
from controlplane.hosting.renewal import renew_due
from controlplane.keys import load_platform_keys
from controlplane.workflows import WorkflowDriver
from yakpanel.clock import SystemClock

from .conftest import Api, Tenant
from .test_hosting_api import (
    Node,
    base,
    db_exec,
    db_rows,
    enrolled_server,
    new_server,
    site_body,
    steps_of,
    workflow,
)

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

DOMAINS = ["shop.example.com", "www.shop.example.com"]


@pytest.fixture
async def node(api: Api) -> AsyncIterator[Node]:
    box = SecretBox(load_master_key(api.stack.settings))
    keys = load_platform_keys(api.stack.postgres_dsn, box)
    db = Database(api.stack.postgres_dsn, SystemClock())
    await db.open()
    try:
        yield Node(api, db, WorkflowDriver(db, keys.signing_key, box, jitter=lambda _: 0.0), box)
    finally:
        await db.close()


def workflows_of(api: Api, subject_id: str, kind: str | None = None) -> list[dict[str, Any]]:
    rows = db_rows(
        api,
        "SELECT * FROM workflows WHERE subject_id = %s ORDER BY created_at",
        uuid.UUID(subject_id),
    )
    return [r for r in rows if kind is None or r["kind"] == kind]


def assert_busy(r: httpx.Response, workflow_id: str, doing: str) -> None:
    assert r.status_code == 409, r.text
    problem = r.json()
    assert problem["code"] == "resource_busy", problem
    assert problem["workflow_id"] == workflow_id, problem
    assert doing in problem["detail"] and "retry when it has finished" in problem["detail"]


def one_accepted(responses: list[httpx.Response]) -> tuple[httpx.Response, list[httpx.Response]]:
    accepted = [r for r in responses if r.status_code == 202]
    assert len(accepted) == 1, [(r.status_code, r.text) for r in responses]
    return accepted[0], [r for r in responses if r is not accepted[0]]


def issued_output(domains: list[str], serial: str, issued: bool = True) -> dict[str, Any]:
    now = datetime.now(UTC).replace(microsecond=0)
    return {
        "issued": issued,
        "not_before": now.isoformat(),
        "not_after": (now + timedelta(days=90)).isoformat(),
        "serial": serial,
        "issuer": f"Pebble Intermediate CA {serial}",
        "domains": domains,
    }


async def active_site(t: Tenant, node: Node, server_id: str, **over: Any) -> str:
    r = await t.owner.post(f"{base(t)}/sites", json=site_body(server_id, **over))
    assert r.status_code == 202, r.text
    await node.succeed(r.json()["workflow_id"], {"document_root": "/srv/x"})
    return str(r.json()["id"])


async def tls_site(t: Tenant, node: Node, server_id: str) -> str:
    """An active site serving HTTPS with a valid certificate for DOMAINS."""
    site_id = await active_site(t, node, server_id, force_https=False)
    r = await t.owner.post(f"{base(t)}/sites/{site_id}/certificate", json={})
    assert r.status_code == 202, r.text
    await node.succeed(r.json()["workflow_id"], issued_output(DOMAINS, "01"))
    await node.succeed(r.json()["workflow_id"], {"changed": True})
    site = (await t.owner.get(f"{base(t)}/sites/{site_id}")).json()
    assert site["tls"] is True and site["certificate"]["state"] == "valid"
    return site_id


# --- concurrent writes ---------------------------------------------------------------------


async def test_concurrent_rotations_start_exactly_one_workflow(api: Api, node: Node) -> None:
    t = await api.create_tenant()
    server_id, _ = await enrolled_server(api, t)
    c = t.owner
    redis = f"{base(t)}/redis-users"
    r = await c.post(redis, json={"server_id": server_id, "name": "shop", "prefix": "shop:"})
    assert r.status_code == 202, r.text
    user_id = r.json()["id"]
    await node.succeed(r.json()["workflow_id"], {})
    sealed = db_rows(api, "SELECT password_sealed FROM redis_users")[0]["password_sealed"]

    # Five rotations at once: one starts, the others are told what runs.
    responses = await asyncio.gather(
        *(c.post(f"{redis}/{user_id}/password", json={}) for _ in range(5))
    )
    winner, losers = one_accepted(list(responses))
    rotation = winner.json()["workflow_id"]
    for r in losers:
        assert_busy(r, rotation, "a password rotation of the Redis user is pending")
        assert "password" not in r.json()
    assert [w["id"] for w in workflows_of(api, user_id, "redis_user.password")] == [
        uuid.UUID(rotation)
    ]
    # Nor can it be deleted meanwhile (the node could drop it before the rotation runs).
    assert_busy(await c.delete(f"{redis}/{user_id}"), rotation, "password rotation")

    # The node confirms: the stored password is the winner's, and writes are open again.
    await node.succeed(rotation, {})
    row = db_rows(api, "SELECT * FROM redis_users")[0]
    assert row["pending_password_sealed"] is None and row["password_sealed"] != sealed
    r = await c.post(f"{redis}/{user_id}/password", json={})
    assert r.status_code == 202, r.text


async def test_concurrent_site_writes_start_exactly_one_workflow(api: Api, node: Node) -> None:
    t = await api.create_tenant()
    server_id = await new_server(t)
    c = t.owner
    site_id = await active_site(t, node, server_id)
    url = f"{base(t)}/sites/{site_id}"

    responses = await asyncio.gather(
        c.patch(url, json={"redirects": []}),
        c.patch(url, json={"force_https": False}),
        c.delete(url),
        c.post(f"{url}/certificate", json={}),
    )
    winner, losers = one_accepted(list(responses))
    running = winner.json()["workflow_id"]
    for r in losers:
        assert_busy(r, running, "")
    started = [w for w in workflows_of(api, site_id) if w["state"] == "running"]
    assert [w["id"] for w in started] == [uuid.UUID(running)]


async def test_site_writes_wait_for_its_workflow(api: Api, node: Node) -> None:
    t = await api.create_tenant()
    server_id, _ = await enrolled_server(api, t)
    c = t.owner
    r = await c.post(f"{base(t)}/sites", json=site_body(server_id))
    site_id, create = r.json()["id"], r.json()["workflow_id"]
    url = f"{base(t)}/sites/{site_id}"

    # While it is being provisioned: no change, no delete, no certificate.
    assert_busy(await c.patch(url, json={"redirects": []}), create, "being provisioned")
    assert_busy(await c.delete(url), create, "the site is being provisioned")
    assert_busy(await c.post(f"{url}/certificate", json={}), create, "being provisioned")
    # A refused name is still a 422, whatever runs.
    r = await c.patch(url, json={"domains": ["evil.com;"]})
    assert (r.status_code, r.json()["code"]) == (422, "invalid_input")
    assert len(workflows_of(api, site_id)) == 1

    # It failed: a certificate cannot be validated through a config the node lacks.
    await node.fail(create, "nginx_test_failed", "nginx -t: bad upstream")
    r = await c.post(f"{url}/certificate", json={})
    assert (r.status_code, r.json()["code"]) == (409, "site_not_active")
    assert "active" in r.json()["detail"] and r.json()["site_status"] == "failed"
    # The same spec again retries it; once active, a certificate may be requested.
    r = await c.patch(url, json={})
    assert r.status_code == 202 and r.json()["status"] == "provisioning", r.text
    await node.succeed(r.json()["workflow_id"], {"document_root": "/srv/x"})
    assert (await c.get(url)).json()["status"] == "active"

    # An FTP account being created holds off the site's deletion (the node could remove
    # the account before creating it).
    ftp = f"{url}/ftp-accounts"
    r = await c.post(ftp, json={"username": "shop-deploy"})
    assert r.status_code == 202, r.text
    account = r.json()
    assert_busy(await c.delete(url), account["workflow_id"], "the FTP account is being created")
    assert_busy(
        await c.delete(f"{ftp}/{account['id']}"),
        account["workflow_id"],
        "the FTP account is being created",
    )
    await node.succeed(account["workflow_id"], {"home": "/srv/x"})
    r = await c.delete(url)
    assert r.status_code == 202 and r.json()["status"] == "deleting", r.text
    deletion = r.json()["workflow_id"]
    # …and once the site is being deleted, its account cannot be rotated.
    r = await c.post(f"{ftp}/{account['id']}/password", json={})
    assert (r.status_code, r.json()["code"]) == (409, "resource_busy")
    assert (await c.delete(url)).json()["workflow_id"] == deletion  # asking again: the same


async def test_failed_resources_can_be_deleted_not_rotated(api: Api, node: Node) -> None:
    t = await api.create_tenant()
    server_id, _ = await enrolled_server(api, t)
    c = t.owner
    r = await c.post(f"{base(t)}/databases", json={"server_id": server_id, "name": "shop"})
    database = r.json()
    db_url = f"{base(t)}/databases/{database['id']}"
    # Not dropped while it is being created.
    assert_busy(
        await c.delete(f"{db_url}?confirm=shop"),
        database["workflow_id"],
        "the database is being created",
    )
    await node.succeed(database["workflow_id"], {"created": True})
    r = await c.post(f"{db_url}/users", json={"name": "shop_app"})
    user = r.json()
    await node.fail(user["workflow_id"], "mariadb_admin_denied", "access denied for admin")
    user_url = f"{db_url}/users/{user['id']}"
    r = await c.post(f"{user_url}/password", json={})
    assert (r.status_code, r.json()["code"]) == (409, "resource_failed")
    assert "delete it and create it again" in r.json()["detail"]
    r = await c.delete(user_url)
    assert r.status_code == 202 and r.json()["status"] == "deleting", r.text


# --- database users while their database is created -------------------------------------


async def test_user_of_a_database_being_created_waits_for_it(api: Api, node: Node) -> None:
    t = await api.create_tenant()
    server_id, _ = await enrolled_server(api, t)
    c = t.owner
    r = await c.post(f"{base(t)}/databases", json={"server_id": server_id, "name": "shop"})
    database = r.json()
    db_url = f"{base(t)}/databases/{database['id']}"
    r = await c.post(f"{db_url}/users", json={"name": "shop_app"})
    assert r.status_code == 202, r.text
    user = r.json()
    (step,) = steps_of(api, user["workflow_id"])
    assert step["max_attempts"] >= 5

    # The node runs the user's command first: the database is missing, and it is retried.
    for _ in range(3):
        await node.report(
            await node.pending(user["workflow_id"]),
            ok=False,
            output={"retryable": True},
            error_code="database_missing",
            message="database 'shop' does not exist",
        )
    assert workflow(api, user["workflow_id"])["state"] == "running"
    await node.succeed(database["workflow_id"], {"created": True})
    await node.succeed(user["workflow_id"], {"user": "shop_app"})
    users = (await c.get(f"{db_url}/users")).json()
    assert [(u["name"], u["status"]) for u in users] == [("shop_app", "active")]
    (step,) = steps_of(api, user["workflow_id"])
    assert step["attempts"] == 4


# --- certificates --------------------------------------------------------------------------


async def test_certificate_issued_but_not_served_is_retried_by_request(
    api: Api, node: Node
) -> None:
    t = await api.create_tenant()
    server_id = await new_server(t)
    c = t.owner
    site_id = await active_site(t, node, server_id, force_https=False)
    cert_url = f"{base(t)}/sites/{site_id}/certificate"
    r = await c.post(cert_url, json={})
    first = r.json()["workflow_id"]
    await node.succeed(first, issued_output(DOMAINS, "0a"))
    await node.fail(first, "nginx_test_failed", "nginx -t: ssl_certificate unreadable")

    got = (await c.get(cert_url)).json()
    assert got["state"] == "failed"
    assert "issued and installed on the server" in got["last_error"]
    assert "ssl_certificate unreadable" in got["last_error"]
    assert got["not_after"] is not None and got["serial"] == "0a"
    assert (await c.get(f"{base(t)}/sites/{site_id}")).json()["tls"] is False

    # The renewal loop leaves a failed first issuance to the tenant, even when due…
    db_exec(api, "UPDATE site_certificates SET not_after = now() + interval '5 days'")
    retry_now = api.stack.settings.model_copy(update={"certificate_renewal_retry_s": 0})
    assert await renew_due(node.db, node.box, retry_now) == []
    # …who retries it: a first issuance again (no certificate is served yet).
    r = await c.post(cert_url, json={})
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "requested"
    retry = r.json()["workflow_id"]
    await node.succeed(retry, issued_output(DOMAINS, "0a", issued=False))
    await node.succeed(retry, {"changed": True})
    got = (await c.get(cert_url)).json()
    assert got["state"] == "valid" and got["last_error"] is None
    assert (await c.get(f"{base(t)}/sites/{site_id}")).json()["tls"] is True


async def test_renewal_skips_sites_that_are_changing(api: Api, node: Node) -> None:
    t = await api.create_tenant()
    server_id = await new_server(t)
    c = t.owner
    site_id = await tls_site(t, node, server_id)
    db_exec(api, "UPDATE site_certificates SET not_after = now() + interval '5 days'")
    r = await c.patch(f"{base(t)}/sites/{site_id}", json={"redirects": []})
    assert r.status_code == 202, r.text
    assert await renew_due(node.db, node.box, api.stack.settings) == []
    await node.succeed(r.json()["workflow_id"], {})
    assert await renew_due(node.db, node.box, api.stack.settings) == [uuid.UUID(site_id)]


# --- domain changes on HTTPS sites ---------------------------------------------------------


async def test_domain_change_on_https_site_reissues_the_certificate(api: Api, node: Node) -> None:
    t = await api.create_tenant()
    server_id = await new_server(t)
    c = t.owner
    site_id = await tls_site(t, node, server_id)
    url = f"{base(t)}/sites/{site_id}"

    # A change that keeps the names orders nothing.
    r = await c.patch(url, json={"redirects": []})
    assert [s["name"] for s in steps_of(api, r.json()["workflow_id"])] == ["apply"]
    await node.succeed(r.json()["workflow_id"], {})

    # New names: the new config goes live over HTTPS with the old certificate, then a
    # certificate for the new names is ordered (and served once installed).
    new = ["shop.example.com", "shop.example.net"]
    r = await c.patch(url, json={"domains": new})
    assert r.status_code == 202, r.text
    change = r.json()["workflow_id"]
    apply, issue = steps_of(api, change)
    assert (apply["command_type"], apply["payload"]["domains"], apply["payload"]["tls"]) == (
        "site.apply",
        new,
        True,
    )
    assert apply["compensation_payload"]["domains"] == DOMAINS
    assert apply["compensation_payload"]["tls"] is True
    assert (issue["command_type"], issue["payload"]["domains"]) == ("site.certificate.issue", new)
    assert issue["payload"]["site_id"] == site_id and issue["timeout_s"] == 600
    # A certificate request meanwhile waits for it.
    assert_busy(await c.post(f"{url}/certificate", json={}), change, "change to the site")
    await node.succeed(change, {})
    await node.succeed(change, issued_output(new, "02"))
    site = (await c.get(url)).json()
    assert site["status"] == "active" and site["tls"] is True
    cert = (await c.get(f"{url}/certificate")).json()
    assert (cert["state"], cert["domains"], cert["serial"]) == ("valid", new, "02")
    assert "certificate.issued" in [
        r["action"]
        for r in db_rows(
            api, "SELECT action FROM audit_log WHERE resource_type = 'site_certificate'"
        )
    ]

    # The CA refuses the next names: the change is undone on the node, which keeps
    # serving the previous names with their valid certificate.
    r = await c.patch(url, json={"domains": ["shop.example.org"]})
    failing = r.json()["workflow_id"]
    await node.succeed(failing, {})
    await node.fail(failing, "acme_failed", "urn:ietf:params:acme:error:dns")
    commands = await node.commands(failing)
    assert [(x["type"], x["payload"].get("domains")) for x in commands][-1] == ("site.apply", new)
    await node.succeed(failing, {})  # the compensation
    assert workflow(api, failing)["state"] == "compensated"
    site = (await c.get(url)).json()
    assert site["status"] == "failed" and "acme" in site["last_error"]
    cert = (await c.get(f"{url}/certificate")).json()
    assert (cert["state"], cert["domains"], cert["serial"]) == ("valid", new, "02")
    # Back to the certified names: just the config, no order.
    r = await c.patch(url, json={"domains": new})
    assert [s["name"] for s in steps_of(api, r.json()["workflow_id"])] == ["apply"]
