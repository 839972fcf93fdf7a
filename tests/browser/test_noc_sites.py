"""The site health pages in a real browser: log in, read the sites list, watch the live
refresh pick up a new probe result, open a site's charts — with no console error (a CSP
violation is one)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from ..integration.controlplane.conftest import OWNER_PASSWORD, Api
from ..support.host_metrics import migrate_clickhouse
from ..unit.test_site_health_query import Probe, every_10s, write_probes

pytestmark = [
    pytest.mark.browser,
    pytest.mark.postgres,
    pytest.mark.kafka,
    pytest.mark.clickhouse,
]

TIMEOUT_MS = 15_000


def _now_ms(ago_s: int = 0) -> int:
    return int(time.time() * 1000) - ago_s * 1000


async def test_sites_list_live_refresh_and_site_charts(api: Api, chromium: Any) -> None:
    from playwright.async_api import expect

    tenant = await api.create_tenant()
    r = await tenant.owner.post(f"/v1/tenants/{tenant.id}/servers", json={"name": "web-1"})
    assert r.status_code == 201, r.text
    server = r.json()["id"]
    domain = f"shop.{tenant.slug}.example.com"
    r = await tenant.owner.post(
        f"/v1/tenants/{tenant.id}/sites",
        json={"server_id": server, "kind": "static", "domains": [domain]},
    )
    assert r.status_code == 202, r.text
    site = r.json()["id"]

    ch = api.stack.clickhouse.client()
    database = api.stack.clickhouse.database
    try:
        migrate_clickhouse(ch, database)
        # Each later write lands 20 s or more after the one before: a 10 s bucket of its own.
        write_probes(
            ch, database, tenant.id, server, site,
            every_10s(_now_ms(40), 10, lambda k, ts: Probe(ts, True, 200, 0.08, 30)),
        )  # fmt: skip

        context = await chromium.new_context()
        page = await context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        problems: list[str] = []
        page.on(
            "console",
            lambda m: (
                problems.append(f"console {m.type}: {m.text} ({m.location})")
                if m.type == "error"
                else None
            ),
        )
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda req: problems.append(f"request failed: {req.url}"))
        await page.clock.install()

        await page.goto(f"{api.url}/noc/login")
        await page.get_by_label("Email").fill(tenant.owner_email)
        await page.get_by_label("Password").fill(OWNER_PASSWORD)
        await page.get_by_role("button", name="Log in").click()
        await expect(page).to_have_url(f"{api.url}/noc/")
        await page.get_by_role("navigation", name="Pages").get_by_role("link", name="Sites").click()
        await expect(page).to_have_url(f"{api.url}/noc/sites")
        await expect(page.get_by_role("heading", name="Sites", exact=True)).to_be_visible()

        row = page.locator(f'tr[data-site-id="{site}"]')
        http = row.locator('td[data-metric="http"]')
        await expect(row.get_by_role("link", name=domain)).to_be_visible()
        await expect(http).to_have_text("200")
        await expect(row.locator('td[data-metric="latency"]')).to_have_text("80 ms")
        await expect(row.locator('td[data-metric="probe"]')).to_contain_text("up")
        await expect(row.locator('td[data-metric="tls"]')).to_have_text("30.0")

        # The site goes down; the next refresh replaces the rows in place (no reload).
        await page.evaluate("window.__still_this_page = true")
        await http.evaluate("cell => cell.setAttribute('data-old', 'yes')")
        write_probes(ch, database, tenant.id, server, site, [Probe(_now_ms(20), False, 502, 0.3)])
        await page.clock.run_for(11_000)
        await expect(http).to_have_text("502")
        await expect(http).to_have_class("num crit")
        await expect(row.locator('td[data-metric="probe"]')).to_contain_text("down")
        await expect(page.locator("td[data-old]")).to_have_count(0)
        assert await page.evaluate("window.__still_this_page === true")
        await expect(page.locator("#refresh-status")).to_contain_text("Updated")

        # The site's page: details and inline SVG charts with drawn lines.
        await row.get_by_role("link", name=domain).click()
        await expect(page).to_have_url(f"{api.url}/noc/sites/{tenant.id}/{site}")
        await expect(page.get_by_role("heading", name=domain, exact=True)).to_be_visible()
        await expect(page.get_by_role("link", name="web-1")).to_be_visible()
        for name in ("up", "latency", "status"):
            chart = page.locator(f"#{name} svg")
            await expect(chart).to_be_visible()
            box = await chart.bounding_box()
            assert box is not None and box["width"] > 300 and box["height"] > 100
        path = await page.locator("#latency svg path.line").first.get_attribute("d")
        assert path is not None and path.startswith("M") and path.count(" L") >= 50, path
        await expect(page.locator("#status figcaption")).to_contain_text("latest 502")

        # The details refresh too.
        write_probes(ch, database, tenant.id, server, site, [Probe(_now_ms(), True, 200, 0.05)])
        await page.clock.run_for(11_000)
        await expect(page.locator('dd[data-metric="http"]')).to_have_text("200")
        await expect(page.locator("#status figcaption")).to_contain_text("latest 200")
        await context.close()
    finally:
        ch.close()
    assert problems == []
