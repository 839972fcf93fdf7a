"""The NOC alert pages over the real API and PostgreSQL: alerts stored the alerting
service's way (`AlertStore.save_evaluation`) in two tenants; each viewer sees exactly
theirs, and the silence form creates a silence through the alerting API's use case."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest
from psycopg.rows import dict_row

from alerting.evaluator import GroupEvaluation
from alerting.state import Alert, AlertState, GroupState, RuleState, Transition, fingerprint
from alerting.store import AlertStore

from .conftest import Api, Client, Tenant
from .test_noc import assert_page_headers

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

RULE = "host/HostLoadHigh"


def db_rows(api: Api, sql: str, *params: Any) -> list[dict[str, Any]]:
    with psycopg.connect(api.stack.postgres_dsn, row_factory=dict_row) as conn:
        return conn.execute(sql, params).fetchall()


async def seed_alerts(api: Api, t: Tenant, host: str) -> tuple[str, str]:
    """A firing alert on `host` (with its history) and a pending one; their fingerprints."""
    at = datetime.now(UTC).replace(microsecond=0)
    labels = {"alertname": "HostLoadHigh", "host_name": host, "severity": "page"}
    fp = fingerprint(t.id, RULE, labels)
    firing = Alert(
        fp,
        RULE,
        labels,
        {"summary": f"load 9 on {host}"},
        AlertState.FIRING,
        9.0,
        at - timedelta(minutes=6),
        at,
        fired_at=at - timedelta(minutes=1),
    )
    labels2 = {**labels, "host_name": f"{host}-b", "severity": "ticket"}
    fp2 = fingerprint(t.id, RULE, labels2)
    pending = Alert(fp2, RULE, labels2, {}, AlertState.PENDING, 8.5, at, at)
    state = GroupState({RULE: RuleState(RULE, {fp: firing, fp2: pending}, "ok", None, at)})

    def transition(src: AlertState, dst: AlertState, when: datetime) -> Transition:
        return Transition(
            t.id, fp, RULE, "host", "HostLoadHigh", labels, {}, src, dst, when, 9.0,
            at - timedelta(minutes=6),
        )  # fmt: skip

    history = (
        transition(AlertState.INACTIVE, AlertState.PENDING, at - timedelta(minutes=6)),
        transition(AlertState.PENDING, AlertState.FIRING, at - timedelta(minutes=1)),
    )
    store = AlertStore(api.stack.postgres_dsn)
    await store.open()
    try:
        await store.save_evaluation(t.id, "host", GroupEvaluation(at, state, history))
    finally:
        await store.close()
    return fp, fp2


async def member(api: Api, t: Tenant, role: str) -> Client:
    email = f"{role}-{uuid.uuid4().hex[:6]}@{t.slug}.test"
    r = await t.owner.post(
        f"/v1/tenants/{t.id}/members",
        json={"email": email, "password": "member-password-123", "role": role},
    )
    assert r.status_code == 201, r.text
    return await api.login(email, "member-password-123")


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match is not None
    return match.group(1)


async def test_alert_pages_visibility_and_silencing(api: Api) -> None:
    a = await api.create_tenant()
    b = await api.create_tenant()
    a_fp, a_pending = await seed_alerts(api, a, "web-1")
    b_fp, _ = await seed_alerts(api, b, "db-1")

    # Without a session: the login form; the live refresh gets 401.
    anonymous = api.client()
    r = await anonymous.get("/noc/alerts")
    assert (r.status_code, r.headers["location"]) == (303, "/noc/login?next=%2Fnoc%2Falerts")
    r = await anonymous.get("/noc/alerts?fragment=rows")
    assert r.status_code == 401

    # A's owner: A's alerts, firing first, with the columns; nothing of B.
    r = await a.owner.get("/noc/alerts")
    assert r.status_code == 200, r.text
    assert_page_headers(r)
    assert a_fp in r.text and a_pending in r.text
    assert b_fp not in r.text and "db-1" not in r.text and b.slug not in r.text
    assert r.text.index(a_fp) < r.text.index(a_pending)
    assert "load 9 on web-1" in r.text and a.slug in r.text
    assert 'href="/noc/alerts"' in r.text  # the nav link
    r = await a.owner.get("/noc/alerts?state=pending")
    assert a_pending in r.text and a_fp not in r.text
    r = await a.owner.get("/noc/alerts?severity=page&fragment=rows")
    assert r.status_code == 200
    assert a_fp in r.text and a_pending not in r.text and "<html" not in r.text
    r = await a.owner.get("/noc/alerts?state=resolved")
    assert r.status_code == 400

    # The detail page: labels, annotations, history, the form with the labels prefilled.
    page = f"/noc/alerts/{a.id}/{a_fp}"
    r = await a.owner.get(page)
    assert r.status_code == 200, r.text
    assert_page_headers(r)
    assert "load 9 on web-1" in r.text and "host_name" in r.text
    assert r.text.count("pending") >= 1 and "firing" in r.text
    assert "host_name=&#34;web-1&#34;" in r.text  # prefilled matcher (escaped quotes)
    assert "No silence matches this alert." in r.text

    # B's alert (through A's tenant id or B's) is the page of an alert that does not exist.
    missing = await a.owner.get(f"/noc/alerts/{a.id}/{uuid.uuid4().hex}")
    assert missing.status_code == 404
    for url in (f"/noc/alerts/{b.id}/{b_fp}", f"/noc/alerts/{a.id}/{b_fp}"):
        r = await a.owner.get(url)
        assert (r.status_code, r.text) == (404, missing.text)
        r = await a.owner.post(url + "/silences", data={"csrf_token": csrf_of(missing.text)})
        assert r.status_code == 404

    # The silence form: without the CSRF token refused, nothing written.
    form = {
        "duration": "4h",
        "matchers": 'alertname="HostLoadHigh"\nhost_name="web-1"',
        "comment": "maintenance of web-1",
    }
    r = await a.owner.post(f"{page}/silences", data=form)
    assert r.status_code == 403
    r = await a.owner.post(f"{page}/silences", data={**form, "csrf_token": "forged"})
    assert r.status_code == 403
    assert db_rows(api, "SELECT * FROM alert_silences WHERE tenant_id = %s", a.id) == []

    # A viewer (alerts:read, not alerts:write) sees the page without the form; posting: 403.
    viewer = await member(api, a, "viewer")
    r = await viewer.get(page)
    assert r.status_code == 200
    assert 'id="silence-form"' not in r.text
    r = await viewer.post(f"{page}/silences", data={**form, "csrf_token": csrf_of(r.text)})
    assert r.status_code == 403
    assert db_rows(api, "SELECT * FROM alert_silences WHERE tenant_id = %s", a.id) == []

    # Invalid input: the form again with the problem, nothing written.
    r = await a.owner.get(page)
    token = csrf_of(r.text)
    bad = {**form, "matchers": "not a matcher", "csrf_token": token}
    r = await a.owner.post(f"{page}/silences", data=bad)
    assert r.status_code == 422
    assert "not a matcher" in r.text
    r = await a.owner.post(f"{page}/silences", data={**form, "duration": "9y", "csrf_token": token})
    assert r.status_code == 422

    # With the token: a silence, created by A's owner, for 4 h; the page lists it.
    r = await a.owner.post(f"{page}/silences", data={**form, "csrf_token": token})
    assert (r.status_code, r.headers["location"]) == (303, page)
    [row] = db_rows(api, "SELECT * FROM alert_silences WHERE tenant_id = %s", a.id)
    silence = row["silence"]
    assert silence["createdBy"] == a.owner_email
    assert silence["comment"] == "maintenance of web-1"
    ends = row["ends_at"] - datetime.fromisoformat(silence["startsAt"])
    assert timedelta(hours=4) - timedelta(seconds=5) < ends <= timedelta(hours=4)
    audit = db_rows(
        api,
        "SELECT action FROM audit_log WHERE tenant_id = %s AND action = 'alert_silence.created'",
        a.id,
    )
    assert len(audit) == 1
    r = await a.owner.get(page)
    assert f'data-silence-id="{row["id"]}"' in r.text and "maintenance of web-1" in r.text
    r = await a.owner.get("/noc/alerts?fragment=rows")
    assert "silenced" in r.text

    # Expire: without the token refused; with it, the silence ends.
    expire = f"{page}/silences/{row['id']}/expire"
    r = await a.owner.post(expire, data={})
    assert r.status_code == 403
    r = await a.owner.post(expire, data={"csrf_token": token})
    assert (r.status_code, r.headers["location"]) == (303, page)
    [row] = db_rows(api, "SELECT * FROM alert_silences WHERE tenant_id = %s", a.id)
    assert row["ends_at"] <= datetime.now(UTC)
    r = await a.owner.get(page)
    assert "No silence matches this alert." in r.text

    # Staff: every tenant's alerts, audited once in the platform log.
    staff = await api.staff()
    r = await staff.get("/noc/alerts")
    assert r.status_code == 200, r.text
    assert a_fp in r.text and b_fp in r.text
    entries = db_rows(
        api,
        "SELECT * FROM audit_log WHERE tenant_id IS NULL AND action = 'staff.read'"
        " AND resource_type = 'alerts'",
    )
    assert entries
    r = await staff.get(f"/noc/alerts/{b.id}/{b_fp}")
    assert r.status_code == 200
    assert 'id="silence-form"' not in r.text  # staff reads, does not write


# --- incidents (issue #6) ------------------------------------------------------------------


async def incident_of(client: Client, t: Tenant, fp: str) -> dict[str, Any]:
    """The alert's incident as the API shows it (with the timeline)."""
    r = await client.get(f"/v1/tenants/{t.id}/incidents")
    assert r.status_code == 200, r.text
    [item] = [i for i in r.json()["items"] if i["fingerprint"] == fp]
    r = await client.get(f"/v1/tenants/{t.id}/incidents/{item['id']}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def section(html: str, element_id: str) -> str:
    """The element with that id, up to its closing tag (tables, sections, dd)."""
    match = re.search(rf'<(\w+)[^>]*id="{element_id}"[^>]*>.*?</\1>', html, re.S)
    assert match is not None, f"no #{element_id} in the page"
    return match.group(0)


def alert_row(html: str, fp: str) -> str:
    match = re.search(rf'<tr[^>]*data-fingerprint="{fp}".*?</tr>', html, re.S)
    assert match is not None, f"no row for {fp}"
    return match.group(0)


async def test_incident_worked_on_from_the_alert_page(api: Api) -> None:
    a = await api.create_tenant()
    b = await api.create_tenant()
    a_fp, _ = await seed_alerts(api, a, "web-1")
    b_fp, _ = await seed_alerts(api, b, "db-1")
    me = (await a.owner.get("/v1/auth/me")).json()["id"]
    incident = await incident_of(a.owner, a, a_fp)
    iid = incident["id"]
    actions = f"/noc/incidents/{a.id}/{iid}"
    page = f"/noc/alerts/{a.id}/{a_fp}"

    # The alert's page shows its incident, open, with the timeline and the forms.
    r = await a.owner.get(page)
    assert r.status_code == 200, r.text
    assert_page_headers(r)
    panel = section(r.text, "incident")
    assert f'data-incident-id="{iid}"' in panel
    assert ">open</span>" in panel
    assert "HostLoadHigh firing" in section(r.text, "timeline")
    assert f'action="{actions}/acknowledge"' in panel
    token = csrf_of(r.text)
    # The list shows each alert's incident state, linked to the incident.
    r = await a.owner.get("/noc/alerts")
    row = alert_row(r.text, a_fp)
    assert 'data-incident-state="open"' in row and f'href="{actions}"' in row
    assert 'href="/noc/incidents"' in r.text

    # Without the CSRF token, or with a forged one: refused, nothing changes.
    for form in ({"from": "alert"}, {"from": "alert", "csrf_token": "forged"}):
        r = await a.owner.post(f"{actions}/acknowledge", data=form)
        assert r.status_code == 403, r.text
        assert "The form expired" in r.text
    r = await a.owner.post(f"{actions}/acknowledge", content=b"{}")  # not a form at all
    assert r.status_code == 403
    assert (await incident_of(a.owner, a, a_fp))["state"] == "open"

    # A viewer (alerts:read only) sees the incident without the forms; posting: 403.
    viewer = await member(api, a, "viewer")
    r = await viewer.get(page)
    assert r.status_code == 200
    assert f'data-incident-id="{iid}"' in r.text and 'id="acknowledge-form"' not in r.text
    r = await viewer.post(
        f"{actions}/acknowledge", data={"csrf_token": csrf_of(r.text), "from": "alert"}
    )
    assert r.status_code == 403
    assert "needs the permission alerts:write" in r.text
    assert (await incident_of(a.owner, a, a_fp))["state"] == "open"

    # Tenant B's owner cannot see or acknowledge A's incident: the page of none (404).
    b_token = csrf_of((await b.owner.get("/noc/alerts")).text)
    nowhere = await b.owner.post(
        f"/noc/incidents/{b.id}/{uuid.uuid4()}/acknowledge", data={"csrf_token": b_token}
    )
    assert nowhere.status_code == 404
    for url in (actions, f"/noc/incidents/{b.id}/{iid}"):
        for action in ("acknowledge", "assign", "notes", "resolve"):
            r = await b.owner.post(
                f"{url}/{action}", data={"csrf_token": b_token, "text": "x", "from": "alert"}
            )
            assert (r.status_code, r.text) == (404, nowhere.text), f"{url}/{action}"
        r = await b.owner.get(url)
        assert r.status_code == 404 and iid not in r.text
    r = await b.owner.get("/noc/incidents")
    assert r.status_code == 200 and iid not in r.text and a.slug not in r.text
    assert (await incident_of(a.owner, a, a_fp))["timeline"][-1]["kind"] == "opened"

    # Acknowledge from the page: back on the alert's page, acknowledged by the owner.
    r = await a.owner.post(f"{actions}/acknowledge", data={"csrf_token": token, "from": "alert"})
    assert (r.status_code, r.headers["location"]) == (303, page)
    body = await incident_of(a.owner, a, a_fp)
    assert (body["state"], body["acknowledged_by"]) == ("acknowledged", me)
    assert [e["kind"] for e in body["timeline"]] == ["opened", "acknowledged"]
    r = await a.owner.get(page)
    panel = section(r.text, "incident")
    assert ">acknowledged</span>" in panel and 'id="acknowledge-form"' not in panel
    timeline = section(r.text, "timeline")
    assert "acknowledged" in timeline and a.owner_email in timeline
    r = await a.owner.get("/noc/alerts?fragment=rows")
    assert 'data-incident-state="acknowledged"' in alert_row(r.text, a_fp)
    audit = db_rows(
        api,
        "SELECT action, actor_id FROM audit_log WHERE tenant_id = %s"
        " AND resource_type = 'incident'",
        a.id,
    )
    assert [(x["action"], str(x["actor_id"])) for x in audit] == [("incident.acknowledged", me)]
    # Twice: the page again, saying why (409).
    r = await a.owner.post(f"{actions}/acknowledge", data={"csrf_token": token, "from": "alert"})
    assert r.status_code == 409
    assert "the incident is acknowledged" in r.text and f'data-incident-id="{iid}"' in r.text

    # Assign to a member; not to someone of another tenant.
    operator = await member(api, a, "operator")
    operator_me = (await operator.get("/v1/auth/me")).json()
    stranger = (await b.owner.get("/v1/auth/me")).json()["id"]
    r = await a.owner.post(
        f"{actions}/assign", data={"csrf_token": token, "from": "alert", "user_id": stranger}
    )
    assert r.status_code == 422
    assert "the assignee must be a member of the tenant" in r.text
    r = await a.owner.get(page)
    assert operator_me["email"] in section(r.text, "assignee")  # offered in the form
    r = await a.owner.post(
        f"{actions}/assign",
        data={"csrf_token": token, "from": "alert", "user_id": operator_me["id"]},
    )
    assert (r.status_code, r.headers["location"]) == (303, page)
    assert (await incident_of(a.owner, a, a_fp))["assignee"] == operator_me["id"]
    r = await a.owner.get(page)
    assert section(r.text, "incident-assignee") == (
        f'<dd id="incident-assignee">{operator_me["email"]}</dd>'
    )
    r = await a.owner.get("/noc/alerts")
    assert operator_me["email"] in alert_row(r.text, a_fp)

    # A note: empty refused (the page again), then on the timeline.
    r = await a.owner.post(f"{actions}/notes", data={"csrf_token": token, "text": "  "})
    assert r.status_code == 422 and "Write the note" in r.text
    note = "load from a <backup> job"
    r = await a.owner.post(
        f"{actions}/notes", data={"csrf_token": token, "from": "alert", "text": note}
    )
    assert (r.status_code, r.headers["location"]) == (303, page)
    r = await a.owner.get(page)
    assert "load from a &lt;backup&gt; job" in section(r.text, "timeline")
    assert "<backup>" not in r.text

    # Resolve from the incident's own page: back there, resolved with the comment.
    r = await a.owner.get(actions)
    assert r.status_code == 200, r.text
    assert f'href="{page}"' in r.text  # the alert is still current
    r = await a.owner.post(
        f"{actions}/resolve",
        data={"csrf_token": token, "from": "incident", "comment": "backup moved to 3am"},
    )
    assert (r.status_code, r.headers["location"]) == (303, actions)
    body = await incident_of(a.owner, a, a_fp)
    assert (body["state"], body["resolution"], body["resolved_by"]) == (
        "resolved",
        "backup moved to 3am",
        me,
    )
    assert [(e["kind"], e["text"]) for e in body["timeline"]] == [
        ("opened", "HostLoadHigh firing"),
        ("acknowledged", None),
        ("assigned", operator_me["id"]),
        ("note", note),
        ("resolved", "backup moved to 3am"),
    ]
    r = await a.owner.get(actions)
    panel = section(r.text, "incident")
    assert ">resolved</span>" in panel and "backup moved to 3am" in panel
    assert 'id="resolve-form"' not in panel and 'id="acknowledge-form"' not in panel
    r = await a.owner.post(f"{actions}/resolve", data={"csrf_token": token, "from": "incident"})
    assert r.status_code == 409

    # The incidents list: open first, filtered by state; another alert opens another.
    web2, _ = await seed_alerts(api, a, "web-2")
    other = (await incident_of(a.owner, a, web2))["id"]
    r = await a.owner.get("/noc/incidents")
    assert r.status_code == 200, r.text
    assert_page_headers(r)
    assert r.text.index(other) < r.text.index(iid)
    r = await a.owner.get("/noc/incidents?state=resolved&fragment=rows")
    assert iid in r.text and other not in r.text and "<html" not in r.text
    r = await a.owner.get("/noc/incidents?state=open")
    assert other in r.text and iid not in r.text
    assert (await a.owner.get("/noc/incidents?state=closed")).status_code == 400
    assert (await api.client().get("/noc/incidents?fragment=rows")).status_code == 401

    # Staff: every tenant's incidents, audited once in the platform log; reads only.
    staff = await api.staff()
    r = await staff.get("/noc/incidents")
    assert r.status_code == 200, r.text
    b_incident = (await incident_of(b.owner, b, b_fp))["id"]
    assert iid in r.text and b_incident in r.text
    entries = db_rows(
        api,
        "SELECT * FROM audit_log WHERE tenant_id IS NULL AND action = 'staff.read'"
        " AND resource_type = 'incidents'",
    )
    assert len(entries) == 1
    r = await staff.get(f"/noc/incidents/{b.id}/{b_incident}")
    assert r.status_code == 200 and 'id="acknowledge-form"' not in r.text
    r = await staff.post(
        f"/noc/incidents/{b.id}/{b_incident}/acknowledge",
        data={"csrf_token": csrf_of(r.text)},
    )
    assert r.status_code == 403
    assert (await incident_of(b.owner, b, b_fp))["state"] == "open"


async def login_form_token(client: Client, url: str) -> tuple[str, str | None]:
    """The login form's CSRF token and its `next` field, if any."""
    r = await client.get(url)
    assert r.status_code == 200, r.text
    nxt = re.search(r'name="next" value="([^"]*)"', r.text)
    return csrf_of(r.text), (nxt.group(1) if nxt else None)


async def test_login_next_returns_to_the_alert_page_and_stays_on_site(api: Api) -> None:
    a = await api.create_tenant()
    fp, _ = await seed_alerts(api, a, "web-1")
    page = f"/noc/alerts/{a.id}/{fp}"
    creds = {"email": a.owner_email, "password": "owner-password-123"}

    browser = api.client()
    r = await browser.get(page)
    assert r.status_code == 303
    login_url = r.headers["location"]
    assert login_url == f"/noc/login?next=%2Fnoc%2Falerts%2F{a.id}%2F{fp}"
    token, nxt = await login_form_token(browser, login_url)
    assert nxt == page
    r = await browser.post("/noc/login", data={**creds, "csrf_token": token, "next": nxt})
    assert (r.status_code, r.headers["location"]) == (303, page)
    r = await browser.get(page)
    assert r.status_code == 200 and "load 9 on web-1" in r.text
    # Logged in already: the login form sends the browser on to `next` too.
    r = await browser.get(login_url)
    assert (r.status_code, r.headers["location"]) == (303, page)

    # The incident's page works the same way.
    iid = (await incident_of(a.owner, a, fp))["id"]
    r = await api.client().get(f"/noc/incidents/{a.id}/{iid}")
    assert r.headers["location"] == f"/noc/login?next=%2Fnoc%2Fincidents%2F{a.id}%2F{iid}"

    # Another site as `next` (scheme, `//host`, a backslash, a header break) is ignored:
    # not in the form, and the login goes to the fleet.
    for evil in (
        "//evil.example",
        "https://evil.example",
        "https://evil.example/noc/alerts",
        "/\\evil.example",
        "/noc/alerts/../..//evil.example",
        "/noc/alerts\r\nLocation: https://evil.example",
        "/noc/alerts\n",
    ):
        client = api.client()
        token, nxt = await login_form_token(client, "/noc/login?" + urlencode({"next": evil}))
        assert nxt is None, evil
        r = await client.post("/noc/login", data={**creds, "csrf_token": token, "next": evil})
        assert (r.status_code, r.headers["location"]) == (303, "/noc/"), evil
        r = await client.get("/noc/login?" + urlencode({"next": evil}))
        assert (r.status_code, r.headers["location"]) == (303, "/noc/"), evil
