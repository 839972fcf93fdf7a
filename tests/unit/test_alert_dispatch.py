"""The dispatcher's timing and decisions on a manual clock, and the notifier's retries."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pytest

from alerting.dispatch import Alert, Dispatcher, Notification
from alerting.matchers import parse_matchers
from alerting.notifylog import AttemptLog, NotificationLog, NotifyLogEntry
from alerting.receivers import DeliveryError, text_message, webhook_payload
from alerting.routing import load_config
from alerting.runner import Notifier, RetryPolicy
from yakpanel.clock import ManualClock

CONFIG = """
route:
  receiver: team
  group_by: [alertname]
  group_wait: 30s
  group_interval: 5m
  repeat_interval: 4h
  routes:
    - matchers: ['team="ops"']
      receiver: ops-hook
      continue: true
    - matchers: ['team="ops"']
      receiver: ops-mail
    - matchers: ['quiet="yes"']
      receiver: no-resolved
receivers:
  - name: team
    urls: ['json://hooks.example.com/team']
  - name: ops-hook
    urls: ['json://hooks.example.com/ops']
  - name: ops-mail
    urls: ['mailto://mail.example.com?from=yak@example.com&to=ops@example.com', 'json://hooks.example.com/ops2']
  - name: no-resolved
    urls: ['json://hooks.example.com/quiet']
    send_resolved: false
inhibit_rules:
  - source_matchers: ['severity="critical"']
    target_matchers: ['severity="warning"']
    equal: [instance]
"""


@dataclass
class Sent:
    at: float
    notification: Notification

    @property
    def summary(self) -> tuple[str, str, list[str], list[str]]:
        n = self.notification
        return (
            n.receiver,
            n.status,
            sorted(a.labels.get("instance", "") for a in n.firing_alerts),
            sorted(a.labels.get("instance", "") for a in n.resolved_alerts),
        )


@dataclass
class Harness:
    """Drives a Dispatcher the way the runner does, on a manual clock."""

    dispatcher: Dispatcher
    clock: ManualClock = field(default_factory=ManualClock)
    sent: list[Sent] = field(default_factory=list)
    failing: set[str] = field(default_factory=set)  # receivers whose deliveries fail

    def __post_init__(self) -> None:
        self.start = self.clock.now()

    @property
    def t(self) -> float:
        return (self.clock.now() - self.start).total_seconds()

    def at(self, seconds: float) -> datetime:
        return self.start + timedelta(seconds=seconds)

    def alert(self, name: str, instance: str, *, since: float = 0, **labels: str) -> Alert:
        return Alert(
            {"alertname": name, "instance": instance, **labels},
            self.at(since),
            annotations={"summary": f"{name} on {instance}"},
        )

    def resolve(self, alert: Alert, at: float) -> Alert:
        return Alert(alert.labels, alert.starts_at, alert.annotations, ends_at=self.at(at))

    def push(self, *alerts: Alert) -> None:
        self.dispatcher.on_alerts(alerts, self.clock.now())

    def run_until(self, seconds: float) -> list[Sent]:
        """Advance to `seconds`, flushing every group at its due time."""
        first = len(self.sent)
        while True:
            due = self.dispatcher.next_flush_at()
            if due is None or due > self.at(seconds):
                break
            self.clock.advance(max(0.0, (due - self.clock.now()).total_seconds()))
            for n in self.dispatcher.tick(self.clock.now()):
                ok = n.receiver not in self.failing
                if ok:
                    self.sent.append(Sent(self.t, n))
                self.dispatcher.on_delivered(n, ok, self.clock.now())
        self.clock.advance(seconds - self.t)
        return self.sent[first:]


def harness(**kwargs: object) -> Harness:
    return Harness(Dispatcher(load_config(CONFIG), **kwargs))  # type: ignore[arg-type]


def test_group_wait_collects_alerts_into_one_notification() -> None:
    h = harness()
    h.push(h.alert("HighCPU", "a"))
    h.clock.advance(10)
    h.push(h.alert("HighCPU", "b", since=10), h.alert("DiskFull", "a", since=10))
    sent = h.run_until(60)
    assert [(s.at, s.summary) for s in sent] == [
        (30.0, ("team", "firing", ["a", "b"], [])),  # group_wait from the group's first alert
        (40.0, ("team", "firing", ["a"], [])),  # the DiskFull group started at 10
    ]
    assert sent[0].notification.group_labels == {"alertname": "HighCPU"}
    assert sent[0].notification.group_key == '{}:{alertname="HighCPU"}'


def test_group_interval_then_repeat_interval() -> None:
    h = harness()
    h.push(h.alert("HighCPU", "a"))
    assert [s.at for s in h.run_until(100)] == [30.0]
    h.push(h.alert("HighCPU", "b", since=100))
    # A new alert waits for the next group_interval tick, not group_wait.
    sent = h.run_until(1000)
    assert [(s.at, s.summary) for s in sent] == [(330.0, ("team", "firing", ["a", "b"], []))]
    # Nothing changes: silence until repeat_interval (4h) after the last send,
    # on the group_interval grid.
    sent = h.run_until(330 + 4 * 3600 + 10)
    assert [s.at for s in sent] == [330.0 + 4 * 3600]


def test_resolved_alerts_are_sent_once_then_leave_the_group() -> None:
    h = harness()
    a, b = h.alert("HighCPU", "a"), h.alert("HighCPU", "b")
    h.push(a, b)
    h.run_until(100)
    h.push(h.resolve(a, 100))
    sent = h.run_until(400)
    assert [(s.at, s.summary) for s in sent] == [(330.0, ("team", "firing", ["b"], ["a"]))]
    payload = webhook_payload(sent[0].notification)
    assert [(x["labels"]["instance"], x["status"]) for x in payload["alerts"]] == [
        ("b", "firing"),
        ("a", "resolved"),
    ]
    assert [x["fingerprint"] for x in payload["alerts"]] == [b.fingerprint, a.fingerprint]
    # a is gone from the group: the next change does not mention it again.
    h.push(h.resolve(b, 400))
    sent = h.run_until(700)
    assert [(s.at, s.summary) for s in sent] == [(630.0, ("team", "resolved", [], ["b"]))]
    assert h.dispatcher.next_flush_at() is None and h.dispatcher.alerts() == []
    assert h.run_until(20000) == []


def test_without_send_resolved_a_resolution_is_only_logged() -> None:
    h = harness()
    a = h.alert("Quiet", "a", quiet="yes")
    h.push(a)
    assert [s.summary for s in h.run_until(100)] == [("no-resolved", "firing", ["a"], [])]
    h.push(h.resolve(a, 100))
    assert h.run_until(1000) == []
    (entry,) = h.dispatcher.notify_log.entries()
    assert entry.firing == frozenset() and entry.resolved == {a.fingerprint}
    assert h.dispatcher.alerts() == []


def test_alert_that_fired_and_resolved_unseen_is_never_sent() -> None:
    h = harness()
    a = h.alert("Blip", "a")
    h.push(a)
    h.clock.advance(5)
    h.push(h.resolve(a, 5))
    assert h.run_until(1000) == []
    assert h.dispatcher.alerts() == []


def test_failed_delivery_is_retried_at_the_next_group_interval() -> None:
    h = harness()
    h.failing.add("team")
    h.push(h.alert("HighCPU", "a"))
    h.run_until(31)
    assert h.sent == [] and h.dispatcher.notify_log.entries() == []
    h.failing.clear()
    assert [s.at for s in h.run_until(400)] == [330.0]


def test_a_resolution_survives_failed_deliveries() -> None:
    h = harness()
    a = h.alert("HighCPU", "a")
    h.push(a)
    h.run_until(100)
    h.failing.add("team")
    h.push(h.resolve(a, 100))
    assert h.run_until(700) == []  # the flushes at 330 and 630 fail
    assert h.dispatcher.alerts() != []  # the resolved alert is kept for the next try
    h.failing.clear()
    assert [(s.at, s.summary) for s in h.run_until(1000)] == [
        (930.0, ("team", "resolved", [], ["a"]))
    ]
    assert h.dispatcher.alerts() == []


def test_continue_notifies_every_receiver_integration_separately() -> None:
    h = harness()
    h.push(h.alert("Down", "a", team="ops"))
    sent = h.run_until(60)
    assert sorted((s.notification.receiver, s.notification.integration) for s in sent) == [
        ("ops-hook", 0),
        ("ops-mail", 0),
        ("ops-mail", 1),
    ]
    # One integration failing is retried alone; the others are not sent twice.
    h.failing.add("ops-mail")
    h.push(h.alert("Down", "b", team="ops", since=60))
    assert [s.notification.receiver for s in h.run_until(400)] == ["ops-hook"]
    h.failing.clear()
    again = h.run_until(700)
    assert sorted((s.at, s.notification.receiver) for s in again) == [
        (630.0, "ops-mail"),
        (630.0, "ops-mail"),
    ]


def test_silence_mutes_until_it_expires() -> None:
    h = harness()
    silence = h.dispatcher.silences.add(
        matchers=parse_matchers('alertname="HighCPU", instance="a"'),
        starts_at=h.at(0),
        ends_at=h.at(400),
        created_by="ana",
        comment="maintenance",
        now=h.at(0),
    )
    a, b = h.alert("HighCPU", "a"), h.alert("HighCPU", "b")
    h.push(a, b)
    assert h.dispatcher.mute_status(a, h.at(1)).silenced_by == (silence.id,)
    assert [(s.at, s.summary) for s in h.run_until(400)] == [(30.0, ("team", "firing", ["b"], []))]
    # Expired at 400: the next flush (630) brings a in.
    assert [(s.at, s.summary) for s in h.run_until(700)] == [
        (630.0, ("team", "firing", ["a", "b"], []))
    ]


def test_expiring_a_silence_early_notifies_at_the_next_flush() -> None:
    h = harness()
    silence = h.dispatcher.silences.add(
        matchers=parse_matchers('alertname="HighCPU"'),
        starts_at=h.at(0),
        ends_at=h.at(86400),
        created_by="ana",
        comment="noisy",
        now=h.at(0),
    )
    h.push(h.alert("HighCPU", "a"))
    assert h.run_until(500) == []
    h.dispatcher.silences.expire(silence.id, h.clock.now())
    assert [s.at for s in h.run_until(700)] == [630.0]


def test_critical_inhibits_warning_only_while_firing() -> None:
    h = harness()
    crit = h.alert("Down", "a", severity="critical")
    warn_a = h.alert("Slow", "a", severity="warning")
    warn_b = h.alert("Slow", "b", severity="warning")
    h.push(crit, warn_a, warn_b)
    assert h.dispatcher.mute_status(warn_a, h.at(1)).inhibited_by == crit.fingerprint
    assert not h.dispatcher.mute_status(warn_b, h.at(1)).muted
    assert sorted(s.summary for s in h.run_until(100)) == [
        ("team", "firing", ["a"], []),
        ("team", "firing", ["b"], []),
    ]
    h.push(h.resolve(crit, 100))
    sent = h.run_until(400)
    assert sorted(s.summary for s in sent) == [
        ("team", "firing", ["a", "b"], []),  # Slow: a no longer inhibited
        ("team", "resolved", [], ["a"]),  # Down resolved
    ]


def test_restored_notification_log_prevents_duplicates_after_restart() -> None:
    first = harness()
    a, b = first.alert("HighCPU", "a"), first.alert("HighCPU", "b")
    first.push(a, b)
    assert [s.at for s in first.run_until(100)] == [30.0]
    stored = json.dumps(first.dispatcher.notify_log.to_dicts())

    # A new process at t=1000 with the log restored; the evaluator re-sends its alerts.
    second = Harness(
        Dispatcher(load_config(CONFIG), notify_log=NotificationLog.from_dicts(json.loads(stored))),
        clock=first.clock,
    )
    second.start = first.start
    second.clock.advance(900)
    second.push(a, b)
    assert second.run_until(4 * 3600) == []  # nothing twice within repeat_interval
    sent = second.run_until(4 * 3600 + 400)
    assert len(sent) == 1 and 4 * 3600 + 30 <= sent[0].at < 4 * 3600 + 330

    # Without the log the restart would notify at once: the log is what prevents it.
    third = Harness(Dispatcher(load_config(CONFIG)), clock=first.clock)
    third.push(a, b)
    assert len(third.run_until(third.t + 1)) == 1


def test_resolution_during_a_restart_is_not_lost() -> None:
    first = harness()
    a = first.alert("HighCPU", "a")
    first.push(a)
    first.run_until(100)
    log = NotificationLog.from_dicts(first.dispatcher.notify_log.to_dicts())
    second = Harness(Dispatcher(load_config(CONFIG), notify_log=log), clock=first.clock)
    second.start = first.start
    second.push(second.resolve(a, 100))
    sent = second.run_until(200)
    assert [(s.at, s.summary) for s in sent] == [(100.0, ("team", "resolved", [], ["a"]))]


def test_group_snapshot_keeps_timers_across_restart() -> None:
    first = harness()
    first.push(first.alert("HighCPU", "a"))
    first.run_until(10)
    snapshot = json.loads(json.dumps(first.dispatcher.snapshot()))
    second = Harness(Dispatcher(load_config(CONFIG)), clock=first.clock)
    second.start = first.start
    second.dispatcher.restore(snapshot, second.clock.now())
    assert [(s.at, s.summary) for s in second.run_until(100)] == [
        (30.0, ("team", "firing", ["a"], []))
    ]


def test_reload_keeps_timers_of_surviving_groups() -> None:
    h = harness()
    h.push(h.alert("HighCPU", "a"))
    h.run_until(100)
    h.dispatcher.reload(
        load_config(CONFIG.replace("repeat_interval: 4h", "repeat_interval: 1h")), h.clock.now()
    )
    assert [s.at for s in h.run_until(4000)] == [3630.0]


def test_text_message_for_email_and_chat() -> None:
    h = harness()
    h.push(h.alert("DiskFull", "web-1"))
    (sent,) = h.run_until(60)
    title, body = text_message(sent.notification)
    assert title == "[FIRING:1] DiskFull"
    assert "alertname=DiskFull, instance=web-1" in body and "summary: DiskFull on web-1" in body


# --- the notifier ----------------------------------------------------------------------


class FlakySender:
    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures = failures
        self.calls = 0
        self.error = error or DeliveryError("HTTP 500: boom")

    async def send(self, notification: Notification) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error


def one_notification(url: str = "json://u:hunter22@hooks.example.com/x") -> Notification:
    config = load_config(
        f"route: {{receiver: r, group_wait: 0s}}\nreceivers: [{{name: r, urls: ['{url}']}}]"
    )
    clock = ManualClock()
    d = Dispatcher(config)
    d.on_alerts([Alert({"alertname": "X"}, clock.now())], clock.now())
    (n,) = d.tick(clock.now())
    return n


def notifier(sender: FlakySender, policy: RetryPolicy) -> tuple[Notifier, list[float]]:
    clock = ManualClock()
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.advance(seconds)

    n = Notifier(
        clock=clock,
        attempts=AttemptLog(),
        policy=policy,
        webhook=sender,
        other=sender,
        sleep=sleep,
        rng=random.Random(7),
    )
    return n, sleeps


async def test_notifier_retries_with_backoff_and_records_every_attempt() -> None:
    sender = FlakySender(failures=3)
    policy = RetryPolicy(max_attempts=5, initial_backoff=1.0, multiplier=2.0, jitter=0.1)
    n, sleeps = notifier(sender, policy)
    assert await n.deliver(one_notification()) is True
    attempts = n.attempts.attempts(receiver="r")
    assert [(a.attempt, a.outcome, a.final) for a in attempts] == [
        (1, "failure", False),
        (2, "failure", False),
        (3, "failure", False),
        (4, "success", True),
    ]
    assert all(a.error == "DeliveryError: HTTP 500: boom" for a in attempts[:3])
    assert [round(s) for s in sleeps] == [1, 2, 4]
    assert all(abs(s - b) <= 0.1 * b for s, b in zip(sleeps, [1, 2, 4], strict=True))
    assert n.attempts.failed_attempts_total == {"r": 3}
    assert n.attempts.failed_notifications_total == {}
    assert attempts[0].target == "json://u:****@hooks.example.com/x"


async def test_notifier_gives_up_visibly_and_redacts_errors() -> None:
    url = "json://u:hunter22@hooks.example.com/x"
    sender = FlakySender(failures=99, error=RuntimeError(f"cannot reach {url}"))
    n, sleeps = notifier(sender, RetryPolicy(max_attempts=3, initial_backoff=0.5))
    assert await n.deliver(one_notification(url)) is False
    attempts = n.attempts.attempts()
    assert [(a.outcome, a.final) for a in attempts] == [
        ("failure", False),
        ("failure", False),
        ("failure", True),
    ]
    assert len(sleeps) == 2
    assert all("hunter22" not in (a.error or "") for a in attempts)
    assert attempts[0].error == "RuntimeError: cannot reach json://u:****@hooks.example.com/x"
    assert n.attempts.failed_notifications_total == {"r": 1}
    assert attempts[-1].to_dict()["outcome"] == "failure"


async def test_notifier_respects_the_elapsed_budget() -> None:
    sender = FlakySender(failures=99)
    policy = RetryPolicy(max_attempts=10, initial_backoff=10, jitter=0, max_elapsed=25)
    n, sleeps = notifier(sender, policy)
    assert await n.deliver(one_notification()) is False
    assert sleeps == [10]  # 10 s, then 10 + 20 > 25: give up
    assert n.attempts.attempts()[-1].final


def test_retry_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=1.5)


def test_log_entries_round_trip_and_expire() -> None:
    h = harness()
    h.push(h.alert("HighCPU", "a"))
    h.run_until(100)
    (entry,) = h.dispatcher.notify_log.entries()
    assert NotifyLogEntry.from_dict(entry.to_dict()) == entry
    assert entry.sent_at == h.at(30) and len(entry.digest) == 16
    assert h.dispatcher.notify_log.gc(h.at(30 + 5 * 86400), timedelta(days=5)) == 1
