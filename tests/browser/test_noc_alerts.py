"""The NOC alert pages in a real browser: log in, read the alerts, open one, silence it
through the form and see the silence listed, then expire it; follow a link to an alert
through the login form, acknowledge its incident and add a note — with no console error
(a CSP violation is one)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from ..integration.controlplane.conftest import OWNER_PASSWORD, Api
from ..integration.controlplane.test_noc_alerts import db_rows, seed_alerts

pytestmark = [
    pytest.mark.browser,
    pytest.mark.postgres,
    pytest.mark.kafka,
    pytest.mark.clickhouse,
]

TIMEOUT_MS = 15_000


async def test_alerts_list_detail_and_silence_form(api: Api, chromium: Any) -> None:
    from playwright.async_api import expect

    tenant = await api.create_tenant()
    firing, pending = await seed_alerts(api, tenant, "web-1")

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

    # The alerts list, through the header's link; it refreshes in place.
    await page.get_by_role("link", name="Alerts", exact=True).click()
    await expect(page).to_have_url(f"{api.url}/noc/alerts")
    row = page.locator(f'tr[data-fingerprint="{firing}"]')
    await expect(row).to_contain_text("firing")
    await expect(row).to_contain_text("load 9 on web-1")
    await expect(page.locator(f'tr[data-fingerprint="{pending}"]')).to_contain_text("pending")
    await page.clock.run_for(11_000)
    await expect(page.locator("#refresh-status")).to_contain_text("Updated")

    # The alert's page, and the silence form with its matchers prefilled.
    await row.get_by_role("link", name="HostLoadHigh").click()
    await expect(page).to_have_url(f"{api.url}/noc/alerts/{tenant.id}/{firing}")
    await expect(page.locator("#history")).to_contain_text("firing")
    matchers = page.get_by_label("Matchers", exact=False)
    await expect(matchers).to_have_value(
        'alertname="HostLoadHigh"\nhost_name="web-1"\nseverity="page"'
    )
    await page.get_by_label("24h").check()
    await page.get_by_label("Comment").fill("maintenance window")
    await page.get_by_role("button", name="Silence", exact=True).click()
    await expect(page).to_have_url(f"{api.url}/noc/alerts/{tenant.id}/{firing}")
    listed = page.locator("#silences tbody tr").first
    await expect(listed).to_contain_text("maintenance window")
    await expect(listed).to_contain_text(tenant.owner_email)
    [stored] = db_rows(api, "SELECT * FROM alert_silences WHERE tenant_id = %s", tenant.id)
    assert stored["silence"]["createdBy"] == tenant.owner_email

    # The list shows it silenced; the Expire button ends the silence.
    await page.goto(f"{api.url}/noc/alerts")
    await expect(page.locator(f'tr[data-fingerprint="{firing}"]')).to_contain_text("silenced")
    await page.goto(f"{api.url}/noc/alerts/{tenant.id}/{firing}")
    await page.get_by_role("button", name="Expire").click()
    await expect(page.locator("#silences")).to_contain_text("No silence matches this alert.")
    await context.close()
    assert problems == []


async def test_acknowledge_and_note_from_the_alert_page(api: Api, chromium: Any) -> None:
    from playwright.async_api import expect

    tenant = await api.create_tenant()
    firing, _ = await seed_alerts(api, tenant, "web-1")
    alert_url = f"{api.url}/noc/alerts/{tenant.id}/{firing}"

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

    # A link to the alert without a session: the login form, then back to the alert.
    await page.goto(alert_url)
    await expect(page).to_have_url(re.compile(r"/noc/login\?next="))
    await page.get_by_label("Email").fill(tenant.owner_email)
    await page.get_by_label("Password").fill(OWNER_PASSWORD)
    await page.get_by_role("button", name="Log in").click()
    await expect(page).to_have_url(alert_url)

    incident = page.locator("#incident")
    await expect(page.locator("#incident-state")).to_have_text("open")
    await expect(page.locator("#timeline")).to_contain_text("HostLoadHigh firing")
    await incident.get_by_role("button", name="Acknowledge").click()
    await expect(page).to_have_url(alert_url)
    await expect(page.locator("#incident-state")).to_have_text("acknowledged")
    entry = page.locator("#timeline tbody tr.event-acknowledged")
    await expect(entry).to_contain_text(tenant.owner_email)
    await expect(incident.get_by_role("button", name="Acknowledge")).to_have_count(0)

    # A note, then assign to oneself: both on the timeline, the assignee shown.
    await page.get_by_label("Note").fill("looking at the backup job")
    await page.get_by_role("button", name="Add note").click()
    await expect(page.locator("#timeline tbody tr.event-note")).to_contain_text(
        "looking at the backup job"
    )
    await page.get_by_label("Assign to").select_option(label=tenant.owner_email)
    await page.get_by_role("button", name="Assign", exact=True).click()
    await expect(page.locator("#incident-assignee")).to_have_text(tenant.owner_email)

    [stored] = db_rows(api, "SELECT state, assignee FROM incidents WHERE tenant_id = %s", tenant.id)
    assert stored["state"] == "acknowledged" and stored["assignee"] is not None

    # The list shows it, and links to the incidents page, where it is listed.
    await page.goto(f"{api.url}/noc/alerts")
    row = page.locator(f'tr[data-fingerprint="{firing}"]')
    await expect(row).to_contain_text("acknowledged")
    # (From the page header: every NOC page links to the incident list.)
    await page.get_by_role("navigation", name="Pages").get_by_role("link", name="Incidents").click()
    await expect(page).to_have_url(f"{api.url}/noc/incidents")
    await expect(page.locator("#incidents tbody tr").first).to_contain_text("acknowledged")
    await context.close()
    assert problems == []
