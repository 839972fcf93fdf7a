"""The NOC alert pages over the real API and PostgreSQL: alerts stored the alerting
service's way (`AlertStore.save_evaluation`) in two tenants; each viewer sees exactly
theirs, and the silence form creates a silence through the alerting API's use case."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

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
    assert (r.status_code, r.headers["location"]) == (303, "/noc/login")
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
