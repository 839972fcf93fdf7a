"""Incidents against the real control plane and PostgreSQL: opened by a firing transition
recorded through `AlertStore`'s transaction, worked on through the API (acknowledge,
assign, notes, resolve) with the timeline in order, the audit log and the events, and
resolved by the alert resolving (issue #6)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from alerting.evaluator import GroupEvaluation
from alerting.state import AlertState, GroupState, Transition, fingerprint
from alerting.store import AlertStore

from .conftest import Api, Client, Tenant

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

RULE = "host/HostLoadHigh"


def url(t: Tenant) -> str:
    return f"/v1/tenants/{t.id}/incidents"


def db_rows(api: Api, sql: str, *params: Any) -> list[dict[str, Any]]:
    with psycopg.connect(api.stack.postgres_dsn, row_factory=dict_row) as conn:
        return conn.execute(sql, params).fetchall()


def transition(
    t: Tenant, labels: dict[str, str], src: AlertState, dst: AlertState, at: datetime
) -> Transition:
    fp = fingerprint(t.id, RULE, labels)
    return Transition(
        t.id, fp, RULE, "host", "HostLoadHigh", labels, {}, src, dst, at, 9.0,
        at - timedelta(minutes=5),
    )  # fmt: skip


async def record(api: Api, t: Tenant, *transitions: Transition) -> None:
    """What the alerting service does after an evaluation: one transaction."""
    store = AlertStore(api.stack.postgres_dsn)
    await store.open()
    try:
        at = max(x.at for x in transitions)
        await store.save_evaluation(t.id, "host", GroupEvaluation(at, GroupState({}), transitions))
    finally:
        await store.close()


async def member(api: Api, t: Tenant, role: str) -> tuple[Client, str]:
    email = f"{role}-{uuid.uuid4().hex[:6]}@{t.slug}.test"
    r = await t.owner.post(
        f"/v1/tenants/{t.id}/members",
        json={"email": email, "password": "member-password-123", "role": role},
    )
    assert r.status_code == 201, r.text
    return await api.login(email, "member-password-123"), r.json()["user_id"]


async def test_incident_lifecycle(api: Api) -> None:
    t = await api.create_tenant()
    other = await api.create_tenant()
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    labels = {"alertname": "HostLoadHigh", "host_name": "web-1", "severity": "page"}
    await record(
        api,
        t,
        transition(t, labels, AlertState.INACTIVE, AlertState.PENDING, at - timedelta(minutes=5)),
        transition(t, labels, AlertState.PENDING, AlertState.FIRING, at),
    )
    r = await t.owner.get(url(t))
    assert r.status_code == 200, r.text
    [item] = r.json()["items"]
    assert (item["state"], item["severity"], item["alertname"]) == ("open", "page", "HostLoadHigh")
    assert item["fingerprint"] == fingerprint(t.id, RULE, labels)
    assert item["labels"] == labels
    incident = f"{url(t)}/{item['id']}"
    # Nothing of it in another tenant.
    assert (await other.owner.get(url(other))).json()["items"] == []
    assert (await other.owner.get(f"{url(other)}/{item['id']}")).status_code == 404

    viewer, _ = await member(api, t, "viewer")
    assert (await viewer.get(incident)).status_code == 200
    r = await viewer.post(f"{incident}/acknowledge")
    assert (r.status_code, r.json()["code"]) == (403, "forbidden")

    me = (await t.owner.get("/v1/auth/me")).json()["id"]
    r = await t.owner.post(f"{incident}/acknowledge")
    assert r.status_code == 200, r.text
    assert (r.json()["state"], r.json()["acknowledged_by"]) == ("acknowledged", me)
    r = await t.owner.post(f"{incident}/acknowledge")
    assert (r.status_code, r.json()["code"]) == (409, "conflict")

    _, operator = await member(api, t, "operator")
    _, stranger = await member(api, other, "operator")
    for who in (stranger, str(uuid.uuid4())):
        r = await t.owner.post(f"{incident}/assign", json={"user_id": who})
        assert (r.status_code, r.json()["code"]) == (422, "not_a_member"), r.text
    r = await t.owner.post(f"{incident}/assign", json={"user_id": operator})
    assert r.status_code == 200, r.text
    assert r.json()["assignee"] == operator

    r = await t.owner.post(f"{incident}/notes", json={"text": "load from a backup job"})
    assert r.status_code == 200, r.text
    r = await t.owner.post(f"{incident}/notes", json={"text": ""})
    assert r.status_code == 422
    r = await t.owner.post(f"{incident}/resolve", json={"comment": "backup moved to 3am"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["state"], body["resolution"], body["resolved_by"]) == (
        "resolved",
        "backup moved to 3am",
        me,
    )
    r = await t.owner.post(f"{incident}/resolve", json={})
    assert (r.status_code, r.json()["code"]) == (409, "conflict")

    timeline = (await t.owner.get(incident)).json()["timeline"]
    assert [(e["kind"], e["author"], e["text"]) for e in timeline] == [
        ("opened", None, "HostLoadHigh firing"),
        ("acknowledged", me, None),
        ("assigned", me, operator),
        ("note", me, "load from a backup job"),
        ("resolved", me, "backup moved to 3am"),
    ]

    actions = ["incident.acknowledged", "incident.assigned", "incident.noted", "incident.resolved"]
    audit = db_rows(
        api,
        "SELECT action, actor_id, after FROM audit_log WHERE tenant_id = %s"
        " AND resource_type = 'incident' ORDER BY at, id",
        t.id,
    )
    assert [a["action"] for a in audit] == actions
    assert {str(a["actor_id"]) for a in audit} == {me}
    assert audit[-1]["after"]["state"] == "resolved"
    events = db_rows(
        api,
        "SELECT event_type FROM outbox WHERE tenant_id = %s AND aggregate_type = 'incident'"
        " ORDER BY occurred_at, event_id",
        t.id,
    )
    # (Opened by the alert transition: the system's event comes first.)
    assert [e["event_type"] for e in events] == ["incident.opened", *actions]

    r = await t.owner.get(url(t), params={"state": "open"})
    assert r.json()["items"] == []
    r = await t.owner.get(url(t), params={"state": "resolved"})
    assert [x["id"] for x in r.json()["items"]] == [item["id"]]


async def test_resolved_alert_resolves_the_incident(api: Api) -> None:
    t = await api.create_tenant()
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
    labels = {"alertname": "HostLoadHigh", "host_name": "web-2"}
    await record(api, t, transition(t, labels, AlertState.PENDING, AlertState.FIRING, at))
    # Firing again while the incident is open: no second incident, a timeline entry.
    later = at + timedelta(minutes=1)
    await record(api, t, transition(t, labels, AlertState.INACTIVE, AlertState.FIRING, later))
    [item] = (await t.owner.get(url(t))).json()["items"]
    assert item["severity"] is None
    r = await t.owner.post(f"{url(t)}/{item['id']}/acknowledge")
    assert r.status_code == 200, r.text

    resolved_at = at + timedelta(minutes=5)
    await record(api, t, transition(t, labels, AlertState.FIRING, AlertState.RESOLVED, resolved_at))
    body = (await t.owner.get(f"{url(t)}/{item['id']}")).json()
    assert (body["state"], body["resolution"], body["resolved_by"]) == (
        "resolved",
        "alert resolved",
        None,
    )
    assert datetime.fromisoformat(body["resolved_at"]) == resolved_at
    assert [e["kind"] for e in body["timeline"]] == [
        "opened",
        "reopened",
        "acknowledged",
        "alert_resolved",
        "resolved",
    ]
    events = db_rows(
        api,
        "SELECT event_type, payload FROM outbox WHERE tenant_id = %s"
        " AND aggregate_id = %s ORDER BY id",
        t.id,
        item["id"],
    )
    assert [e["event_type"] for e in events] == [
        "incident.opened",
        "incident.acknowledged",
        "incident.resolved",
    ]
    resolved = events[-1]["payload"]
    assert resolved["actor"]["kind"] == "system" and resolved["data"]["resolution"] == (
        "alert resolved"
    )

    # It fires again: a new incident; the list is newest first and pages.
    await record(
        api,
        t,
        transition(t, labels, AlertState.RESOLVED, AlertState.FIRING, at + timedelta(minutes=10)),
        transition(
            t,
            {**labels, "host_name": "web-3"},
            AlertState.PENDING,
            AlertState.FIRING,
            at + timedelta(minutes=10),
        ),
    )
    seen: list[str] = []
    cursor = None
    for _ in range(4):
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await t.owner.get(url(t), params=params)).json()
        seen += [x["state"] for x in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ["open", "open", "resolved"]
    r = await t.owner.get(url(t), params={"cursor": "not-a-cursor"})
    assert r.status_code == 400
    r = await t.owner.get(url(t), params={"state": "closed"})
    assert r.status_code == 422
