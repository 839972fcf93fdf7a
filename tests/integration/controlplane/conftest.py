"""The control-plane API served by uvicorn on a loopback port, on a fresh database."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
import pytest

from controlplane.access.permissions import STAFF_PERMISSIONS
from controlplane.app import create_app
from controlplane.passwords import hash_password
from controlplane.service import ApiService
from yakpanel.ids import new_id
from yakpanel.services import Stack

STAFF_EMAIL = "noc@yakpanel.test"
STAFF_PASSWORD = "staff-password-123"
OWNER_PASSWORD = "owner-password-123"


class Client(httpx.AsyncClient):
    """An httpx client that sends the CSRF header a logged-in dashboard sends."""

    csrf: str | None = None

    async def request(self, method: str, url: Any, **kwargs: Any) -> httpx.Response:  # type: ignore[override]
        if self.csrf and method.upper() not in ("GET", "HEAD", "OPTIONS"):
            headers = dict(kwargs.pop("headers", None) or {})
            headers.setdefault("X-CSRF-Token", self.csrf)
            kwargs["headers"] = headers
        return await super().request(method, url, **kwargs)


@dataclass
class Tenant:
    id: str
    slug: str
    owner_email: str
    owner: Client


@dataclass
class Api:
    url: str
    stack: Stack
    clients: list[Client] = field(default_factory=list)

    def client(self, **kwargs: Any) -> Client:
        c = Client(base_url=self.url, timeout=30, **kwargs)
        self.clients.append(c)
        return c

    async def login(self, email: str, password: str, totp_code: str | None = None) -> Client:
        c = self.client()
        body: dict[str, Any] = {"email": email, "password": password}
        if totp_code:
            body["totp_code"] = totp_code
        r = await c.post("/v1/auth/login", json=body)
        assert r.status_code == 200, r.text
        c.csrf = r.json()["csrf_token"]
        return c

    def token_client(self, token: str) -> Client:
        return self.client(headers={"Authorization": f"Bearer {token}"})

    async def staff(self) -> Client:
        return await self.login(STAFF_EMAIL, STAFF_PASSWORD)

    async def create_tenant(self, plan: str = "starter", slug: str | None = None) -> Tenant:
        slug = slug or f"t-{uuid.uuid4().hex[:10]}"
        email = f"owner@{slug}.test"
        staff = await self.staff()
        r = await staff.post(
            "/v1/tenants",
            json={
                "slug": slug,
                "name": f"Tenant {slug}",
                "plan": plan,
                "owner_email": email,
                "owner_password": OWNER_PASSWORD,
            },
        )
        assert r.status_code == 201, r.text
        owner = await self.login(email, OWNER_PASSWORD)
        return Tenant(r.json()["id"], slug, email, owner)

    async def token(self, tenant: Tenant, scopes: list[str], **extra: Any) -> str:
        r = await tenant.owner.post(
            f"/v1/tenants/{tenant.id}/tokens", json={"name": "test", "scopes": scopes, **extra}
        )
        assert r.status_code == 201, r.text
        token: str = r.json()["token"]
        return token


def add_staff(dsn: str, email: str, password: str, permissions: list[str]) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO platform_staff (id, email, password_hash, permissions)"
            " VALUES (%s, %s, %s, %s)",
            (new_id(), email, hash_password(password), permissions),
        )


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[Api]:
    add_staff(stack.postgres_dsn, STAFF_EMAIL, STAFF_PASSWORD, sorted(STAFF_PERMISSIONS))
    service = ApiService(create_app(stack), "127.0.0.1", 0)
    await service.start()
    handle = Api(service.url, stack)
    try:
        yield handle
    finally:
        for c in handle.clients:
            await c.aclose()
        await service.stop()
