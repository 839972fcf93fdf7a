"""The NOC pages over the real API (uvicorn on loopback), PostgreSQL, ClickHouse (chDB).

Host metrics are written the aggregator's way (OTLP decoded, rolled up and written by its
writer) for servers of two tenants; the pages must show each viewer exactly what they may
see, with the numbers that were sent.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from controlplane.db import Database
from controlplane.registry.presence import apply_presence
from proto import agent_pb2
from yakpanel.clock import SystemClock

from ...support.host_metrics import HostSample, migrate_clickhouse, write_samples
from .conftest import OWNER_PASSWORD, STAFF_EMAIL, STAFF_PASSWORD, Api, Client, Tenant

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

FORM = {"content-type": "application/x-www-form-urlencoded"}


@dataclass
class Fleet:
    a: Tenant
    b: Tenant
    web: str  # A's server, online, CPU 73 %
    db: str  # B's server, offline, CPU 12 %


@pytest.fixture
def ch(api: Api) -> Iterator[Any]:
    client = api.stack.clickhouse.client()
    migrate_clickhouse(client, api.stack.clickhouse.database)
    yield client
    client.close()


async def set_presence(api: Api, tenant: str, server: str, online: bool, session: str) -> None:
    db = Database(api.stack.postgres_dsn, SystemClock(), max_size=1)
    await db.open()
    try:
        at = Timestamp()
        at.FromDatetime(datetime.now(UTC))
        event = agent_pb2.PresenceEvent(
            tenant_id=tenant, server_id=server, online=online, session_id=session, at=at
        )
        await apply_presence(db, event)
    finally:
        await db.close()


def history(now_ms: int, minutes: int, last: HostSample) -> list[HostSample]:
    """Samples every 10 s for `minutes`, ending with `last`; the counters grow steadily."""
    out = []
    steps = minutes * 6
    for k in range(steps, 0, -1):
        ts = now_ms - k * 10_000
        network = {key: value - k * 20_480 for key, value in last.network.items()}
        out.append(HostSample(ts, 0.2, last.memory_used, dict(last.disks), last.load_1m, network))
    return [*out, last]


@pytest.fixture
async def fleet(api: Api, ch: Any) -> Fleet:
    a = await api.create_tenant()
    b = await api.create_tenant()
    r = await a.owner.post(f"/v1/tenants/{a.id}/servers", json={"name": "web-1", "region": "eu"})
    assert r.status_code == 201, r.text
    web = r.json()["id"]
    r = await b.owner.post(f"/v1/tenants/{b.id}/servers", json={"name": "db-1"})
    assert r.status_code == 201, r.text
    db = r.json()["id"]
    await set_presence(api, a.id, web, True, "s-web")
    await set_presence(api, b.id, db, True, "s-db")
    await set_presence(api, b.id, db, False, "s-db")

    now = int(time.time() * 1000)
    database = api.stack.clickhouse.database
    web_last = HostSample(
        now,
        cpu_busy=0.73,
        memory_used=0.41,
        disks={"/": 0.55, "/var": 0.92},
        load_1m=1.5,
        # 20 KiB per 10 s = 2.0 KiB/s received; lo is left out.
        network={("eth0", "receive"): 10_000_000, ("lo", "receive"): 99_000_000},
    )
    write_samples(ch, database, a.id, web, "web-1", history(now, 15, web_last))
    db_last = HostSample(now, 0.12, 0.30, {"/": 0.20}, 0.25)
    write_samples(ch, database, b.id, db, "db-1", history(now, 5, db_last))
    return Fleet(a, b, web, db)


async def form_login(api: Api, email: str, password: str, **extra: str) -> Client:
    client = api.client()
    r = await client.get("/noc/login")
    assert r.status_code == 200, r.text
    token = re.search(r'name="csrf_token" value="([^"]+)"', r.text)
    assert token is not None
    r = await client.post(
        "/noc/login",
        data={"email": email, "password": password, "csrf_token": token.group(1), **extra},
    )
    assert r.status_code == 303, r.text
    return client


def row_of(html: str, server_id: str) -> str:
    match = re.search(rf'<tr[^>]*data-server-id="{server_id}".*?</tr>', html, re.S)
    assert match is not None, f"no row for {server_id}"
    return match.group(0)


def cell(row: str, metric: str) -> str:
    match = re.search(rf'data-metric="{metric}">(.*?)</td>', row, re.S)
    assert match is not None, f"no {metric} cell in {row}"
    return re.sub(r"<[^>]+>", "", match.group(1)).strip()


def assert_page_headers(r: Any) -> None:
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["x-content-type-options"] == "nosniff"


async def test_login_form_logout_and_unauthenticated_redirects(api: Api, fleet: Fleet) -> None:
    anonymous = api.client()
    r = await anonymous.get("/noc/")
    assert (r.status_code, r.headers["location"]) == (303, "/noc/login")
    r = await anonymous.get(f"/noc/servers/{fleet.web}")
    assert r.status_code == 303
    assert r.headers["location"] == f"/noc/login?next=%2Fnoc%2Fservers%2F{fleet.web}"
    r = await anonymous.get("/noc/?fragment=rows")
    assert r.status_code == 401  # the live refresh reloads the page, which redirects
    assert "web-1" not in r.text

    r = await anonymous.get("/noc/login")
    assert r.status_code == 200
    assert_page_headers(r)
    token = re.search(r'name="csrf_token" value="([^"]+)"', r.text)
    assert token is not None
    creds = {"email": fleet.a.owner_email, "csrf_token": token.group(1)}

    # Without the form's token (another site posting the form): refused.
    r = await api.client().post("/noc/login", data={**creds, "password": OWNER_PASSWORD})
    assert r.status_code == 403
    assert "yak_session" not in r.cookies
    # Wrong password: the form again with the error, no session.
    r = await anonymous.post("/noc/login", data={**creds, "password": "wrong-password-1"})
    assert r.status_code == 401
    assert "Wrong email, password or code." in r.text
    assert "yak_session" not in r.cookies
    # Right password: the API's session and CSRF cookies, and on to the fleet.
    r = await anonymous.post("/noc/login", data={**creds, "password": OWNER_PASSWORD})
    assert (r.status_code, r.headers["location"]) == (303, "/noc/")
    assert anonymous.cookies.get("yak_session") and anonymous.cookies.get("yak_csrf")
    set_cookies = r.headers.get_list("set-cookie")
    session_cookie = next(c for c in set_cookies if c.startswith("yak_session="))
    assert "HttpOnly" in session_cookie and "SameSite=strict" in session_cookie
    r = await anonymous.get("/noc/")
    assert r.status_code == 200
    assert "web-1" in r.text
    # The same session works on the API (with the CSRF cookie as header for writes).
    r = await anonymous.get("/v1/auth/me")
    assert (r.status_code, r.json()["email"]) == (200, fleet.a.owner_email)

    # `next` brings the user back where they were going; foreign targets are ignored.
    c = api.client()
    r = await c.get(f"/noc/login?next=/noc/servers/{fleet.web}")
    token = re.search(r'name="csrf_token" value="([^"]+)"', r.text)
    assert token is not None
    r = await c.post(
        "/noc/login",
        data={
            "email": fleet.a.owner_email,
            "password": OWNER_PASSWORD,
            "csrf_token": token.group(1),
            "next": "https://evil.test/noc/",
        },
    )
    assert r.headers["location"] == "/noc/"

    # Logout needs the CSRF token (the page's form carries it), then ends the session.
    r = await anonymous.post("/noc/logout", data={})
    assert r.status_code == 403
    page = (await anonymous.get("/noc/")).text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert csrf is not None and csrf.group(1) == anonymous.cookies.get("yak_csrf")
    session = anonymous.cookies.get("yak_session")
    r = await anonymous.post("/noc/logout", data={"csrf_token": csrf.group(1)})
    assert (r.status_code, r.headers["location"]) == (303, "/noc/login")
    stale = api.client(cookies={"yak_session": session or ""})
    r = await stale.get("/noc/")
    assert (r.status_code, r.headers["location"]) == (303, "/noc/login")


async def test_login_form_respects_throttling(api: Api, fleet: Fleet) -> None:
    client = api.client()
    r = await client.get("/noc/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', r.text)
    assert token is not None
    creds = {"email": fleet.b.owner_email, "csrf_token": token.group(1)}
    for _ in range(5):
        r = await client.post("/noc/login", data={**creds, "password": "not-the-password"})
        assert r.status_code == 401
    # Over the limit even the right password is refused, with the wait.
    r = await client.post("/noc/login", data={**creds, "password": OWNER_PASSWORD})
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) > 0
    assert "Too many failed logins" in r.text
    assert "yak_session" not in client.cookies


async def test_tenant_user_sees_their_servers_with_current_values(api: Api, fleet: Fleet) -> None:
    owner = await form_login(api, fleet.a.owner_email, OWNER_PASSWORD)
    r = await owner.get("/noc/")
    assert r.status_code == 200
    assert_page_headers(r)
    html = r.text
    row = row_of(html, fleet.web)
    assert "web-1" in row and fleet.a.slug in row
    assert cell(row, "cpu") == "73 %"
    assert cell(row, "memory") == "41 %"
    assert cell(row, "disk") == "55 %"
    assert cell(row, "load") == "1.50"
    assert re.fullmatch(r"\d+ s ago", cell(row, "age")), cell(row, "age")
    assert "online" in row
    # Nothing of tenant B.
    assert fleet.db not in html and "db-1" not in html and fleet.b.slug not in html

    # The live-refresh fragment: the rows alone, same numbers.
    r = await owner.get("/noc/?fragment=rows")
    assert r.status_code == 200
    assert "<html" not in r.text and "<tbody" not in r.text
    assert cell(row_of(r.text, fleet.web), "cpu") == "73 %"
    r = await owner.get("/noc/?fragment=everything")
    assert r.status_code == 400

    # Filters.
    assert fleet.web in (await owner.get("/noc/?state=online&name=WEB")).text
    assert fleet.web not in (await owner.get("/noc/?state=offline")).text
    assert fleet.web not in (await owner.get("/noc/?name=db")).text
    assert fleet.web in (await owner.get(f"/noc/?tenant={fleet.a.slug}")).text
    # Filtering on another tenant shows nothing of it either.
    filtered = await owner.get(f"/noc/?tenant={fleet.b.slug}")
    assert filtered.status_code == 200 and fleet.db not in filtered.text
    assert (await owner.get("/noc/?state=sleeping")).status_code == 400

    # The other tenant's server page is 404, the very page a nonexistent id gets.
    foreign = await owner.get(f"/noc/servers/{fleet.db}")
    missing = await owner.get(f"/noc/servers/{uuid.uuid4()}")
    garbage = await owner.get("/noc/servers/not-an-id")
    assert foreign.status_code == missing.status_code == garbage.status_code == 404
    assert foreign.text == missing.text == garbage.text
    assert "db-1" not in foreign.text and fleet.b.slug not in foreign.text
    r = await owner.get(f"/noc/servers/{fleet.db}?fragment=live")
    assert r.status_code == 404 and "db-1" not in r.text


async def test_server_page_draws_the_charts(api: Api, fleet: Fleet) -> None:
    owner = await form_login(api, fleet.a.owner_email, OWNER_PASSWORD)
    r = await owner.get(f"/noc/servers/{fleet.web}")
    assert r.status_code == 200, r.text
    assert_page_headers(r)
    html = r.text
    assert "<h1>web-1</h1>" in html
    assert '<script src="/noc/static/noc.js" defer></script>' in html
    assert "<script>" not in html and "style=" not in html  # CSP: nothing inline
    charts = dict(re.findall(r'<figure class="chart" id="([a-z-]+)">(.*?)</figure>', html, re.S))
    assert set(charts) == {"cpu", "memory", "disk", "load", "network"}
    for name, chart in charts.items():
        assert re.search(r'<svg[^>]+role="img"[^>]+aria-labelledby=', chart), name
        assert "<title id=" in chart and "<desc id=" in chart and "<table>" in chart, name
        path = re.search(r'<path class="line" d="M([^"]+)"', chart)
        assert path is not None, name
        assert path.group(1).count(" L") >= 80, name  # 15 minutes of 10 s points
    assert "CPU busy: latest 73 %, min 20 %, max 73 %" in charts["cpu"]
    assert "memory used: latest 41 %" in charts["memory"]
    assert "/: latest 55 %" in charts["disk"] and "/var: latest 92 %" in charts["disk"]
    assert "load 1m: latest 1.50" in charts["load"]
    # eth0 only: 20 KiB every 10 s; transmit was never reported.
    assert "receive: latest 2.0 KiB/s, min 2.0 KiB/s, max 2.0 KiB/s" in charts["network"]
    assert "transmit: no data" in charts["network"]
    assert "Tenant" in html and fleet.a.slug in html

    r = await owner.get(f"/noc/servers/{fleet.web}?window=24h")
    assert r.status_code == 200
    assert "last 24 hours, one point per 240 s" in r.text
    assert (await owner.get(f"/noc/servers/{fleet.web}?window=7d")).status_code == 400
    r = await owner.get(f"/noc/servers/{fleet.web}?window=6h&fragment=live")
    assert r.status_code == 200
    assert "<html" not in r.text and r.text.count("<svg") == 5

    # Static files are served with their type and the same headers.
    js = await owner.get("/noc/static/noc.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "data-refresh" in js.text
    assert (await owner.get("/noc/static/../app.py")).status_code == 404
    assert (await owner.get("/noc/static/evil.js")).status_code == 404


async def test_staff_see_every_tenant_and_their_reads_are_audited(api: Api, fleet: Fleet) -> None:
    staff = await form_login(api, STAFF_EMAIL, STAFF_PASSWORD)
    r = await staff.get("/noc/")
    assert r.status_code == 200
    html = r.text
    web, db = row_of(html, fleet.web), row_of(html, fleet.db)
    assert fleet.a.slug in web and fleet.b.slug in db
    assert cell(web, "cpu") == "73 %" and cell(db, "cpu") == "12 %"
    # Offline first.
    assert html.index(f'data-server-id="{fleet.db}"') < html.index(f'data-server-id="{fleet.web}"')
    assert "offline" in db and "for " in db
    assert fleet.b.slug in (await staff.get(f"/noc/?tenant={fleet.b.slug}")).text
    assert fleet.a.slug not in row_of((await staff.get("/noc/?state=offline")).text, fleet.db)

    # The fleet read is in the platform audit log, by this staff member.
    api_staff = await api.staff()
    me = (await api_staff.get("/v1/auth/me")).json()
    entries = (await api_staff.get("/v1/audit?action=staff.read")).json()["items"]
    fleet_reads = [e for e in entries if e["resource_type"] == "fleet"]
    assert fleet_reads and {e["actor_id"] for e in fleet_reads} == {me["id"]}
    assert all(e["tenant_id"] is None for e in fleet_reads)

    # A server page read lands in that tenant's own log, where its owner sees it.
    r = await staff.get(f"/noc/servers/{fleet.db}")
    assert r.status_code == 200 and "db-1" in r.text
    log = await fleet.b.owner.get(f"/v1/tenants/{fleet.b.id}/audit?action=staff.read")
    assert log.status_code == 200
    assert [(e["actor_kind"], e["actor_id"]) for e in log.json()["items"]] == [("staff", me["id"])]
    log = await fleet.a.owner.get(f"/v1/tenants/{fleet.a.id}/audit?action=staff.read")
    assert log.json()["items"] == []


async def test_servers_read_without_metrics_read_shows_no_values(api: Api, fleet: Fleet) -> None:
    owner = fleet.a.owner
    base = f"/v1/tenants/{fleet.a.id}"
    r = await owner.post(f"{base}/roles", json={"name": "lister", "permissions": ["servers:read"]})
    assert r.status_code == 201, r.text
    email = f"lister@{fleet.a.slug}.test"
    r = await owner.post(
        f"{base}/members", json={"email": email, "password": "lister-password-1", "role": "lister"}
    )
    assert r.status_code == 201, r.text
    lister = await form_login(api, email, "lister-password-1")
    row = row_of((await lister.get("/noc/")).text, fleet.web)
    assert cell(row, "cpu") == "—" and cell(row, "age") == "never"
    page = (await lister.get(f"/noc/servers/{fleet.web}")).text
    assert "does not include metrics:read" in page and "73 %" not in page

    # A member whose role cannot read servers sees an empty fleet.
    r = await owner.post(f"{base}/members", json={**_member("biller", fleet), "role": "billing"})
    assert r.status_code == 201, r.text
    biller = await form_login(api, f"biller@{fleet.a.slug}.test", "biller-password-1")
    html = (await biller.get("/noc/")).text
    assert "No servers match." in html and fleet.web not in html
    assert (await biller.get(f"/noc/servers/{fleet.web}")).status_code == 404


def _member(name: str, fleet: Fleet) -> dict[str, str]:
    return {"email": f"{name}@{fleet.a.slug}.test", "password": f"{name}-password-1"}
