"""The hosting API against the real control plane and PostgreSQL: sites with domains,
redirects and HTTPS, certificates and their renewal, FTP accounts, databases and their
users, Redis users (issue #7).

A create stores desired state and starts a workflow; the real workflow driver turns
each step into a signed command, and the results an agent would report are applied
with the worker's own `apply_result`, so a resource's status follows its workflow the
way it does in production. Invalid names are refused before anything is stored.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from psycopg.rows import dict_row

from controlplane.api.internal import INTERNAL_HEADER
from controlplane.crypto import SecretBox, load_master_key
from controlplane.db import Database
from controlplane.hosting.renewal import renew_due
from controlplane.keys import load_platform_keys
from controlplane.registry.commands import apply_result
from controlplane.workflows import WorkflowDriver
from proto import agent_pb2
from yakpanel.clock import SystemClock
from yakpanel.pki import new_csr, new_private_key
from yakpanel.service_secrets import load_internal_token

from .conftest import Api, Client, Tenant

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

HOSTING_TABLES = (
    "sites",
    "site_domains",
    "site_certificates",
    "ftp_accounts",
    "hosted_databases",
    "database_users",
    "redis_users",
    "workflows",
    "workflow_steps",
    "commands",
)


def db_rows(api: Api, query: str, *params: Any) -> list[dict[str, Any]]:
    with psycopg.connect(api.stack.postgres_dsn, row_factory=dict_row) as conn:
        return conn.execute(query, params).fetchall()


def db_exec(api: Api, query: str, *params: Any) -> None:
    with psycopg.connect(api.stack.postgres_dsn) as conn:
        conn.execute(query, params)


def counts(api: Api) -> dict[str, int]:
    return {t: db_rows(api, f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in HOSTING_TABLES}


def base(t: Tenant) -> str:
    return f"/v1/tenants/{t.id}"


async def new_server(t: Tenant, name: str = "web-1") -> str:
    r = await t.owner.post(f"{base(t)}/servers", json={"name": name})
    assert r.status_code == 201, r.text
    server_id: str = r.json()["id"]
    return server_id


async def enrolled_server(api: Api, t: Tenant) -> tuple[str, ec.EllipticCurvePrivateKey]:
    """A server whose agent enrolled (as the gateway does it); the agent's private key,
    which opens the secrets sealed to it."""
    server_id = await new_server(t, f"node-{uuid.uuid4().hex[:6]}")
    r = await t.owner.post(f"{base(t)}/servers/{server_id}/enrollment-tokens", json={})
    assert r.status_code == 201, r.text
    key = new_private_key()
    internal = api.client(headers={INTERNAL_HEADER: load_internal_token(api.stack.settings)})
    r = await internal.post(
        "/internal/v1/enroll",
        json={"token": r.json()["token"], "csr_pem": new_csr(key, "node").decode()},
    )
    assert r.status_code == 200, r.text
    return server_id, key


@dataclass
class Node:
    """Plays the agent's part: runs the workflow driver and reports command results."""

    api: Api
    db: Database
    driver: WorkflowDriver
    box: SecretBox

    async def commands(self, workflow_id: str) -> list[dict[str, Any]]:
        """Commands of the workflow, in the order they were issued (after a driver round)."""
        await self.driver.tick()
        return db_rows(
            self.api,
            """SELECT c.* FROM commands c JOIN workflow_steps s ON c.id = ANY(s.command_ids)
               WHERE s.workflow_id = %s ORDER BY c.issued_at, c.id""",
            uuid.UUID(workflow_id),
        )

    async def pending(self, workflow_id: str) -> dict[str, Any]:
        open_ = [c for c in await self.commands(workflow_id) if c["finished_at"] is None]
        assert len(open_) == 1, f"expected one open command, got {open_}"
        return open_[0]

    async def report(
        self,
        command: dict[str, Any],
        ok: bool = True,
        output: dict[str, Any] | None = None,
        error_code: str = "",
        message: str = "",
    ) -> None:
        result = agent_pb2.CommandResult(
            command_id=str(command["id"]),
            tenant_id=str(command["tenant_id"]),
            server_id=str(command["server_id"]),
            status=agent_pb2.SUCCEEDED if ok else agent_pb2.FAILED,
            output=json.dumps(output or {}).encode(),
            error_code=error_code,
            message=message,
        )
        assert await apply_result(self.db, result) is not None
        await self.driver.tick()

    async def succeed(self, workflow_id: str, output: dict[str, Any] | None = None) -> None:
        await self.report(await self.pending(workflow_id), True, output)

    async def fail(self, workflow_id: str, error_code: str, message: str) -> None:
        await self.report(await self.pending(workflow_id), False, None, error_code, message)


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


def steps_of(api: Api, workflow_id: str) -> list[dict[str, Any]]:
    return db_rows(
        api,
        "SELECT * FROM workflow_steps WHERE workflow_id = %s ORDER BY index",
        uuid.UUID(workflow_id),
    )


def workflow(api: Api, workflow_id: str) -> dict[str, Any]:
    return db_rows(api, "SELECT * FROM workflows WHERE id = %s", uuid.UUID(workflow_id))[0]


def audit_actions(api: Api, resource_id: str) -> list[str]:
    return [
        r["action"]
        for r in db_rows(
            api, "SELECT action FROM audit_log WHERE resource_id = %s ORDER BY at", resource_id
        )
    ]


def event_types(api: Api, aggregate_id: str) -> list[str]:
    return [
        r["event_type"]
        for r in db_rows(
            api,
            "SELECT event_type FROM outbox WHERE aggregate_id = %s ORDER BY occurred_at",
            aggregate_id,
        )
    ]


async def tenant_with_limits(api: Api, **limits: int) -> Tenant:
    """A tenant on a plan with the given hosting limits (others generous)."""
    staff = await api.staff()
    code = f"hosting-{uuid.uuid4().hex[:8]}"
    r = await staff.post(
        "/v1/plans",
        json={
            "code": code,
            "name": "Hosting test",
            "max_servers": 10,
            "max_sites": limits.pop("max_sites", 100),
            "max_databases": limits.pop("max_databases", 100),
            "max_alert_rules": 10,
            "metric_retention_days": 30,
            "api_requests_per_minute": 100_000,
        },
    )
    assert r.status_code == 201, r.text
    for column, value in limits.items():
        # The newer limits are set in SQL: PlanCreate does not take them yet.
        assert column in ("max_database_users", "max_ftp_accounts", "max_redis_users")
        db_exec(api, f"UPDATE plans SET {column} = %s WHERE code = %s", value, code)
    return await api.create_tenant(plan=code)


def site_body(server_id: str, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "server_id": server_id,
        "kind": "php",
        "domains": ["Shop.Example.COM", "www.shop.example.com"],
        "upstream": "unix:/run/php/php8.2-fpm.sock",
        "redirects": [{"source": "/old", "target": "/new", "code": 301}],
        "force_https": True,
    }
    body.update(over)
    return body


# --- sites ---------------------------------------------------------------------------------


async def test_site_lifecycle_follows_its_workflows(api: Api, node: Node) -> None:
    t = await api.create_tenant()
    server_id = await new_server(t)
    c = t.owner

    r = await c.post(f"{base(t)}/sites", json=site_body(server_id))
    assert r.status_code == 202, r.text
    site = r.json()
    site_id, wf = site["id"], site["workflow_id"]
    assert site["status"] == "provisioning"
    assert site["domains"] == ["shop.example.com", "www.shop.example.com"]
    assert site["primary_domain"] == "shop.example.com"
    assert site["certificate"] is None and site["tls"] is False
    apply = {
        "site_id": site_id,
        "kind": "php",
        "domains": ["shop.example.com", "www.shop.example.com"],
        "upstream": "unix:/run/php/php8.2-fpm.sock",
        "redirects": [{"source": "/old", "target": "/new", "code": 301}],
        # Wanted, but not sent before the site has a certificate (the engine would
        # refuse to redirect to an HTTPS server that does not exist).
        "force_https": False,
        "tls": False,
    }
    (step,) = steps_of(api, wf)
    assert (step["command_type"], step["payload"]) == ("site.apply", apply)
    assert step["compensation_type"] == "site.remove"
    assert step["compensation_payload"] == {"site_id": site_id, "delete_files": False}
    wf_row = workflow(api, wf)
    assert (wf_row["kind"], wf_row["subject_type"], str(wf_row["subject_id"])) == (
        "site.create",
        "site",
        site_id,
    )

    # The driver issues the command exactly as the site engine expects it.
    command = await node.pending(wf)
    assert (command["type"], command["payload"], str(command["server_id"])) == (
        "site.apply",
        apply,
        server_id,
    )
    root = f"/var/lib/yakpanel/sites/{site_id}/public"
    await node.report(
        command,
        output={
            "config_path": f"/etc/nginx/yak/{site_id}.conf",
            "changed": True,
            "document_root": root,
        },
    )
    r = await c.get(f"{base(t)}/sites/{site_id}")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "active" and r.json()["document_root"] == root
    r = await c.get(f"{base(t)}/sites")
    assert [s["id"] for s in r.json()["items"]] == [site_id]

    # A change that the node refuses: the old config is re-applied and the site says why.
    r = await c.patch(
        f"{base(t)}/sites/{site_id}",
        json={"kind": "proxy", "upstream": "http://127.0.0.1:8080", "redirects": []},
    )
    assert r.status_code == 202, r.text
    changed = r.json()
    assert changed["status"] == "provisioning" and changed["workflow_id"] != wf
    (step,) = steps_of(api, changed["workflow_id"])
    assert step["payload"] == {
        **apply,
        "kind": "proxy",
        "upstream": "http://127.0.0.1:8080",
        "redirects": [],
    }
    assert (step["compensation_type"], step["compensation_payload"]) == ("site.apply", apply)
    # (The engine checks a config with `nginx -t` before it replaces the old one, so the
    # failed step left the old config serving; only completed steps are undone.)
    await node.fail(changed["workflow_id"], "nginx_test_failed", "nginx -t: upstream refused")
    assert workflow(api, changed["workflow_id"])["state"] == "compensated"
    assert [c["type"] for c in await node.commands(changed["workflow_id"])] == ["site.apply"]
    r = await c.get(f"{base(t)}/sites/{site_id}")
    failed = r.json()
    assert failed["status"] == "failed"
    assert "upstream refused" in failed["last_error"]

    # The same spec again on a failed site is the way to retry it.
    r = await c.patch(f"{base(t)}/sites/{site_id}", json={})
    assert r.status_code == 202, r.text
    retry = r.json()["workflow_id"]
    assert retry != changed["workflow_id"] and r.json()["status"] == "provisioning"
    (step,) = steps_of(api, retry)
    assert step["payload"]["kind"] == "proxy"
    command = await node.pending(retry)
    await node.report(command, output={"config_path": "x", "changed": True, "document_root": root})
    assert (await c.get(f"{base(t)}/sites/{site_id}")).json()["status"] == "active"
    # …and an active site with nothing changed starts nothing.
    r = await c.patch(f"{base(t)}/sites/{site_id}", json={})
    assert r.status_code == 202 and r.json()["workflow_id"] == retry

    # Deletion: the row stays `deleting` until the node confirms, then it is gone.
    r = await c.delete(f"{base(t)}/sites/{site_id}")
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "deleting"
    deletion = r.json()["workflow_id"]
    command = await node.pending(deletion)
    assert (command["type"], command["payload"]) == (
        "site.remove",
        {"site_id": site_id, "delete_files": False},
    )
    assert (await c.get(f"{base(t)}/sites/{site_id}")).json()["status"] == "deleting"
    await node.report(command, output={"removed": True})
    r = await c.get(f"{base(t)}/sites/{site_id}")
    assert (r.status_code, r.json()["code"]) == (404, "not_found")
    assert db_rows(api, "SELECT * FROM site_domains") == []

    expected = [
        "site.created",
        "site.applied",
        "site.updated",
        "site.apply_failed",
        "site.updated",
        "site.applied",
        "site.delete_requested",
        "site.deleted",
    ]
    assert audit_actions(api, site_id) == expected
    assert event_types(api, site_id) == expected


async def test_certificate_issue_and_renewal(api: Api, node: Node, tmp_path: Path) -> None:
    t = await api.create_tenant()
    server_id = await new_server(t)
    c = t.owner
    r = await c.post(f"{base(t)}/sites", json=site_body(server_id, force_https=False))
    site_id = r.json()["id"]
    await node.succeed(r.json()["workflow_id"], {"document_root": "/srv/x"})

    r = await c.get(f"{base(t)}/sites/{site_id}/certificate")
    assert (r.status_code, r.json()["code"]) == (404, "not_found")
    r = await c.post(f"{base(t)}/sites/{site_id}/certificate", json={})
    assert r.status_code == 202, r.text
    cert = r.json()
    assert cert["state"] == "requested" and cert["not_after"] is None
    r = await c.post(f"{base(t)}/sites/{site_id}/certificate", json={"force": True})
    assert (r.status_code, r.json()["code"]) == (409, "resource_busy")
    # The issuance ends by applying the site's config: changes wait until it is done.
    r = await c.patch(f"{base(t)}/sites/{site_id}", json={"force_https": True})
    assert (r.status_code, r.json()["code"]) == (409, "resource_busy")
    r = await c.delete(f"{base(t)}/sites/{site_id}")
    assert (r.status_code, r.json()["code"]) == (409, "resource_busy")

    issue, tls = steps_of(api, cert["workflow_id"])
    domains = ["shop.example.com", "www.shop.example.com"]
    assert (issue["command_type"], issue["payload"]) == (
        "site.certificate.issue",
        {
            "site_id": site_id,
            "domains": domains,
            "directory_url": "https://acme-v02.api.letsencrypt.org/directory",
            "email": None,
            "ca_bundle": None,
            "force": False,
            "renew_before_days": 30,
        },
    )
    assert tls["command_type"] == "site.apply" and tls["payload"]["tls"] is True

    now = datetime.now(UTC)
    not_after = (now + timedelta(days=90)).replace(microsecond=0)
    issued = {
        "issued": True,
        "not_before": now.isoformat(),
        "not_after": not_after.isoformat(),
        "serial": "0a1b2c",
        "issuer": "Pebble Intermediate CA 4f1e6b",
        "domains": domains,
    }
    await node.succeed(cert["workflow_id"], issued)
    await node.succeed(cert["workflow_id"], {"changed": True})
    r = await c.get(f"{base(t)}/sites/{site_id}/certificate")
    got = r.json()
    assert got["state"] == "valid" and got["issuer"] == issued["issuer"]
    assert datetime.fromisoformat(got["not_after"]) == not_after
    assert got["days_left"] in (89, 90)
    site = (await c.get(f"{base(t)}/sites/{site_id}")).json()
    assert site["tls"] is True
    assert (
        site["certificate"]["state"] == "valid"
        and site["certificate"]["issuer"] == issued["issuer"]
    )
    # With a certificate, later changes keep serving HTTPS.
    r = await c.patch(f"{base(t)}/sites/{site_id}", json={"force_https": True})
    assert r.status_code == 202, r.text
    (step,) = steps_of(api, r.json()["workflow_id"])
    assert (step["payload"]["tls"], step["payload"]["force_https"]) == (True, True)
    await node.succeed(r.json()["workflow_id"], {})

    # Not due yet: the renewal loop leaves it alone.
    settings = api.stack.settings
    assert await renew_due(node.db, node.box, settings) == []

    # Due (10 days left): a renewal starts, with the operator's private CA bundle.
    soon = now + timedelta(days=10)
    db_exec(api, "UPDATE site_certificates SET not_after = %s", soon)
    bundle = tmp_path / "pebble-root.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    private = settings.model_copy(
        update={
            "acme_ca_bundle": bundle,
            "acme_directory_url": "https://127.0.0.1:14000/dir",
            "acme_email": "ops@example.com",
        }
    )
    assert await renew_due(node.db, node.box, private) == [uuid.UUID(site_id)]
    assert await renew_due(node.db, node.box, private) == []  # already renewing
    got = (await c.get(f"{base(t)}/sites/{site_id}/certificate")).json()
    assert got["state"] == "renewing"
    renewal = got["workflow_id"]
    assert workflow(api, renewal)["kind"] == "certificate.renew"
    issue, _ = steps_of(api, renewal)
    assert issue["payload"]["ca_bundle"] == bundle.read_text()
    assert issue["payload"]["directory_url"] == "https://127.0.0.1:14000/dir"
    assert issue["payload"]["email"] == "ops@example.com"

    # The ACME server refuses: the old certificate stays, and the failure is told.
    await node.fail(renewal, "acme_error", "urn:ietf:params:acme:error:rateLimited")
    assert workflow(api, renewal)["state"] in ("compensated", "failed")
    got = (await c.get(f"{base(t)}/sites/{site_id}/certificate")).json()
    assert got["state"] == "renewal_failed"
    assert "rateLimited" in got["last_error"]
    assert datetime.fromisoformat(got["not_after"]) == soon.replace(microsecond=soon.microsecond)
    assert got["issuer"] == issued["issuer"]
    assert "certificate.renewal_failed" in audit_actions(api, site_id)
    assert "certificate.renewal_failed" in event_types(api, site_id)
    # Not retried at once: the next attempt waits for the retry interval.
    assert await renew_due(node.db, node.box, private) == []
    retry_now = private.model_copy(update={"certificate_renewal_retry_s": 0})
    assert await renew_due(node.db, node.box, retry_now) == [uuid.UUID(site_id)]


# --- validation ----------------------------------------------------------------------------

INJECTIONS = [
    "evil.com;",
    "a;rm -rf.example.com",
    "ex{ample}.com",
    "example.com\nserver_name evil.com",
    'ex"ample.com',
    "ex'ample.com",
    "../../etc/passwd",
    "a..b.com",
    "ex\u0430mple.com",  # Cyrillic a
    "\uff45xample.com",  # fullwidth e
    "a" * 64 + ".com",
    "$(reboot).example.com",
    "`id`.example.com",
    "example.com\x00",
    "",
]


async def _problem(c: Client, method: str, url: str, body: dict[str, Any], field: str) -> None:
    r = await c.request(method, url, json=body)
    assert r.status_code == 422, f"{method} {url} {body!r}: {r.status_code} {r.text}"
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    named = problem.get("field") or ".".join(
        str(p) for e in problem.get("errors", []) for p in e["loc"]
    )
    assert field.split("[")[0] in named, (body, problem)
    assert problem["detail"], problem


async def test_injection_corpus_is_refused_before_anything_is_stored(api: Api, node: Node) -> None:
    t = await api.create_tenant()
    server_id = await new_server(t)
    c = t.owner
    r = await c.post(f"{base(t)}/sites", json=site_body(server_id))
    site_id = r.json()["id"]
    r = await c.post(f"{base(t)}/databases", json={"server_id": server_id, "name": "shop"})
    assert r.status_code == 202, r.text
    database_id = r.json()["id"]
    before = counts(api)
    sites_url, db_url = f"{base(t)}/sites", f"{base(t)}/databases"

    for bad in INJECTIONS:
        await _problem(c, "POST", sites_url, site_body(server_id, domains=[bad]), "domains[0]")
        await _problem(
            c, "POST", sites_url, site_body(server_id, domains=["ok.example.com", bad]), "domains"
        )
        await _problem(
            c, "POST", sites_url, site_body(server_id, kind="proxy", upstream=bad), "upstream"
        )
        await _problem(
            c,
            "POST",
            sites_url,
            site_body(server_id, redirects=[{"source": bad, "target": "/x"}]),
            "redirects",
        )
        await _problem(
            c,
            "POST",
            sites_url,
            site_body(server_id, redirects=[{"source": "/x", "target": bad}]),
            "redirects",
        )
        await _problem(c, "PATCH", f"{sites_url}/{site_id}", {"domains": [bad]}, "domains")
        await _problem(
            c, "POST", f"{sites_url}/{site_id}/ftp-accounts", {"username": bad}, "username"
        )
        await _problem(c, "POST", db_url, {"server_id": server_id, "name": bad}, "name")
        await _problem(c, "POST", f"{db_url}/{database_id}/users", {"name": bad}, "name")
        await _problem(
            c,
            "POST",
            f"{base(t)}/redis-users",
            {"server_id": server_id, "name": bad, "prefix": "shop:"},
            "name",
        )
        await _problem(
            c,
            "POST",
            f"{base(t)}/redis-users",
            {"server_id": server_id, "name": "shop", "prefix": bad},
            "prefix",
        )
    # The challenge path must keep serving certificate challenges.
    await _problem(
        c,
        "POST",
        sites_url,
        site_body(
            server_id, redirects=[{"source": "/.well-known/acme-challenge/t", "target": "/"}]
        ),
        "redirects",
    )
    for path in ("/../etc/passwd", "/a b", "/x;y", "/x{y}", "/x\nreturn 200", "/" + "a" * 1100):
        await _problem(
            c,
            "POST",
            sites_url,
            site_body(server_id, redirects=[{"source": path, "target": "/x"}]),
            "redirects",
        )
        await _problem(
            c,
            "POST",
            sites_url,
            site_body(server_id, redirects=[{"source": "/x", "target": path}]),
            "redirects",
        )
    for target in ("javascript:alert(1)", "http://ex\u0430mple.com/", "https://evil.com;/x"):
        await _problem(
            c,
            "POST",
            sites_url,
            site_body(server_id, redirects=[{"source": "/x", "target": target}]),
            "redirects",
        )
    # Names that are well-formed but not allowed, and rules between fields.
    for body, field in (
        ({"server_id": server_id, "name": "mysql"}, "name"),
        ({"server_id": server_id, "name": "Shop"}, "name"),
        ({"server_id": server_id, "name": "a" * 33}, "name"),
    ):
        await _problem(c, "POST", db_url, body, field)
    await _problem(c, "POST", f"{db_url}/{database_id}/users", {"name": "root"}, "name")
    await _problem(
        c,
        "POST",
        f"{db_url}/{database_id}/users",
        {"name": "shop", "password": "short"},
        "password",
    )
    await _problem(
        c,
        "POST",
        f"{base(t)}/redis-users",
        {"server_id": server_id, "name": "default", "prefix": "shop:"},
        "name",
    )
    await _problem(
        c,
        "POST",
        f"{base(t)}/redis-users",
        {"server_id": server_id, "name": "shop", "prefix": "shop*"},
        "prefix",
    )
    await _problem(c, "POST", sites_url, site_body(server_id, kind="static"), "upstream")
    await _problem(c, "POST", sites_url, site_body(server_id, upstream=None), "upstream")
    await _problem(
        c,
        "POST",
        sites_url,
        site_body(server_id, domains=["a.example.com", "A.example.com"]),
        "domains[1]",
    )
    await _problem(c, "POST", sites_url, site_body(server_id, domains=["*.example.com"]), "domains")
    await _problem(c, "POST", sites_url, site_body(server_id, domains=["localhost"]), "domains")
    await _problem(c, "POST", sites_url, site_body(server_id, domains=["127.0.0.1"]), "domains")

    assert counts(api) == before, "a refused request left rows behind"
    r = await c.get(f"{sites_url}/{site_id}")
    assert r.json()["domains"] == ["shop.example.com", "www.shop.example.com"]


# --- quotas, uniqueness, isolation, permissions --------------------------------------------


async def test_plan_quotas(api: Api) -> None:
    t = await tenant_with_limits(
        api,
        max_sites=1,
        max_databases=1,
        max_database_users=1,
        max_ftp_accounts=1,
        max_redis_users=1,
    )
    server_id = await new_server(t)
    c = t.owner

    async def over(url: str, body: dict[str, Any], limit: str) -> None:
        r = await c.post(url, json=body)
        assert (r.status_code, r.json()["code"]) == (409, "quota_exceeded"), r.text
        assert (r.json()["limit"], r.json()["limit_value"], r.json()["current"]) == (limit, 1, 1)

    r = await c.post(f"{base(t)}/sites", json=site_body(server_id))
    assert r.status_code == 202, r.text
    site_id = r.json()["id"]
    await over(f"{base(t)}/sites", site_body(server_id, domains=["b.example.com"]), "max_sites")
    ftp = f"{base(t)}/sites/{site_id}/ftp-accounts"
    assert (await c.post(ftp, json={"username": "shop-ftp"})).status_code == 202
    await over(ftp, {"username": "shop-ftp2"}, "max_ftp_accounts")
    r = await c.post(f"{base(t)}/databases", json={"server_id": server_id, "name": "shop"})
    database_id = r.json()["id"]
    await over(f"{base(t)}/databases", {"server_id": server_id, "name": "blog"}, "max_databases")
    users = f"{base(t)}/databases/{database_id}/users"
    assert (await c.post(users, json={"name": "shop"})).status_code == 202
    await over(users, {"name": "shop2"}, "max_database_users")
    redis = f"{base(t)}/redis-users"
    assert (
        await c.post(redis, json={"server_id": server_id, "name": "shop", "prefix": "shop:"})
    ).status_code == 202
    await over(
        redis, {"server_id": server_id, "name": "blog", "prefix": "blog:"}, "max_redis_users"
    )
    assert len(db_rows(api, "SELECT * FROM workflows")) == 5
    r = await c.get("/v1/plans")
    plan = next(p for p in r.json() if p["max_sites"] == 1)
    assert (plan["max_database_users"], plan["max_ftp_accounts"], plan["max_redis_users"]) == (
        1,
        1,
        1,
    )


async def test_domains_are_unique_across_tenants_and_tenants_are_isolated(api: Api) -> None:
    a, b = await api.create_tenant(), await api.create_tenant()
    server_a, server_b = await new_server(a), await new_server(b)
    r = await a.owner.post(f"{base(a)}/sites", json=site_body(server_a))
    assert r.status_code == 202, r.text
    site = r.json()
    r = await a.owner.post(f"{base(a)}/databases", json={"server_id": server_a, "name": "shop"})
    database = r.json()
    r = await a.owner.post(
        f"{base(a)}/redis-users", json={"server_id": server_a, "name": "shop", "prefix": "shop:"}
    )
    redis_user = r.json()
    before = counts(api)

    # The same name, in any spelling, belongs to A's site.
    r = await b.owner.post(
        f"{base(b)}/sites",
        json=site_body(server_b, domains=["new.example.com", "SHOP.example.com."]),
    )
    assert (r.status_code, r.json()["code"]) == (409, "domain_in_use"), r.text
    assert "domain already in use" in r.json()["detail"]
    assert r.json()["field"] == "domains[1]"
    r = await a.owner.post(
        f"{base(a)}/sites", json=site_body(server_a, domains=["www.shop.example.com"])
    )
    assert (r.status_code, r.json()["code"]) == (409, "domain_in_use")
    assert counts(api) == before

    # B cannot see or touch A's resources: 404, as for ids that exist nowhere.
    sid, did, rid = site["id"], database["id"], redis_user["id"]
    for method, path, body in (
        ("GET", f"sites/{sid}", None),
        ("PATCH", f"sites/{sid}", {"force_https": False}),
        ("DELETE", f"sites/{sid}", None),
        ("GET", f"sites/{sid}/certificate", None),
        ("POST", f"sites/{sid}/certificate", {}),
        ("GET", f"sites/{sid}/ftp-accounts", None),
        ("POST", f"sites/{sid}/ftp-accounts", {"username": "intruder"}),
        ("GET", f"databases/{did}", None),
        ("DELETE", f"databases/{did}?confirm=shop", None),
        ("POST", f"databases/{did}/users", {"name": "intruder"}),
        ("GET", f"redis-users/{rid}", None),
        ("POST", f"redis-users/{rid}/password", {}),
        ("DELETE", f"redis-users/{rid}", None),
    ):
        r = await b.owner.request(method, f"{base(b)}/{path}", json=body)
        assert (r.status_code, r.json()["code"]) == (404, "not_found"), (method, path, r.text)
        r = await a.owner.request(method, f"{base(b)}/{path}", json=body)
        assert r.status_code == 404, (method, path, r.text)
    # A site on B's server cannot be created by A.
    r = await a.owner.post(f"{base(a)}/sites", json=site_body(server_b, domains=["x.example.com"]))
    assert (r.status_code, r.json()["code"]) == (404, "not_found")
    for path in ("sites", "databases", "redis-users"):
        r = await b.owner.get(f"{base(b)}/{path}")
        assert r.json()["items"] == [], path
    assert counts(api) == before
    r = await a.owner.get(f"{base(a)}/sites/{sid}")
    assert r.json()["status"] == "provisioning" and r.json()["force_https"] is True


async def test_permissions(api: Api) -> None:
    t = await api.create_tenant()
    server_id = await new_server(t)
    sites_only = api.token_client(await api.token(t, ["sites:read", "sites:write"]))
    viewer = api.token_client(await api.token(t, ["sites:read", "databases:read"]))
    r = await viewer.post(f"{base(t)}/sites", json=site_body(server_id))
    assert (r.status_code, r.json()["permission"]) == (403, "sites:write")
    r = await sites_only.post(f"{base(t)}/sites", json=site_body(server_id))
    assert r.status_code == 202, r.text
    r = await sites_only.post(f"{base(t)}/databases", json={"server_id": server_id, "name": "db"})
    assert (r.status_code, r.json()["permission"]) == (403, "databases:write")
    r = await viewer.get(f"{base(t)}/databases")
    assert r.status_code == 200
    r = await sites_only.get(f"{base(t)}/redis-users")
    assert (r.status_code, r.json()["permission"]) == (403, "databases:read")


# --- databases, users, FTP and Redis ---------------------------------------------------------


async def test_database_users_and_confirmed_deletion(api: Api, node: Node) -> None:
    t = await api.create_tenant()
    server_id, _ = await enrolled_server(api, t)
    c = t.owner
    r = await c.post(f"{base(t)}/databases", json={"server_id": server_id, "name": "shop"})
    assert r.status_code == 202, r.text
    database = r.json()
    (step,) = steps_of(api, database["workflow_id"])
    assert (step["command_type"], step["payload"]) == (
        "db.mariadb.database.create",
        {"name": "shop"},
    )
    assert (step["compensation_type"], step["compensation_payload"]) == (
        "db.mariadb.database.drop",
        {"name": "shop", "confirm": "shop"},
    )
    r = await c.post(f"{base(t)}/databases", json={"server_id": server_id, "name": "shop"})
    assert (r.status_code, r.json()["code"]) == (409, "conflict")
    await node.succeed(database["workflow_id"], {"created": True})
    db_url = f"{base(t)}/databases/{database['id']}"
    assert (await c.get(db_url)).json()["status"] == "active"

    r = await c.post(f"{db_url}/users", json={"name": "shop_app"})
    assert r.status_code == 202, r.text
    user = r.json()
    assert len(user["password"]) >= 32
    (step,) = steps_of(api, user["workflow_id"])
    assert step["command_type"] == "db.mariadb.user.create"
    assert set(step["payload"]) == {"user", "password", "database"}
    assert (step["payload"]["user"], step["payload"]["database"]) == ("shop_app", "shop")
    assert set(step["payload"]["password"]) == {"$boxed"}
    assert (step["compensation_type"], step["compensation_payload"]) == (
        "db.mariadb.user.drop",
        {"user": "shop_app"},
    )
    await node.succeed(user["workflow_id"], {"user": "shop_app"})
    r = await c.get(f"{db_url}/users")
    assert [(u["name"], u["status"]) for u in r.json()] == [("shop_app", "active")]
    assert "password" not in r.json()[0]

    # Deleting a database takes its name again, and no users left.
    r = await c.delete(db_url)
    assert (r.status_code, r.json()["code"]) == (409, "confirmation_required")
    assert "confirm=shop" in r.json()["detail"]
    r = await c.delete(f"{db_url}?confirm=blog")
    assert (r.status_code, r.json()["code"]) == (409, "confirmation_required")
    r = await c.delete(f"{db_url}?confirm=shop")
    assert (r.status_code, r.json()["code"]) == (409, "database_has_users")
    r = await c.delete(f"{db_url}/users/{user['id']}")
    assert r.status_code == 202 and r.json()["status"] == "deleting"
    command = await node.pending(r.json()["workflow_id"])
    assert (command["type"], command["payload"]) == ("db.mariadb.user.drop", {"user": "shop_app"})
    await node.report(command, output={"dropped": True})
    assert (await c.get(f"{db_url}/users")).json() == []
    r = await c.request("DELETE", db_url, json={"confirm": "shop"})
    assert r.status_code == 202, r.text
    command = await node.pending(r.json()["workflow_id"])
    assert (command["type"], command["payload"]) == (
        "db.mariadb.database.drop",
        {"name": "shop", "confirm": "shop"},
    )
    await node.report(command, output={"dropped": True})
    assert (await c.get(db_url)).status_code == 404
    assert audit_actions(api, database["id"]) == [
        "database.created",
        "database.provisioned",
        "database.delete_requested",
        "database.deleted",
    ]
    assert event_types(api, user["id"]) == [
        "database_user.created",
        "database_user.provisioned",
        "database_user.delete_requested",
        "database_user.deleted",
    ]


async def test_ftp_accounts_and_redis_users(api: Api, node: Node) -> None:
    t = await api.create_tenant()
    server_id, _ = await enrolled_server(api, t)
    c = t.owner
    r = await c.post(f"{base(t)}/sites", json=site_body(server_id))
    site_id = r.json()["id"]
    await node.succeed(r.json()["workflow_id"], {"document_root": "/srv/site"})

    ftp = f"{base(t)}/sites/{site_id}/ftp-accounts"
    r = await c.post(ftp, json={"username": "shop-deploy", "password": "Correct-Horse-9"})
    assert r.status_code == 202, r.text
    account = r.json()
    assert account["password"] == "Correct-Horse-9" and account["status"] == "provisioning"
    (step,) = steps_of(api, account["workflow_id"])
    assert step["command_type"] == "site.ftp.create"
    assert {k: v for k, v in step["payload"].items() if k != "password"} == {
        "site_id": site_id,
        "username": "shop-deploy",
    }
    assert (step["compensation_type"], step["compensation_payload"]) == (
        "site.ftp.delete",
        {"username": "shop-deploy"},
    )
    await node.succeed(account["workflow_id"], {"username": "shop-deploy", "home": "/srv/site"})
    r = await c.get(ftp)
    assert [(a["username"], a["status"], a["home"]) for a in r.json()] == [
        ("shop-deploy", "active", "/srv/site")
    ]
    r = await c.post(ftp, json={"username": "shop-deploy"})
    assert (r.status_code, r.json()["code"]) == (409, "conflict")

    # Deleting the site removes its FTP accounts on the node first.
    r = await c.delete(f"{base(t)}/sites/{site_id}")
    first = await node.pending(r.json()["workflow_id"])
    assert (first["type"], first["payload"]) == ("site.ftp.delete", {"username": "shop-deploy"})
    assert (await c.get(ftp)).json()[0]["status"] == "deleting"
    await node.report(first, output={"deleted": True})
    second = await node.pending(r.json()["workflow_id"])
    assert second["type"] == "site.remove"
    await node.report(second, output={"removed": True})
    assert db_rows(api, "SELECT * FROM ftp_accounts") == []

    redis = f"{base(t)}/redis-users"
    r = await c.post(redis, json={"server_id": server_id, "name": "shop", "prefix": "shop:"})
    assert r.status_code == 202, r.text
    user = r.json()
    (step,) = steps_of(api, user["workflow_id"])
    assert step["command_type"] == "db.redis.user.create"
    assert (step["payload"]["user"], step["payload"]["prefix"]) == ("shop", "shop:")
    r = await c.post(redis, json={"server_id": server_id, "name": "blog", "prefix": "shop:"})
    assert (r.status_code, r.json()["code"]) == (409, "conflict")
    # A password rotation waits until the user exists on the node.
    r = await c.post(f"{redis}/{user['id']}/password", json={})
    assert (r.status_code, r.json()["code"]) == (409, "resource_busy")
    await node.fail(user["workflow_id"], "redis_unreachable", "connection refused")
    got = (await c.get(f"{redis}/{user['id']}")).json()
    assert got["status"] == "failed" and "connection refused" in got["last_error"]
    r = await c.delete(f"{redis}/{user['id']}")
    assert r.status_code == 202 and r.json()["status"] == "deleting"
    await node.succeed(r.json()["workflow_id"], {})
    assert (await c.get(redis)).json()["items"] == []
