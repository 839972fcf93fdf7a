"""The site health pages over the real API (uvicorn on loopback), PostgreSQL, ClickHouse.

Sites are created through the API; their control-plane outcome (status, certificate,
workflow) is then set in PostgreSQL as the workflow driver would, and probe results are
written the aggregator's way. Each viewer must see exactly their sites, problems first,
with the values the probes reported.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from ...support.host_metrics import migrate_clickhouse
from ...unit.test_site_health_query import Probe, every_10s, write_probes
from .conftest import OWNER_PASSWORD, STAFF_EMAIL, STAFF_PASSWORD, Api, Tenant
from .test_noc import assert_page_headers, form_login

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]


@dataclass
class Hosted:
    a: Tenant
    b: Tenant
    web: str  # A's server
    shop: str  # A: active, down (503) for the last 3 minutes, workflow failed
    blog: str  # A: active, up, TLS 10.5 days left, certificate valid
    fresh: str  # A: provisioning, never probed
    foreign: str  # B: active, down (500)
    ch: Any
    database: str

    def probe(self, tenant: Tenant, site: str, probes: list[Probe]) -> None:
        server = self.web if tenant is self.a else str(uuid.UUID(int=0))
        write_probes(self.ch, self.database, tenant.id, server, site, probes)


@pytest.fixture
def ch(api: Api) -> Iterator[Any]:
    client = api.stack.clickhouse.client()
    migrate_clickhouse(client, api.stack.clickhouse.database)
    yield client
    client.close()


async def _site(tenant: Tenant, server: str, domain: str) -> dict[str, Any]:
    r = await tenant.owner.post(
        f"/v1/tenants/{tenant.id}/sites",
        json={
            "server_id": server,
            "kind": "static",
            "domains": [domain, f"www.{domain}"],
            "redirects": [{"source": "/old", "target": "/new", "code": 301}],
        },
    )
    assert r.status_code == 202, r.text
    body: dict[str, Any] = r.json()
    return body


@pytest.fixture
async def hosted(api: Api, ch: Any) -> Hosted:
    a, b = await api.create_tenant(), await api.create_tenant()
    servers = []
    for t, name in ((a, "web-1"), (b, "b-web")):
        r = await t.owner.post(f"/v1/tenants/{t.id}/servers", json={"name": name})
        assert r.status_code == 201, r.text
        servers.append(r.json()["id"])
    web, b_web = servers
    shop = await _site(a, web, f"shop.{a.slug}.example.com")
    blog = await _site(a, web, f"blog.{a.slug}.example.com")
    fresh = await _site(a, web, f"new.{a.slug}.example.com")
    foreign = await _site(b, b_web, f"shop.{b.slug}.example.com")

    now = datetime.now(UTC)
    # What the workflow driver records when the node reports back.
    with psycopg.connect(api.stack.postgres_dsn) as conn:
        for site in (blog, foreign):
            conn.execute("UPDATE sites SET status = 'active' WHERE id = %s", (site["id"],))
        conn.execute(
            "UPDATE sites SET status = 'failed', last_error = %s WHERE id = %s",
            ("nginx -t: unknown directive", shop["id"]),
        )
        conn.execute(
            """UPDATE workflows SET state = 'failed', error = %s, finished_at = now(),
                   awaiting_command = NULL, wake_at = NULL
               WHERE id = %s""",
            ("step apply failed: nginx -t: unknown directive", shop["workflow_id"]),
        )
        conn.execute(
            """INSERT INTO site_certificates
                   (site_id, tenant_id, domains, state, issuer, not_before, not_after)
               VALUES (%s, %s, %s, 'valid', 'Pebble Intermediate CA', %s, %s)""",
            (
                blog["id"],
                a.id,
                blog["domains"],
                now - timedelta(days=80),
                now + timedelta(days=10, hours=12),
            ),
        )

    now_ms = int(time.time() * 1000) - 20_000
    hosted = Hosted(
        a, b, web, shop["id"], blog["id"], fresh["id"], foreign["id"], ch,
        api.stack.clickhouse.database,
    )  # fmt: skip
    hosted.probe(
        a, hosted.shop,
        every_10s(now_ms, 20, lambda k, ts: Probe(ts, k > 18, 200 if k > 18 else 503, 0.04, 40)),
    )  # fmt: skip
    hosted.probe(
        a, hosted.blog, every_10s(now_ms, 10, lambda k, ts: Probe(ts, True, 200, 0.123, 10.5))
    )
    hosted.probe(
        b, hosted.foreign, every_10s(now_ms, 10, lambda k, ts: Probe(ts, False, 500, 0.9, 1.0))
    )
    return hosted


def row_of(html: str, site_id: str) -> str:
    match = re.search(rf'<tr[^>]*data-site-id="{site_id}".*?</tr>', html, re.S)
    assert match is not None, f"no row for {site_id}"
    return match.group(0)


def cell(row: str, metric: str) -> tuple[str, str]:
    """(the cell's class attribute, its text)."""
    match = re.search(rf'<td(?: class="([^"]*)")? data-metric="{metric}">(.*?)</td>', row, re.S)
    assert match is not None, f"no {metric} cell in {row}"
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", match.group(2))).strip()
    return match.group(1) or "", text


def order(html: str, *site_ids: str) -> list[int]:
    return [html.index(f'data-site-id="{s}"') for s in site_ids]


async def test_tenant_sees_their_sites_problems_first(api: Api, hosted: Hosted) -> None:
    h = hosted
    owner = await form_login(api, h.a.owner_email, OWNER_PASSWORD)
    r = await owner.get("/noc/sites")
    assert r.status_code == 200, r.text
    assert_page_headers(r)
    html = r.text
    assert '<a href="/noc/sites">Sites</a>' in html  # the header's nav
    # Down first, then the certificate about to expire, then the healthy one.
    positions = order(html, h.shop, h.blog, h.fresh)
    assert positions == sorted(positions), positions

    shop = row_of(html, h.shop)
    assert f'href="/noc/sites/{h.a.id}/{h.shop}">shop.{h.a.slug}.example.com</a>' in shop
    assert f'href="/noc/servers/{h.web}">web-1</a>' in shop
    assert cell(shop, "status")[1] == "failed"
    probe = cell(shop, "probe")[1]
    assert re.fullmatch(r"down for [23] min", probe), probe
    assert cell(shop, "http") == ("num crit", "503")
    assert cell(shop, "latency")[1] == "40 ms"
    assert cell(shop, "tls") == ("num ok", "40.0")

    blog = row_of(html, h.blog)
    assert cell(blog, "tls") == ("num warn", "10.5")  # under 14 days: a warning
    assert cell(blog, "http") == ("num", "200")
    assert cell(blog, "latency")[1] == "123 ms"
    assert re.fullmatch(r"up for over (9|10) min", cell(blog, "probe")[1])
    assert cell(blog, "certificate")[1].startswith("valid until ")

    fresh = row_of(html, h.fresh)
    assert cell(fresh, "status")[1] == "provisioning"
    assert cell(fresh, "probe")[1] == "unknown" and cell(fresh, "http")[1] == "—"

    # Nothing of tenant B, even when asked for (the filter echoes only what was asked).
    assert h.foreign not in html and h.b.slug not in html and h.b.id not in html
    asked = (await owner.get(f"/noc/sites?tenant={h.b.slug}")).text
    assert h.foreign not in asked and f"shop.{h.b.slug}" not in asked and "No sites match." in asked

    # Filters: status, problems only.
    r = await owner.get("/noc/sites?status=provisioning")
    assert h.fresh in r.text and h.shop not in r.text and h.blog not in r.text
    r = await owner.get("/noc/sites?problem=1")
    assert h.shop in r.text and h.blog in r.text and h.fresh not in r.text
    assert 'name="problem" value="1" checked' in r.text
    assert h.shop in (await owner.get(f"/noc/sites?tenant={h.a.slug}&status=failed")).text
    assert (await owner.get("/noc/sites?status=sleeping")).status_code == 400
    assert (await owner.get("/noc/sites?problem=maybe")).status_code == 400

    # The live refresh: the rows alone, with what the probes report now.
    r = await owner.get("/noc/sites?fragment=rows&problem=1")
    assert r.status_code == 200
    assert "<html" not in r.text and "<tbody" not in r.text
    assert h.fresh not in r.text and cell(row_of(r.text, h.shop), "http")[1] == "503"
    assert (await owner.get("/noc/sites?fragment=everything")).status_code == 400
    h.probe(h.a, h.fresh, [Probe(int(time.time() * 1000), True, 204, 0.01)])
    r = await owner.get("/noc/sites?fragment=rows")
    fresh = row_of(r.text, h.fresh)
    assert cell(fresh, "http")[1] == "204" and cell(fresh, "probe")[1].startswith("up")

    # Without a session: the page sends to the login form, the fragment answers 401.
    anonymous = api.client()
    r = await anonymous.get("/noc/sites")
    assert (r.status_code, r.headers["location"]) == (303, "/noc/login?next=%2Fnoc%2Fsites")
    r = await anonymous.get("/noc/sites?fragment=rows")
    assert r.status_code == 401 and h.shop not in r.text


async def test_site_page_details_charts_and_not_found_parity(api: Api, hosted: Hosted) -> None:
    h = hosted
    owner = await form_login(api, h.a.owner_email, OWNER_PASSWORD)
    url = f"/noc/sites/{h.a.id}/{h.shop}"
    r = await owner.get(url)
    assert r.status_code == 200, r.text
    assert_page_headers(r)
    html = r.text
    assert "<script>" not in html and "style=" not in html  # CSP: nothing inline
    assert f"<h1>shop.{h.a.slug}.example.com</h1>" in html
    assert f"www.shop.{h.a.slug}.example.com" in html  # the alias
    assert "<code>/old</code>" in html and "<code>/new</code>" in html  # the redirect
    assert f'href="/noc/servers/{h.web}">web-1</a>' in html
    workflow = re.search(r'data-metric="workflow">(.*?)</dl>', html, re.S)
    assert workflow is not None
    assert "failed" in workflow.group(1)
    assert "step apply failed: nginx -t: unknown directive" in workflow.group(1)
    assert "No certificate requested." in html

    charts = dict(re.findall(r'<figure class="chart" id="([a-z-]+)">(.*?)</figure>', html, re.S))
    assert set(charts) == {"up", "latency", "status"}
    for name, chart in charts.items():
        assert re.search(r'<svg[^>]+role="img"[^>]+aria-labelledby=', chart), name
        path = re.search(r'<path class="line" d="M([^"]+)"', chart)
        assert path is not None and path.group(1).count(" L") >= 60, name
    assert "up: latest 0 %, min 0 %, max 100 %" in charts["up"]
    assert "response time: latest 40 ms" in charts["latency"]
    assert "HTTP status: latest 503, min 200, max 503" in charts["status"]

    blog = (await owner.get(f"/noc/sites/{h.a.id}/{h.blog}")).text
    assert re.search(r'<dd data-metric="tls" class="warn">10.5</dd>', blog)
    assert "Pebble Intermediate CA" in blog

    r = await owner.get(url + "?window=24h")
    assert r.status_code == 200 and "last 24 hours, one point per 240 s" in r.text
    assert (await owner.get(url + "?window=7d")).status_code == 400
    r = await owner.get(url + "?window=6h&fragment=live")
    assert r.status_code == 200 and "<html" not in r.text and r.text.count("<svg") == 3

    # B's site is the very page of a site that does not exist, however it is asked for.
    foreign = await owner.get(f"/noc/sites/{h.b.id}/{h.foreign}")
    under_a = await owner.get(f"/noc/sites/{h.a.id}/{h.foreign}")
    missing = await owner.get(f"/noc/sites/{h.a.id}/{uuid.uuid4()}")
    nowhere = await owner.get(f"/noc/sites/{uuid.uuid4()}/{uuid.uuid4()}")
    garbage = await owner.get("/noc/sites/not-a-tenant/not-a-site")
    answers = [foreign, under_a, missing, nowhere, garbage]
    assert {x.status_code for x in answers} == {404}
    assert len({x.text for x in answers}) == 1
    assert h.b.slug not in foreign.text and "shop." not in foreign.text
    r = await owner.get(f"/noc/sites/{h.b.id}/{h.foreign}?fragment=live")
    assert r.status_code == 404 and h.b.slug not in r.text


async def test_staff_see_every_tenant_and_their_reads_are_audited(api: Api, hosted: Hosted) -> None:
    h = hosted
    staff = await form_login(api, STAFF_EMAIL, STAFF_PASSWORD)
    r = await staff.get("/noc/sites")
    assert r.status_code == 200
    html = r.text
    foreign = row_of(html, h.foreign)
    assert h.b.slug in foreign and cell(foreign, "http") == ("num crit", "500")
    assert cell(foreign, "tls") == ("num crit", "1.0")  # under 3 days: critical
    assert h.a.slug in row_of(html, h.shop)
    only_b = (await staff.get(f"/noc/sites?tenant={h.b.slug}")).text
    assert h.foreign in only_b and h.shop not in only_b

    api_staff = await api.staff()
    me = (await api_staff.get("/v1/auth/me")).json()
    entries = (await api_staff.get("/v1/audit?action=staff.read")).json()["items"]
    reads = [e for e in entries if e["resource_type"] == "sites"]
    assert reads and {e["actor_id"] for e in reads} == {me["id"]}
    assert all(e["tenant_id"] is None for e in reads)

    # One site's page is read in that tenant's own log, where its owner sees it.
    r = await staff.get(f"/noc/sites/{h.b.id}/{h.foreign}")
    assert r.status_code == 200 and f"shop.{h.b.slug}.example.com" in r.text
    log = await h.b.owner.get(f"/v1/tenants/{h.b.id}/audit?action=staff.read")
    assert [(e["actor_kind"], e["actor_id"]) for e in log.json()["items"]] == [("staff", me["id"])]
    log = await h.a.owner.get(f"/v1/tenants/{h.a.id}/audit?action=staff.read")
    assert log.json()["items"] == []


async def test_roles_without_metrics_or_sites_read(api: Api, hosted: Hosted) -> None:
    h = hosted
    base = f"/v1/tenants/{h.a.id}"
    r = await h.a.owner.post(
        f"{base}/roles", json={"name": "site-lister", "permissions": ["sites:read"]}
    )
    assert r.status_code == 201, r.text
    email = f"lister@{h.a.slug}.test"
    r = await h.a.owner.post(
        f"{base}/members",
        json={"email": email, "password": "lister-password-1", "role": "site-lister"},
    )
    assert r.status_code == 201, r.text
    lister = await form_login(api, email, "lister-password-1")
    html = (await lister.get("/noc/sites")).text
    shop = row_of(html, h.shop)
    assert cell(shop, "http")[1] == "—" and cell(shop, "probe")[1] == "unknown"
    assert "web-1" not in shop  # no servers:read: no server name either
    page = (await lister.get(f"/noc/sites/{h.a.id}/{h.shop}")).text
    assert "does not include metrics:read" in page and "503" not in page

    r = await h.a.owner.post(
        f"{base}/members",
        json={
            "email": f"biller@{h.a.slug}.test",
            "password": "biller-password-1",
            "role": "billing",
        },
    )
    assert r.status_code == 201, r.text
    biller = await form_login(api, f"biller@{h.a.slug}.test", "biller-password-1")
    html = (await biller.get("/noc/sites")).text
    assert "No sites match." in html and h.shop not in html
    missing = await biller.get(f"/noc/sites/{h.a.id}/{uuid.uuid4()}")
    r = await biller.get(f"/noc/sites/{h.a.id}/{h.shop}")
    assert r.status_code == 404 and r.text == missing.text
