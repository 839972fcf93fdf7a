"""Schemathesis over the live `/openapi.json`: no 5xx, and every response matches the schema.

The real API is served by uvicorn on a loopback port. Hypothesis generates requests for
every documented operation (valid and invalid ones), sent as three identities: an API
token holding every tenant permission, the tenant owner's dashboard session, and a
platform staff session. Each response must be documented (status code, content type,
headers) and its body must match the documented schema.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from controlplane.access.permissions import TENANT_PERMISSIONS

from .conftest import OWNER_PASSWORD, STAFF_EMAIL, STAFF_PASSWORD, Api, Tenant

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Examples per operation, identity and generation mode.
EXAMPLES = {GenerationMode.POSITIVE: 16, GenerationMode.NEGATIVE: 8}
# Creates first, so that reads and updates find more; deletes late. Then, in this order,
# what locks the tenant out of writes, changes its plan or ends the session.
METHOD_ORDER = {"POST": 0, "GET": 1, "PATCH": 2, "PUT": 2, "DELETE": 3}
LAST = ("/schedule-deletion", "/suspend", "/plan", "/v1/auth/logout")
# Each identity must get 2xx answers from at least this many operations.
MIN_SUCCEEDED = 12


@dataclass
class Identity:
    name: str
    headers: dict[str, str]
    cookies: dict[str, str] = field(default_factory=dict)


@dataclass
class Target:
    """What the generated cases are pointed at, so that most reach the handlers."""

    tenant_id: str
    # Real ids by path parameter name, and real names by body field (plan codes, role
    # names): half of the cases use them instead of random ones.
    ids: dict[str, list[str]]
    names: dict[str, list[Any]]


@dataclass
class Report:
    cases: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, set[int]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    # Operations that answered 2xx, by identity: the requests did reach the handlers.
    succeeded: dict[str, set[str]] = field(default_factory=dict)
    failures: dict[tuple[str, str], str] = field(default_factory=dict)

    def failed(self, key: tuple[str, str], text: str) -> None:
        self.failures.setdefault(key, text)


def _cookie_jar_that_keeps_nothing() -> requests.Session:
    # Responses set and delete cookies (login, logout); the identity must not change.
    session = requests.Session()
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    return session


def _order(operation: schemathesis.APIOperation) -> tuple[int, int, str]:
    for position, suffix in enumerate(LAST):
        if operation.path.endswith(suffix):
            return (len(METHOD_ORDER), position, operation.label)
    return (METHOD_ORDER.get(operation.method.upper(), 0), 0, operation.label)


def _point(case: schemathesis.Case, target: Target, choice: int) -> None:
    """Mostly the tenant of the identities and, half of the time, real ids and names."""
    params = case.path_parameters
    if params and "tenant_id" in params and choice % 10 < 8:
        params["tenant_id"] = target.tenant_id
    for name, values in target.ids.items():
        if params and name in params and choice % 2 == 0:
            params[name] = values[choice % len(values)]
    if isinstance(case.body, dict):
        for name, values in target.names.items():
            if name in case.body and choice % 2 == 0:
                case.body[name] = values[choice % len(values)]


def _fuzz(url: str, identities: list[Identity], target: Target) -> Report:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    # `/docs` (HTML) is not in the schema; every documented operation is fuzzed.
    operations = sorted((result.ok() for result in schema.get_all_operations()), key=_order)
    report = Report()
    for identity in identities:
        session = _cookie_jar_that_keeps_nothing()
        for operation in operations:
            for mode, examples in EXAMPLES.items():
                _fuzz_operation(url, session, identity, target, operation, mode, examples, report)
        session.close()
    return report


def _fuzz_operation(
    url: str,
    session: requests.Session,
    identity: Identity,
    target: Target,
    operation: schemathesis.APIOperation,
    mode: GenerationMode,
    examples: int,
    report: Report,
) -> None:
    label = f"{operation.label} as {identity.name}"

    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        verbosity=hypothesis.Verbosity.quiet,
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode), choice=st.integers(0, 99))
    def run(case: schemathesis.Case, choice: int) -> None:
        _point(case, target, choice)
        report.cases[operation.label] = report.cases.get(operation.label, 0) + 1
        sent = time.monotonic()
        try:
            response = case.call(
                base_url=url, session=session, headers=identity.headers, cookies=identity.cookies
            )
        except Exception as exc:
            key = (operation.label, type(exc).__name__)
            report.failed(key, f"{label}: the request failed: {exc!r}")
            return
        finally:
            spent = time.monotonic() - sent
            report.seconds[operation.label] = report.seconds.get(operation.label, 0.0) + spent
        report.statuses.setdefault(operation.label, set()).add(response.status_code)
        if response.status_code < 300:
            report.succeeded.setdefault(identity.name, set()).add(operation.label)
        try:
            case.validate_response(
                response,
                checks=CHECKS,
                headers=identity.headers,
                transport_kwargs={"base_url": url, "session": session},
            )
        except FailureGroup as group:
            for failure in group.exceptions:
                key = (operation.label, f"{failure.title} ({response.status_code})")
                report.failed(key, _describe(label, case, response, identity, failure))

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        # Nothing to make invalid: an operation without parameters and body.
        if mode is not GenerationMode.NEGATIVE:
            raise


def _describe(
    label: str,
    case: schemathesis.Case,
    response: schemathesis.Response,
    identity: Identity,
    failure: Exception,
) -> str:
    title = getattr(failure, "title", type(failure).__name__)
    message = getattr(failure, "message", str(failure)).strip()
    body = response.content.decode(errors="replace")[:600]
    curl = case.as_curl_command(headers={**identity.headers, **_cookie_header(identity)})
    return (
        f"{label} -> {response.status_code}: {title}\n"
        + (f"{message}\n" if message else "")
        + f"body: {body}\nreproduce: {curl}"
    )


def _cookie_header(identity: Identity) -> dict[str, str]:
    if not identity.cookies:
        return {}
    return {"Cookie": "; ".join(f"{k}={v}" for k, v in identity.cookies.items())}


async def _session_identity(api: Api, name: str, email: str, password: str) -> Identity:
    client = await api.login(email, password)
    csrf = client.csrf
    assert csrf is not None
    cookie = client.cookies.get("yak_session")
    assert cookie is not None
    return Identity(name, {"X-CSRF-Token": csrf}, {"yak_session": cookie})


async def _resources(api: Api, tenant: Tenant, token: str) -> dict[str, list[str]]:
    """A few real resources, so that item operations also find something."""
    client = api.token_client(token)
    base = f"/v1/tenants/{tenant.id}"
    ids: dict[str, list[str]] = {}

    async def create(path: str, body: dict[str, Any], key: str, pick: Callable[..., str]) -> None:
        r = await client.post(base + path, json=body)
        assert r.status_code == 201, r.text
        ids.setdefault(key, []).append(pick(r.json()))

    await create("/servers", {"name": "web-1", "labels": {"env": "prod"}}, "server_id", _id)
    await create("/servers", {"name": "db-1", "region": "eu-1"}, "server_id", _id)
    await create("/roles", {"name": "deployer", "permissions": ["servers:read"]}, "role_id", _id)
    await create(
        "/members",
        {"email": f"viewer@{tenant.slug}.test", "role": "viewer", "password": "x" * 12},
        "user_id",
        lambda b: str(b["user_id"]),
    )
    await create("/tokens", {"name": "spare", "scopes": ["servers:read"]}, "token_id", _id)
    return ids


def _id(body: dict[str, Any]) -> str:
    return str(body["id"])


async def test_schemathesis_finds_no_server_error_and_no_schema_violation(api: Api) -> None:
    started = time.monotonic()
    staff = await api.staff()
    # A plan whose request rate the fuzzing does not exhaust.
    plan_code = f"fuzz-{uuid.uuid4().hex[:8]}"
    r = await staff.post(
        "/v1/plans",
        json={
            "code": plan_code,
            "name": "Fuzz",
            "max_servers": 100_000,
            "max_sites": 1000,
            "max_databases": 1000,
            "max_alert_rules": 1000,
            "metric_retention_days": 30,
            "api_requests_per_minute": 1_000_000,
        },
    )
    assert r.status_code == 201, r.text
    plan_id = str(r.json()["id"])
    tenant = await api.create_tenant(plan=plan_code)
    token = await api.token(tenant, sorted(TENANT_PERMISSIONS))
    ids = await _resources(api, tenant, token)
    ids["plan_id"] = [plan_id]
    # Logged in before fuzzing: fuzzed logins from this address get throttled.
    owner = await _session_identity(api, "owner session", tenant.owner_email, OWNER_PASSWORD)
    platform = await _session_identity(api, "staff session", STAFF_EMAIL, STAFF_PASSWORD)
    identities = [
        Identity("token", {"Authorization": f"Bearer {token}"}),
        owner,
        platform,
    ]

    names: dict[str, list[Any]] = {
        "plan": [plan_code, "business"],
        "role": ["viewer", "deployer"],
        "scopes": [["servers:read"], sorted(TENANT_PERMISSIONS)],
        "permissions": [["servers:read", "servers:write"], []],
    }
    target = Target(tenant.id, ids, names)
    report = await asyncio.to_thread(_fuzz, api.url, identities, target)

    elapsed = time.monotonic() - started
    summary = "\n".join(
        f"  {label}: {n} cases in {report.seconds.get(label, 0):.1f} s,"
        f" statuses {sorted(report.statuses.get(label, ()))}"
        for label, n in sorted(report.cases.items())
    )
    reached = ", ".join(f"{k}: {len(v)}" for k, v in sorted(report.succeeded.items()))
    print(f"\n{sum(report.cases.values())} cases in {elapsed:.1f} s\n{summary}")
    print(f"operations answering 2xx, by identity: {reached}")
    if report.failures:
        pytest.fail(
            f"schemathesis found {len(report.failures)} distinct failure(s):\n\n"
            + "\n\n".join(report.failures.values()),
            pytrace=False,
        )
    assert len(report.cases) >= 40, f"only {len(report.cases)} operations were fuzzed"
    for identity in identities:
        reached = report.succeeded.get(identity.name, set())
        assert len(reached) >= MIN_SUCCEEDED, (
            f"as {identity.name}, only {sorted(reached)} answered 2xx: is the identity valid?"
        )
