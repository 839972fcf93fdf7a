"""Streaming evaluation: rules see a sample as soon as the gateway has put it on Kafka.

Evaluating on ClickHouse alone, a rule sees a sample only after gateway → Kafka →
aggregator batch → insert (0.3 s at the median, ~1 s at p99) and then waits for the next
evaluation. Here the alerting service reads `yak.metrics.v1` itself (every replica reads
every partition, from the end, without a consumer group: it only keeps the tenants it
owns) and keeps, per owned tenant, a *hot window* of the series its rules select, long
enough for every range they read. A group whose window is hot is evaluated from it on
its interval and also as soon as new samples of its selectors arrive (throttled per group).

One source per tenant, never mixed: the ClickHouse view lags the stream, and flipping
between the two would make alerts flap. A tenant is evaluated from its hot window when
the window is *ready*, otherwise on ClickHouse as before:

- warming: the stream keeps matching samples from offset `mark` (its position when the
  rules were planned) on; once the aggregator's committed offsets have passed `mark`
  (everything before it is in ClickHouse: the aggregator commits after the insert), the
  window is loaded from ClickHouse over its retention and merged (a repeated timestamp
  is idempotent), so there is no gap between the two;
- ready: evaluated from the window; samples older than the retention are trimmed;
- fallback: over `max_samples`, the window is dropped (a warning, `stats.fallbacks`) and
  the tenant goes back to ClickHouse; warming is retried after `fallback_retry`.

A group stays on ClickHouse when its expression cannot be planned (a construct whose
selectors cannot be listed) or reads further back than `max_window`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from enum import Enum
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from alerting.hotwindow import HotWindow
from alerting.rules import RuleGroup
from alerting.streamplan import (
    ExpressionReads,
    StreamPlan,
    expression_reads,
    load_window,
    plan_groups,
)
from alerting.throttle import IngestThrottle
from ingest.aggregator.decode import UndecodableMessage, decode, identity_from_headers
from ingest.aggregator.rollup import LatePolicy, split_by_time
from ingest.query import (
    METRIC_LABEL,
    MetricStore,
    QueryError,
)
from ingest.query.matchers import selector_matches
from yakpanel.clock import Clock, SystemClock
from yakpanel.topics import METRICS, ensure_topics

log = logging.getLogger(__name__)

__all__ = [
    "ExpressionReads",
    "IngestThrottle",
    "MetricStream",
    "StreamConfig",
    "StreamPlan",
    "StreamStats",
    "WindowState",
    "expression_reads",
    "load_window",
    "plan_groups",
]

_MATCH_CACHE_MAX = 200_000  # series ids remembered per tenant (matching or not)


@dataclass(frozen=True)
class StreamConfig:
    """`max_samples`: the hot window's bound per tenant (over it: ClickHouse);
    `inline_max_samples`: see docs/alerting.md (measured in docs/benchmarks.md);
    `max_window`: groups reading further back stay on ClickHouse; `debounce_s`: at most
    one on-ingest evaluation per group this often; `late`: the aggregator's late policy,
    so that the window keeps what ClickHouse keeps."""

    enabled: bool = True
    max_samples: int = 200_000
    max_window: timedelta = timedelta(hours=1)
    debounce_s: float = 0.025
    fallback_retry: timedelta = timedelta(minutes=10)
    catchup_poll_s: float = 0.25
    fetch_max_wait_ms: int = 10
    retry_backoff_s: float = 1.0
    request_timeout_s: float = 10.0
    late: LatePolicy = field(default_factory=LatePolicy)
    # Windows up to this many samples are evaluated on the event loop (a few ms, and no
    # wait for the GIL between threads); bigger ones on the stream's own thread.
    inline_max_samples: int = 50_000


@dataclass
class StreamStats:
    messages: int = 0
    samples: int = 0  # kept in hot windows
    undecodable: int = 0
    warmups: int = 0
    fallbacks: int = 0
    reconnects: int = 0


# --- the stream -----------------------------------------------------------------------------


class WindowState(Enum):
    WARMING = "warming"
    READY = "ready"
    FALLBACK = "fallback"


@dataclass
class TenantWindow:
    tenant_id: str
    plan: StreamPlan
    store: HotWindow
    state: WindowState = WindowState.WARMING
    marks: dict[int, int] | None = None  # partition -> offset kept from (None: not yet)
    since: float = 0.0  # monotonic, entering the state
    matched: dict[int, frozenset[str]] = field(default_factory=dict)  # series id -> groups
    last_trim: float = 0.0
    waiting_logged: bool = False


Runner = Callable[..., Awaitable[Any]]


class MetricStream:
    """Reads `yak.metrics.v1`, keeps the hot windows of the planned tenants, and calls
    `on_ingest(tenant_id, groups)` with the ready groups whose selectors got samples."""

    def __init__(
        self,
        bootstrap: str,
        topic_prefix: str,
        config: StreamConfig,
        on_ingest: Callable[[str, frozenset[str]], None],
        clock: Clock | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.prefix = topic_prefix
        self.config = config
        self.topic = METRICS.full_name(topic_prefix)
        # The aggregator's consumer group (`ingest.aggregator.service`): its committed
        # offsets say what is in ClickHouse.
        self.aggregator_group = f"{topic_prefix}aggregator"
        self.on_ingest = on_ingest
        self.clock = clock or SystemClock()
        self.stats = StreamStats()
        self.tenants: dict[str, TenantWindow] = {}
        self._position: dict[int, int] = {}
        self._connected = False
        self._task: asyncio.Task[None] | None = None
        self._warmer: asyncio.Task[None] | None = None
        self._watcher: AIOKafkaConsumer | None = None
        self._last_catchup_poll = 0.0

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self, run: Runner | None = None, store: MetricStore | None = None) -> None:
        """Starts reading; with `run` and `store` (see `advance_warmups`), also warming up
        windows on a task of its own, so that waiting on Kafka or ClickHouse never holds
        up the evaluations."""
        self._task = asyncio.create_task(self._run(), name="alerting-stream")
        if run is not None and store is not None:
            self._warmer = asyncio.create_task(self._warm_loop(run, store), name="alerting-warmup")

    async def stop(self) -> None:
        for task in (self._warmer, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._warmer = None
        if self._watcher is not None:
            with contextlib.suppress(KafkaError, OSError):
                await self._watcher.stop()
            self._watcher = None
        self.tenants.clear()

    @property
    def connected(self) -> bool:
        return self._connected

    # --- plans -----------------------------------------------------------------------------

    def plan(self, tenant_id: str, groups: Iterable[RuleGroup]) -> StreamPlan:
        """(Re)plans a tenant's window from its groups; a changed plan warms up again."""
        plan = plan_groups(groups, self.config.max_window)
        current = self.tenants.get(tenant_id)
        if current is not None and current.plan == plan:
            return plan
        if not plan.selectors:
            self.tenants.pop(tenant_id, None)
            return plan
        for name, reason in sorted(plan.on_clickhouse.items()):
            log.info(
                "alerting: tenant %s group %s evaluated on ClickHouse: %s", tenant_id, name, reason
            )
        window = TenantWindow(tenant_id, plan, HotWindow(tenant_id))
        self._warm(window)
        self.tenants[tenant_id] = window
        return plan

    def forget(self, tenant_id: str) -> None:
        self.tenants.pop(tenant_id, None)

    def window_for(self, tenant_id: str, group: str) -> HotWindow | None:
        """The store to evaluate `group` from when the stream serves it, else None."""
        window = self.tenants.get(tenant_id)
        if window is None or window.state != WindowState.READY or group not in window.plan.groups:
            return None
        return window.store

    def state(self, tenant_id: str) -> WindowState | None:
        window = self.tenants.get(tenant_id)
        return None if window is None else window.state

    def _warm(self, window: TenantWindow) -> None:
        window.state = WindowState.WARMING
        window.store = HotWindow(window.tenant_id)
        window.matched.clear()
        window.since = self.clock.monotonic()
        window.waiting_logged = False
        # Only while connected is "kept from here on" true; else marked at (re)connect.
        window.marks = dict(self._position) if self._connected else None

    def _fall_back(self, window: TenantWindow, why: str) -> None:
        self.stats.fallbacks += 1
        log.warning(
            "alerting: tenant %s evaluated on ClickHouse, not from the stream: %s; set"
            " YAKPANEL_ALERTING_STREAM_MAX_SAMPLES higher or select fewer series (retried"
            " in %s)",
            window.tenant_id,
            why,
            self.config.fallback_retry,
        )
        window.state = WindowState.FALLBACK
        window.store = HotWindow(window.tenant_id)
        window.matched.clear()
        window.since = self.clock.monotonic()

    # --- warm-up ----------------------------------------------------------------------------

    async def _warm_loop(self, run: Runner, store: MetricStore) -> None:
        while True:
            try:
                await self.advance_warmups(run, store)
            except Exception:
                # (ClickHouse away while loading: the window stays warming, its tenant on
                # ClickHouse, and it is tried again.)
                log.exception("alerting: warming up stream windows failed")
            await asyncio.sleep(self.config.catchup_poll_s)

    async def advance_warmups(self, run: Runner, store: MetricStore) -> None:
        """Loads the windows whose stream has caught up with ClickHouse; `run(fn, *args)`
        runs a blocking ClickHouse call on the service's ClickHouse thread."""
        now = self.clock.monotonic()
        for window in list(self.tenants.values()):
            retry = self.config.fallback_retry.total_seconds()
            if window.state == WindowState.FALLBACK and now - window.since >= retry:
                self._warm(window)
        warming = [
            w
            for w in self.tenants.values()
            if w.state == WindowState.WARMING and w.marks is not None
        ]
        if not warming or now - self._last_catchup_poll < self.config.catchup_poll_s:
            return
        self._last_catchup_poll = now
        committed = await self._aggregator_committed({p for w in warming for p in w.marks or {}})
        for window in warming:
            assert window.marks is not None
            behind = {p: m for p, m in window.marks.items() if m > 0 and committed.get(p, -1) < m}
            if behind:
                if not window.waiting_logged and now - window.since > 30:
                    window.waiting_logged = True
                    log.warning(
                        "alerting: tenant %s stays on ClickHouse until the aggregator has"
                        " stored yak.metrics.v1 up to %s (committed: %s)",
                        window.tenant_id,
                        behind,
                        {p: committed.get(p) for p in behind},
                    )
                continue
            await self.warm_up(window.tenant_id, run, store)

    async def warm_up(self, tenant_id: str, run: Runner, store: MetricStore) -> WindowState | None:
        """Loads a warming window from `store` and makes it ready (or falls back). Only
        gapless once ClickHouse holds everything before the window's marks, which
        `advance_warmups` waits for."""
        window = self.tenants.get(tenant_id)
        if window is None or window.state != WindowState.WARMING:
            return None if window is None else window.state
        await self._load(window, run, store)
        return window.state

    async def _load(self, window: TenantWindow, run: Runner, store: MetricStore) -> None:
        now_ms = int(self.clock.now().timestamp() * 1000)
        start = now_ms - window.plan.retention_ms
        end = now_ms + self.config.late.future_window_ms
        try:
            loaded = await run(
                load_window,
                store,
                window.tenant_id,
                window.plan.all_selectors(),
                start,
                end,
                self.config.max_samples,
            )
        except QueryError as exc:
            if self.tenants.get(window.tenant_id) is window:
                self._fall_back(window, f"loading its window from ClickHouse: {exc.message}")
            return
        if self.tenants.get(window.tenant_id) is not window or window.state != WindowState.WARMING:
            return  # re-planned or reconnected meanwhile: that warm-up starts over
        for ref, points in loaded:
            window.store.put_ref(ref, points)
        window.store.trim(start)
        if window.store.samples > self.config.max_samples:
            self._fall_back(window, f"{window.store.samples} samples in its window")
            return
        window.state = WindowState.READY
        window.since = self.clock.monotonic()
        self.stats.warmups += 1
        log.info(
            "alerting: tenant %s evaluated from the stream (%d samples, groups %s)",
            window.tenant_id,
            window.store.samples,
            ", ".join(sorted(window.plan.groups)),
        )

    async def _aggregator_committed(self, partitions: set[int]) -> dict[int, int]:
        try:
            out: dict[int, int] = {}
            async with asyncio.timeout(self.config.request_timeout_s):
                if self._watcher is None:
                    # Never subscribes or commits: it only reads the group's offsets.
                    self._watcher = AIOKafkaConsumer(
                        bootstrap_servers=self.bootstrap,
                        group_id=self.aggregator_group,
                        enable_auto_commit=False,
                    )
                    await self._watcher.start()
                for p in sorted(partitions):
                    offset = await self._watcher.committed(TopicPartition(self.topic, p))
                    if offset is not None:
                        out[p] = int(offset)
            return out
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("alerting: reading the aggregator's offsets failed: %s", exc)
            if self._watcher is not None:
                with contextlib.suppress(KafkaError, OSError):
                    await self._watcher.stop()
                self._watcher = None
            return {}

    # --- the consumer ------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            consumer: AIOKafkaConsumer | None = None
            try:
                await ensure_topics(self.bootstrap, self.prefix, (METRICS,))
                consumer = AIOKafkaConsumer(
                    bootstrap_servers=self.bootstrap,
                    group_id=None,
                    enable_auto_commit=False,
                    auto_offset_reset="latest",
                    fetch_max_wait_ms=self.config.fetch_max_wait_ms,
                )
                await consumer.start()
                await consumer.topics()
                partitions = consumer.partitions_for_topic(self.topic) or set()
                if not partitions:
                    raise KafkaError(f"topic {self.topic} has no partitions")
                tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
                consumer.assign(tps)
                await consumer.seek_to_end(*tps)
                self._position = {tp.partition: int(await consumer.position(tp)) for tp in tps}
                self._connected = True
                for window in self.tenants.values():
                    if window.state != WindowState.FALLBACK:
                        self._warm(window)  # what passed while disconnected is not kept
                while True:
                    batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
                    self._consume(batches)
            except (KafkaError, OSError, TimeoutError) as exc:
                self.stats.reconnects += 1
                log.warning("alerting: reading %s failed, reconnecting: %s", self.topic, exc)
            except Exception:
                # A defect must not end the stream silently: its windows would go stale
                # while still "ready". Reconnecting warms every window up again.
                self.stats.reconnects += 1
                log.exception("alerting: reading %s failed; reconnecting", self.topic)
            finally:
                self._connected = False
                if consumer is not None:
                    with contextlib.suppress(KafkaError, OSError):
                        await consumer.stop()
            await asyncio.sleep(self.config.retry_backoff_s)

    def _consume(self, batches: Mapping[TopicPartition, Sequence[Any]]) -> None:
        triggered: dict[str, set[str]] = {}
        for tp, records in batches.items():
            for record in records:
                self._position[tp.partition] = int(record.offset) + 1
                self.stats.messages += 1
                self.ingest(record.value, list(record.headers or ()), triggered)
        for tenant_id, groups in triggered.items():
            self.on_ingest(tenant_id, frozenset(groups))

    def ingest(
        self, payload: bytes, headers: Sequence[tuple[str, bytes]], triggered: dict[str, set[str]]
    ) -> None:
        """One `yak.metrics.v1` message: the samples of planned tenants' selected series go
        to their windows; `triggered` collects the ready groups that got samples."""
        try:
            tenant_id = identity_from_headers(headers).tenant_id
        except UndecodableMessage:
            self.stats.undecodable += 1
            return
        window = self.tenants.get(tenant_id)
        if window is None or window.state == WindowState.FALLBACK:
            return
        try:
            frame = decode(payload, headers)
        except UndecodableMessage:
            self.stats.undecodable += 1  # the aggregator dead-letters it
            return
        frame, _, _ = split_by_time(frame, self.config.late)
        series: dict[int, tuple[str, dict[str, str], list[tuple[int, float]]]] = {}
        groups: set[str] = set()
        rows = frame.select("series_id", "metric", "labels", "ts", "value").iter_rows()
        for sid, metric, labels, ts, value in rows:
            hit = window.matched.get(sid)
            if hit is None:
                if len(window.matched) >= _MATCH_CACHE_MAX:
                    window.matched.clear()
                named = {kv["key"]: kv["value"] for kv in labels}
                named[METRIC_LABEL] = metric
                hit = frozenset(
                    g
                    for g, sels in window.plan.selectors.items()
                    if any(selector_matches(s, named) for s in sels)
                )
                window.matched[sid] = hit
            if not hit:
                continue
            groups |= hit
            entry = series.get(sid)
            if entry is None:
                entry = series[sid] = (metric, {kv["key"]: kv["value"] for kv in labels}, [])
            entry[2].append((ts, value))
        if not series:
            return
        for metric, labels, points in series.values():
            self.stats.samples += window.store.put(metric, labels, points)
        now = self.clock.monotonic()
        if now - window.last_trim >= 1.0:
            window.last_trim = now
            now_ms = int(self.clock.now().timestamp() * 1000)
            window.store.trim(now_ms - window.plan.retention_ms)
        if window.store.samples > self.config.max_samples:
            self._fall_back(window, f"{window.store.samples} samples in its window")
            return
        if window.state == WindowState.READY:
            triggered.setdefault(tenant_id, set()).update(groups)
