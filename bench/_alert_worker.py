"""`python -m bench._alert_worker …`: the alert-latency benchmark's YakPanel back end.

One process holds YakPanel's aggregator (Kafka → chDB) and the alerting service (rules
read from the same chDB through the query layer, and, unless `--stream off`, evaluated on
ingest from the service's own reading of `yak.metrics.v1`; state, rule groups and
notification config in PostgreSQL through `alerting.store`): chDB opens its path in one
process only.
Before the service starts, the benchmark's rule group and notification config are stored
for the tenant, as the API would. It prints `{"ready": …}` once both run; a line on stdin
(or its end) stops it, after which it prints the service's and aggregator's counters.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import gc
import json
import os
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

MASTER_KEY_ENV = "BENCH_ALERT_MASTER_KEY"
ALERT_NAME = "BenchThreshold"


def rules_yaml(expr: str, interval: str, yakpanel: bool = True) -> str:
    """The rule group; Prometheus 2.42 has no `evaluation_delay` (its default is 0 too)."""
    delay = "\n    evaluation_delay: 0s" if yakpanel else ""
    return f"""
groups:
  - name: bench
    interval: {interval}{delay}
    rules:
      - alert: {ALERT_NAME}
        expr: {expr}
        for: 0s
        labels: {{severity: page}}
"""


_SERIES_SQL = (
    "SELECT DISTINCT series_id, labels['series'] FROM metric_series"
    " WHERE tenant_id = {tenant:UUID} AND metric = {metric:String}"
)
_CROSSED_SQL = (
    "SELECT DISTINCT series_id FROM samples_raw WHERE tenant_id = {tenant:UUID}"
    " AND series_id IN {ids:Array(UInt64)} AND value > 0.5"
    " AND ts >= now64(3) - INTERVAL 300 SECOND"
)


def poll_visible(
    target: Any, tenant: str, metric: str, interval_s: float, stop: threading.Event
) -> dict[str, Any]:
    """When each series' first sample over the threshold became queryable in chDB
    (wall time the poll returned): splits ack → evaluation into ingest and waiting."""
    client = target.client()
    names: dict[int, str] = {}
    visible: dict[str, float] = {}
    one_thread = {"max_threads": 1}
    polls = 0
    try:
        while not stop.is_set():
            started = time.monotonic()
            rows = client.query(
                _SERIES_SQL, parameters={"tenant": tenant, "metric": metric}, settings=one_thread
            ).result_rows
            names.update((int(r[0]), str(r[1])) for r in rows)
            if names:
                crossed = client.query(
                    _CROSSED_SQL,
                    parameters={"tenant": tenant, "ids": sorted(names)},
                    settings=one_thread,
                ).result_rows
                at = time.time()
                for (sid,) in crossed:
                    visible.setdefault(names[int(sid)], at)
            polls += 1
            stop.wait(max(0.0, interval_s - (time.monotonic() - started)))
    finally:
        client.close()
    return {"visible": visible, "visibility_polls": polls}


class Stalls:
    """What holds up the worker's event loop: the lag of a 10 ms sleep, and the pauses of
    Python's cyclic garbage collector (the services share this process and its loop)."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.gc_pauses: list[float] = []
        self._gc_started = 0.0

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_pauses.append(time.perf_counter() - self._gc_started)

    async def watch(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.01)
            self.lags.append(time.perf_counter() - started - 0.01)

    def summary(self) -> dict[str, Any]:
        lags, pauses = sorted(self.lags), sorted(self.gc_pauses)

        def ms(values: list[float], q: float) -> float | None:
            return (
                round(1000 * values[min(len(values) - 1, int(q * len(values)))], 1)
                if values
                else None
            )

        return {
            "loop_lag_ms_p50": ms(lags, 0.5),
            "loop_lag_ms_p99": ms(lags, 0.99),
            "loop_lag_ms_max": ms(lags, 1.0),
            "loop_lags_over_50ms": sum(x > 0.05 for x in lags),
            "gc_collections": len(pauses),
            "gc_pause_ms_max": ms(pauses, 1.0),
        }


def _out(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> None:
    from alerting.routing import parse_config
    from alerting.rules import load_rules_text
    from alerting.service import AlertingConfig, AlertingService
    from alerting.stream import StreamConfig, WindowState
    from controlplane.crypto import SecretBox
    from ingest.aggregator.config import AggregatorConfig
    from ingest.aggregator.service import Aggregator
    from ingest.query import ClickHouseStore
    from yakpanel.clickhouse import ClickHouseTarget
    from yakpanel.logs import configure_logging
    from yakpanel.migrations import CLICKHOUSE_SOURCES, ClickHouseMigrator

    p = argparse.ArgumentParser(prog="python -m bench._alert_worker")
    p.add_argument("--ch-path", required=True)
    p.add_argument("--database", required=True)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--dsn", required=True)
    p.add_argument("--tenant", required=True)
    p.add_argument("--webhook-url", required=True)
    p.add_argument("--expr", required=True)
    p.add_argument("--eval-interval", required=True, help="rule group interval, e.g. 500ms")
    p.add_argument("--tick-s", type=float, required=True)
    p.add_argument("--group-wait", required=True)
    p.add_argument("--group-interval", required=True)
    p.add_argument("--max-wait-s", type=float, required=True)
    p.add_argument("--metric", required=True, help="the stored metric name, e.g. bench_alert")
    p.add_argument("--visibility-poll-ms", type=float, default=100.0)
    p.add_argument(
        "--stream",
        choices=("on", "inline", "thread", "off"),
        default="on",
        help="streaming evaluation (on: small windows on the event loop, big ones on the"
        " stream's thread; inline/thread: always there)",
    )
    a = p.parse_args(argv)
    configure_logging("WARNING")
    box = SecretBox(base64.b64decode(os.environ[MASTER_KEY_ENV]))

    target = ClickHouseTarget(f"chdb://{a.ch_path}", a.database)
    client = target.client()
    try:
        ClickHouseMigrator(client, a.database).apply(
            [m for s in CLICKHOUSE_SOURCES for m in s.load()]
        )
    finally:
        client.close()
    agg_config = dataclasses.replace(AggregatorConfig(), max_wait_s=a.max_wait_s)
    inline = {"inline": 10**12, "thread": -1}.get(a.stream, StreamConfig().inline_max_samples)
    stream_config = dataclasses.replace(
        StreamConfig(), enabled=a.stream != "off", inline_max_samples=inline
    )
    alert_config = AlertingConfig(tick_s=a.tick_s, stop_grace_s=2.0, stream=stream_config)
    notification = {
        "route": {
            "receiver": "bench",
            "group_by": ["alertname", "series"],
            "group_wait": a.group_wait,
            "group_interval": a.group_interval,
            "repeat_interval": "1h",
        },
        "receivers": [{"name": "bench", "urls": [a.webhook_url], "send_resolved": False}],
    }

    stalls = Stalls()

    async def run() -> None:
        gc.callbacks.append(stalls.on_gc)
        watcher = asyncio.create_task(stalls.watch())
        aggregator = Aggregator(a.bootstrap, "", target.client, a.database, agg_config)
        await aggregator.start()
        service = AlertingService(
            a.dsn,
            ClickHouseStore(target.client, a.database),
            sealer=box,
            config=alert_config,
            kafka_bootstrap=a.bootstrap,
            topic_prefix="",
        )
        await service.store.open()
        try:
            now = datetime.now(UTC)
            (group,) = load_rules_text(rules_yaml(a.expr, a.eval_interval))
            await service.store.save_rule_group(a.tenant, group, now)
            await service.store.save_notification_config(a.tenant, parse_config(notification), now)
        finally:
            await service.store.close()
        stop_poll = threading.Event()
        poll_result: dict[str, Any] = {}

        def poll() -> None:
            poll_result.update(
                poll_visible(target, a.tenant, a.metric, a.visibility_poll_ms / 1000, stop_poll)
            )

        poller = threading.Thread(target=poll, daemon=True, name="visibility-poll")
        if a.visibility_poll_ms > 0:  # (0: no poller, nothing competing with the services)
            poller.start()
        await service.start()
        service_started = asyncio.get_running_loop().time()
        deadline = asyncio.get_running_loop().time() + 30
        while service.owned_tenants != {a.tenant}:
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError("the alerting service did not take the tenant in 30 s")
            await asyncio.sleep(0.05)
        while service.stream is not None and service.stream.state(a.tenant) != WindowState.READY:
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError("the tenant's stream window was not ready in 30 s")
            await asyncio.sleep(0.05)
        _out(
            {
                "ready": True,
                "config": {
                    "aggregator_max_wait_s": agg_config.max_wait_s,
                    "aggregator_max_records": agg_config.max_records,
                    "alerting_tick_s": alert_config.tick_s,
                    "alerting_stream": a.stream,
                    "alerting_stream_debounce_s": stream_config.debounce_s,
                    "rule_group": {
                        "interval": a.eval_interval,
                        "evaluation_delay": "0s",
                        "expr": a.expr,
                        "for": "0s",
                    },
                    "route": notification["route"],
                    "receiver": "json:// webhook (Alertmanager JSON), send_resolved false",
                },
            }
        )
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, sys.stdin.readline)
        finally:
            watcher.cancel()
            running_s = loop.time() - service_started
            stop_poll.set()
            if poller.is_alive():
                await loop.run_in_executor(None, poller.join, 10)
            await service.stop()
            await aggregator.stop()
            await service.store.open()
            try:
                attempts = await service.store.attempts(a.tenant)
            finally:
                await service.store.close()
            durations = sorted(float(r["duration_seconds"]) for r in attempts)
            s = aggregator.stats
            _out(
                {
                    "visibility": poll_result,
                    "stalls": stalls.summary(),
                    "alerting_stats": {
                        "evaluations": service.evaluations,
                        "errors": service.errors,
                        "running_s": round(running_s, 1),
                        "delivery_attempts": len(attempts),
                        "failed_attempts": sum(r["outcome"] != "success" for r in attempts),
                        "attempt_s_max": round(durations[-1], 3) if durations else None,
                        "stream_evaluations": service.stream_evaluations,
                        "ingest_evaluations": service.ingest_evaluations,
                        "state_writes": service.state_writes,
                        "state_write_ms_mean": round(
                            1000 * service.state_write_seconds / service.state_writes, 2
                        )
                        if service.state_writes
                        else None,
                        "state_write_ms_max": round(1000 * service.state_write_max_s, 2),
                        "stream_eval_ms_mean": round(
                            1000 * service.stream_eval_seconds / service.stream_evaluations, 2
                        )
                        if service.stream_evaluations
                        else None,
                        "stream_eval_ms_max": round(1000 * service.stream_eval_max_s, 2),
                        "stream": dataclasses.asdict(service.stream.stats)
                        if service.stream is not None
                        else None,
                    },
                    "aggregator_stats": {
                        "records": s.records,
                        "samples": s.samples,
                        "batches": s.batches,
                        "late_dropped": s.late_dropped,
                        "future_dropped": s.future_dropped,
                    },
                }
            )

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main(sys.argv[1:])
