"""Alert latency: a threshold-crossing sample accepted → the webhook notified, YakPanel
against Prometheus 2.42 + Alertmanager 0.25 (Debian), in one run.

YakPanel (real components, temp dirs, loopback, each in its own process, started as in
`bench.ingest`): embedded PostgreSQL with every migration, the Tansu broker,
`yakpanel serve api`, `yakpanel serve gateway`, and one process holding the aggregator
(chDB) and the alerting service (`bench._alert_worker`; chDB opens its path in one
process only). One agent is enrolled through the gateway; its certificate sends OTLP
`Export` requests of one gauge, `bench.alert`, with `--series` points told apart by a
`series` attribute. The rule group (`bench_alert > 0.5`, `for: 0s`, evaluation delay 0,
interval `--eval-interval`) and the notification config (group_by [alertname, series],
`--group-wait`, `--group-interval`, a `json://` webhook) are stored in PostgreSQL through
`alerting.store`, as the API does.

Prometheus: `prometheus --web.enable-remote-write-receiver` with the same rule and
evaluation interval, `--rules.alert.resend-delay` = the evaluation interval, sending to
`prometheus-alertmanager` (cluster off) with the same route and a webhook receiver. It
gets exactly the same samples (same labels as YakPanel stores them, same timestamps and
values) by remote write.

Every `--round-interval-s` the sender sends one sample of every series (an agent's
export); about every `--wave-interval-s` (±50 % jitter, so crossings fall anywhere in
the evaluation cycle) a wave of `--wave-size` series goes from 0 to 1 and stays there.
t0 of a series = when the request carrying its crossing was acknowledged (gRPC reply;
HTTP 204). A local HTTP receiver records when each series' first firing notification
arrives; latency = arrival - t0 (one clock, one process). `breakdown` splits it at the
alert's `startsAt` (the evaluation that fired it) and, for YakPanel, at the moment a chDB
query first returned the crossing sample. The systems run one after the other, each on
its own. An export the gateway refuses is retried for up to 10 s (counted in
`export_errors`; t0 is the final acknowledgement).

JSON lines: `alert_latency.yakpanel`, `alert_latency.prometheus`, `alert_latency.summary`
(ratios YakPanel / Prometheus; target p99 ≤ 3 s and ≤ half of Prometheus').
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import random
import re
import struct
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench._alert_worker import MASTER_KEY_ENV, rules_yaml
from bench._common import emit, fail, percentile
from bench._ingest_wire import (
    SERVICE_NAME,
    Template,
    _number_point,
    _otlp_metric,
    _resource,
    _timeseries,
    field_message,
    field_string,
    otlp_ts,
    remote_write_ts,
)
from bench.ingest import PROMETHEUS, Proc, YakPanel, deb_version, free_port, tail
from bench.ingest import parse_args as ingest_params

ALERTMANAGER = "/usr/bin/prometheus-alertmanager"
METRIC = "bench.alert"
PROM_METRIC = "bench_alert"
EXPR = f"{PROM_METRIC} > 0.5"
EXPORT_METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
TARGET_P99_S = 3.0
TARGET_RATIO = 0.5
SYSTEMS = ("yakpanel", "prometheus")


@dataclass(frozen=True)
class Params:
    series: int
    wave_size: int
    wave_interval_s: float
    round_interval_s: float
    prime_s: float
    settle_s: float
    eval_interval: str
    tick_s: float
    group_wait: str
    group_interval: str
    max_wait_s: float
    seed: int
    systems: tuple[str, ...]
    stream: str = "on"
    visibility_poll_ms: float = 100.0

    def fields(self) -> dict[str, Any]:
        return {
            "series": self.series,
            "wave_size": self.wave_size,
            "wave_interval_s": self.wave_interval_s,
            "round_interval_s": self.round_interval_s,
            "prime_s": self.prime_s,
            "settle_s": self.settle_s,
            "yakpanel_stream": self.stream,
            "visibility_poll_ms": self.visibility_poll_ms,
            "rule": {"expr": EXPR, "for": "0s", "interval": self.eval_interval},
            "route": {
                "group_by": ["alertname", "series"],
                "group_wait": self.group_wait,
                "group_interval": self.group_interval,
                "repeat_interval": "1h",
            },
        }


def parse_args(argv: list[str] | None) -> Params:
    p = argparse.ArgumentParser(prog="python -m bench.alert_latency", description=__doc__)
    p.add_argument("--series", type=int, default=200, help="series = alerts per system")
    p.add_argument("--wave-size", type=int, default=5, help="series crossing together")
    p.add_argument("--wave-interval-s", type=float, default=1.0, help="mean time between waves")
    p.add_argument("--round-interval-s", type=float, default=0.5, help="agent export interval")
    p.add_argument("--prime-s", type=float, default=4.0, help="all-zero rounds before the waves")
    p.add_argument("--settle-s", type=float, default=20.0, help="wait for late notifications")
    p.add_argument("--eval-interval", default="500ms", help="rule group interval (both)")
    p.add_argument("--tick-s", type=float, default=0.1, help="YakPanel's alerting tick")
    p.add_argument("--group-wait", default="100ms", help="route group_wait (both)")
    p.add_argument("--group-interval", default="1s", help="route group_interval (both)")
    p.add_argument("--max-wait-s", type=float, default=0.2, help="aggregator batch age limit")
    p.add_argument("--seed", type=int, default=6)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument(
        "--stream",
        choices=("on", "inline", "thread", "off"),
        default="on",
        help="YakPanel's streaming evaluation (inline/thread: always on the event loop / the"
        " stream's thread; off: rules read ClickHouse only)",
    )
    p.add_argument(
        "--visibility-poll-ms",
        type=float,
        default=None,
        help="how often the worker asks chDB whether the crossing sample is stored (the"
        " ack_to_queryable breakdown); 0: never. Default: 100 with --stream off, else 0"
        " (the probe competes with the services, and the stream does not wait for chDB)",
    )
    a = p.parse_args(argv)
    systems = tuple(s for s in SYSTEMS if s in {x.strip() for x in a.systems.split(",")})
    if not systems:
        p.error(f"--systems takes names from {', '.join(SYSTEMS)}")
    if a.series < 1 or a.wave_size < 1 or min(a.wave_interval_s, a.round_interval_s) <= 0:
        p.error("--series, --wave-size >= 1; intervals > 0")
    return Params(
        a.series,
        a.wave_size,
        a.wave_interval_s,
        a.round_interval_s,
        a.prime_s,
        a.settle_s,
        a.eval_interval,
        a.tick_s,
        a.group_wait,
        a.group_interval,
        a.max_wait_s,
        a.seed,
        systems,
        a.stream,
        a.visibility_poll_ms
        if a.visibility_poll_ms is not None
        else (100.0 if a.stream == "off" else 0.0),
    )


def series_name(i: int) -> str:
    return f"s-{i:04d}"


# --- the webhook receiver ---------------------------------------------------------------------


def rfc3339(text: str) -> float | None:
    """Seconds since the epoch of an Alertmanager timestamp (any fraction digits)."""
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if match is None:
        return None
    zone = "+00:00" if match[3] == "Z" else match[3]
    whole = datetime.fromisoformat(match[1] + zone).timestamp()
    return whole + float("0." + (match[2] or "0"))


class _Server(ThreadingHTTPServer):
    # The default backlog (5) drops connections when a wave's notifications arrive
    # together, and the client's SYN is retried a second later: a receiver artifact.
    request_queue_size = 128
    daemon_threads = True


@dataclass
class Receiver:
    """Alertmanager-JSON webhooks on loopback: first firing arrival per (path, series)."""

    first: dict[tuple[str, str], float] = field(default_factory=dict)  # monotonic
    # Seconds from the alert's startsAt (the evaluation that fired it) to its arrival.
    since_start: dict[tuple[str, str], float] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    repeats: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0
    _server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                at, wall = time.monotonic(), time.time()
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                receiver.record(self.path, body, at, wall)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def record(self, path: str, body: bytes, at: float, wall: float) -> None:
        with self.lock:
            self.requests[path] = self.requests.get(path, 0) + 1
            try:
                alerts = json.loads(body)["alerts"]
            except (ValueError, KeyError, TypeError) as exc:
                self.errors.append(f"{path}: {type(exc).__name__}: {exc}")
                return
            for alert in alerts:
                if alert.get("status") != "firing":
                    continue
                key = (path, str(alert.get("labels", {}).get("series")))
                if key in self.first:
                    self.repeats[path] = self.repeats.get(path, 0) + 1
                else:
                    self.first[key] = at
                    started = rfc3339(str(alert.get("startsAt", "")))
                    if started is not None:
                        self.since_start[key] = wall - started

    def arrived(self, path: str) -> dict[str, float]:
        with self.lock:
            return {s: t for (p, s), t in self.first.items() if p == path}

    def after_start(self, path: str) -> dict[str, float]:
        with self.lock:
            return {s: t for (p, s), t in self.since_start.items() if p == path}

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


# --- the waves ---------------------------------------------------------------------------------


def run_waves(
    params: Params, send: Callable[[list[float], int], None], receiver: Receiver, path: str
) -> dict[str, Any]:
    """Rounds of every series; waves flip series to 1. `send(values, ts_ms)` returns once
    the system acknowledged the request. Returns t0 and arrival per series."""
    n = params.series
    values = [0.0] * n
    order = list(range(n))
    random.Random(params.seed).shuffle(order)
    jitter = random.Random(params.seed + 1)
    t0: dict[str, float] = {}
    t0_wall: dict[str, float] = {}
    last_ts = 0
    send_ms: list[float] = []

    def one_round(flip: list[int]) -> None:
        nonlocal last_ts
        for i in flip:
            values[i] = 1.0
        last_ts = max(int(time.time() * 1000), last_ts + 1)
        started = time.monotonic()
        send(values, last_ts)
        acked, acked_wall = time.monotonic(), time.time()
        send_ms.append(1000 * (acked - started))
        for i in flip:
            t0[series_name(i)] = acked
            t0_wall[series_name(i)] = acked_wall

    def rounds(until: Callable[[], bool]) -> Iterator[None]:
        next_round = time.monotonic()
        while not until():
            yield
            next_round += params.round_interval_s
            time.sleep(max(0.0, next_round - time.monotonic()))

    started = time.monotonic()
    for _ in rounds(lambda: time.monotonic() - started >= params.prime_s):
        one_round([])
    # Waves fall at random times, off the rounds' grid, so that crossings land at every
    # phase of the systems' evaluation cycles; a wave's request is that moment's export.
    next_round = time.monotonic() + params.round_interval_s
    next_wave = time.monotonic() + params.wave_interval_s * jitter.uniform(0.0, 1.0)
    waves = 0
    while order:
        now = time.monotonic()
        if now >= next_wave:
            flip, order[:] = order[: params.wave_size], order[params.wave_size :]
            one_round(flip)
            waves += 1
            next_wave += params.wave_interval_s * jitter.uniform(0.5, 1.5)
            next_round = time.monotonic() + params.round_interval_s
        elif now >= next_round:
            one_round([])
            next_round += params.round_interval_s
        time.sleep(max(0.0, min(next_wave, next_round) - time.monotonic()))
    last_wave = time.monotonic()
    for _ in rounds(
        lambda: len(receiver.arrived(path)) >= n or time.monotonic() - last_wave >= params.settle_s
    ):
        one_round([])
    arrived = receiver.arrived(path)
    latencies = {s: arrived[s] - t for s, t in t0.items() if s in arrived}
    after_start = receiver.after_start(path)
    # startsAt - t0: how long until an evaluation saw the crossing (wall clocks, one host).
    detect = {s: latencies[s] - after_start[s] for s in latencies if s in after_start}
    return {
        "waves": waves,
        "t0": t0,
        "t0_wall": t0_wall,
        "latencies": latencies,
        "detect": detect,
        "notify": {s: after_start[s] for s in detect},
        "send_ms_p50": round(percentile(send_ms, 50), 2),
        "send_ms_p99": round(percentile(send_ms, 99), 2),
        "run_s": round(time.monotonic() - started, 1),
    }


def _quantiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {f"p{q}": round(percentile(values, q), 3) for q in (50, 90, 99)}


def latency_fields(params: Params, result: dict[str, Any], receiver: Receiver, path: str) -> Any:
    lat = sorted(result["latencies"].values())
    with receiver.lock:
        requests = receiver.requests.get(path, 0)
        repeats = receiver.repeats.get(path, 0)
    return {
        "alerts": params.series,
        "notified": len(lat),
        "missing_notifications": params.series - len(lat),
        "webhook_requests": requests,
        "repeated_firing_notifications": repeats,
        "waves": result["waves"],
        "p50_s": round(percentile(lat, 50), 3) if lat else None,
        "p90_s": round(percentile(lat, 90), 3) if lat else None,
        "p99_s": round(percentile(lat, 99), 3) if lat else None,
        "max_s": round(lat[-1], 3) if lat else None,
        "min_s": round(lat[0], 3) if lat else None,
        "mean_s": round(sum(lat) / len(lat), 3) if lat else None,
        "breakdown": {
            "ack_to_startsAt_s": _quantiles(list(result["detect"].values())),
            "startsAt_to_webhook_s": _quantiles(list(result["notify"].values())),
        },
        "send_ack_ms_p50": result["send_ms_p50"],
        "send_ack_ms_p99": result["send_ms_p99"],
        "run_s": result["run_s"],
    }


# --- YakPanel -------------------------------------------------------------------------------------


class _WorkerProc(Proc):
    """YakPanel's `aggregator` slot, started as `bench._alert_worker` (aggregator + alerting)."""

    def __init__(self, owner: AlertYakPanel) -> None:
        super().__init__("aggregator+alerting", owner.root / "worker.log")
        self.owner = owner

    def start(self, cmd: list[str], env: dict[str, str] | None = None, pipe: bool = False) -> None:
        from psycopg.conninfo import make_conninfo

        o = self.owner
        env = dict(env or os.environ)
        env[MASTER_KEY_ENV] = base64.b64encode(o._master_key).decode()
        command = [
            sys.executable,
            "-m",
            "bench._alert_worker",
            "--ch-path",
            str(o.root / "ch"),
            "--database",
            "bench",
            "--bootstrap",
            o.broker.bootstrap,
            "--dsn",
            make_conninfo(o.pg.dsn, dbname="yakpanel"),
            "--tenant",
            o.tenant_id,
            "--webhook-url",
            o.webhook_url,
            "--expr",
            EXPR,
            "--eval-interval",
            o.alert_params.eval_interval,
            "--tick-s",
            str(o.alert_params.tick_s),
            "--group-wait",
            o.alert_params.group_wait,
            "--group-interval",
            o.alert_params.group_interval,
            "--max-wait-s",
            str(o.alert_params.max_wait_s),
            "--metric",
            PROM_METRIC,
            "--stream",
            o.alert_params.stream,
            "--visibility-poll-ms",
            str(o.alert_params.visibility_poll_ms),
        ]
        super().start(command, env, pipe)


class AlertYakPanel(YakPanel):
    def __init__(self, root: Path, params: Params, webhook_url: str) -> None:
        super().__init__(
            root, ingest_params(["--agents", "1", "--series", "1", "--generators", "1"])
        )
        self.alert_params = params
        self.webhook_url = webhook_url
        self.aggregator = _WorkerProc(self)


def otlp_request(agent: int, server_id: str, n: int) -> Template:
    points = [_number_point([("series", series_name(i))], None, i) for i in range(n)]
    metric = _otlp_metric(METRIC, False, points, 0)
    scope = field_message(2, [*field_message(1, field_string(1, "bench")), *metric])
    return Template(field_message(1, [*_resource(agent, server_id), *scope]))


def run_yakpanel(params: Params, root: Path, receiver: Receiver) -> dict[str, Any]:
    import grpc

    path = "/yakpanel"
    system = AlertYakPanel(root, params, f"json://127.0.0.1:{receiver.port}{path}")
    errors: dict[str, int] = {}
    try:
        started = time.monotonic()
        system.start()
        startup_s = time.monotonic() - started
        (agent,) = system.agents
        template = otlp_request(agent.index, agent.server_id, params.series)
        creds = grpc.ssl_channel_credentials(system.ca_pem(), agent.key_pem, agent.cert_pem)
        with grpc.secure_channel(system.target(), creds) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            call = channel.unary_unary(EXPORT_METHOD, None, None)  # bytes in, bytes out

            def send(values: list[float], ts_ms: int) -> None:
                # As an agent does: a refused export is retried (t0 is the final ack).
                body = template.render(otlp_ts(ts_ms), struct.pack(f"<{len(values)}d", *values))
                give_up = time.monotonic() + 10
                while True:
                    try:
                        call(body, timeout=30)
                        break
                    except grpc.RpcError as exc:
                        code, detail = exc.code(), exc.details()
                        errors[f"{code.name}: {detail}"] = (
                            errors.get(f"{code.name}: {detail}", 0) + 1
                        )
                        system.check()
                        if time.monotonic() > give_up:
                            raise
                        time.sleep(0.1)
                system.check()

            result = run_waves(params, send, receiver, path)
    finally:
        system.stop()
    fields = latency_fields(params, result, receiver, path)
    visible = (system.final.get("visibility") or {}).get("visible", {})
    # ack -> the crossing sample returned by a chDB query (polled every 100 ms, same process
    # as the aggregator and the alerting service).
    ingest = [visible[s] - t for s, t in result["t0_wall"].items() if s in visible]
    fields["breakdown"]["ack_to_queryable_s"] = _quantiles(ingest)
    return {
        **fields,
        "startup_s": round(startup_s, 1),
        "export_errors": errors,
        "visibility_polls": (system.final.get("visibility") or {}).get("visibility_polls"),
        "pipeline": (
            "OTLP/gRPC mTLS (enrolled agent) -> gateway -> Tansu yak.metrics.v1 -> "
            "alerting service's stream reader -> hot window (rules evaluated on ingest via "
            "the query layer, state in PostgreSQL) -> dispatcher -> json:// webhook; "
            "aggregator -> chDB alongside (warm-up, ClickHouse fallback)"
            if params.stream != "off"
            else "OTLP/gRPC mTLS (enrolled agent) -> gateway -> Tansu yak.metrics.v1 -> "
            "aggregator -> chDB -> alerting service (rules via the query layer, state in "
            "PostgreSQL) -> dispatcher -> json:// webhook"
        ),
        "t0": "gateway's Export reply",
        "settings": system.final.get("aggregator_config"),
        "alerting_stats": system.final.get("alerting_stats"),
        "worker_stalls": system.final.get("stalls"),
        "aggregator_stats": system.final.get("aggregator_stats"),
    }


# --- Prometheus + Alertmanager ------------------------------------------------------------


def _wait_ready(proc: Proc, url: str, timeout_s: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2) as web:
        while True:
            proc.check()
            with contextlib.suppress(httpx.HTTPError):
                if web.get(url).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{proc.name} not ready in {timeout_s:g} s:\n{tail(proc.log_path)}"
                )
            time.sleep(0.1)


def run_prometheus(params: Params, root: Path, receiver: Receiver) -> dict[str, Any]:
    import cramjam
    import httpx

    path = "/prometheus"
    root.mkdir(parents=True, exist_ok=True)
    am_port, prom_port = free_port(), free_port()
    (root / "alertmanager.yml").write_text(
        json.dumps(
            {
                "route": {
                    "receiver": "bench",
                    "group_by": ["alertname", "series"],
                    "group_wait": params.group_wait,
                    "group_interval": params.group_interval,
                    "repeat_interval": "1h",
                },
                "receivers": [
                    {
                        "name": "bench",
                        "webhook_configs": [
                            {
                                "url": f"http://127.0.0.1:{receiver.port}{path}",
                                "send_resolved": False,
                            }
                        ],
                    }
                ],
            }
        )
    )
    (root / "rules.yml").write_text(rules_yaml(EXPR, params.eval_interval, yakpanel=False))
    (root / "prometheus.yml").write_text(
        json.dumps(
            {
                "global": {"evaluation_interval": params.eval_interval},
                "rule_files": [str(root / "rules.yml")],
                "alerting": {
                    "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]
                },
            }
        )
    )
    am_cmd = [
        ALERTMANAGER,
        f"--config.file={root / 'alertmanager.yml'}",
        f"--storage.path={root / 'am'}",
        f"--web.listen-address=127.0.0.1:{am_port}",
        "--cluster.listen-address=",
        "--log.level=warn",
    ]
    prom_cmd = [
        PROMETHEUS,
        f"--config.file={root / 'prometheus.yml'}",
        f"--storage.tsdb.path={root / 'data'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        "--web.enable-remote-write-receiver",
        f"--rules.alert.resend-delay={params.eval_interval}",
        "--log.level=warn",
    ]
    am, prom = Proc("alertmanager", root / "am.log"), Proc("prometheus", root / "prom.log")
    server_id = str(uuid.uuid4())
    labels_base = {
        "__name__": PROM_METRIC,
        "host_name": "bench-0000",
        "service_name": SERVICE_NAME,
        "server_id": server_id,
    }
    pieces = []
    for i in range(params.series):
        labels = sorted({**labels_base, "series": series_name(i)}.items())
        pieces += _timeseries(labels, i)
    template = Template(pieces)
    headers = {
        "Content-Type": "application/x-protobuf",
        "Content-Encoding": "snappy",
        "X-Prometheus-Remote-Write-Version": "0.1.0",
        "User-Agent": "yakpanel-bench",
    }
    try:
        started = time.monotonic()
        am.start(am_cmd)
        _wait_ready(am, f"http://127.0.0.1:{am_port}/-/ready")
        prom.start(prom_cmd)
        _wait_ready(prom, f"http://127.0.0.1:{prom_port}/-/ready")
        deadline = time.monotonic() + 30
        with httpx.Client(timeout=2) as web:
            while not web.get(f"http://127.0.0.1:{prom_port}/api/v1/alertmanagers").json()["data"][
                "activeAlertmanagers"
            ]:
                if time.monotonic() > deadline:
                    raise RuntimeError("Prometheus found no Alertmanager in 30 s")
                time.sleep(0.1)
        startup_s = time.monotonic() - started
        conn = http.client.HTTPConnection("127.0.0.1", prom_port, timeout=30)

        def send(values: list[float], ts_ms: int) -> None:
            raw = template.render(remote_write_ts(ts_ms), struct.pack(f"<{len(values)}d", *values))
            conn.request(
                "POST",
                "/api/v1/write",
                body=bytes(cramjam.snappy.compress_raw(raw)),
                headers=headers,
            )
            response = conn.getresponse()
            detail = response.read()
            if not 200 <= response.status < 300:
                raise RuntimeError(f"remote write: HTTP {response.status}: {detail[:300]!r}")
            prom.check()
            am.check()

        try:
            result = run_waves(params, send, receiver, path)
        finally:
            conn.close()
    finally:
        prom.stop()
        am.stop()
    return {
        **latency_fields(params, result, receiver, path),
        "startup_s": round(startup_s, 1),
        "versions": {
            "prometheus": deb_version("prometheus"),
            "alertmanager": deb_version("prometheus-alertmanager"),
        },
        "pipeline": "remote write 1.0 -> prometheus (rule evaluation) -> notifier -> "
        "alertmanager (cluster off) -> webhook",
        "t0": "remote write HTTP 204",
        "commands": {"prometheus": prom_cmd, "alertmanager": am_cmd},
        "settings": {
            "evaluation_interval": params.eval_interval,
            "rules.alert.resend-delay": params.eval_interval,
        },
    }


# --- main ---------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def main(argv: list[str] | None = None) -> None:
    params = parse_args(argv)
    if "prometheus" in params.systems:
        missing = [
            f"{binary} (Debian {package})"
            for binary, package in (
                (PROMETHEUS, "prometheus"),
                (ALERTMANAGER, "prometheus-alertmanager"),
            )
            if not os.access(binary, os.X_OK)
        ]
        if missing:
            fail(
                "bench.alert_latency needs its peer, missing: "
                + ", ".join(missing)
                + ". Install with `make bench-deps` (apt-get install prometheus "
                "prometheus-alertmanager)."
            )
    receiver = Receiver()
    receiver.start()
    results: dict[str, dict[str, Any]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="yak-alert-bench-") as tmp:
            for name in params.systems:
                run = run_yakpanel if name == "yakpanel" else run_prometheus
                results[name] = run(params, Path(tmp) / name, receiver)
                emit(f"alert_latency.{name}", **{**params.fields(), **results[name]})
    finally:
        receiver.stop()
    yak, prom = results.get("yakpanel"), results.get("prometheus")
    summary: dict[str, Any] = {
        **params.fields(),
        "systems": list(results),
        "receiver_errors": receiver.errors[:5],
    }
    for name, r in results.items():
        summary[name] = {
            k: r[k]
            for k in ("p50_s", "p90_s", "p99_s", "max_s", "notified", "missing_notifications")
        }
    if yak is not None and prom is not None:
        summary["ratio_yakpanel_to_prometheus"] = {
            q: _ratio(yak[q], prom[q]) for q in ("p50_s", "p90_s", "p99_s", "max_s")
        }
    if yak is not None:
        p99 = yak["p99_s"]
        ratio = summary.get("ratio_yakpanel_to_prometheus", {}).get("p99_s")
        summary["targets"] = {
            "p99_s_max": TARGET_P99_S,
            "ratio_p99_max": TARGET_RATIO,
            "p99_met": p99 is not None
            and p99 <= TARGET_P99_S
            and yak["missing_notifications"] == 0,
            "ratio_met": ratio is not None and ratio <= TARGET_RATIO,
        }
    emit("alert_latency.summary", **summary)
    if any(r["notified"] == 0 for r in results.values()):
        fail("bench.alert_latency: a system sent no notification")


if __name__ == "__main__":
    main(sys.argv[1:])
