"""The alerting API against the real control plane and PostgreSQL: rule groups with
validation and the plan's rule limit, the notification config with its receiver URLs
sealed and never shown, silences, current alerts and their history, and delivery
attempts — a receiver that fails three times and then recovers gets the notification,
and the failures are visible through the API (issue #6's acceptance)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from alerting.dispatch import Alert as DispatchAlert
from alerting.dispatch import Dispatcher
from alerting.evaluator import GroupEvaluation
from alerting.notifylog import AttemptLog, DeliveryAttempt
from alerting.runner import Notifier, RetryPolicy
from alerting.service import AlertingConfig, AlertingService
from alerting.state import Alert, AlertState, GroupState, RuleState, Transition, fingerprint
from alerting.store import AlertStore
from controlplane.crypto import SecretBox, load_master_key
from ingest.query import ClickHouseStore
from yakpanel.clickhouse import ClickHouseTarget
from yakpanel.clock import SystemClock

from ..test_alert_notifications import WebhookServer, webhook  # noqa: F401 - fixture
from ..test_alerting_service import Samples, _until
from .conftest import Api, Client, Tenant

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

SECRET = "s3cretPassw0rdXYZ"
SLACK_TOKEN = "xoxbT0KENabcdefghij1234567890"


def base(t: Tenant) -> str:
    return f"/v1/tenants/{t.id}/alerting"


def group(name: str, *alerts: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "interval": "1m",
        "rules": [
            {
                "alert": a,
                "expr": "system_cpu_load_average_1m > 8",
                "for": "5m",
                "labels": {"severity": "page"},
                "annotations": {"summary": "load {{ $value }} on {{ $labels.host_name }}"},
            }
            for a in alerts
        ],
        **extra,
    }


def db_rows(api: Api, sql: str, *params: Any) -> list[dict[str, Any]]:
    with psycopg.connect(api.stack.postgres_dsn, row_factory=dict_row) as conn:
        return conn.execute(sql, params).fetchall()


async def tenant_with_rule_limit(api: Api, limit: int) -> Tenant:
    staff = await api.staff()
    code = f"alerts-{uuid.uuid4().hex[:8]}"
    r = await staff.post(
        "/v1/plans",
        json={
            "code": code,
            "name": "Few alerts",
            "max_servers": 10,
            "max_sites": 10,
            "max_databases": 10,
            "max_alert_rules": limit,
            "metric_retention_days": 30,
            "api_requests_per_minute": 10_000,
        },
    )
    assert r.status_code == 201, r.text
    return await api.create_tenant(plan=code)


async def member(api: Api, t: Tenant, role: str) -> Client:
    email = f"{role}-{uuid.uuid4().hex[:6]}@{t.slug}.test"
    r = await t.owner.post(
        f"/v1/tenants/{t.id}/members",
        json={"email": email, "password": "member-password-123", "role": role},
    )
    assert r.status_code == 201, r.text
    return await api.login(email, "member-password-123")


# --- rule groups ----------------------------------------------------------------------------


async def test_rule_groups_validation_quota_and_audit(api: Api) -> None:
    t = await tenant_with_rule_limit(api, 4)
    c, url = t.owner, f"{base(t)}/rule-groups"

    r = await c.get(url)
    assert r.status_code == 200, r.text
    assert r.json() == {"items": [], "rule_count": 0, "rule_limit": 4}

    r = await c.post(url, json=group("host", "HostLoadHigh", "HostLoadVeryHigh"))
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["name"] == "host" and created["rule_count"] == 2
    assert created["spec"]["rules"][0]["for"] == "5m"
    r = await c.post(url, json=group("host", "Other"))
    assert (r.status_code, r.json()["code"]) == (409, "conflict")

    # YAML text works as well as JSON; the body's name may be left out on PUT.
    yaml_text = """
interval: 30s
rules:
  - alert: HostLoadHigh
    expr: system_cpu_load_average_1m > 8
  - alert: HostDown
    expr: absent_over_time(system_cpu_load_average_1m{server_id="db-1"}[10m])
  - alert: DiskFilling
    expr: deriv(system_filesystem_utilization[30m]) * 3600 > 0.05
"""
    r = await c.put(f"{url}/host", json=yaml_text)
    assert r.status_code == 200, r.text
    r = await c.put(
        f"{url}/host", content=yaml_text.encode(), headers={"Content-Type": "application/yaml"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["rule_count"] == 3 and r.json()["spec"]["interval"] == "30s"
    r = await c.put(f"{url}/host", json={**group("host", "A"), "name": "other"})
    assert (r.status_code, r.json()["code"]) == (422, "invalid_rules")
    r = await c.put(f"{url}/nope", json=group("nope", "A"))
    assert (r.status_code, r.json()["code"]) == (404, "not_found")

    # Every problem at once, each naming group, rule and field.
    bad = {
        "name": "bad",
        "interval": "1 minute",
        "rules": [
            {"alert": "Ok", "expr": "up == 0"},
            {"alert": "Slow", "expr": "quantile_over_time(0.9, up[5m]) >"},
            {"record": "x", "expr": "up"},
            {"alert": "Typo", "expr": "up", "severity": "page"},
        ],
    }
    r = await c.post(url, json=bad)
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["code"] == "invalid_rules"
    assert r.headers["content-type"] == "application/problem+json"
    assert len(problem["problems"]) >= 4, problem
    text = "\n".join(problem["problems"])
    assert "field interval" in text and "recording rules" in text and "'severity'" in text
    r = await c.post(url, json="groups: [unclosed")
    assert (r.status_code, r.json()["code"]) == (422, "invalid_rules")
    r = await c.post(url, json=[1, 2])
    assert r.status_code == 422
    # Nothing PostgreSQL cannot store gets as far as it (no 5xx).
    r = await c.post(url, json=group("nul\x00", "A"))
    assert (r.status_code, r.json()["code"]) == (422, "invalid_rules")
    r = await c.post(url, json={**group("g", "A"), "labels": {"team": "a\x00b"}})
    assert (r.status_code, r.json()["code"]) == (422, "invalid_rules")
    assert (await c.get(f"{url}/a%00b")).status_code == 404
    assert (await c.delete(f"{url}/a%00b")).status_code == 404
    history = f"{base(t)}/alerts/history"
    assert (await c.get(history, params={"fingerprint": "a\x00"})).status_code == 422
    cursor = base64.urlsafe_b64encode(json.dumps(["2026-01-01T00:00:00+00:00", "\x00"]).encode())
    r = await c.get(history, params={"cursor": cursor.decode()})
    assert (r.status_code, r.json()["code"]) == (400, "bad_cursor")
    r = await c.get(f"{base(t)}/delivery-attempts", params={"receiver": "\x00"})
    assert r.status_code == 422

    # The plan allows 4 rules; 3 are in use.
    r = await c.post(url, json=group("more", "One", "Two"))
    assert r.status_code == 409, r.text
    quota = r.json()
    assert quota["code"] == "quota_exceeded"
    assert (quota["limit"], quota["limit_value"], quota["current"]) == ("max_alert_rules", 4, 5)
    r = await c.post(url, json=group("more", "One"))
    assert r.status_code == 201, r.text

    # A rule file is stored atomically: an invalid group or the limit refuses all of it.
    files = f"{base(t)}/rule-files"
    r = await c.post(files, json={"groups": [group("g1", "A"), {"name": "g2", "rules": "x"}]})
    assert (r.status_code, r.json()["code"]) == (422, "invalid_rules")
    r = await c.post(files, json={"groups": [group("g1", "A"), group("g2", "B")]})
    assert (r.status_code, r.json()["code"]) == (409, "quota_exceeded")
    names = [g["name"] for g in (await c.get(url)).json()["items"]]
    assert names == ["host", "more"]
    rule_file = "groups:\n  - name: host\n    rules:\n      - {alert: A, expr: up == 0}\n"
    rule_file += "  - name: g1\n    rules:\n      - {alert: B, expr: up == 0}\n"
    r = await c.post(files, json=rule_file)
    assert r.status_code == 200, r.text
    assert [g["name"] for g in r.json()] == ["host", "g1"]
    listing = (await c.get(url)).json()
    assert [g["name"] for g in listing["items"]] == ["g1", "host", "more"]
    assert listing["rule_count"] == 3

    r = await c.get(f"{url}/g1")
    assert r.status_code == 200 and r.json()["spec"]["rules"] == [{"alert": "B", "expr": "up == 0"}]
    r = await c.delete(f"{url}/g1")
    assert r.status_code == 204, r.text
    assert (await c.get(f"{url}/g1")).status_code == 404
    assert (await c.delete(f"{url}/g1")).status_code == 404

    # Stored in the shape the alerting service reads.
    store = AlertStore(api.stack.postgres_dsn)
    await store.open()
    try:
        groups, broken = await store.rule_groups(t.id)
    finally:
        await store.close()
    assert broken == {}
    assert [(g.group.name, [r.id for r in g.group.rules]) for g in groups] == [
        ("host", ["host/A"]),
        ("more", ["more/One"]),
    ]

    audit = (await c.get(f"/v1/tenants/{t.id}/audit", params={"limit": 200})).json()["items"]
    actions = [e["action"] for e in audit if e["action"].startswith("alert_rule_group.")]
    assert sorted(set(actions)) == [
        "alert_rule_group.created",
        "alert_rule_group.deleted",
        "alert_rule_group.updated",
    ]
    events = db_rows(
        api,
        "SELECT event_type FROM outbox WHERE tenant_id = %s"
        " AND aggregate_type = 'alert_rule_group'",
        t.id,
    )
    assert len(events) == len(actions)


# --- notification config ----------------------------------------------------------------------


def notification_config(hook_url: str) -> dict[str, Any]:
    return {
        "route": {
            "receiver": "hook",
            "group_by": ["alertname"],
            "routes": [{"matchers": ['severity="critical"'], "receiver": "chat"}],
        },
        "receivers": [
            {"name": "hook", "urls": [hook_url]},
            {"name": "chat", "urls": [f"slack://T000/B000/{SLACK_TOKEN}/#oncall"]},
        ],
    }


async def test_notification_config_is_sealed_and_never_shown(api: Api) -> None:
    t = await api.create_tenant()
    c, url = t.owner, f"{base(t)}/notification-config"
    r = await c.get(url)
    assert (r.status_code, r.json()) == (200, {"config": None, "updated_at": None})

    hook = f"jsons://alert:{SECRET}@hooks.example.com/alerts"
    r = await c.put(url, json=notification_config(hook))
    assert r.status_code == 200, r.text
    shown = r.json()["config"]
    assert SECRET not in r.text and SLACK_TOKEN not in r.text
    assert shown["receivers"][0]["urls"] == ["jsons://alert:****@hooks.example.com/alerts"]
    r = await c.get(url)
    assert r.status_code == 200 and r.json()["config"] == shown
    assert SECRET not in r.text and SLACK_TOKEN not in r.text

    # YAML works too; a second write's audit entry holds before and after, redacted.
    yaml_text = json.dumps(notification_config(hook.replace("/alerts", "/v2")))
    r = await c.put(url, json=yaml_text)
    assert r.status_code == 200, r.text

    # Invalid: the field is named, the URL redacted.
    broken = notification_config(hook)
    broken["route"]["receiver"] = "pagr"
    r = await c.put(url, json=broken)
    assert (r.status_code, r.json()["code"]) == (422, "invalid_config"), r.text
    assert "route.receiver" in r.text or "pagr" in r.text
    broken = notification_config(f"nosuchscheme://user:{SECRET}@x")
    r = await c.put(url, json=broken)
    assert r.status_code == 422, r.text
    assert SECRET not in r.text

    # At rest: sealed, and the alerting service's store opens it.
    rows = db_rows(
        api, "SELECT config::text AS c FROM alert_notification_config WHERE tenant_id = %s", t.id
    )
    assert len(rows) == 1 and SECRET not in rows[0]["c"] and SLACK_TOKEN not in rows[0]["c"]
    assert "$sealed" in rows[0]["c"]
    for table, column in (
        ("audit_log", "before::text || after::text"),
        ("outbox", "payload::text"),
    ):
        texts = db_rows(api, f"SELECT {column} AS t FROM {table} WHERE tenant_id = %s", t.id)
        assert texts and not [
            x for x in texts if x["t"] and (SECRET in x["t"] or SLACK_TOKEN in x["t"])
        ]
    store = AlertStore(
        api.stack.postgres_dsn, sealer=SecretBox(load_master_key(api.stack.settings))
    )
    await store.open()
    try:
        stored = await store.notification_config(t.id)
    finally:
        await store.close()
    assert stored is not None
    assert stored.config.receivers["hook"].urls[0].reveal() == hook.replace("/alerts", "/v2")
    assert stored.config.receivers["chat"].urls[0].reveal().endswith(f"{SLACK_TOKEN}/#oncall")
    audit = (
        await c.get(
            f"/v1/tenants/{t.id}/audit", params={"action": "alert_notification_config.updated"}
        )
    ).json()["items"]
    assert len(audit) == 2
    assert SECRET not in json.dumps(audit)


# --- silences --------------------------------------------------------------------------------


async def test_silence_lifecycle(api: Api) -> None:
    t = await api.create_tenant()
    c, url = t.owner, f"{base(t)}/silences"
    now = datetime.now(UTC)
    r = await c.post(
        url,
        json={
            "matchers": [
                'alertname="HostLoadHigh"',
                {"name": "env", "value": "dev|test", "isRegex": True},
            ],
            "ends_at": (now + timedelta(hours=2)).isoformat(),
            "comment": "maintenance",
        },
    )
    assert r.status_code == 201, r.text
    active = r.json()
    assert active["state"] == "active" and active["created_by"] == t.owner_email
    assert active["matchers"][1] == {
        "name": "env",
        "value": "dev|test",
        "isRegex": True,
        "isEqual": True,
    }
    r = await c.post(
        url,
        json={
            "matchers": ['{severity="page", team!~"db"}'],
            "starts_at": (now + timedelta(hours=1)).isoformat(),
            "ends_at": (now + timedelta(hours=2)).isoformat(),
            "comment": "later",
        },
    )
    assert r.status_code == 201, r.text
    pending = r.json()
    assert pending["state"] == "pending" and len(pending["matchers"]) == 2

    for body, needle in (
        (
            {
                "matchers": ['a=~".*"'],
                "ends_at": (now + timedelta(hours=1)).isoformat(),
                "comment": "x",
            },
            "empty",
        ),
        (
            {
                "matchers": ['a="b"'],
                "ends_at": (now - timedelta(hours=1)).isoformat(),
                "comment": "x",
            },
            "after",
        ),
        (
            {
                "matchers": ['a=="b'],
                "ends_at": (now + timedelta(hours=1)).isoformat(),
                "comment": "x",
            },
            "",
        ),
    ):
        r = await c.post(url, json=body)
        assert (r.status_code, r.json()["code"]) == (422, "invalid_silence"), r.text
        assert needle in r.json()["detail"]
    r = await c.post(
        url, json={"matchers": ['a="b"'], "ends_at": "2030-01-01T00:00:00", "comment": "x"}
    )
    assert r.status_code == 422  # a time without its zone

    listing = (await c.get(url)).json()
    assert {s["id"]: s["state"] for s in listing["items"]} == {
        active["id"]: "active",
        pending["id"]: "pending",
    }
    page = (await c.get(url, params={"limit": 1})).json()
    assert len(page["items"]) == 1 and page["next_cursor"]
    rest = (await c.get(url, params={"limit": 1, "cursor": page["next_cursor"]})).json()
    assert [s["id"] for s in page["items"] + rest["items"]] == sorted([active["id"], pending["id"]])
    assert rest["next_cursor"] is None

    r = await c.delete(f"{url}/{active['id']}")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "expired"
    r = await c.delete(f"{url}/{active['id']}")
    assert (r.status_code, r.json()["code"]) == (409, "already_expired")
    r = await c.delete(f"{url}/{pending['id']}")
    assert r.status_code == 200 and r.json()["state"] == "expired"
    assert (await c.delete(f"{url}/{uuid.uuid4()}")).status_code == 404
    states = {s["state"] for s in (await c.get(url, params={"state": "expired"})).json()["items"]}
    assert states == {"expired"}
    assert (await c.get(url, params={"state": "active"})).json()["items"] == []

    # The alerting service reads what the API wrote.
    store = AlertStore(api.stack.postgres_dsn)
    await store.open()
    try:
        silences = await store.silences(t.id)
    finally:
        await store.close()
    assert sorted(s.id for s in silences) == sorted([active["id"], pending["id"]])
    audit = (await c.get(f"/v1/tenants/{t.id}/audit", params={"limit": 200})).json()["items"]
    assert sum(e["action"] == "alert_silence.expired" for e in audit) == 2


# --- permissions ------------------------------------------------------------------------------


async def test_viewer_reads_operator_writes(api: Api) -> None:
    t = await api.create_tenant()
    r = await t.owner.post(f"{base(t)}/rule-groups", json=group("host", "A"))
    assert r.status_code == 201
    viewer, operator = await member(api, t, "viewer"), await member(api, t, "operator")
    reads = [
        "rule-groups",
        "rule-groups/host",
        "notification-config",
        "silences",
        "alerts",
        "alerts/history",
        "delivery-attempts",
    ]
    for path in reads:
        r = await viewer.get(f"{base(t)}/{path}")
        assert r.status_code == 200, f"{path}: {r.text}"
    ends = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    writes: list[tuple[str, str, Any]] = [
        ("POST", "rule-groups", group("other", "B")),
        ("PUT", "rule-groups/host", group("host", "B")),
        ("DELETE", "rule-groups/host", None),
        ("POST", "rule-files", {"groups": [group("x", "C")]}),
        ("PUT", "notification-config", notification_config("json://127.0.0.1:9/x")),
        ("POST", "silences", {"matchers": ['a="b"'], "ends_at": ends, "comment": "x"}),
        ("DELETE", f"silences/{uuid.uuid4()}", None),
    ]
    for method, path, body in writes:
        r = await viewer.request(method, f"{base(t)}/{path}", json=body)
        assert r.status_code == 403, f"{method} {path}: {r.text}"
        assert r.json()["permission"] == "alerts:write"
    token = await api.token(t, ["alerts:read"])
    reader = api.token_client(token)
    assert (await reader.get(f"{base(t)}/alerts")).status_code == 200
    r = await reader.post(f"{base(t)}/silences", json=writes[5][2])
    assert r.status_code == 403
    r = await operator.post(f"{base(t)}/silences", json=writes[5][2])
    assert r.status_code == 201, r.text
    # No permission at all: a token with other scopes.
    other = api.token_client(await api.token(t, ["servers:read"]))
    r = await other.get(f"{base(t)}/alerts")
    assert (r.status_code, r.json()["permission"]) == (403, "alerts:read")


# --- alerts and history -------------------------------------------------------------------------


async def test_current_alerts_and_history(api: Api) -> None:
    t = await api.create_tenant()
    at = datetime.now(UTC).replace(microsecond=0)
    labels = {"alertname": "HostLoadHigh", "host_name": "web-1", "severity": "page"}
    fp = fingerprint(t.id, "host/HostLoadHigh", labels)
    firing = Alert(
        fp,
        "host/HostLoadHigh",
        labels,
        {"summary": "load 9 on web-1"},
        AlertState.FIRING,
        9.0,
        at - timedelta(minutes=6),
        at,
        fired_at=at - timedelta(minutes=1),
    )
    labels2 = {**labels, "host_name": "web-2"}
    fp2 = fingerprint(t.id, "host/HostLoadHigh", labels2)
    pending = Alert(fp2, "host/HostLoadHigh", labels2, {}, AlertState.PENDING, float("nan"), at, at)
    state = GroupState(
        {
            "host/HostLoadHigh": RuleState(
                "host/HostLoadHigh", {fp: firing, fp2: pending}, "ok", None, at
            )
        }
    )

    def transition(
        f: str, lbl: dict[str, str], src: AlertState, dst: AlertState, when: datetime
    ) -> Transition:
        return Transition(
            t.id,
            f,
            "host/HostLoadHigh",
            "host",
            "HostLoadHigh",
            lbl,
            {},
            src,
            dst,
            when,
            9.0,
            at - timedelta(minutes=6),
        )

    history = [
        transition(fp, labels, AlertState.INACTIVE, AlertState.PENDING, at - timedelta(minutes=6)),
        transition(fp, labels, AlertState.PENDING, AlertState.FIRING, at - timedelta(minutes=1)),
        transition(fp2, labels2, AlertState.INACTIVE, AlertState.PENDING, at),
    ]
    store = AlertStore(api.stack.postgres_dsn)
    await store.open()
    try:
        await store.save_evaluation(t.id, "host", GroupEvaluation(at, state, tuple(history)))
    finally:
        await store.close()
    r = await t.owner.post(
        f"{base(t)}/silences",
        json={
            "matchers": ['host_name="web-1"'],
            "ends_at": (at + timedelta(hours=1)).isoformat(),
            "comment": "known",
        },
    )
    silence = r.json()["id"]

    r = await t.owner.get(f"{base(t)}/alerts")
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(a["state"], a["labels"]["host_name"]) for a in body["items"]] == [
        ("firing", "web-1"),
        ("pending", "web-2"),
    ]
    first = body["items"][0]
    assert first["value"] == 9.0 and first["annotations"] == {"summary": "load 9 on web-1"}
    assert first["silenced_by"] == [silence] and body["items"][1]["silenced_by"] == []
    assert body["items"][1]["value"] == "NaN"
    assert body["rules"] == [
        {
            "group": "host",
            "rule_id": "host/HostLoadHigh",
            "health": "ok",
            "last_error": None,
            "last_evaluated_at": at.isoformat().replace("+00:00", "Z"),
        }
    ]
    r = await t.owner.get(f"{base(t)}/alerts", params={"state": "pending"})
    assert [a["fingerprint"] for a in r.json()["items"]] == [fp2]

    url = f"{base(t)}/alerts/history"
    seen: list[tuple[str, str]] = []
    cursor = None
    for _ in range(4):
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await t.owner.get(url, params=params)).json()
        seen += [(x["fingerprint"], x["to_state"]) for x in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [(fp2, "pending"), (fp, "firing"), (fp, "pending")]
    r = await t.owner.get(url, params={"fingerprint": fp})
    assert [x["to_state"] for x in r.json()["items"]] == ["firing", "pending"]
    r = await t.owner.get(url, params={"cursor": "not-a-cursor"})
    assert (r.status_code, r.json()["code"]) == (400, "bad_cursor")


# --- delivery attempts: the acceptance ----------------------------------------------------------


async def test_failing_receiver_recovers_and_failures_are_visible(
    api: Api,
    webhook: WebhookServer,  # noqa: F811 - fixture
) -> None:
    """A receiver that fails three times and then recovers gets the notification, and the
    failures are visible through the API (redacted)."""
    t = await api.create_tenant()
    hook = webhook.url("/hook", userinfo=f"alert:{SECRET}@")
    webhook.script["/hook"] = [500, 503, 500]
    r = await t.owner.put(
        f"{base(t)}/notification-config",
        json={
            "route": {"receiver": "hook", "group_by": ["alertname"], "group_wait": "0s"},
            "receivers": [{"name": "hook", "urls": [hook]}],
        },
    )
    assert r.status_code == 200, r.text

    # The alerting service's pipeline: the config the API stored, its dispatcher and
    # notifier with retries, every attempt persisted through the alerting store.
    store = AlertStore(
        api.stack.postgres_dsn, sealer=SecretBox(load_master_key(api.stack.settings))
    )
    await store.open()
    try:
        stored = await store.notification_config(t.id)
        assert stored is not None
        recorded: list[DeliveryAttempt] = []
        clock = SystemClock()
        notifier = Notifier(
            clock=clock,
            attempts=AttemptLog(listener=recorded.append),
            policy=RetryPolicy(
                max_attempts=5, initial_backoff=0.02, max_elapsed=10, attempt_timeout=5
            ),
        )
        dispatcher = Dispatcher(stored.config, tenant_id=t.id)
        now = clock.now()
        dispatcher.on_alerts(
            [
                DispatchAlert(
                    {"alertname": "HostDown", "host_name": "web-1"}, now - timedelta(minutes=5)
                )
            ],
            now,
        )
        [notification] = dispatcher.tick(clock.now())
        assert await notifier.deliver(notification)
        for attempt in recorded:
            await store.save_attempt(t.id, attempt)
    finally:
        await store.close()
    assert len(webhook.delivered("/hook")) == 1
    assert [x.status for x in webhook.all("/hook")] == [500, 503, 500, 200]

    url = f"{base(t)}/delivery-attempts"
    r = await t.owner.get(url)
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert SECRET not in r.text
    assert [(a["attempt"], a["outcome"], a["final"]) for a in items] == [
        (4, "success", True),
        (3, "failure", False),
        (2, "failure", False),
        (1, "failure", False),
    ]
    assert all(a["receiver"] == "hook" and "****" in a["target"] for a in items)
    assert [a["error"] for a in items[1:]] == [
        "DeliveryError: HTTP 500: boom",
        "DeliveryError: HTTP 503: boom",
        "DeliveryError: HTTP 500: boom",
    ] or all("HTTP 50" in a["error"] for a in items[1:])
    failures = (await t.owner.get(url, params={"outcome": "failure", "limit": 2})).json()
    assert len(failures["items"]) == 2 and failures["next_cursor"]
    more = (
        await t.owner.get(
            url, params={"outcome": "failure", "limit": 2, "cursor": failures["next_cursor"]}
        )
    ).json()
    assert [a["attempt"] for a in failures["items"] + more["items"]] == [3, 2, 1]
    assert more["next_cursor"] is None
    rows = db_rows(
        api,
        "SELECT target || coalesce(error, '') AS t FROM alert_delivery_attempts"
        " WHERE tenant_id = %s",
        t.id,
    )
    assert len(rows) == 4 and not [x for x in rows if SECRET in x["t"]]


async def test_alerting_service_end_to_end_with_a_receiver_that_fails_three_times(
    api: Api,
    ch_client: Any,
    clickhouse_target: ClickHouseTarget,
    webhook: WebhookServer,  # noqa: F811 - fixture
) -> None:
    """Rules and config through the API, the real alerting service evaluating samples in
    ClickHouse and notifying a webhook that answers 500 three times: the notification
    arrives once, and the API shows the alert, its history and the three failures."""
    t = await api.create_tenant()
    rules = {
        "name": "host",
        "interval": "500ms",
        "rules": [{"alert": "HostLoadHigh", "expr": "cpu_load > 5", "labels": {"sev": "page"}}],
    }
    r = await t.owner.post(f"{base(t)}/rule-groups", json=rules)
    assert r.status_code == 201, r.text
    hook = webhook.url("/hook", userinfo=f"alert:{SECRET}@")
    webhook.script["/hook"] = [500, 500, 500]
    r = await t.owner.put(
        f"{base(t)}/notification-config",
        json={
            "route": {"receiver": "hook", "group_by": ["alertname"], "group_wait": "200ms"},
            "receivers": [{"name": "hook", "urls": [hook]}],
        },
    )
    assert r.status_code == 200, r.text
    Samples(ch_client, clickhouse_target.database, t.id).write(9.0)

    service = AlertingService(
        api.stack.postgres_dsn,
        ClickHouseStore(clickhouse_target.client, clickhouse_target.database),
        sealer=SecretBox(load_master_key(api.stack.settings)),
        config=AlertingConfig(
            tick_s=0.1,
            stop_grace_s=2.0,
            retry_policy=RetryPolicy(initial_backoff=0.05, max_elapsed=20, attempt_timeout=5),
        ),
    )
    await service.start()
    try:
        deadline = time.monotonic() + 20
        assert await _until(lambda: bool(webhook.delivered("/hook")), 20)
        assert len(webhook.delivered("/hook")) == 1, webhook.all("/hook")
        url = f"{base(t)}/delivery-attempts"
        items: list[dict[str, Any]] = []
        while time.monotonic() < deadline + 5:  # attempts are stored behind the sending
            items = (await t.owner.get(url)).json()["items"]
            if len(items) == 4:
                break
            await asyncio.sleep(0.1)
    finally:
        await service.stop()
    assert [x.status for x in webhook.all("/hook")] == [500, 500, 500, 200]
    assert [(a["attempt"], a["outcome"]) for a in items] == [
        (4, "success"),
        (3, "failure"),
        (2, "failure"),
        (1, "failure"),
    ]
    assert all("HTTP 500" in (a["error"] or "") for a in items[1:]), items
    failures = await t.owner.get(url, params={"outcome": "failure"})
    assert len(failures.json()["items"]) == 3 and SECRET not in failures.text

    alerts = (await t.owner.get(f"{base(t)}/alerts")).json()
    assert [(a["alertname"], a["state"], a["labels"]["sev"]) for a in alerts["items"]] == [
        ("HostLoadHigh", "firing", "page")
    ]
    assert alerts["rules"][0]["health"] == "ok"
    history = (await t.owner.get(f"{base(t)}/alerts/history")).json()["items"]
    assert [(h["from_state"], h["to_state"]) for h in history] == [("inactive", "firing")]
