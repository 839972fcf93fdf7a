"""The NOC pages in a real browser: log in through the form, read the fleet, open a
server's charts, and watch the live refresh pick up new samples — with no console error
(a CSP violation is one)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from controlplane.db import Database
from controlplane.registry.presence import apply_presence
from proto import agent_pb2
from yakpanel.clock import SystemClock

from ..integration.controlplane.conftest import OWNER_PASSWORD, Api
from ..support.host_metrics import HostSample, migrate_clickhouse, write_samples

pytestmark = [
    pytest.mark.browser,
    pytest.mark.postgres,
    pytest.mark.kafka,
    pytest.mark.clickhouse,
]

TIMEOUT_MS = 15_000


async def online(api: Api, tenant: str, server: str) -> None:
    db = Database(api.stack.postgres_dsn, SystemClock(), max_size=1)
    await db.open()
    try:
        at = Timestamp()
        at.GetCurrentTime()
        event = agent_pb2.PresenceEvent(
            tenant_id=tenant, server_id=server, online=True, session_id="s-1", at=at
        )
        await apply_presence(db, event)
    finally:
        await db.close()


def samples(end_ms: int, minutes: int, cpu_last: float) -> list[HostSample]:
    """Every 10 s for `minutes` before `end_ms`, the last one with CPU busy `cpu_last`."""
    out = [
        HostSample(end_ms - k * 10_000, 0.25 + 0.1 * (k % 3), 0.5, {"/": 0.4}, 0.8)
        for k in range(minutes * 6, 0, -1)
    ]
    return [*out, HostSample(end_ms, cpu_last, 0.5, {"/": 0.4}, 0.8)]


def _now_ms(ago_s: int = 0) -> int:
    return int(time.time() * 1000) - ago_s * 1000


async def test_login_fleet_server_charts_and_live_refresh(api: Api, chromium: Any) -> None:
    from playwright.async_api import expect

    tenant = await api.create_tenant()
    r = await tenant.owner.post(f"/v1/tenants/{tenant.id}/servers", json={"name": "web-1"})
    assert r.status_code == 201, r.text
    server = r.json()["id"]
    await online(api, tenant.id, server)
    ch = api.stack.clickhouse.client()
    database = api.stack.clickhouse.database
    try:
        migrate_clickhouse(ch, database)
        # Each later write lands 20 s or more after the one before: a 10 s bucket of its own.
        write_samples(ch, database, tenant.id, server, "web-1", samples(_now_ms(40), 10, 0.73))

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
        # The page's timers run on a clock the test moves: the 10 s refresh without waiting.
        await page.clock.install()

        # Not logged in: the fleet sends the browser to the login form.
        await page.goto(f"{api.url}/noc/")
        await expect(page).to_have_url(f"{api.url}/noc/login")
        await page.get_by_label("Email").fill(tenant.owner_email)
        await page.get_by_label("Password").fill(OWNER_PASSWORD)
        await page.get_by_role("button", name="Log in").click()
        await expect(page).to_have_url(f"{api.url}/noc/")

        row = page.locator(f'tr[data-server-id="{server}"]')
        cpu = row.locator('td[data-metric="cpu"]')
        await expect(row.get_by_role("link", name="web-1")).to_be_visible()
        await expect(cpu).to_have_text("73 %")
        await expect(row.locator('td[data-metric="memory"]')).to_have_text("50 %")
        await expect(row).to_contain_text("online")

        # New samples arrive; the next refresh replaces the rows in place (no reload).
        await page.evaluate("window.__still_this_page = true")
        await cpu.evaluate("cell => cell.setAttribute('data-old', 'yes')")
        write_samples(ch, database, tenant.id, server, "web-1", samples(_now_ms(20), 0, 0.37))
        await page.clock.run_for(11_000)
        await expect(cpu).to_have_text("37 %")
        await expect(page.locator("td[data-old]")).to_have_count(0)
        assert await page.evaluate("window.__still_this_page === true")
        await expect(page.locator("#refresh-status")).to_contain_text("Updated")

        # The server page: inline SVG charts with drawn lines and accessible names.
        await row.get_by_role("link", name="web-1").click()
        await expect(page).to_have_url(f"{api.url}/noc/servers/{server}")
        await expect(page.get_by_role("heading", name="web-1", exact=True)).to_be_visible()
        chart = page.locator("#cpu svg")
        await expect(chart).to_be_visible()
        await expect(page.get_by_role("img", name="CPU busy %")).to_be_visible()
        path = await chart.locator("path.line").first.get_attribute("d")
        assert path is not None and path.startswith("M") and path.count(" L") >= 50, path
        box = await chart.bounding_box()
        assert box is not None and box["width"] > 300 and box["height"] > 100
        await expect(page.locator("#cpu figcaption")).to_contain_text("latest 37 %")
        for name in ("memory", "disk", "load", "network"):
            await expect(page.locator(f"#{name} svg")).to_be_visible()

        # The charts refresh too.
        write_samples(ch, database, tenant.id, server, "web-1", samples(_now_ms(), 0, 0.91))
        await page.clock.run_for(11_000)
        await expect(page.locator("#cpu figcaption")).to_contain_text("latest 91 %")

        # Log out through the header's form: back to the login page, the fleet is closed.
        await page.get_by_role("button", name="Log out").click()
        await expect(page).to_have_url(f"{api.url}/noc/login")
        await page.goto(f"{api.url}/noc/")
        await expect(page).to_have_url(f"{api.url}/noc/login")
        await context.close()
    finally:
        ch.close()
    assert problems == []
