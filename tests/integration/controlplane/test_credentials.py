"""Tokens, sessions, CSRF, login throttling and the second factor, against the real API."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pyotp
import pytest

from controlplane.access.permissions import TENANT_PERMISSIONS

from .conftest import OWNER_PASSWORD, Api

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]


async def test_a_token_works_within_its_scopes_only(api: Api) -> None:
    t = await api.create_tenant()
    token = await api.token(t, ["servers:read"])
    client = api.token_client(token)
    assert (await client.get(f"/v1/tenants/{t.id}/servers")).status_code == 200
    r = await client.post(f"/v1/tenants/{t.id}/servers", json={"name": "nope"})
    assert r.status_code == 403
    assert r.json()["permission"] == "servers:write"
    assert r.headers["content-type"] == "application/problem+json"


async def test_revoked_and_expired_tokens_are_refused(api: Api) -> None:
    t = await api.create_tenant()
    token = await api.token(t, ["servers:read"])
    client = api.token_client(token)
    listed = (await t.owner.get(f"/v1/tenants/{t.id}/tokens")).json()["items"]
    token_id = listed[0]["id"]
    assert (await client.get(f"/v1/tenants/{t.id}/servers")).status_code == 200

    r = await t.owner.delete(f"/v1/tenants/{t.id}/tokens/{token_id}")
    assert r.status_code == 200
    assert r.json()["revoked_at"] is not None
    refused = await client.get(f"/v1/tenants/{t.id}/servers")
    assert refused.status_code == 401
    assert refused.json()["code"] == "token_revoked"

    other = await api.token(t, ["servers:read"], expires_in_days=1)
    with psycopg.connect(api.stack.postgres_dsn) as conn:
        conn.execute(
            "UPDATE api_tokens SET expires_at = %s WHERE prefix = %s",
            (datetime.now(UTC) - timedelta(seconds=1), other[:12]),
        )
    expired = await api.token_client(other).get(f"/v1/tenants/{t.id}/servers")
    assert expired.status_code == 401
    assert expired.json()["code"] == "token_expired"

    garbage = await api.token_client("yak_" + "A" * 43).get(f"/v1/tenants/{t.id}/servers")
    assert garbage.status_code == 401
    assert garbage.json()["code"] == "token_invalid"


async def test_a_token_is_shown_once_and_never_logged(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    t = await api.create_tenant()
    r = await t.owner.post(
        f"/v1/tenants/{t.id}/tokens", json={"name": "ci", "scopes": ["servers:read"]}
    )
    token = r.json()["token"]
    token_id = r.json()["id"]
    client = api.token_client(token)
    await client.get(f"/v1/tenants/{t.id}/servers")
    await client.get(f"/v1/tenants/{t.id}/servers/00000000-0000-7000-8000-000000000000")

    bodies = [
        (await t.owner.get(f"/v1/tenants/{t.id}/tokens")).text,
        (await t.owner.get(f"/v1/tenants/{t.id}/tokens/{token_id}")).text,
        (await t.owner.get(f"/v1/tenants/{t.id}/audit")).text,
        (await t.owner.delete(f"/v1/tenants/{t.id}/tokens/{token_id}")).text,
        (await client.get(f"/v1/tenants/{t.id}/servers")).text,
    ]
    secret = token.removeprefix("yak_")
    for body in bodies:
        assert secret not in body
    assert secret not in caplog.text
    with psycopg.connect(api.stack.postgres_dsn) as conn:
        dump = conn.execute(
            "SELECT string_agg(t::text, ' ') FROM (SELECT * FROM api_tokens) t"
        ).fetchone()
        outbox = conn.execute("SELECT string_agg(payload::text, ' ') FROM outbox").fetchone()
    assert dump is not None and secret not in (dump[0] or "")
    assert outbox is not None and secret not in (outbox[0] or "")


async def test_token_scopes_cannot_exceed_the_creator(api: Api) -> None:
    t = await api.create_tenant()
    r = await t.owner.post(
        f"/v1/tenants/{t.id}/members",
        json={"email": "viewer@example.org", "role": "viewer", "password": OWNER_PASSWORD},
    )
    assert r.status_code == 201, r.text
    viewer = await api.login("viewer@example.org", OWNER_PASSWORD)
    r = await viewer.post(
        f"/v1/tenants/{t.id}/tokens", json={"name": "x", "scopes": ["servers:read"]}
    )
    assert r.status_code == 403  # a viewer has no tokens:write
    token = await api.token(t, sorted(TENANT_PERMISSIONS))
    r = await api.token_client(token).post(
        f"/v1/tenants/{t.id}/roles",
        json={"name": "everything", "permissions": sorted(TENANT_PERMISSIONS)},
    )
    assert r.status_code == 201, r.text


async def test_the_sixth_wrong_password_in_a_minute_is_throttled(api: Api) -> None:
    t = await api.create_tenant()
    client = api.client()
    for _ in range(5):
        r = await client.post(
            "/v1/auth/login", json={"email": t.owner_email, "password": "wrong password!"}
        )
        assert r.status_code == 401
        assert r.json()["code"] == "login_failed"
    r = await client.post(
        "/v1/auth/login", json={"email": t.owner_email, "password": "wrong password!"}
    )
    assert r.status_code == 429
    assert r.json()["code"] == "login_throttled"
    assert int(r.headers["Retry-After"]) >= 1
    # While throttled even the right password is refused: guessing cannot go on.
    r = await client.post(
        "/v1/auth/login", json={"email": t.owner_email, "password": OWNER_PASSWORD}
    )
    assert r.status_code == 429
    # Another account from elsewhere is not affected.
    other = await api.create_tenant()
    assert (
        await api.client().post(
            "/v1/auth/login", json={"email": other.owner_email, "password": OWNER_PASSWORD}
        )
    ).status_code == 200


async def test_wrong_email_and_wrong_password_look_the_same(api: Api) -> None:
    t = await api.create_tenant()
    a = await api.client().post(
        "/v1/auth/login", json={"email": "nobody@example.org", "password": "whatever-pass"}
    )
    b = await api.client().post(
        "/v1/auth/login", json={"email": t.owner_email, "password": "whatever-pass"}
    )
    assert a.status_code == b.status_code == 401
    assert a.json()["detail"] == b.json()["detail"]


async def test_session_writes_need_the_csrf_header(api: Api) -> None:
    t = await api.create_tenant()
    t.owner.csrf, csrf = None, t.owner.csrf
    r = await t.owner.post(f"/v1/tenants/{t.id}/servers", json={"name": "web"})
    assert r.status_code == 403
    assert r.json()["code"] == "csrf_failed"
    r = await t.owner.post(
        f"/v1/tenants/{t.id}/servers", json={"name": "web"}, headers={"X-CSRF-Token": "forged"}
    )
    assert r.status_code == 403
    assert (await t.owner.get(f"/v1/tenants/{t.id}/servers")).status_code == 200
    t.owner.csrf = csrf
    assert (
        await t.owner.post(f"/v1/tenants/{t.id}/servers", json={"name": "web"})
    ).status_code == 201


async def test_session_cookie_flags_and_logout(api: Api) -> None:
    t = await api.create_tenant()
    client = api.client()
    r = await client.post(
        "/v1/auth/login", json={"email": t.owner_email, "password": OWNER_PASSWORD}
    )
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("yak_session="))
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    client.csrf = r.json()["csrf_token"]
    assert (await client.post("/v1/auth/logout")).status_code == 204
    # The server forgot the session: replaying the old cookie does not work.
    replay = api.client(cookies={"yak_session": cookie.split(";")[0].split("=", 1)[1]})
    assert (await replay.get("/v1/auth/me")).status_code == 401


async def test_second_factor_enrollment_and_login(api: Api) -> None:
    t = await api.create_tenant()
    r = await t.owner.post("/v1/users/me/totp")
    assert r.status_code == 200, r.text
    secret = r.json()["secret"]
    assert r.json()["otpauth_uri"].startswith("otpauth://totp/")
    r = await t.owner.post("/v1/users/me/totp/confirm", json={"code": "000000"})
    assert r.status_code == 422
    confirmed_code = pyotp.TOTP(secret).now()
    r = await t.owner.post("/v1/users/me/totp/confirm", json={"code": confirmed_code})
    assert r.status_code == 204, r.text

    client = api.client()
    r = await client.post(
        "/v1/auth/login", json={"email": t.owner_email, "password": OWNER_PASSWORD}
    )
    assert r.status_code == 401
    assert r.json()["code"] == "totp_required"
    r = await client.post(
        "/v1/auth/login",
        json={"email": t.owner_email, "password": OWNER_PASSWORD, "totp_code": "123456"},
    )
    assert r.status_code == 401
    # The code that confirmed the enrollment is spent; the next step's code (accepted
    # for clock drift) is not.
    code = pyotp.TOTP(secret).at(time.time() + 30)
    assert code != confirmed_code
    ok = await api.login(t.owner_email, OWNER_PASSWORD, totp_code=code)
    me = (await ok.get("/v1/auth/me")).json()
    assert me["totp_enabled"] is True
    # One-time: the same code does not log in a second time.
    replay = await api.client().post(
        "/v1/auth/login",
        json={"email": t.owner_email, "password": OWNER_PASSWORD, "totp_code": code},
    )
    assert replay.status_code == 401
    assert replay.json()["code"] == "login_failed"
    with psycopg.connect(api.stack.postgres_dsn) as conn:
        row = conn.execute(
            "SELECT totp_secret FROM users WHERE email = %s", (t.owner_email,)
        ).fetchone()
    assert row is not None
    assert secret.encode() not in bytes(row[0])
