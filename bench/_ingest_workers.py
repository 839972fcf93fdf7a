"""Processes of the ingest benchmark other than the orchestrator.

- `load_generator` (a multiprocessing target): a share of the simulated agents, each with
  its own connection, sending its rounds one request at a time — OTLP `Export` over
  mutual TLS with the agent's certificate, or Prometheus remote write over HTTP. The
  orchestrator steers every generator through shared memory: run/stop, a pause flag (the
  pipeline fell too far behind) and a per-agent rate (0: as fast as acknowledged).
- `python -m bench._ingest_workers aggregator …`: YakPanel's aggregator service plus a
  poller reading ClickHouse in the same process (chDB opens its path in one process only).
  The poller prints one JSON line per poll: committed `samples_raw` rows and the marker
  samples newly visible, with the wall time the query returned.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import http.client
import json
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from bench._ingest_wire import MARKER_METRIC, AgentLoad, SeriesModel

EXPORT_METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
IDLE, RUN, STOP = 0, 1, 2
REQUEST_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class AgentSpec:
    index: int
    server_id: str
    key_pem: bytes = b""
    cert_pem: bytes = b""


@dataclass(frozen=True)
class LoadSpec:
    protocol: str  # "otlp" or "remote_write"
    target: str  # gRPC "host:port", or HTTP "host:port" for /api/v1/write
    model: SeriesModel
    agents: list[AgentSpec]
    slot: int
    result_path: str
    marker_interval_s: float
    start_ns: int
    ca_pem: bytes = b""


@dataclass
class Control:
    """Shared memory (multiprocessing RawValue/RawArray) between the orchestrator and the
    generators; every field has one writer (arrays: one slot per generator)."""

    state: Any  # c_int: IDLE, RUN, STOP
    paused: Any  # c_int
    agent_rate: Any  # c_double: samples/s per agent; 0 = unthrottled
    ready: Any  # c_int per generator
    acked: Any  # c_longlong per generator: samples acknowledged
    requests: Any  # c_longlong per generator
    failures: Any  # c_longlong per generator


@dataclass
class _Tally:
    markers: list[tuple[int, float, float]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    last_error: str = ""

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.last_error = detail[:300]


class _Pacer:
    """When the agent may start its next round: at once, or on a fixed-rate schedule."""

    def __init__(self, ctl: Control, series: int) -> None:
        self.ctl = ctl
        self.series = series
        self.next_at = time.monotonic()
        self.rate = 0.0

    def delay(self) -> float:
        rate = self.ctl.agent_rate.value
        now = time.monotonic()
        if rate <= 0:
            self.next_at = now
            self.rate = rate
            return 0.0
        interval = self.series / rate
        if rate != self.rate:
            # A new rate: each agent starts at a random point of its interval, so that the
            # agents' rounds spread out instead of arriving together.
            self.rate = rate
            self.next_at = now + random.uniform(0, interval)
        elif self.next_at < now - interval:  # fell behind: no catch-up burst
            self.next_at = now
        wait = self.next_at - now
        self.next_at += interval
        return max(0.0, wait)


def load_generator(spec: LoadSpec, ctl: Control) -> None:
    tally = _Tally()
    try:
        if spec.protocol == "otlp":
            asyncio.run(_otlp_main(spec, ctl, tally))
        else:
            _remote_write_main(spec, ctl, tally)
    except Exception as exc:
        tally.error("crash", f"{type(exc).__name__}: {exc}")
        ctl.failures[spec.slot] += 1
        raise
    finally:
        with open(spec.result_path, "w") as out:
            json.dump(
                {"markers": tally.markers, "errors": tally.errors, "last_error": tally.last_error},
                out,
            )


def _next_ts(last_ms: int) -> int:
    return max(int(time.time() * 1000), last_ms + 1)


async def _otlp_main(spec: LoadSpec, ctl: Control, tally: _Tally) -> None:
    import grpc

    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", 64 << 20)]
    channels = []
    calls = []
    for agent in spec.agents:
        creds = grpc.ssl_channel_credentials(spec.ca_pem, agent.key_pem, agent.cert_pem)
        channel = grpc.aio.secure_channel(spec.target, creds, options)
        channels.append(channel)
        calls.append(channel.unary_unary(EXPORT_METHOD, None, None))  # bytes in, bytes out
    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(c.channel_ready() for c in channels))
        loads = [
            AgentLoad(spec.model, a.index, a.server_id, "otlp", spec.start_ns) for a in spec.agents
        ]
        ctl.ready[spec.slot] = 1
        while ctl.state.value == IDLE:  # noqa: ASYNC110 - the flag is in shared memory
            await asyncio.sleep(0.01)
        await asyncio.gather(
            *(
                _otlp_agent(spec, ctl, tally, load, call)
                for load, call in zip(loads, calls, strict=True)
            )
        )
    finally:
        for channel in channels:
            await channel.close(None)


async def _otlp_agent(
    spec: LoadSpec, ctl: Control, tally: _Tally, load: AgentLoad, call: Any
) -> None:
    import grpc

    pacer = _Pacer(ctl, load.series)
    # Spread the agents' markers over the interval.
    next_marker = time.monotonic() + random.uniform(0, spec.marker_interval_s)
    round_, last_ts = 0, 0
    while ctl.state.value == RUN:
        if ctl.paused.value:
            await asyncio.sleep(0.01)
            continue
        wait = pacer.delay()
        if wait:
            await asyncio.sleep(wait)
        last_ts = _next_ts(last_ts)
        for body, points in load.round(round_, last_ts):
            marker = None
            if time.monotonic() >= next_marker:
                body, marker = load.with_marker(body, last_ts)
                points += 1
                next_marker = max(next_marker + spec.marker_interval_s, time.monotonic())
            while True:
                sent = time.time()
                try:
                    await call(body, timeout=REQUEST_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    tally.error(exc.code().name, exc.details() or "")
                    ctl.failures[spec.slot] += 1
                    if ctl.state.value != RUN:
                        return
                    await asyncio.sleep(0.2)
                    continue
                break
            ctl.acked[spec.slot] += points
            ctl.requests[spec.slot] += 1
            if marker is not None:
                tally.markers.append((marker, sent, time.time()))
        round_ += 1


def _remote_write_main(spec: LoadSpec, ctl: Control, tally: _Tally) -> None:
    lock = threading.Lock()
    loads = [AgentLoad(spec.model, a.index, a.server_id, "remote_write", 0) for a in spec.agents]
    ctl.ready[spec.slot] = 1
    while ctl.state.value == IDLE:
        time.sleep(0.01)
    threads = [
        threading.Thread(
            target=_remote_write_agent, args=(spec, ctl, tally, load, lock), daemon=True
        )
        for load in loads
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _remote_write_agent(
    spec: LoadSpec, ctl: Control, tally: _Tally, load: AgentLoad, lock: threading.Lock
) -> None:
    import cramjam

    host, _, port = spec.target.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=REQUEST_TIMEOUT_S)
    headers = {
        "Content-Type": "application/x-protobuf",
        "Content-Encoding": "snappy",
        "X-Prometheus-Remote-Write-Version": "0.1.0",
        "User-Agent": "yakpanel-bench",
    }
    pacer = _Pacer(ctl, load.series)
    next_marker = time.monotonic() + random.uniform(0, spec.marker_interval_s)
    round_, last_ts = 0, 0
    try:
        while ctl.state.value == RUN:
            if ctl.paused.value:
                time.sleep(0.01)
                continue
            wait = pacer.delay()
            if wait:
                time.sleep(wait)
            last_ts = _next_ts(last_ts)
            for raw, points in load.round(round_, last_ts):
                marker = None
                if time.monotonic() >= next_marker:
                    raw, marker = load.with_marker(raw, last_ts)
                    points += 1
                    next_marker = max(next_marker + spec.marker_interval_s, time.monotonic())
                body = bytes(cramjam.snappy.compress_raw(raw))
                while True:
                    sent = time.time()
                    try:
                        conn.request("POST", "/api/v1/write", body=body, headers=headers)
                        response = conn.getresponse()
                        detail = response.read()
                        status = response.status
                    except (OSError, http.client.HTTPException) as exc:
                        conn.close()
                        status, detail = 0, str(exc).encode()
                    if 200 <= status < 300:
                        break
                    with lock:
                        tally.error(f"http_{status}", detail.decode(errors="replace"))
                        ctl.failures[spec.slot] += 1
                    if ctl.state.value != RUN or 400 <= status < 500:
                        break  # a 4xx is final: retrying cannot help
                    time.sleep(0.2)
                with lock:
                    ctl.acked[spec.slot] += points
                    ctl.requests[spec.slot] += 1
                    if marker is not None:
                        tally.markers.append((marker, sent, time.time()))
            round_ += 1
    finally:
        conn.close()


# --- the aggregator with a ClickHouse poller ------------------------------------------------


_MARKER_SERIES_SQL = (
    "SELECT DISTINCT series_id FROM metric_series"
    " WHERE tenant_id = {tenant:UUID} AND metric = {metric:String}"
)
# Committed rows and the visible markers in one query (chDB costs milliseconds a query).
_POLL_SQL = (
    "SELECT (SELECT count() FROM samples_raw), groupArray(toUInt64(value)) FROM samples_raw"
    " WHERE tenant_id = {tenant:UUID} AND series_id IN {ids:Array(UInt64)}"
    " AND ts >= now64(3) - INTERVAL {window:UInt32} SECOND"
)


def _poll(
    target: Any,
    tenant: str,
    agents: int,
    interval_s: float,
    window_s: int,
    stop: threading.Event,
    out: Any,
) -> None:
    client = target.client()
    seen: set[int] = set()
    metric = MARKER_METRIC.replace(".", "_")
    marker_series: list[int] = []
    # One thread per poll query: the poller must not take the aggregator's CPU.
    one_thread = {"max_threads": 1}
    polls, busy_s = 0, 0.0
    try:
        while not stop.is_set():
            started = time.monotonic()
            if len(marker_series) < agents:
                rows = client.query(
                    _MARKER_SERIES_SQL,
                    parameters={"tenant": tenant, "metric": metric},
                    settings=one_thread,
                ).result_rows
                marker_series = [int(r[0]) for r in rows]
            raw, markers = client.query(
                _POLL_SQL,
                parameters={"tenant": tenant, "ids": marker_series or [0], "window": window_s},
                settings=one_thread,
            ).result_rows[0]
            new = [int(m) for m in markers if int(m) not in seen]
            at = time.time()
            polls += 1
            busy_s += time.monotonic() - started
            seen.update(new)
            out({"t": at, "raw": int(raw), "markers": new})
            stop.wait(max(0.0, interval_s - (time.monotonic() - started)))
    finally:
        client.close()
        out({"poller": {"polls": polls, "mean_poll_ms": round(1000 * busy_s / max(polls, 1), 1)}})


def aggregator_main(argv: list[str]) -> None:
    from ingest.aggregator.config import AggregatorConfig
    from ingest.aggregator.service import Aggregator
    from yakpanel.clickhouse import ClickHouseTarget
    from yakpanel.logs import configure_logging
    from yakpanel.migrations import CLICKHOUSE_SOURCES, ClickHouseMigrator

    p = argparse.ArgumentParser(prog="python -m bench._ingest_workers aggregator")
    p.add_argument("--ch-path", required=True)
    p.add_argument("--database", required=True)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--tenant", required=True)
    p.add_argument("--agents", type=int, required=True)
    p.add_argument("--poll-ms", type=float, default=100.0)
    p.add_argument("--marker-window-s", type=int, default=120)
    p.add_argument("--max-wait-s", type=float, default=None)
    a = p.parse_args(argv)
    configure_logging("WARNING")
    write_lock = threading.Lock()

    def out(record: dict[str, Any]) -> None:
        with write_lock:
            sys.stdout.write(json.dumps(record) + "\n")
            sys.stdout.flush()

    target = ClickHouseTarget(f"chdb://{a.ch_path}", a.database)
    client = target.client()
    try:
        migrations = [m for s in CLICKHOUSE_SOURCES for m in s.load()]
        ClickHouseMigrator(client, a.database).apply(migrations)
    finally:
        client.close()
    config = AggregatorConfig()
    if a.max_wait_s is not None:
        config = dataclasses.replace(config, max_wait_s=a.max_wait_s)

    async def main() -> None:
        aggregator = Aggregator(a.bootstrap, "", target.client, a.database, config)
        await aggregator.start()
        stop = threading.Event()
        poller = threading.Thread(
            target=_poll,
            args=(target, a.tenant, a.agents, a.poll_ms / 1000, a.marker_window_s, stop, out),
            daemon=True,
        )
        poller.start()
        out(
            {
                "ready": True,
                "config": {
                    "max_records": config.max_records,
                    "max_wait_s": config.max_wait_s,
                    "max_pending_rows": config.max_pending_rows,
                },
            }
        )
        loop = asyncio.get_running_loop()
        try:
            # Any line on stdin (or its end) stops the aggregator.
            await loop.run_in_executor(None, sys.stdin.readline)
        finally:
            stop.set()
            poller.join(10)
            await aggregator.stop()
            s = aggregator.stats
            counts = {}
            done = target.client()
            try:
                for table in (
                    "samples_raw",
                    "rollup_10s",
                    "rollup_1m",
                    "rollup_1h",
                    "metric_series",
                ):
                    counts[table] = int(done.command(f"SELECT count() FROM {table}"))
            finally:
                done.close()
            out({"rows": counts})
            out(
                {
                    "stats": {
                        "records": s.records,
                        "samples": s.samples,
                        "series_rows": s.series,
                        "batches": s.batches,
                        "insert_seconds": round(s.insert_seconds, 2),
                        "late_dropped": s.late_dropped,
                        "future_dropped": s.future_dropped,
                        "skipped_points": s.skipped_points,
                        "dlq": s.dlq,
                        "write_retries": s.write_retries,
                        "commit_failures": s.commit_failures,
                        "rollups_published": s.rollups_published,
                        "pauses": s.pauses,
                        "consumer_restarts": s.consumer_restarts,
                    }
                }
            )

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


if __name__ == "__main__":
    if sys.argv[1:2] != ["aggregator"]:
        sys.exit("usage: python -m bench._ingest_workers aggregator --ch-path … (see --help)")
    aggregator_main(sys.argv[2:])
