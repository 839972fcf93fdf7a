"""Acceptance tests for notifications, in the style of Alertmanager's.

Real receivers on loopback (an HTTP webhook server and an aiosmtpd SMTP server), the real
dispatcher loop on the real clock with short intervals (group_wait 0.5 s, group_interval
1 s, repeat_interval 3 s). Each scenario pushes alerts at scripted times and expects
deliveries inside time windows of +-TOLERANCE around Alertmanager's schedule.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from alerting.dispatch import Alert, Dispatcher
from alerting.matchers import parse_matchers
from alerting.notifylog import AttemptLog
from alerting.routing import parse_config
from alerting.runner import DispatchRunner, Notifier, RetryPolicy
from alerting.silences import Silences
from yakpanel.clock import SystemClock
from yakpanel.embedded import free_port

TOLERANCE = 0.4
TIMING = {"group_wait": "500ms", "group_interval": "1s", "repeat_interval": "3s"}


# --- real receivers ---------------------------------------------------------------------


@dataclass
class Request:
    at: float  # time.monotonic() on arrival
    path: str
    status: int
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class WebhookServer:
    """Records every request; `script[path]` lists status codes to answer before 200."""

    requests: list[Request] = field(default_factory=list)
    script: dict[str, list[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    def url(self, path: str, userinfo: str = "") -> str:
        return f"json://{userinfo}127.0.0.1:{self.port}{path}"

    def delivered(self, path: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == path and r.status == 200]

    def all(self, path: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == path]


@pytest.fixture
def webhook() -> Iterator[WebhookServer]:
    state = WebhookServer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            arrived = time.monotonic()
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                queue = state.script.get(self.path, [])
                status = queue.pop(0) if queue else 200
                state.requests.append(Request(arrived, self.path, status, dict(self.headers), body))
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"boom" if status >= 400 else b"ok")

        def log_message(self, fmt: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@dataclass
class Mailbox:
    port: int = 0
    messages: list[tuple[float, list[str], EmailMessage]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append((time.monotonic(), list(envelope.rcpt_tos), message))
        return "250 Message accepted for delivery"

    def url(self) -> str:
        return f"mailto://127.0.0.1:{self.port}?from=yak@alerts.test&to=oncall@ops.test"


@pytest.fixture
def smtp() -> Iterator[Mailbox]:
    mailbox = Mailbox(port=free_port())
    controller = Controller(mailbox, hostname="127.0.0.1", port=mailbox.port)
    controller.start()
    yield mailbox
    controller.stop()


# --- the system under test, on the real clock ---------------------------------------------


@dataclass
class Scenario:
    runner: DispatchRunner
    attempts: AttemptLog
    t0: float
    clock: SystemClock = field(default_factory=SystemClock)

    async def at(self, t: float) -> None:
        await asyncio.sleep(max(0.0, self.t0 + t - time.monotonic()))

    def since(self, moment: float) -> float:
        return moment - self.t0

    def alert(self, name: str, instance: str, **labels: str) -> Alert:
        return Alert(
            {"alertname": name, "instance": instance, **labels},
            self.clock.now(),
            annotations={"summary": f"{name} on {instance}"},
        )

    def resolve(self, alert: Alert) -> Alert:
        return Alert(alert.labels, alert.starts_at, alert.annotations, ends_at=self.clock.now())


@asynccontextmanager
async def running(
    config: dict[str, Any], *, silences: Silences | None = None, policy: RetryPolicy | None = None
) -> AsyncIterator[Scenario]:
    clock = SystemClock()
    attempts = AttemptLog()
    notifier = Notifier(
        clock=clock,
        attempts=attempts,
        policy=policy or RetryPolicy(initial_backoff=0.02, max_elapsed=0.5, attempt_timeout=2),
    )
    dispatcher = Dispatcher(parse_config(config), silences=silences)
    runner = DispatchRunner(dispatcher, notifier, clock, max_sleep=0.05)
    await runner.start()
    try:
        yield Scenario(runner, attempts, time.monotonic())
    finally:
        await runner.stop()


def summary(body: dict[str, Any]) -> tuple[str, list[str], list[str]]:
    by_status: dict[str, list[str]] = {"firing": [], "resolved": []}
    for alert in body["alerts"]:
        by_status[alert["status"]].append(alert["labels"]["instance"])
    return body["status"], sorted(by_status["firing"]), sorted(by_status["resolved"])


def assert_timeline(
    scenario: Scenario, got: list[Request], expected: list[tuple[float, Any]]
) -> None:
    """Each delivery inside its window, in order, and nothing else."""
    timeline = [(round(scenario.since(r.at), 2), summary(r.body)) for r in got]
    assert len(timeline) == len(expected), f"deliveries {timeline}, expected {expected}"
    for (t, what), (want_t, want) in zip(timeline, expected, strict=True):
        assert what == want, f"at {t}s got {what}, expected {want}; all: {timeline}"
        assert abs(t - want_t) <= TOLERANCE, f"{what} at {t}s, expected {want_t}s +-{TOLERANCE}"


def route(receiver: str, **extra: Any) -> dict[str, Any]:
    return {"receiver": receiver, "group_by": ["alertname"], **TIMING, **extra}


# --- scenarios ---------------------------------------------------------------------------


async def test_grouping_group_interval_repeat_and_resolution(webhook: WebhookServer) -> None:
    config = {"route": route("hook"), "receivers": [{"name": "hook", "urls": [webhook.url("/g")]}]}
    async with running(config) as s:
        a, b = s.alert("HighCPU", "a"), s.alert("HighCPU", "b")
        s.runner.push([a, b])
        await s.at(1.2)
        c = s.alert("HighCPU", "c")
        s.runner.push([c])
        await s.at(5.2)
        s.runner.push([s.resolve(a)])
        await s.at(6.2)
        s.runner.push([s.resolve(b), s.resolve(c)])
        await s.at(7.6)
    assert_timeline(
        s,
        webhook.delivered("/g"),
        [
            (0.5, ("firing", ["a", "b"], [])),  # group_wait: both alerts in one message
            (1.5, ("firing", ["a", "b", "c"], [])),  # a new alert waits for group_interval
            (4.5, ("firing", ["a", "b", "c"], [])),  # unchanged: repeat_interval after 1.5
            (5.5, ("firing", ["b", "c"], ["a"])),  # a resolved
            (6.5, ("resolved", [], ["b", "c"])),  # all resolved, then the group is gone
        ],
    )
    body = webhook.delivered("/g")[0].body
    assert set(body) == {
        "version",
        "groupKey",
        "truncatedAlerts",
        "status",
        "receiver",
        "groupLabels",
        "commonLabels",
        "commonAnnotations",
        "externalURL",
        "alerts",
    }
    assert body["version"] == "4" and body["receiver"] == "hook"
    assert body["groupLabels"] == {"alertname": "HighCPU"}
    assert body["commonLabels"] == {"alertname": "HighCPU"}
    assert body["groupKey"] == '{}:{alertname="HighCPU"}'
    assert set(body["alerts"][0]) == {
        "status",
        "labels",
        "annotations",
        "startsAt",
        "endsAt",
        "generatorURL",
        "fingerprint",
    }
    assert body["alerts"][0]["fingerprint"] == a.fingerprint
    assert body["alerts"][0]["annotations"] == {"summary": "HighCPU on a"}
    resolved = webhook.delivered("/g")[3].body["alerts"]
    assert [x["endsAt"] != "0001-01-01T00:00:00Z" for x in resolved] == [False, False, True]


async def test_silence_suppresses_then_expires(webhook: WebhookServer) -> None:
    config = {"route": route("hook"), "receivers": [{"name": "hook", "urls": [webhook.url("/s")]}]}
    silences = Silences()
    now = SystemClock().now()
    silences.add(
        matchers=parse_matchers('alertname="Noisy"'),
        starts_at=now,
        ends_at=now + timedelta(seconds=2),
        created_by="ana",
        comment="deploy in progress",
        now=now,
    )
    async with running(config, silences=silences) as s:
        s.runner.push([s.alert("Noisy", "a"), s.alert("Other", "a")])
        await s.at(3.2)
    got = webhook.delivered("/s")
    assert [r.body["groupLabels"]["alertname"] for r in got] == ["Other", "Noisy"]
    assert_timeline(
        s,
        got,
        [
            (0.5, ("firing", ["a"], [])),  # Other; Noisy is silenced at 0.5 and 1.5
            (2.5, ("firing", ["a"], [])),  # Noisy, at the first flush after expiry (2.0)
        ],
    )


async def test_critical_inhibits_warning_while_it_fires(webhook: WebhookServer) -> None:
    config = {
        "route": route("hook"),
        "receivers": [{"name": "hook", "urls": [webhook.url("/i")]}],
        "inhibit_rules": [
            {
                "source_matchers": ['severity="critical"'],
                "target_matchers": ['severity="warning"'],
                "equal": ["instance"],
            }
        ],
    }
    async with running(config) as s:
        down = s.alert("Down", "a", severity="critical")
        s.runner.push(
            [
                down,
                s.alert("Slow", "a", severity="warning"),
                s.alert("Slow", "b", severity="warning"),
            ]
        )
        await s.at(1.2)
        s.runner.push([s.resolve(down)])
        await s.at(2.2)
    # Order by flush (0.5 s, 1.5 s, ...), then by group, whatever the arrival order within.
    got = sorted(
        webhook.delivered("/i"),
        key=lambda r: (round(s.since(r.at) - 0.5), r.body["groupLabels"]["alertname"]),
    )
    assert [r.body["groupLabels"]["alertname"] for r in got] == ["Down", "Slow", "Down", "Slow"]
    assert_timeline(
        s,
        got,
        [
            (0.5, ("firing", ["a"], [])),  # Down
            (0.5, ("firing", ["b"], [])),  # Slow: a is inhibited by Down on a
            (1.5, ("resolved", [], ["a"])),  # Down resolved
            (1.5, ("firing", ["a", "b"], [])),  # Slow on a no longer inhibited
        ],
    )


async def test_continue_delivers_to_webhook_and_email(
    webhook: WebhookServer, smtp: Mailbox
) -> None:
    config = {
        "route": route(
            "default",
            routes=[
                {"matchers": ['team="ops"'], "receiver": "ops-hook", "continue": True},
                {"matchers": ['team="ops"'], "receiver": "ops-mail"},
            ],
        ),
        "receivers": [
            {"name": "default", "urls": [webhook.url("/default")]},
            {"name": "ops-hook", "urls": [webhook.url("/ops")]},
            {"name": "ops-mail", "urls": [smtp.url()]},
        ],
    }
    async with running(config) as s:
        s.runner.push([s.alert("DatabaseDown", "db-1", team="ops")])
        await s.at(1.3)
    assert webhook.all("/default") == []
    assert_timeline(s, webhook.delivered("/ops"), [(0.5, ("firing", ["db-1"], []))])
    assert len(smtp.messages) == 1
    arrived, recipients, message = smtp.messages[0]
    assert abs(s.since(arrived) - 0.5) <= TOLERANCE
    assert recipients == ["oncall@ops.test"]
    assert message["Subject"] == "[FIRING:1] DatabaseDown"
    plain = message.get_body(preferencelist=("plain",))
    assert plain is not None
    text = plain.get_content()
    assert "alertname=DatabaseDown" in text and "summary: DatabaseDown on db-1" in text
    assert [a.outcome for a in s.attempts.attempts()] == ["success", "success"]


async def test_receiver_failing_three_times_then_recovering(webhook: WebhookServer) -> None:
    webhook.script["/flaky"] = [500, 500, 500]
    url = webhook.url("/flaky", userinfo="yak:s3cr3t-pw@")
    config = {"route": route("flaky"), "receivers": [{"name": "flaky", "urls": [url]}]}
    async with running(config) as s:
        s.runner.push([s.alert("HighCPU", "a")])
        await s.at(1.2)
    assert [r.status for r in webhook.all("/flaky")] == [500, 500, 500, 200]
    assert_timeline(s, webhook.delivered("/flaky"), [(0.5, ("firing", ["a"], []))])
    auth = webhook.delivered("/flaky")[0].headers["Authorization"]
    assert base64.b64decode(auth.split()[1]) == b"yak:s3cr3t-pw"
    attempts = s.attempts.attempts(receiver="flaky")
    assert [(a.attempt, a.outcome) for a in attempts] == [
        (1, "failure"),
        (2, "failure"),
        (3, "failure"),
        (4, "success"),
    ]
    assert [a.error for a in attempts[:3]] == ["DeliveryError: HTTP 500: boom"] * 3
    assert len({a.notification_id for a in attempts}) == 1
    for a in attempts:
        assert "s3cr3t" not in a.target and "s3cr3t" not in (a.error or "")
        assert a.target == f"json://yak:****@127.0.0.1:{webhook.port}/flaky"
    assert s.attempts.failed_attempts_total == {"flaky": 3}


async def test_exhausted_retries_are_sent_again_at_the_next_group_interval(
    webhook: WebhookServer,
) -> None:
    webhook.script["/down"] = [500, 500, 500]
    config = {
        "route": route("down"),
        "receivers": [{"name": "down", "urls": [webhook.url("/down")]}],
    }
    policy = RetryPolicy(max_attempts=2, initial_backoff=0.02, max_elapsed=0.5, attempt_timeout=2)
    async with running(config, policy=policy) as s:
        s.runner.push([s.alert("HighCPU", "a")])
        await s.at(2.2)
    assert [r.status for r in webhook.all("/down")] == [500, 500, 500, 200]
    assert_timeline(s, webhook.delivered("/down"), [(1.5, ("firing", ["a"], []))])
    attempts = s.attempts.attempts(receiver="down")
    assert [(a.attempt, a.outcome, a.final) for a in attempts] == [
        (1, "failure", False),
        (2, "failure", True),  # given up: visible as a failed notification ...
        (1, "failure", False),  # ... and sent again by the next flush
        (2, "success", True),
    ]
    assert s.attempts.failed_notifications_total == {"down": 1}
    assert len({a.notification_id for a in attempts}) == 2
