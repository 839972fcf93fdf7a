"""The alerting service: evaluates every tenant's rule groups and notifies.

Every tick it lists the tenants that have rule groups and takes ownership of each one it
can through a PostgreSQL advisory lock held on its own connection, so two alerting
processes never evaluate the same tenant (a replica that stops or loses its connection
releases its tenants, and another takes them at its next tick). For each owned tenant:

1. due groups are evaluated with `RuleEvaluator` over `MetricsQueries` on ClickHouse
   (on one worker thread: the ClickHouse client is synchronous);
2. `AlertStore.save_evaluation` stores the new state, the transitions (history) and
   their `yak.alerts.v1` outbox messages in one transaction; the control plane's outbox
   relay publishes them;
3. the group's firing and resolved alerts go to the tenant's `Dispatcher`, run by a
   `DispatchRunner`, whose notification log, silences and delivery attempts are written
   to PostgreSQL through their listeners and restored when the tenant is taken over.

Streaming (`alerting.stream`, docs/alerting.md "Streaming evaluation"): given a Kafka
bootstrap, the service also reads `yak.metrics.v1` and evaluates a tenant's groups from
a hot window of their series, on their interval and as soon as their samples arrive,
without waiting for the aggregator. Evaluations that change nothing are stored at most
once per group interval; transitions are always stored before anyone is notified.

Restarts: the evaluator resumes from the stored state (a pending `for` keeps its start,
a firing alert stays firing), the firing alerts are handed to the dispatcher again, and
the restored notification log keeps a receiver from hearing about them twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import psycopg
from psycopg.rows import dict_row

from alerting.dispatch import Alert as DispatchAlert
from alerting.dispatch import Dispatcher
from alerting.evaluator import EvaluatorSettings, RuleEvaluator, retire
from alerting.notifylog import AttemptLog, NotificationLog
from alerting.receivers import Sealer
from alerting.rules import RuleGroup
from alerting.runner import DispatchRunner, Notifier, RetryPolicy
from alerting.silences import Silences
from alerting.state import Alert, AlertState, GroupState, Transition
from alerting.store import AlertStore, StoredState
from alerting.stream import IngestThrottle, MetricStream, StreamConfig
from ingest.aggregator.rollup import LatePolicy
from ingest.query import ClickHouseStore, MetricsQueries, MetricStore
from yakpanel.clock import Clock, SystemClock
from yakpanel.secretbox import SecretBox
from yakpanel.service_secrets import load_master_key
from yakpanel.services import Stack

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

_LOCK_NAMESPACE = b"yakpanel:alerting:tenant:"


def tenant_lock_key(tenant_id: str) -> int:
    """The advisory lock (a signed 64-bit key) that makes one process a tenant's evaluator."""
    digest = hashlib.sha256(_LOCK_NAMESPACE + tenant_id.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@dataclass(frozen=True)
class AlertingConfig:
    """`tick_s`: how often due groups are looked for (a group's own `interval` decides
    when it is due); `default_interval`: for groups without one."""

    tick_s: float = 1.0
    default_interval: timedelta = timedelta(minutes=1)
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)
    stop_grace_s: float = 5.0
    write_retry_s: float = 1.0
    stream: StreamConfig = field(default_factory=StreamConfig)
    # Touched after every tick that reached PostgreSQL (container health checks).
    heartbeat_file: Path | None = None


def dispatch_alert(alert: Alert) -> DispatchAlert | None:
    """What the dispatcher hears of an evaluator alert: firing, or resolved (with
    `ends_at`); pending alerts are nobody's business yet."""
    if alert.state == AlertState.FIRING:
        ends = None
    elif alert.state == AlertState.RESOLVED and alert.resolved_at is not None:
        ends = alert.resolved_at
    else:
        return None
    return DispatchAlert(
        labels=alert.labels,
        starts_at=alert.active_since,
        annotations=alert.annotations,
        ends_at=ends,
        fingerprint=alert.fingerprint,
    )


@dataclass
class _Tenant:
    id: str
    runner: DispatchRunner | None = None
    config_version: datetime | None = None
    states: dict[str, StoredState] = field(default_factory=dict)
    groups: dict[str, RuleGroup] = field(default_factory=dict)  # as of the last tick
    persisted_at: dict[str, datetime] = field(default_factory=dict)  # state stored
    interval_at: dict[str, datetime] = field(default_factory=dict)  # last on the interval
    # One evaluation of a group at a time (tick and on-ingest runs would both start
    # from the same previous state and record its transitions twice).
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)


class AlertingService:
    name = "alerting"

    def __init__(
        self,
        dsn: str,
        metrics: MetricStore,
        *,
        sealer: Sealer | None = None,
        config: AlertingConfig | None = None,
        clock: Clock | None = None,
        kafka_bootstrap: str | None = None,
        topic_prefix: str = "",
    ) -> None:
        self.dsn = dsn
        self.metrics = metrics
        self.config = config or AlertingConfig()
        self.clock = clock or SystemClock()
        self.store = AlertStore(dsn, sealer)
        self.evaluator = RuleEvaluator(
            MetricsQueries(metrics, self.clock),
            self.clock,
            EvaluatorSettings(default_interval=self.config.default_interval),
        )
        self.tenants: dict[str, _Tenant] = {}
        self.evaluations = 0
        self.errors = 0
        self.stream_evaluations = 0  # from hot windows (interval and on-ingest)
        self.ingest_evaluations = 0  # started by arriving samples
        self.stream_eval_seconds = 0.0
        self.stream_eval_max_s = 0.0
        self.state_writes = 0
        self.state_write_seconds = 0.0
        self.state_write_max_s = 0.0
        self.stream: MetricStream | None = None
        if kafka_bootstrap is not None and self.config.stream.enabled:
            self.stream = MetricStream(
                kafka_bootstrap, topic_prefix, self.config.stream, self._on_ingest, self.clock
            )
        self._throttle: IngestThrottle[tuple[str, str]] = IngestThrottle(
            self.config.stream.debounce_s, self._ingest_evaluation, self.clock
        )
        self._lock_conn: psycopg.AsyncConnection[dict[str, Any]] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stream_executor: ThreadPoolExecutor | None = None
        self._writes: asyncio.Queue[Callable[[], Awaitable[None]]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    # --- Service -------------------------------------------------------------------

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="alerting-clickhouse")
        await self.store.open()
        self._stop.clear()
        self._writer = asyncio.create_task(self._write_loop(), name="alerting-writes")
        if self.stream is not None:
            self._stream_executor = ThreadPoolExecutor(1, thread_name_prefix="alerting-stream")
            # Reading starts before any tenant is planned: its position marks the warm-up.
            await self.stream.start(self._in_thread, self.metrics)
        self._task = asyncio.create_task(self._run(), name="alerting")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self.stream is not None:
            await self.stream.stop()
        await self._throttle.close()
        for tenant in list(self.tenants):
            await self._release(tenant)
        # What the listeners queued (log entries of deliveries made) is written before
        # the connections close, so a restart does not send it again.
        try:
            await asyncio.wait_for(self._writes.join(), self.config.stop_grace_s * 2)
        except TimeoutError:
            # PostgreSQL is away: those deliveries may be repeated after the restart.
            log.error("alerting: %d notification state writes not stored", self._writes.qsize())
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        await self._close_lock_conn()
        await self.store.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._stream_executor is not None:
            self._stream_executor.shutdown(wait=True)
            self._stream_executor = None
        close = getattr(self.metrics, "close", None)
        if close is not None:
            close()

    def endpoints(self) -> dict[str, str]:
        return {}

    @property
    def owned_tenants(self) -> set[str]:
        return set(self.tenants)

    # --- the loop ------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stop.is_set():
            started = self.clock.monotonic()
            try:
                await self.tick()
            except (OSError, psycopg.Error) as exc:
                # Locks live on the connection: without it, this process owns nothing.
                self.errors += 1
                log.warning("alerting tick failed, releasing tenants: %s", exc)
                for tenant in list(self.tenants):
                    await self._release(tenant)
                await self._close_lock_conn()
            else:
                self._beat()
            wait = max(0.0, self.config.tick_s - (self.clock.monotonic() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), wait)

    def _beat(self) -> None:
        path = self.config.heartbeat_file
        if path is not None:
            with contextlib.suppress(OSError):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()

    async def tick(self) -> None:
        """Take over tenants that have rules and nobody evaluating them; evaluate due groups."""
        conn = await self._lock_connection()
        # (Read as the owner: listing tenants is not any one tenant's business. A tenant
        # whose groups were all removed stays until their alerts are retired.)
        rows = await (
            await conn.execute(
                "SELECT tenant_id FROM alert_rule_groups UNION SELECT tenant_id"
                " FROM alert_group_state"
            )
        ).fetchall()
        with_rules = {str(r["tenant_id"]) for r in rows}
        for tenant_id in sorted(set(self.tenants) - with_rules):
            runner = self.tenants[tenant_id].runner
            if runner is None or runner.dispatcher.next_flush_at() is None:
                # (Not while a last resolved notification is still waiting to go out.)
                await self._release(tenant_id)
        for tenant_id in sorted(with_rules - set(self.tenants)):
            if self._stop.is_set():
                return
            got = await (
                await conn.execute(
                    "SELECT pg_try_advisory_lock(%s) AS ok", (tenant_lock_key(tenant_id),)
                )
            ).fetchone()
            if got and got["ok"]:
                await self._take_over(tenant_id)
        for tenant in list(self.tenants.values()):
            if self._stop.is_set():
                return
            try:
                await self._evaluate_tenant(tenant)
            except (OSError, psycopg.Error):
                raise
            except Exception:
                # One tenant's defect must not stop the others; it is retried next tick.
                self.errors += 1
                log.exception("alerting: evaluating tenant %s failed", tenant.id)

    async def _take_over(self, tenant_id: str) -> None:
        tenant = _Tenant(tenant_id)
        tenant.states = await self.store.group_states(tenant_id)
        tenant.interval_at = {name: s.evaluated_at for name, s in tenant.states.items()}
        self.tenants[tenant_id] = tenant
        log.info("alerting: evaluating tenant %s", tenant_id)
        await self._sync_notifications(tenant)
        # The alerts already firing (or recently resolved) are handed over again; the
        # restored notification log decides what is still news.
        self._push(tenant, [a for s in tenant.states.values() for a in s.state.alerts()])

    async def _release(self, tenant_id: str) -> None:
        tenant = self.tenants.pop(tenant_id, None)
        if self.stream is not None:
            self.stream.forget(tenant_id)
        self._throttle.forget(lambda key: key[0] != tenant_id)
        if tenant is None:
            return
        if tenant.runner is not None:
            await tenant.runner.stop(self.config.stop_grace_s)
        if self._lock_conn is not None and not self._lock_conn.closed:
            with contextlib.suppress(psycopg.Error):
                await self._lock_conn.execute(
                    "SELECT pg_advisory_unlock(%s)", (tenant_lock_key(tenant_id),)
                )

    async def _evaluate_tenant(self, tenant: _Tenant) -> None:
        await self._sync_notifications(tenant)
        groups, broken = await self.store.rule_groups(tenant.id)
        for name, reason in sorted(broken.items()):
            # Kept as it is (not retired): its alerts neither resolve nor re-fire.
            self.errors += 1
            log.error(
                "alerting: tenant %s rule group %s does not load: %s", tenant.id, name, reason
            )
        names = {g.group.name for g in groups} | set(broken)
        for name in sorted(set(tenant.states) - names):
            await self._retire(tenant, name)
        tenant.groups = {g.group.name: g.group for g in groups}
        if self.stream is not None:
            self.stream.plan(tenant.id, tenant.groups.values())
        for stored in groups:
            if self._stop.is_set():
                return
            await self._evaluate_group(tenant, stored.group, on_ingest=False)

    def _due(self, tenant: _Tenant, group: RuleGroup) -> bool:
        # Counted from the last interval evaluation (or the stored one, at takeover):
        # on-ingest ones do not postpone it (they cannot end a pending `for` or resolve).
        last = tenant.interval_at.get(group.name)
        return last is None or self.clock.now() >= last + self.evaluator.interval(group)

    async def _evaluate_group(self, tenant: _Tenant, group: RuleGroup, *, on_ingest: bool) -> None:
        """One evaluation from one source: the tenant's hot window when the stream serves
        the group, else ClickHouse (on the ClickHouse thread). `on_ingest`: started by new
        samples rather than by the interval."""
        lock = tenant.locks.setdefault(group.name, asyncio.Lock())
        async with lock:
            if self.tenants.get(tenant.id) is not tenant or self._stop.is_set():
                return  # released meanwhile
            if not on_ingest and not self._due(tenant, group):
                return
            previous = tenant.states.get(group.name)
            state = previous.state if previous else GroupState()
            hot = None if self.stream is None else self.stream.window_for(tenant.id, group.name)
            if hot is not None:
                started = self.clock.monotonic()
                evaluator = RuleEvaluator(
                    MetricsQueries(hot, self.clock), self.clock, self.evaluator.settings
                )
                evaluate = functools.partial(
                    evaluator.evaluate_group, tenant.id, group, state, hold_absent=on_ingest
                )
                if hot.samples <= self.config.stream.inline_max_samples:
                    # A few ms on the loop beat a thread hand-over (measured: the thread
                    # waits for the GIL behind the loop, 7 ms against 18 ms mean).
                    evaluation = evaluate()
                else:
                    # A big window: its own thread, neither behind a slow ClickHouse group
                    # nor holding up the event loop (shared with other services when
                    # embedded).
                    assert self._stream_executor is not None
                    evaluation = await asyncio.get_running_loop().run_in_executor(
                        self._stream_executor, evaluate
                    )
                spent = self.clock.monotonic() - started
                self.stream_evaluations += 1
                self.stream_eval_seconds += spent
                self.stream_eval_max_s = max(self.stream_eval_max_s, spent)
            elif on_ingest:
                return  # the stream stopped serving it; the interval takes over
            else:
                evaluation = await self._in_thread(
                    self.evaluator.evaluate_group, tenant.id, group, state
                )
            if on_ingest:
                self.ingest_evaluations += 1
            else:
                tenant.interval_at[group.name] = evaluation.at
            stored_at = tenant.persisted_at.get(group.name)
            if (
                previous is None
                or evaluation.transitions
                or _health(previous.state) != _health(evaluation.state)
                or stored_at is None
                or evaluation.at - stored_at >= self.evaluator.interval(group)
            ):
                # Stored before anyone hears of it: a restart resumes from here.
                write_started = self.clock.monotonic()
                await self.store.save_evaluation(tenant.id, group.name, evaluation)
                tenant.persisted_at[group.name] = evaluation.at
                self.state_writes += 1
                written = self.clock.monotonic() - write_started
                self.state_write_seconds += written
                self.state_write_max_s = max(self.state_write_max_s, written)
            self.evaluations += 1
            tenant.states[group.name] = StoredState(evaluation.state, evaluation.at)
            self._after_evaluation(tenant, group.name, evaluation.transitions)
            self._push(tenant, evaluation.state.alerts())

    def _on_ingest(self, tenant_id: str, groups: frozenset[str]) -> None:
        tenant = self.tenants.get(tenant_id)
        if tenant is None or self._stop.is_set():
            return
        for name in groups:
            group = tenant.groups.get(name)
            # A delayed group looks at `now - delay`: a sample arriving now is not news.
            if group is not None and not group.evaluation_delay:
                self._throttle.trigger((tenant_id, name))

    async def _ingest_evaluation(self, key: tuple[str, str]) -> None:
        tenant_id, name = key
        tenant = self.tenants.get(tenant_id)
        group = None if tenant is None else tenant.groups.get(name)
        if tenant is None or group is None:
            return
        try:
            await self._evaluate_group(tenant, group, on_ingest=True)
        except Exception:
            # The interval evaluation (next tick) tries again, and reports a lost connection.
            self.errors += 1
            log.exception("alerting: evaluating tenant %s group %s on ingest failed", *key)

    async def _retire(self, tenant: _Tenant, name: str) -> None:
        """A removed group: its pending alerts end, its firing ones resolve (receivers
        hear it), and its state is dropped."""
        stored = tenant.states[name]
        at = self.clock.now()
        transitions = [
            t
            for rule_state in stored.state.rules.values()
            for t in retire(rule_state, name, at, tenant_id=tenant.id)
        ]
        await self.store.retire_group(tenant.id, name, transitions)
        del tenant.states[name]
        tenant.persisted_at.pop(name, None)
        tenant.interval_at.pop(name, None)
        self._after_evaluation(tenant, name, transitions)
        if tenant.runner is not None:
            resolved = [
                DispatchAlert(
                    labels=t.labels,
                    starts_at=t.active_since,
                    annotations=t.annotations,
                    ends_at=t.at,
                    fingerprint=t.fingerprint,
                )
                for t in transitions
                if t.to_state == AlertState.RESOLVED
            ]
            if resolved:
                tenant.runner.push(resolved)

    def _after_evaluation(
        self, tenant: _Tenant, group: str, transitions: Sequence[Transition]
    ) -> None:
        for t in transitions:
            log.info(
                "alert %s %s: %s -> %s (tenant %s, group %s)",
                t.alertname,
                t.fingerprint,
                t.from_state.value,
                t.to_state.value,
                tenant.id,
                group,
            )

    def _push(self, tenant: _Tenant, alerts: list[Alert]) -> None:
        if tenant.runner is None:
            return
        out = [d for d in map(dispatch_alert, alerts) if d is not None]
        if out:
            tenant.runner.push(out)

    # --- notifications -------------------------------------------------------------

    async def _sync_notifications(self, tenant: _Tenant) -> None:
        """Start the tenant's dispatcher when it has a notification config (restoring the
        notification log and silences first), reload it when the config changed, and
        pick up silences written by the API."""
        try:
            stored = await self.store.notification_config(tenant.id)
        except (ValueError, RuntimeError) as exc:  # ConfigError, a URL that does not open
            # Rules are still evaluated and recorded; the running dispatcher (if any)
            # keeps its last good config.
            self.errors += 1
            log.error("alerting: tenant %s notification config unusable: %s", tenant.id, exc)
            return
        if stored is None:
            if tenant.runner is not None:
                await tenant.runner.stop(self.config.stop_grace_s)
                tenant.runner, tenant.config_version = None, None
            return
        silences = await self.store.silences(tenant.id)
        if tenant.runner is None:
            tid = tenant.id
            notify_log = NotificationLog(
                listener=lambda e: self._queue(self.store.save_notify_log_entry, tid, e)
            )
            notify_log.restore(await self.store.notify_log_entries(tid))
            muted = Silences(listener=lambda s: self._queue(self.store.save_silence, tid, s))
            muted.restore(silences)
            dispatcher = Dispatcher(
                stored.config, silences=muted, notify_log=notify_log, tenant_id=tid
            )
            attempts = AttemptLog(listener=lambda a: self._queue(self.store.save_attempt, tid, a))
            notifier = Notifier(
                clock=self.clock, attempts=attempts, policy=self.config.retry_policy
            )
            tenant.runner = DispatchRunner(dispatcher, notifier, self.clock)
            tenant.config_version = stored.updated_at
            await tenant.runner.start()
            return
        dispatcher = tenant.runner.dispatcher
        if stored.updated_at != tenant.config_version:
            dispatcher.reload(stored.config, self.clock.now())
            tenant.config_version = stored.updated_at
        dispatcher.silences.restore(silences)
        tenant.runner.wake()

    def _queue(self, write: Callable[[str, T], Awaitable[None]], tenant_id: str, item: T) -> None:
        self._writes.put_nowait(functools.partial(write, tenant_id, item))

    async def _write_loop(self) -> None:
        """Writes what the listeners hand over, in order, retrying until it is stored."""
        while True:
            write = await self._writes.get()
            try:
                while True:
                    try:
                        await write()
                        break
                    except (OSError, psycopg.Error) as exc:
                        self.errors += 1
                        log.warning("alerting: storing notification state failed: %s", exc)
                        await asyncio.sleep(self.config.write_retry_s)
            finally:
                self._writes.task_done()

    # --- plumbing ------------------------------------------------------------------

    async def _lock_connection(self) -> psycopg.AsyncConnection[dict[str, Any]]:
        if self._lock_conn is None or self._lock_conn.closed:
            self._lock_conn = await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, row_factory=dict_row
            )
        return self._lock_conn

    async def _close_lock_conn(self) -> None:
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()

    async def _in_thread(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))


def _health(state: GroupState) -> dict[str, tuple[str, str | None]]:
    return {rid: (r.health, r.last_error) for rid, r in state.rules.items()}


def build_alerting_service(stack: Stack) -> AlertingService:
    """The service for `yakpanel up` / `serve alerting`: rules read through the query
    layer on the stack's ClickHouse; receiver URLs opened with the master key."""
    # The control plane seals receiver URLs with this box; the same key opens them.
    settings = stack.settings
    return AlertingService(
        stack.postgres_dsn,
        ClickHouseStore(stack.clickhouse.client, stack.clickhouse.database),
        sealer=SecretBox(load_master_key(settings)),
        config=AlertingConfig(
            tick_s=settings.alerting_tick_s,
            default_interval=timedelta(seconds=settings.alerting_default_interval_s),
            stream=StreamConfig(
                enabled=settings.alerting_stream,
                max_samples=settings.alerting_stream_max_samples,
                max_window=timedelta(seconds=settings.alerting_stream_max_window_s),
                debounce_s=settings.alerting_stream_debounce_ms / 1000,
                late=LatePolicy(
                    settings.aggregator_late_window_s * 1000,
                    settings.aggregator_future_window_s * 1000,
                ),
            ),
            heartbeat_file=settings.alerting_heartbeat_file,
        ),
        clock=stack.clock,
        kafka_bootstrap=stack.kafka_bootstrap,
        topic_prefix=stack.topic_prefix,
    )
