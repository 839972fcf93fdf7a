"""Tenant isolation over the whole HTTP API, generated from the route table.

For every route whose path names `{tenant_id}`, each principal of tenant A (the owner's
dashboard session and an API token with every tenant scope) is pointed at tenant B:

(a) every path parameter names B's resource (tenant_id = B);
(b) tenant_id = A and the other path parameters name B's resources.

The answer must be exactly 404 — not 403 (that would confirm the resource exists), not
data — and it must be the same answer as for an id that exists nowhere. Afterwards B's
data is unchanged, and A's own listings hold nothing of B.

The route table is the source: a route without `{tenant_id}` must be listed in
NOT_TENANT_SCOPED with the reason, a service-to-service route under /internal/ in
INTERNAL, a route that takes a body must have an example in BODIES, and a path parameter
must name a resource kind that `seed` creates. A route added without that coverage fails
`test_every_route_is_covered` and the sweep.
"""

from __future__ import annotations

import json
import re
import secrets
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import fastapi.routing
import httpx
import psycopg
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, Route

from alerting.evaluator import GroupEvaluation
from alerting.state import AlertState, GroupState, Transition, fingerprint
from alerting.store import AlertStore
from controlplane.access.permissions import TENANT_PERMISSIONS
from controlplane.api.internal import INTERNAL_HEADER
from controlplane.app import create_app
from yakpanel.pki import new_csr, new_private_key
from yakpanel.service_secrets import load_internal_token
from yakpanel.services import Stack

from .conftest import Api, Client, Tenant

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

TENANT = "tenant_id"
MEMBER_PASSWORD = "member-password-123"

# --- the coverage tables --------------------------------------------------------------

# Path parameters the sweep can fill with a resource of tenant B (created by `seed`).
RESOURCE_PARAMS = frozenset(
    {
        TENANT,
        "server_id",
        "role_id",
        "token_id",
        "user_id",
        "serial",
        "command_id",
        "group_name",
        "silence_id",
        "incident_id",
        "site_id",
        "ftp_account_id",
        "database_id",
        "database_user_id",
        "redis_user_id",
        "workflow_id",  # WORKFLOWS: a site's workflow stands in for any
    }
)
INTERNAL_PREFIX = "/internal/"

Access = Literal["public", "self", "catalogue", "own-tenants", "staff", "tenant-param"]

# Routes without `{tenant_id}`: why they cannot reach a tenant's data by path.
#   public      no principal, no tenant data
#   self        acts on the caller's own identity only
#   catalogue   platform-wide data, the same for every caller
#   own-tenants the caller's tenants only (checked below: A sees only A)
#   staff       platform staff only (checked below: A's principals get 403)
#   tenant-param the tenant is the token's own or the `tenant_id` parameter, resolved like
#               a path's (checked below with TENANT_PARAM_EXAMPLES: B's is 404 as none's)
NOT_TENANT_SCOPED: dict[tuple[str, str], tuple[Access, str]] = {
    ("GET", "/healthz"): ("public", "liveness; no data"),
    ("GET", "/readyz"): ("public", "reachability of PostgreSQL, Kafka, ClickHouse; no data"),
    ("GET", "/openapi.json"): ("public", "the API description"),
    ("GET", "/docs"): ("public", "Swagger UI page"),
    ("GET", "/docs/oauth2-redirect"): ("public", "Swagger UI helper page"),
    ("POST", "/v1/auth/login"): ("public", "exchanges credentials for a session"),
    ("POST", "/v1/auth/logout"): ("self", "ends the caller's own session"),
    ("GET", "/v1/auth/me"): ("self", "the caller and its memberships (checked: only A)"),
    ("POST", "/v1/users/me/password"): ("self", "the caller's own password"),
    ("POST", "/v1/users/me/totp"): ("self", "the caller's own second factor"),
    ("POST", "/v1/users/me/totp/confirm"): ("self", "the caller's own second factor"),
    ("POST", "/v1/users/me/totp/disable"): ("self", "the caller's own second factor"),
    ("GET", "/v1/plans"): ("catalogue", "plans and their limits are public to callers"),
    ("GET", "/v1/permissions"): ("catalogue", "the permission catalogue"),
    ("GET", "/v1/tenants"): ("own-tenants", "the caller's tenants"),
    ("POST", "/v1/plans"): ("staff", "platform:plans:write"),
    ("PATCH", "/v1/plans/{plan_id}"): ("staff", "platform:plans:write"),
    ("POST", "/v1/tenants"): ("staff", "platform:tenants:write"),
    ("GET", "/v1/audit"): ("staff", "platform:audit:read"),
    # The NOC pages: HTML for browser sessions (checked below).
    ("GET", "/noc/login"): ("public", "the NOC login form; no data"),
    ("POST", "/noc/login"): ("public", "the NOC login form: exchanges credentials for a session"),
    ("POST", "/noc/logout"): ("self", "ends the caller's own session"),
    ("GET", "/noc/static/{asset}"): ("public", "the NOC pages' script, stylesheet and icon"),
    ("GET", "/noc/"): ("own-tenants", "NOC fleet: servers of the caller's tenants (only A)"),
    ("GET", "/noc/servers/{server_id}"): (
        "own-tenants",
        "NOC server page: B's server gets the page of a server that does not exist",
    ),
    ("GET", "/noc/alerts"): ("own-tenants", "NOC alerts: alerts of the caller's tenants (only A)"),
    ("GET", "/noc/alerts/{tenant}/{fingerprint}"): (
        "own-tenants",
        "NOC alert page: B's alert gets the page of an alert that does not exist",
    ),
    ("POST", "/noc/alerts/{tenant}/{fingerprint}/silences"): (
        "own-tenants",
        "NOC silence form: B's alert is 404 as none's, before the form is read",
    ),
    ("POST", "/noc/alerts/{tenant}/{fingerprint}/silences/{silence_id}/expire"): (
        "own-tenants",
        "NOC expire button: B's alert is 404 as none's, before the form is read",
    ),
    ("GET", "/noc/sites"): ("own-tenants", "NOC sites: sites of the caller's tenants (only A)"),
    ("GET", "/noc/sites/{tenant}/{site_id}"): (
        "own-tenants",
        "NOC site page: B's site is the page of a site that does not exist",
    ),
    ("GET", "/noc/incidents"): (
        "own-tenants",
        "NOC incidents: incidents of the caller's tenants (only A)",
    ),
    ("GET", "/noc/incidents/{tenant}/{incident_id}"): (
        "own-tenants",
        "NOC incident page: B's incident gets the page of an incident that does not exist",
    ),
    ("POST", "/noc/incidents/{tenant}/{incident_id}/acknowledge"): (
        "own-tenants",
        "NOC acknowledge button: B's incident is 404 as none's, before the form is read",
    ),
    ("POST", "/noc/incidents/{tenant}/{incident_id}/assign"): (
        "own-tenants",
        "NOC assign form: B's incident is 404 as none's, before the form is read",
    ),
    ("POST", "/noc/incidents/{tenant}/{incident_id}/notes"): (
        "own-tenants",
        "NOC note form: B's incident is 404 as none's, before the form is read",
    ),
    ("POST", "/noc/incidents/{tenant}/{incident_id}/resolve"): (
        "own-tenants",
        "NOC resolve form: B's incident is 404 as none's, before the form is read",
    ),
    # Metrics: the tenant comes from the token or the `tenant_id` parameter.
    ("GET", "/v1/metrics/query_range"): ("tenant-param", "bucketed metric values"),
    ("GET", "/v1/metrics/series"): ("tenant-param", "the tenant's series"),
    ("GET", "/v1/metrics/labels"): ("tenant-param", "the tenant's label names"),
    ("GET", "/v1/metrics/labels/{name}/values"): ("tenant-param", "the tenant's label values"),
    ("GET", "/prometheus/api/v1/query"): ("tenant-param", "PromQL instant query"),
    ("POST", "/prometheus/api/v1/query"): ("tenant-param", "PromQL instant query"),
    ("GET", "/prometheus/api/v1/query_range"): ("tenant-param", "PromQL range query"),
    ("POST", "/prometheus/api/v1/query_range"): ("tenant-param", "PromQL range query"),
    ("GET", "/prometheus/api/v1/series"): ("tenant-param", "series by match[]"),
    ("POST", "/prometheus/api/v1/series"): ("tenant-param", "series by match[]"),
    ("GET", "/prometheus/api/v1/labels"): ("tenant-param", "label names"),
    ("POST", "/prometheus/api/v1/labels"): ("tenant-param", "label names"),
    ("GET", "/prometheus/api/v1/label/{name}/values"): ("tenant-param", "label values"),
    ("POST", "/prometheus/api/v1/label/{name}/values"): ("tenant-param", "label values"),
    ("GET", "/prometheus/api/v1/status/buildinfo"): ("public", "API level and version; no data"),
}

# A valid request (path parameters, then query string or form) for every `tenant-param`
# route; `tenant_id` is added by the check.
TENANT_PARAM_EXAMPLES: dict[tuple[str, str], tuple[dict[str, str], dict[str, str]]] = {
    ("GET", "/v1/metrics/query_range"): ({}, {"metric": "http_requests", "step": "60"}),
    ("GET", "/v1/metrics/series"): ({}, {}),
    ("GET", "/v1/metrics/labels"): ({}, {}),
    ("GET", "/v1/metrics/labels/{name}/values"): ({"name": "server_id"}, {}),
    ("GET", "/prometheus/api/v1/query"): ({}, {"query": '{__name__=~".+"}'}),
    ("POST", "/prometheus/api/v1/query"): ({}, {"query": '{__name__=~".+"}'}),
    ("GET", "/prometheus/api/v1/query_range"): (
        {},
        {"query": "up", "start": "1700000000", "end": "1700003600", "step": "60"},
    ),
    ("POST", "/prometheus/api/v1/query_range"): (
        {},
        {"query": "up", "start": "1700000000", "end": "1700003600", "step": "60"},
    ),
    ("GET", "/prometheus/api/v1/series"): ({}, {"match[]": '{__name__=~".+"}'}),
    ("POST", "/prometheus/api/v1/series"): ({}, {"match[]": '{__name__=~".+"}'}),
    ("GET", "/prometheus/api/v1/labels"): ({}, {}),
    ("POST", "/prometheus/api/v1/labels"): ({}, {}),
    ("GET", "/prometheus/api/v1/label/{name}/values"): ({"name": "server_id"}, {}),
    ("POST", "/prometheus/api/v1/label/{name}/values"): ({"name": "server_id"}, {}),
}

# Routes for other YakPanel services (the gateway), authenticated by the shared internal
# token; the gateway takes tenant and server from the agent's certificate. Principals of
# a tenant get 401 there (checked below).
INTERNAL: dict[tuple[str, str], str] = {
    ("POST", "/internal/v1/enroll"): "redeems a one-time enrollment token for a certificate",
    ("GET", "/internal/v1/certificates/{serial}"): "status of a certificate an agent presented",
    ("POST", "/internal/v1/gateway-certificate"): "the gateway's own server certificate",
    ("GET", "/internal/v1/tenants/{tenant_id}/servers/{server_id}/pending-commands"): (
        "commands for the connecting agent, by the identity in its certificate"
    ),
    ("GET", "/internal/v1/tenants/{tenant_id}/metric-limits"): (
        "the plan's metric retention of the tenant named in a sender's certificate"
    ),
}

# In BODIES, a server the request names; the control with A's own ids puts A's in.
ANY_SERVER = "00000000-0000-0000-0000-000000000000"

# A valid body for every tenant-scoped route that takes one. The values are the most
# damaging ones, so that a leak would show in B's state as well as in the status.
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("PATCH", "/v1/tenants/{tenant_id}"): {"name": "Renamed by another tenant"},
    ("POST", "/v1/tenants/{tenant_id}/suspend"): {"reason": "suspended by another tenant"},
    ("POST", "/v1/tenants/{tenant_id}/schedule-deletion"): {"after_days": 0},
    ("PUT", "/v1/tenants/{tenant_id}/plan"): {"plan": "business"},
    ("POST", "/v1/tenants/{tenant_id}/members"): {
        "email": "intruder@intruder.test",
        "password": MEMBER_PASSWORD,
        "role": "owner",
    },
    ("PATCH", "/v1/tenants/{tenant_id}/members/{user_id}"): {"role": "admin"},
    ("POST", "/v1/tenants/{tenant_id}/roles"): {
        "name": "intruder",
        "permissions": sorted(TENANT_PERMISSIONS),
    },
    ("PATCH", "/v1/tenants/{tenant_id}/roles/{role_id}"): {
        "description": "changed by another tenant",
        "permissions": sorted(TENANT_PERMISSIONS),
    },
    ("POST", "/v1/tenants/{tenant_id}/tokens"): {"name": "intruder", "scopes": ["servers:read"]},
    ("POST", "/v1/tenants/{tenant_id}/servers"): {"name": "intruder", "region": "eu-1"},
    ("PATCH", "/v1/tenants/{tenant_id}/servers/{server_id}"): {
        "region": "hijacked",
        "labels": {"owner": "intruder"},
    },
    ("POST", "/v1/tenants/{tenant_id}/servers/{server_id}/enrollment-tokens"): {"ttl_minutes": 60},
    ("POST", "/v1/tenants/{tenant_id}/servers/{server_id}/certificates/{serial}/revoke"): {
        "reason": "revoked by another tenant"
    },
    ("POST", "/v1/tenants/{tenant_id}/servers/{server_id}/commands"): {
        "type": "system.reboot",
        "payload": {},
        "idempotency_key": "intruder",
    },
    ("POST", "/v1/tenants/{tenant_id}/alerting/rule-groups"): {
        "name": "intruder",
        "rules": [{"alert": "Intruder", "expr": "vector(1)"}],
    },
    ("PUT", "/v1/tenants/{tenant_id}/alerting/rule-groups/{group_name}"): {
        "rules": [{"alert": "Hijacked", "expr": "vector(1)"}],
    },
    ("POST", "/v1/tenants/{tenant_id}/alerting/rule-files"): {
        "groups": [{"name": "intruder-file", "rules": [{"alert": "Intruder", "expr": "vector(1)"}]}]
    },
    ("PUT", "/v1/tenants/{tenant_id}/alerting/notification-config"): {
        "route": {"receiver": "intruder"},
        "receivers": [{"name": "intruder", "urls": ["json://intruder.example/hook"]}],
    },
    ("POST", "/v1/tenants/{tenant_id}/alerting/silences"): {
        "matchers": ['alertname=~".+"'],
        "ends_at": "2099-01-01T00:00:00Z",
        "comment": "silenced by another tenant",
    },
    ("POST", "/v1/tenants/{tenant_id}/incidents/{incident_id}/assign"): {"user_id": None},
    ("POST", "/v1/tenants/{tenant_id}/incidents/{incident_id}/notes"): {
        "text": "noted by another tenant"
    },
    ("POST", "/v1/tenants/{tenant_id}/incidents/{incident_id}/resolve"): {
        "comment": "resolved by another tenant"
    },
    ("POST", "/v1/tenants/{tenant_id}/sites"): {
        "server_id": ANY_SERVER,
        "kind": "static",
        "domains": ["intruder.example.com"],
    },
    ("PATCH", "/v1/tenants/{tenant_id}/sites/{site_id}"): {
        "domains": ["hijacked.example.com"],
        "force_https": False,
    },
    ("POST", "/v1/tenants/{tenant_id}/sites/{site_id}/certificate"): {"force": True},
    ("POST", "/v1/tenants/{tenant_id}/sites/{site_id}/ftp-accounts"): {
        "username": "intruder",
        "password": "intruder-password-123",
    },
    ("POST", "/v1/tenants/{tenant_id}/sites/{site_id}/ftp-accounts/{ftp_account_id}/password"): {
        "password": "intruder-password-123"
    },
    ("POST", "/v1/tenants/{tenant_id}/databases"): {"server_id": ANY_SERVER, "name": "intruder"},
    ("DELETE", "/v1/tenants/{tenant_id}/databases/{database_id}"): {"confirm": "intruder"},
    ("POST", "/v1/tenants/{tenant_id}/databases/{database_id}/users"): {
        "name": "intruder",
        "password": "intruder-password-123",
    },
    ("POST", "/v1/tenants/{tenant_id}/databases/{database_id}/users/{database_user_id}/password"): {
        "password": "intruder-password-123"
    },
    ("POST", "/v1/tenants/{tenant_id}/redis-users"): {
        "server_id": ANY_SERVER,
        "name": "intruder",
        "prefix": "intruder:",
    },
    ("POST", "/v1/tenants/{tenant_id}/redis-users/{redis_user_id}/password"): {
        "password": "intruder-password-123"
    },
}

# Bodies for the staff-only routes, so that the 403 is about permission, not validation.
STAFF_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/plans"): {
        "code": "intruder",
        "name": "Intruder",
        "max_servers": 1000,
        "max_sites": 1000,
        "max_databases": 1000,
        "max_alert_rules": 1000,
        "metric_retention_days": 30,
        "api_requests_per_minute": 1000,
    },
    ("PATCH", "/v1/plans/{plan_id}"): {"max_servers": 1000},
    ("POST", "/v1/tenants"): {
        "slug": "intruder-tenant",
        "name": "Intruder",
        "plan": "business",
        "owner_email": "intruder@intruder.test",
        "owner_password": MEMBER_PASSWORD,
    },
}


# --- the route table ------------------------------------------------------------------

_PARAM = re.compile(r"{(\w+)(?::\w+)?}")


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    params: tuple[str, ...]
    has_body: bool

    @property
    def key(self) -> tuple[str, str]:
        return (self.method, self.path)

    @property
    def internal(self) -> bool:
        return self.path.startswith(INTERNAL_PREFIX)

    @property
    def tenant_scoped(self) -> bool:
        return TENANT in self.params and not self.internal

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def _routes(app: FastAPI) -> Iterator[tuple[str, set[str], BaseRoute]]:
    """(path, methods, route) of every route, through included routers."""
    contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    if contexts is None:  # FastAPI before lazily included routers: `app.routes` is flat
        for route in app.routes:
            yield getattr(route, "path", ""), set(getattr(route, "methods", None) or ()), route
        return
    for ctx in contexts(app.routes):
        yield ctx.path or "", set(ctx.methods or ()), ctx.original_route


def endpoints(app: FastAPI) -> list[Endpoint]:
    """Every (method, path) the app serves. Anything but an HTTP route is refused."""
    out: list[Endpoint] = []
    for path, methods, route in _routes(app):
        if not isinstance(route, Route) or not methods:
            pytest.fail(
                f"{route!r} ({path}) is not an HTTP route; teach test_cross_tenant.py how "
                "to cover it",
                pytrace=False,
            )
        if "GET" in methods:
            methods.discard("HEAD")  # served by the GET handler
        has_body = isinstance(route, APIRoute) and route.body_field is not None
        params = tuple(m.group(1) for m in _PARAM.finditer(path))
        out.extend(Endpoint(m, path, params, has_body) for m in sorted(methods))
    return out


def coverage_problems(eps: list[Endpoint]) -> list[str]:
    problems: list[str] = []
    keys = {ep.key for ep in eps}
    for ep in eps:
        if ep.internal:
            if ep.key not in INTERNAL:
                problems.append(
                    f"{ep} is an internal route but not in INTERNAL; add it there with what "
                    "it serves, and make sure it does not trust a tenant from the caller"
                )
        elif ep.tenant_scoped:
            unknown = sorted(set(ep.params) - RESOURCE_PARAMS)
            if unknown:
                problems.append(
                    f"{ep}: path parameter(s) {unknown} name a resource the cross-tenant test "
                    "does not create; add it to `seed` and RESOURCE_PARAMS"
                )
            if ep.has_body and ep.key not in BODIES:
                problems.append(
                    f"{ep} takes a body but BODIES has no example for it; add coverage "
                    "(a valid body) to test_cross_tenant.py"
                )
        elif ep.key not in NOT_TENANT_SCOPED:
            problems.append(
                f"{ep} is not tenant-scoped (no {{tenant_id}} in its path) and is not in "
                "NOT_TENANT_SCOPED; add it there with the reason it cannot reach a tenant's "
                "data, or put it under /v1/tenants/{tenant_id}"
            )
        elif NOT_TENANT_SCOPED[ep.key][0] == "staff" and ep.has_body and ep.key not in STAFF_BODIES:
            problems.append(f"{ep} is staff-only and takes a body; add it to STAFF_BODIES")
        elif NOT_TENANT_SCOPED[ep.key][0] == "tenant-param" and (
            ep.key not in TENANT_PARAM_EXAMPLES
        ):
            problems.append(f"{ep} takes its tenant as a parameter; add TENANT_PARAM_EXAMPLES")
    tables: dict[str, Collection[tuple[str, str]]] = {
        "NOT_TENANT_SCOPED": NOT_TENANT_SCOPED,
        "INTERNAL": INTERNAL,
        "BODIES": BODIES,
        "STAFF_BODIES": STAFF_BODIES,
        "TENANT_PARAM_EXAMPLES": TENANT_PARAM_EXAMPLES,
    }
    for name, table in tables.items():
        for method, path in sorted(set(table) - keys):
            problems.append(f"{name} lists {method} {path}, which the app no longer serves")
    return problems


def fill(path: str, values: dict[str, str]) -> str:
    return _PARAM.sub(lambda m: values[m.group(1)], path)


# --- tenants with one resource of every kind --------------------------------------------


@dataclass
class Seeded:
    tenant: Tenant
    ids: dict[str, str]  # path parameter -> this tenant's resource
    marks: set[str] = field(default_factory=set)  # strings only this tenant's data holds
    hosting_server: str = ""  # the server its hosting resources live on


async def _created(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def internal_client(api: Api) -> Client:
    """What the gateway is: a service holding the shared internal token."""
    return api.client(headers={INTERNAL_HEADER: load_internal_token(api.stack.settings)})


async def seed(api: Api, t: Tenant) -> Seeded:
    """One resource of every kind a path parameter can name, with names unique to `t`."""
    c, base, tag = t.owner, f"/v1/tenants/{t.id}", t.slug
    server = await _created(
        await c.post(
            f"{base}/servers",
            json={"name": f"{tag}-srv", "region": tag, "labels": {"who": tag}},
        )
    )
    role = await _created(
        await c.post(
            f"{base}/roles",
            json={"name": f"{tag}-role", "description": tag, "permissions": ["servers:read"]},
        )
    )
    token = await _created(
        await c.post(f"{base}/tokens", json={"name": f"{tag}-token", "scopes": ["servers:read"]})
    )
    member = await _created(
        await c.post(
            f"{base}/members",
            json={
                "email": f"member@{tag}.test",
                "password": MEMBER_PASSWORD,
                "role": "viewer",
                "display_name": tag,
            },
        )
    )
    # An agent enrolled on the server (as the gateway would), and a command for it.
    servers = f"{base}/servers/{server['id']}"
    enrollment = await _created(await c.post(f"{servers}/enrollment-tokens", json={}))
    r = await internal_client(api).post(
        "/internal/v1/enroll",
        json={
            "token": enrollment["token"],
            "csr_pem": new_csr(new_private_key(), f"{tag}-node").decode(),
            "hostname": f"{tag}-node",
        },
    )
    assert r.status_code == 200, r.text
    r = await c.get(f"{servers}/certificates")
    assert r.status_code == 200, r.text
    [certificate] = r.json()
    r = await c.post(
        f"{servers}/commands",
        json={"type": "system.ping", "payload": {"who": tag}, "idempotency_key": f"{tag}-cmd"},
    )
    assert r.status_code == 202, r.text
    command = r.json()
    # Alerting: a rule group, a silence and a notification config naming the tenant.
    alerting = f"{base}/alerting"
    rules = [{"alert": "SiteDown", "expr": f'yakpanel_site_up{{site="{tag}"}} == 0'}]
    group = await _created(
        await c.post(f"{alerting}/rule-groups", json={"name": f"{tag}-group", "rules": rules})
    )
    silence = await _created(
        await c.post(
            f"{alerting}/silences",
            json={
                "matchers": [f'who="{tag}"'],
                "ends_at": "2099-01-01T00:00:00Z",
                "comment": f"silence of {tag}",
            },
        )
    )
    r = await c.put(
        f"{alerting}/notification-config",
        json={
            "route": {"receiver": tag},
            "receivers": [{"name": tag, "urls": [f"json://{tag}.example/hook"]}],
        },
    )
    assert r.status_code == 200, r.text
    # An incident, opened by a firing transition recorded through the alert store.
    incident = await open_incident(api, t.id, {"alertname": "SiteDown", "site": tag})

    # Hosting: a site with a certificate request and an FTP account, a database with a
    # user, a Redis user (writes answer 202: stored, and a workflow started).
    hosting = await _hosting(api, c, base, tag)
    hosting_server = hosting.pop("server")

    me = (await c.get("/v1/auth/me")).json()
    ids = {
        TENANT: t.id,
        "server_id": server["id"],
        "role_id": role["id"],
        "token_id": token["id"],
        "user_id": member["user_id"],
        "serial": certificate["serial"],
        "command_id": command["id"],
        "group_name": group["name"],
        "silence_id": silence["id"],
        "incident_id": incident,
        **hosting,
    }
    assert set(ids) == RESOURCE_PARAMS
    # The slug is part of every name, email, label and payload above, so it covers them.
    found = {me["id"], t.slug, token["prefix"], certificate["fingerprint"]}
    return Seeded(t, ids, {*ids.values(), *found}, hosting_server)


async def _accepted(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def _site_provisioned(api: Api, site: dict[str, Any]) -> None:
    """What the workflow driver records when the node has applied the site (no driver
    runs here): a certificate can only be asked for an active, idle site."""
    with psycopg.connect(api.stack.postgres_dsn) as conn:
        conn.execute(
            "UPDATE workflows SET state = 'succeeded', finished_at = now() WHERE id = %s",
            (site["workflow_id"],),
        )
        conn.execute("UPDATE sites SET status = 'active' WHERE id = %s", (site["id"],))


async def _hosting(api: Api, c: Client, base: str, tag: str) -> dict[str, str]:
    # On a server of their own: the control below deletes `server_id`, which removes
    # what lives on it, and these resources must outlive it.
    server = await _created(await c.post(f"{base}/servers", json={"name": f"{tag}-web"}))
    server_id = server["id"]
    site = await _accepted(
        await c.post(
            f"{base}/sites",
            json={"server_id": server_id, "kind": "static", "domains": [f"{tag}.example.com"]},
        )
    )
    _site_provisioned(api, site)
    await _accepted(await c.post(f"{base}/sites/{site['id']}/certificate", json={}))
    ftp = await _accepted(
        await c.post(f"{base}/sites/{site['id']}/ftp-accounts", json={"username": f"{tag}-ftp"})
    )
    name = tag.replace("-", "_")
    database = await _accepted(
        await c.post(f"{base}/databases", json={"server_id": server_id, "name": name})
    )
    user = await _accepted(
        await c.post(f"{base}/databases/{database['id']}/users", json={"name": name})
    )
    redis_user = await _accepted(
        await c.post(
            f"{base}/redis-users", json={"server_id": server_id, "name": tag, "prefix": f"{tag}:"}
        )
    )
    return {
        "server": server_id,
        "site_id": site["id"],
        "ftp_account_id": ftp["id"],
        "database_id": database["id"],
        "database_user_id": user["id"],
        "redis_user_id": redis_user["id"],
        "workflow_id": site["workflow_id"],  # WORKFLOWS
    }


async def open_incident(api: Api, tenant_id: str, labels: dict[str, str]) -> str:
    """Record a firing transition the alerting service's way; returns the incident."""
    at = datetime.now(UTC)
    fp = fingerprint(tenant_id, "g/SiteDown", labels)
    firing = Transition(
        tenant_id, fp, "g/SiteDown", "g", "SiteDown", labels, {},
        AlertState.PENDING, AlertState.FIRING, at, 1.0, at,
    )  # fmt: skip
    store = AlertStore(api.stack.postgres_dsn)
    await store.open()
    try:
        await store.save_evaluation(tenant_id, "g", GroupEvaluation(at, GroupState({}), (firing,)))
        async with store.tenant(tenant_id) as conn:
            row = await (
                await conn.execute(
                    "SELECT id FROM incidents WHERE tenant_id = %s AND fingerprint = %s",
                    (tenant_id, fp),
                )
            ).fetchone()
    finally:
        await store.close()
    assert row is not None
    return str(row["id"])


async def noc_alert(api: Api, tenant_id: str) -> str:
    """A firing alert in the tenant's state, stored the alerting service's way."""
    from alerting.state import Alert, RuleState

    at = datetime.now(UTC)
    labels = {"alertname": "NocDown", "tenant": tenant_id}
    fp = fingerprint(tenant_id, "noc/NocDown", labels)
    alert = Alert(fp, "noc/NocDown", labels, {}, AlertState.FIRING, 1.0, at, at, fired_at=at)
    state = GroupState({"noc/NocDown": RuleState("noc/NocDown", {fp: alert}, "ok", None, at)})
    store = AlertStore(api.stack.postgres_dsn)
    await store.open()
    try:
        await store.save_evaluation(tenant_id, "noc", GroupEvaluation(at, state, ()))
    finally:
        await store.close()
    return fp


def phantom(param: str, real: str) -> str:
    """An id of the same shape as `real` that names nothing."""
    if param == "serial":
        return secrets.token_hex(20)[: len(real)].lstrip("0") or "1"
    return str(uuid.uuid4())


def _leaks(text: str, marks: set[str]) -> list[str]:
    return sorted(s for s in marks if s in text)


def _problem(r: httpx.Response, url: str) -> dict[str, Any]:
    """The problem body without `instance`, which echoes the path the caller sent."""
    problem: dict[str, Any] = r.json()
    assert problem.pop("instance", url) == url
    return problem


async def _not_found(
    client: Client, ep: Endpoint, values: dict[str, str], marks: set[str], who: str
) -> dict[str, Any]:
    """Call `ep`; require exactly 404 with nothing of the other tenant in the body."""
    url = fill(ep.path, values)
    body = BODIES.get(ep.key)
    r = await client.request(ep.method, url, json=body)
    assert r.status_code == 404, (
        f"{who}: {ep.method} {url} answered {r.status_code} instead of 404: {r.text}"
    )
    problem = _problem(r, url)
    leaked = _leaks(json.dumps(problem), marks)
    assert not leaked, f"{who}: {ep.method} {url} leaked {leaked}: {r.text}"
    return problem


async def _hidden(
    client: Client,
    ep: Endpoint,
    values: dict[str, str],
    foreign: set[str],
    marks: set[str],
    who: str,
) -> None:
    """404 for the foreign ids, and the very same problem as for ids that exist nowhere."""
    problem = await _not_found(client, ep, values, marks, who)
    nowhere = {k: (phantom(k, v) if k in foreign else v) for k, v in values.items()}
    expected = await _not_found(client, ep, nowhere, marks, f"{who} (nonexistent ids)")
    assert problem == expected, (
        f"{who}: {ep} tells B's existing resource ({problem}) from a nonexistent one ({expected})"
    )


async def _snapshot(
    client: Client, eps: list[Endpoint], ids: dict[str, str], when: str
) -> dict[str, Any]:
    """What the tenant's own owner reads on every tenant-scoped GET route."""
    out: dict[str, Any] = {}
    for ep in eps:
        if ep.tenant_scoped and ep.method == "GET":
            url = fill(ep.path, ids)
            r = await client.get(url)
            assert r.status_code == 200, f"B's owner {when}: GET {url}: {r.text}"
            out[url] = r.json()
    return out


def _mirror_order(ep: Endpoint) -> int:
    """Reads first, then changes of existing resources, deletes, and tenant-level writes."""
    if ep.method == "GET":
        return 0
    if len(ep.params) > 1:
        return 2 if ep.method == "DELETE" else 1
    return 3


# --- the tests ------------------------------------------------------------------------


async def test_every_route_is_covered(stack: Stack) -> None:
    eps = endpoints(create_app(stack))  # reading the routes needs no lifespan
    problems = coverage_problems(eps)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
    assert any(ep.tenant_scoped for ep in eps)


async def test_foreign_tenant_resources_are_not_found_on_every_route(api: Api) -> None:
    eps = endpoints(create_app(api.stack))
    problems = coverage_problems(eps)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
    scoped = [ep for ep in eps if ep.tenant_scoped]

    a = await seed(api, await api.create_tenant())
    b = await seed(api, await api.create_tenant())
    a_token = await api.token(a.tenant, sorted(TENANT_PERMISSIONS))
    principals = {
        "A's owner (session)": a.tenant.owner,
        "A's token (all scopes)": api.token_client(a_token),
    }
    before = await _snapshot(b.tenant.owner, eps, b.ids, "before the sweep")

    calls = 0
    for ep in scoped:
        others = set(ep.params) - {TENANT}
        for who, client in principals.items():
            # (a) everything names B.
            await _hidden(client, ep, b.ids, set(ep.params), b.marks, f"{who} in B")
            calls += 1
            # (b) A's tenant, B's resources (routes with only {tenant_id} do not apply).
            if others:
                values = {**b.ids, TENANT: a.tenant.id}
                await _hidden(client, ep, values, others, b.marks, f"{who} in A")
                calls += 1
    with_resource = [ep for ep in scoped if len(ep.params) > 1]
    assert scoped and with_resource
    assert calls == len(principals) * (len(scoped) + len(with_resource))

    # Nothing of B changed: not the tenant (name, plan, state), its servers, roles,
    # tokens, members, certificates, commands — nor its audit log, which would show any
    # write A made.
    after = await _snapshot(b.tenant.owner, eps, b.ids, "after the sweep")
    assert after == before
    b_base = f"/v1/tenants/{b.tenant.id}"
    b_server = f"{b_base}/servers/{b.ids['server_id']}"
    assert (after[b_base]["state"], after[b_base]["plan"]) == ("active", "starter")
    assert after[f"{b_base}/tokens/{b.ids['token_id']}"]["revoked_at"] is None
    assert [c["revoked_at"] for c in after[f"{b_server}/certificates"]] == [None]
    assert after[f"{b_base}/commands/{b.ids['command_id']}"]["state"] == "pending"
    assert b.ids["server_id"] in [s["id"] for s in after[f"{b_base}/servers"]["items"]]

    # B's data does not show through A's own routes: every tenant-scoped read of A, with
    # A's resources, answers 200 without a trace of B.
    for who, client in principals.items():
        for ep in scoped:
            if ep.method == "GET":
                url = fill(ep.path, a.ids)
                r = await client.get(url)
                assert r.status_code == 200, f"{who}: {url}: {r.text}"
                leaked = _leaks(r.text, b.marks)
                assert not leaked, f"{who}: {url} shows B's {leaked}: {r.text}"

    # Control: the same requests with A's own ids are not 404 (nor invalid), so each 404
    # above came from tenant isolation, not from a wrong path or body.
    for ep in sorted(scoped, key=_mirror_order):
        url = fill(ep.path, a.ids)
        body = json.loads(json.dumps(BODIES.get(ep.key)).replace(ANY_SERVER, a.hosting_server))
        r = await a.tenant.owner.request(ep.method, url, json=body)
        assert r.status_code not in (401, 404, 405, 422), f"{ep} on A's own: {r.text}"


async def test_platform_routes_do_not_reach_other_tenants(api: Api) -> None:
    a = await seed(api, await api.create_tenant())
    b = await seed(api, await api.create_tenant())
    eps = {ep.key: ep for ep in endpoints(create_app(api.stack))}
    a_token = await api.token(a.tenant, sorted(TENANT_PERMISSIONS))
    principals = {
        "A's owner (session)": a.tenant.owner,
        "A's token (all scopes)": api.token_client(a_token),
    }
    plans = (await a.tenant.owner.get("/v1/plans")).json()
    values = {"plan_id": next(p["id"] for p in plans if p["code"] == "starter")}

    # A firing alert in each tenant, for the NOC alert pages.
    a_alert = await noc_alert(api, a.tenant.id)
    b_noc = {**b.ids, "tenant": b.tenant.id, "fingerprint": await noc_alert(api, b.tenant.id)}
    b.marks.add(b_noc["fingerprint"])

    staff_routes = [k for k, (access, _) in NOT_TENANT_SCOPED.items() if access == "staff"]
    assert staff_routes
    for who, client in principals.items():
        for key in staff_routes:
            ep = eps[key]
            url = fill(ep.path, values)
            r = await client.request(ep.method, url, json=STAFF_BODIES.get(key))
            assert r.status_code == 403, f"{who}: {ep.method} {url}: {r.status_code} {r.text}"
            assert not _leaks(json.dumps(_problem(r, url)), b.marks)

        r = await client.get("/v1/tenants")
        assert r.status_code == 200, r.text
        assert [t["id"] for t in r.json()["items"]] == [a.tenant.id], f"{who}: {r.text}"

        r = await client.get("/v1/auth/me")
        assert r.status_code == 200, r.text
        assert [m["tenant_id"] for m in r.json()["memberships"]] == [a.tenant.id]

        for path in ("/v1/plans", "/v1/permissions"):
            r = await client.get(path)
            assert r.status_code == 200, r.text
            assert not _leaks(r.text, b.marks), f"{who}: {path}: {r.text}"

        # The NOC pages (HTML for a browser session): nothing of B on the fleet, and B's
        # server page is the very page of a server that does not exist. An API token is
        # not a browser session: it is sent to the login form.
        noc_pages = [
            key
            for key, (access, _) in NOT_TENANT_SCOPED.items()
            if access == "own-tenants" and key[1].startswith("/noc/")
        ]
        assert noc_pages
        for key in noc_pages:
            ep = eps[key]
            url = fill(ep.path, b_noc)
            r = await client.request(ep.method, url)
            assert not _leaks(r.text, b.marks), f"{who}: {url} shows B: {r.text}"
            if "token" in who:
                assert r.status_code == 303, f"{who}: {url}: {r.status_code}"
                assert r.headers["location"].startswith("/noc/login"), r.headers
            elif ep.params:
                nowhere = fill(ep.path, {k: phantom(k, v) for k, v in b_noc.items()})
                expected = await client.request(ep.method, nowhere)
                assert r.status_code == expected.status_code == 404, f"{who}: {url}: {r.text}"
                assert r.text == expected.text, f"{who}: {url} tells B's server from none"
            else:
                assert r.status_code == 200, f"{who}: {url}: {r.text}"
                # control: A's own server (fleet) or alert (alerts) is there
                assert (
                    a.ids["server_id"] in r.text
                    or a_alert in r.text
                    or a.ids["incident_id"] in r.text
                    or a.ids["site_id"] in r.text
                )

        # The internal routes are for services: a tenant's principal is not one.
        for key in INTERNAL:
            ep = eps[key]
            url = fill(ep.path, b.ids)
            r = await client.request(ep.method, url)
            assert r.status_code == 401, f"{who}: {ep.method} {url}: {r.status_code} {r.text}"
            assert not _leaks(json.dumps(_problem(r, url)), b.marks)

    # Even the gateway gets nothing of B's server under A's identity.
    internal = internal_client(api)
    pending = "/internal/v1/tenants/{}/servers/{}/pending-commands"
    r = await internal.get(pending.format(a.tenant.id, b.ids["server_id"]))
    assert (r.status_code, r.json()) == (200, [])
    r = await internal.get(pending.format(b.tenant.id, b.ids["server_id"]))
    assert r.status_code == 200
    assert len(r.json()) == 1  # control: B's own command is there

    # None of those requests did anything: no plan, tenant or account was created.
    staff = await api.staff()
    codes = [p["code"] for p in (await staff.get("/v1/plans")).json()]
    assert "intruder" not in codes
    slugs = [t["slug"] for t in (await staff.get("/v1/tenants")).json()["items"]]
    assert "intruder-tenant" not in slugs
    starter = next(p for p in plans if p["code"] == "starter")
    assert next(p for p in (await staff.get("/v1/plans")).json() if p["id"] == starter["id"]) == (
        starter
    )


async def _tenant_param_request(
    client: Client, ep: Endpoint, tenant_id: str | None
) -> httpx.Response:
    path_values, params = TENANT_PARAM_EXAMPLES[ep.key]
    url = fill(ep.path, path_values)
    query = {"tenant_id": tenant_id} if tenant_id else {}
    if ep.method == "POST":
        return await client.request(ep.method, url, params=query, data=params)
    return await client.request(ep.method, url, params={**query, **params})


async def test_tenant_parameter_routes_do_not_reach_other_tenants(api: Api) -> None:
    """Routes whose tenant is the token's own or a `tenant_id` parameter: B's tenant gets
    exactly the answer of a tenant that does not exist (404), A's own gets 200."""
    a = await seed(api, await api.create_tenant())
    b = await seed(api, await api.create_tenant())
    a_token = await api.token(a.tenant, sorted(TENANT_PERMISSIONS))
    principals = {
        "A's owner (session)": a.tenant.owner,
        "A's token (all scopes)": api.token_client(a_token),
    }
    eps = [
        ep
        for ep in endpoints(create_app(api.stack))
        if NOT_TENANT_SCOPED.get(ep.key, ("", ""))[0] == "tenant-param"
    ]
    assert eps
    for who, client in principals.items():
        for ep in eps:
            r = await _tenant_param_request(client, ep, b.tenant.id)
            nowhere = await _tenant_param_request(client, ep, str(uuid.uuid4()))
            assert r.status_code == nowhere.status_code == 404, f"{who}: {ep}: {r.text}"
            assert not _leaks(r.text, b.marks), f"{who}: {ep} leaked: {r.text}"
            body, control = r.json(), nowhere.json()
            body.pop("instance", None)
            control.pop("instance", None)
            assert body == control, f"{who}: {ep} tells B from no tenant: {body} {control}"
            # Control: A's own tenant (a token's by default, a session's by naming it).
            own = None if "token" in who else a.tenant.id
            r = await _tenant_param_request(client, ep, own)
            assert r.status_code == 200, f"{who}: {ep} on A's own: {r.text}"
            assert not _leaks(r.text, b.marks), f"{who}: {ep} shows B: {r.text}"
