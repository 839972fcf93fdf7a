"""Metric ingest: YakPanel end to end against VictoriaMetrics 1.79 and Prometheus 2.42.

YakPanel (real components, temp dirs, loopback, each in its own process): embedded
PostgreSQL with every migration, the Tansu broker, the control-plane API
(`yakpanel serve api`), the gateway (`yakpanel serve gateway`) and the aggregator writing
to chDB. N agents are enrolled through the gateway (one client certificate each); load
generator processes then send OTLP `MetricsService/Export` requests with those
certificates, one request in flight per agent, as an OpenTelemetry exporter does. A sample
counts as committed when its row is in ClickHouse `samples_raw` (the aggregator writes
the batch's rollup rows in the same step, before committing the Kafka offsets).

Peers: `victoria-metrics` and `prometheus --web.enable-remote-write-receiver` (Debian
packages) get exactly the same samples — same series and labels as YakPanel stores them,
same timestamps and values, same rounds, same number of agents and connections — as
Prometheus remote write (protobuf + snappy). Committed = VictoriaMetrics'
`vm_rows_added_to_storage_total`, Prometheus' `prometheus_tsdb_head_samples_appended_total`;
after the run every system is asked how many samples it can return, which must equal
what was acknowledged.

Each system runs, with the same load generator processes:
0. warm-up: `--warmup-s` at `--warmup-rate` (the first round mints every series), then
   up to `--steady-wait-s` until what it queued is committed;
1. saturation (`--measure-s`): every agent sends its next request as soon as the previous
   one is acknowledged, but a pipeline that queues (YakPanel: Kafka between gateway and
   aggregator) is held at most `--max-lag-s` behind: the senders pause while the oldest
   uncommitted sample is older than that or the backlog would take longer than that to
   commit. The rate is what was committed in the window; for YakPanel it is the rate at
   which the aggregator works through a backlog of up to `--max-lag-s`;
2. fixed rate (`--fixed-s`, open loop): every system gets the same offered load
   (`--fixed-fraction` of YakPanel's saturation rate, or `--fixed-rate`), starting from an
   empty backlog. `kept_up` says whether it committed it with bounded latency; if not, the
   committed rate is its steady-state capacity (batches of steady-state size).
Latency: every agent adds a marker sample (its own series) to a request about once per
`--marker-interval-s`; its send time is taken just before the request goes out, and it
is queryable when a query polling every `--poll-ms` first returns it (ClickHouse
`samples_raw`; PromQL `bench_marker[120s]` on the peers). Peak RSS and CPU per process
are sampled with psutil every 250 ms. `--profile-dir` records py-spy profiles of the
gateway and the aggregator during YakPanel's saturation window.

JSON lines: `ingest.yakpanel`, `ingest.victoriametrics`, `ingest.prometheus`,
`ingest.summary` (ratios YakPanel / peer).
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import base64
import collections
import contextlib
import ctypes
import json
import multiprocessing
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from bench._common import emit, fail, percentile
from bench._ingest_wire import MARKER_METRIC, SeriesModel
from bench._ingest_workers import IDLE, RUN, STOP, AgentSpec, Control, LoadSpec, load_generator

REPO = Path(__file__).resolve().parent.parent
VICTORIA_METRICS = "/usr/bin/victoria-metrics"
PROMETHEUS = "/usr/bin/prometheus"
TARGET_SAMPLES_PER_S = 250_000
TARGET_AGGREGATOR_RSS_MIB = 1024
STAFF_EMAIL = "bench@yakpanel.test"
STAFF_PASSWORD = "bench-staff-password-123"  # noqa: S105 - a throwaway stack in a temp dir
OWNER_PASSWORD = "bench-owner-password-123"  # noqa: S105
MARKER_QUERY_WINDOW_S = 120
SYSTEMS = ("yakpanel", "victoriametrics", "prometheus")


@dataclass
class Params:
    agents: int
    series: int
    metrics: int
    batch: int
    generators: int
    warmup_s: float
    measure_s: float
    settle_s: float
    fixed_s: float
    fixed_fraction: float
    fixed_rate: float | None
    max_lag_s: float
    marker_interval_s: float
    poll_ms: float
    drain_s: float
    steady_wait_s: float
    aggregator_max_wait_s: float | None
    warmup_rate: float
    systems: tuple[str, ...]
    profile_dir: Path | None

    @property
    def model(self) -> SeriesModel:
        return SeriesModel(self.agents, self.series, self.metrics, self.batch)

    def fields(self) -> dict[str, Any]:
        return {
            "agents": self.agents,
            "series": self.series,
            "marker_series": self.agents,
            "series_per_agent": self.series // self.agents,
            "metrics_per_agent": self.metrics,
            "batch_points": self.batch,
            "requests_per_round_per_agent": len(self.model.chunks(0)),
            "in_flight_per_agent": 1,
            "load_generators": self.generators,
            "warmup_s": self.warmup_s,
            "warmup_samples_per_s": self.warmup_rate,
            "steady_wait_s": self.steady_wait_s,
            "measure_s": self.measure_s,
            "fixed_s": self.fixed_s,
            "max_lag_s": self.max_lag_s,
            "marker_interval_s": self.marker_interval_s,
            "poll_ms": self.poll_ms,
        }


def parse_args(argv: list[str] | None) -> Params:
    p = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n")[0])
    p.add_argument("--agents", type=int, default=50, help="simulated agents (certificates)")
    p.add_argument("--series", type=int, default=100_000, help="active series over all agents")
    p.add_argument("--metrics", type=int, default=10, help="metric names per agent")
    p.add_argument("--batch", type=int, default=2000, help="data points per request")
    p.add_argument("--generators", type=int, default=2, help="load generator processes")
    p.add_argument("--warmup-s", type=float, default=10.0)
    p.add_argument(
        "--warmup-rate",
        type=float,
        default=25_000.0,
        help="samples/s offered during the warm-up (0: as fast as acknowledged)",
    )
    p.add_argument("--measure-s", type=float, default=20.0, help="saturation window")
    p.add_argument("--settle-s", type=float, default=4.0, help="before the fixed-rate window")
    p.add_argument("--fixed-s", type=float, default=15.0, help="fixed-rate window (0: skip)")
    p.add_argument(
        "--fixed-fraction",
        type=float,
        default=0.5,
        help="fixed rate as a fraction of YakPanel's sustained rate",
    )
    p.add_argument("--fixed-rate", type=float, default=None, help="fixed rate, samples/s")
    p.add_argument("--max-lag-s", type=float, default=10.0, help="staleness bound at saturation")
    p.add_argument("--marker-interval-s", type=float, default=1.0)
    p.add_argument("--poll-ms", type=float, default=250.0, help="visibility poll interval")
    p.add_argument(
        "--steady-wait-s",
        type=float,
        default=30.0,
        help="after the warm-up (and before the fixed rate), wait at most this long for the "
        "backlog to be committed",
    )
    p.add_argument("--drain-s", type=float, default=30.0, help="wait for the backlog at the end")
    p.add_argument(
        "--aggregator-max-wait-s",
        type=float,
        default=None,
        help="the aggregator's batch age limit (setting aggregator_max_wait_s; default: "
        "the product default)",
    )
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {','.join(SYSTEMS)} (in this order)",
    )
    p.add_argument(
        "--profile-dir",
        type=Path,
        default=None,
        help="record py-spy profiles (raw stacks) of the gateway and the aggregator "
        "during YakPanel's saturation window into this folder",
    )
    a = p.parse_args(argv)
    systems = tuple(s.strip() for s in a.systems.split(",") if s.strip())
    if not systems or any(s not in SYSTEMS for s in systems):
        p.error(f"--systems takes names from {', '.join(SYSTEMS)}")
    if a.agents < 1 or a.series < a.agents or a.batch < 1 or a.metrics < 1:
        p.error("need --agents >= 1, --series >= --agents, --batch >= 1, --metrics >= 1")
    if a.generators < 1 or a.generators > a.agents:
        p.error("--generators must be between 1 and --agents")
    if (
        min(a.warmup_s, a.settle_s, a.fixed_s, a.steady_wait_s, a.drain_s, a.warmup_rate) < 0
        or a.measure_s <= 0
        or a.max_lag_s <= 0
        or (a.aggregator_max_wait_s is not None and a.aggregator_max_wait_s <= 0)
    ):
        p.error("durations must be >= 0 (--measure-s, --max-lag-s > 0)")
    if a.marker_interval_s <= 0 or a.poll_ms <= 0 or not 0 < a.fixed_fraction <= 1:
        p.error("--marker-interval-s and --poll-ms must be > 0, --fixed-fraction in (0, 1]")
    ordered = tuple(s for s in SYSTEMS if s in systems)
    return Params(
        a.agents,
        a.series,
        a.metrics,
        a.batch,
        a.generators,
        a.warmup_s,
        a.measure_s,
        a.settle_s,
        a.fixed_s,
        a.fixed_fraction,
        a.fixed_rate,
        a.max_lag_s,
        a.marker_interval_s,
        a.poll_ms,
        a.drain_s,
        a.steady_wait_s,
        a.aggregator_max_wait_s,
        a.warmup_rate,
        ordered,
        a.profile_dir,
    )


# --- processes ------------------------------------------------------------------------------


def _die_with_parent() -> None:
    # Between fork and exec: if this benchmark dies, even by SIGKILL, the child gets SIGTERM.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Proc:
    """A child process with its output in a log file (or stdout piped to the caller)."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, cmd: list[str], env: dict[str, str] | None = None, pipe: bool = False) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                env=env,
                stdin=subprocess.PIPE if pipe else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipe else log,
                stderr=log,
                preexec_fn=_die_with_parent,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode}:\n{tail(self.log_path)}"
            )

    def wait_port(self, port: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not port_open(port):
            self.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not listen in {timeout_s:g} s")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# --- measurement ------------------------------------------------------------------------------


class Progress:
    """What the system reports: committed samples and when each marker became visible."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.committed = 0
        self.polls = 0
        self.seen: dict[int, float] = {}
        self.error = ""

    def update(self, at: float, committed: int, markers: list[int]) -> None:
        with self.lock:
            self.committed = max(self.committed, committed)
            self.polls += 1
            for marker in markers:
                self.seen.setdefault(marker, at)


class Monitor(threading.Thread):
    """Peak RSS of every service (a service may be a process tree) and CPU snapshots."""

    def __init__(self, interval_s: float = 0.25) -> None:
        super().__init__(daemon=True, name="bench-monitor")
        self.interval_s = interval_s
        self.roots: dict[str, list[int]] = {}
        self.tree: set[str] = set()
        self.peak: dict[str, int] = {}
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def add(self, name: str, pids: list[int], tree: bool = False) -> None:
        with self._lock:
            self.roots[name] = pids
            if tree:
                self.tree.add(name)

    def _procs(self, name: str) -> list[Any]:
        import psutil

        out = []
        for pid in self.roots.get(name, []):
            try:
                proc = psutil.Process(pid)
                out.append(proc)
                if name in self.tree:
                    out.extend(proc.children(recursive=True))
            except psutil.Error:
                continue
        return out

    def _rss(self, name: str) -> int:
        import psutil

        total = 0
        for proc in self._procs(name):
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def cpu(self) -> dict[str, float]:
        """CPU seconds (user + system) used so far by each service."""
        import psutil

        with self._lock:
            names = list(self.roots)
        out: dict[str, float] = {}
        for name in names:
            total = 0.0
            for proc in self._procs(name):
                with contextlib.suppress(psutil.Error):
                    t = proc.cpu_times()
                    total += t.user + t.system
            out[name] = total
        return out

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval_s)

    def sample(self) -> None:
        with self._lock:
            names = list(self.roots)
        for name in names:
            rss = self._rss(name)
            if rss > self.peak.get(name, 0):
                self.peak[name] = rss

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.sample()

    def peaks_mib(self) -> dict[str, float]:
        return {k: round(v / 2**20, 1) for k, v in self.peak.items()}


class Gate(threading.Thread):
    """Keeps the senders at most `max_lag_s` ahead of what is committed: pauses them while
    the oldest acknowledged-but-uncommitted sample is older than that, or while the
    backlog would take longer than that to commit at the recent commit rate; resumes
    below half of both. `hold()` pauses them regardless, `open()` stops gating (open-loop
    load: a backlog then shows as latency)."""

    def __init__(self, ctl: Control, progress: Progress, max_lag_s: float, tick_s: float) -> None:
        super().__init__(daemon=True, name="bench-gate")
        self.ctl = ctl
        self.progress = progress
        self.max_lag_s = max_lag_s
        self.tick_s = tick_s
        self.paused_s = 0.0
        self.staleness_s = 0.0
        self.max_staleness_s = 0.0
        self._history: collections.deque[tuple[float, int]] = collections.deque()
        self._commits: collections.deque[tuple[float, int]] = collections.deque()
        self._halt = threading.Event()
        self.mode = "gate"  # or "hold", "open"

    def hold(self) -> None:
        self.mode = "hold"
        self.ctl.paused.value = 1

    def open(self) -> None:
        self.mode = "open"
        self.ctl.paused.value = 0

    def acked(self) -> int:
        return int(sum(self.ctl.acked))

    def run(self) -> None:
        last = time.monotonic()
        while not self._halt.wait(self.tick_s):
            now = time.monotonic()
            if self.ctl.paused.value:
                self.paused_s += now - last
            last = now
            acked = self.acked()
            with self.progress.lock:
                committed = self.progress.committed
            history = self._history
            if not history or history[-1][1] != acked:
                history.append((now, acked))
            while history and history[0][1] <= committed:
                history.popleft()
            staleness = now - history[0][0] if history else 0.0
            self.staleness_s = staleness
            self.max_staleness_s = max(self.max_staleness_s, staleness)
            # Commit rate over the last 3 s (at least 1000 samples/s, not to divide by ~0).
            commits = self._commits
            commits.append((now, committed))
            while len(commits) > 2 and now - commits[0][0] > 3.0:
                commits.popleft()
            span = now - commits[0][0]
            rate = (committed - commits[0][1]) / span if span > 0.5 else 0.0
            drain_s = max(0, acked - committed) / max(rate, 1000.0)
            lag = max(staleness, drain_s)
            if self.mode != "gate":
                continue
            if lag > self.max_lag_s:
                self.ctl.paused.value = 1
            elif lag < self.max_lag_s / 2:
                self.ctl.paused.value = 0

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.ctl.paused.value = 0


@dataclass
class Snapshot:
    at: float  # time.time()
    committed: int
    acked: int
    requests: int
    cpu: dict[str, float]


def latency_fields(latencies_ms: list[float], sent: int) -> dict[str, Any]:
    if not latencies_ms:
        return {"markers": sent, "visible": 0}
    return {
        "markers": sent,
        "visible": len(latencies_ms),
        "p50_ms": round(percentile(latencies_ms, 50), 1),
        "p90_ms": round(percentile(latencies_ms, 90), 1),
        "p99_ms": round(percentile(latencies_ms, 99), 1),
        "max_ms": round(max(latencies_ms), 1),
    }


class System(abc.ABC):
    """One system under test: started, fed through `load_specs`, observed, stopped."""

    name = ""
    protocol = ""

    def __init__(self, root: Path, params: Params) -> None:
        self.root = root
        self.params = params
        self.progress = Progress()
        self.monitor = Monitor()

    @abc.abstractmethod
    def start(self) -> None:
        """Overridden by each system."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Overridden by each system."""

    @abc.abstractmethod
    def target(self) -> str:
        """Overridden by each system."""

    @abc.abstractmethod
    def agent_specs(self) -> list[AgentSpec]:
        """Overridden by each system."""

    def ca_pem(self) -> bytes:
        return b""

    def check(self) -> None:
        """Raise if a service died (an optional hook: nothing to check by default)."""
        return None

    @abc.abstractmethod
    def queryable_total(self, horizon_s: float) -> int:
        """Overridden by each system."""

    def extra(self) -> dict[str, Any]:
        return {}

    def on_measure_start(self) -> None:
        """Called when the saturation window opens (an optional hook)."""
        return None


def run_load(system: System, params: Params, fixed_rate: float | None) -> dict[str, Any]:
    """Drive the system through both phases and measure; returns the JSON fields."""
    ctx = multiprocessing.get_context("spawn")
    g = params.generators
    ctl = Control(
        ctx.RawValue("i", IDLE),
        ctx.RawValue("i", 0),
        ctx.RawValue("d", 0.0),
        ctx.RawArray("i", g),
        ctx.RawArray("q", g),
        ctx.RawArray("q", g),
        ctx.RawArray("q", g),
    )
    agents = system.agent_specs()
    results = [system.root / f"loadgen-{i}.json" for i in range(g)]
    start_ns = time.time_ns()
    procs = []
    for slot in range(g):
        spec = LoadSpec(
            system.protocol,
            system.target(),
            params.model,
            agents[slot::g],
            slot,
            str(results[slot]),
            params.marker_interval_s,
            start_ns,
            system.ca_pem(),
        )
        proc = ctx.Process(target=load_generator, args=(spec, ctl), name=f"loadgen-{slot}")
        proc.start()
        procs.append(proc)
    monitor = system.monitor
    monitor.add("load_generators", [p.pid for p in procs if p.pid is not None])
    deadline = time.monotonic() + 120
    while not all(ctl.ready):
        if any(p.exitcode is not None for p in procs):
            raise RuntimeError(f"a load generator exited early: {_loadgen_errors(results)}")
        if time.monotonic() > deadline:
            raise RuntimeError("the load generators were not ready in 120 s")
        time.sleep(0.05)

    gate = Gate(ctl, system.progress, params.max_lag_s, params.poll_ms / 1000)

    def snapshot() -> Snapshot:
        system.check()
        with system.progress.lock:
            committed = system.progress.committed
        return Snapshot(time.time(), committed, gate.acked(), int(sum(ctl.requests)), monitor.cpu())

    def rates(a: Snapshot, b: Snapshot) -> dict[str, Any]:
        wall = b.at - a.at
        return {
            "seconds": round(wall, 2),
            "committed_samples": b.committed - a.committed,
            "samples_per_s": round((b.committed - a.committed) / wall),
            "acked_samples_per_s": round((b.acked - a.acked) / wall),
            "requests_per_s": round((b.requests - a.requests) / wall, 1),
            "cpu_cores": {
                k: round((b.cpu.get(k, 0.0) - a.cpu.get(k, 0.0)) / wall, 2) for k in b.cpu
            },
        }

    load_before = round(os.getloadavg()[0], 2)
    gate.start()
    # Warm-up at a modest fixed rate: the first round mints every series, which costs far
    # more than the rounds after, and a flood on top of it would only build a backlog.
    ctl.agent_rate.value = params.warmup_rate / params.agents
    ctl.state.value = RUN
    started = time.time()
    fixed: dict[str, Any] | None = None
    offered = 0.0
    try:
        _sleep_checked(system, procs, params.warmup_s)
        ctl.agent_rate.value = 0.0  # saturation
        # Steady state before measuring: what the warm-up queued is committed.
        deadline = time.monotonic() + params.steady_wait_s
        while time.monotonic() < deadline and (
            ctl.paused.value or gate.staleness_s > params.max_lag_s / 2
        ):
            _sleep_checked(system, procs, 0.1)
        warmed_s = time.time() - started
        s0 = snapshot()
        paused0 = gate.paused_s
        system.on_measure_start()
        _sleep_checked(system, procs, params.measure_s)
        s1 = snapshot()
        saturation = rates(s0, s1)
        saturation["paused_fraction"] = round((gate.paused_s - paused0) / (s1.at - s0.at), 3)
        if params.fixed_s > 0:
            offered = fixed_rate or params.fixed_fraction * saturation["samples_per_s"]
            # The saturation backlog first: latency at the fixed rate starts from empty.
            gate.hold()
            time.sleep(0.5)  # requests in flight are acknowledged
            backlog_end = gate.acked()
            deadline = time.monotonic() + params.steady_wait_s
            while system.progress.committed < backlog_end and time.monotonic() < deadline:
                _sleep_checked(system, procs, 0.1)
            backlog_left = max(0, backlog_end - system.progress.committed)
            # Open loop from here: the offered load is sent whether or not it keeps up.
            ctl.agent_rate.value = offered / params.agents
            gate.open()
            _sleep_checked(system, procs, params.settle_s)
            f0 = snapshot()
            _sleep_checked(system, procs, params.fixed_s)
            f1 = snapshot()
            fixed = {
                "offered_samples_per_s": round(offered),
                "backlog_left_at_start": backlog_left,
                **rates(f0, f1),
            }
    finally:
        ctl.state.value = STOP
        for proc in procs:
            proc.join(90)
            if proc.exitcode is None:
                proc.terminate()
                proc.join(10)
        gate.stop()
    acked = gate.acked()
    stopped = time.time()
    drain_deadline = time.monotonic() + params.drain_s
    while True:
        with system.progress.lock:
            committed = system.progress.committed
        if committed >= acked or time.monotonic() > drain_deadline:
            break
        system.check()
        time.sleep(0.1)
    drained_s = time.time() - stopped
    # Markers still in flight at the stop get the poller's last chance.
    time.sleep(3 * params.poll_ms / 1000)

    markers: list[tuple[int, float, float]] = []
    errors: dict[str, int] = {}
    last_error = ""
    for path in results:
        data = json.loads(path.read_text())
        markers += [tuple(m) for m in data["markers"]]
        for k, v in data["errors"].items():
            errors[k] = errors.get(k, 0) + v
        last_error = data["last_error"] or last_error
    with system.progress.lock:
        seen = dict(system.progress.seen)

    def latencies(a: float, b: float) -> dict[str, Any]:
        window = [m for m in markers if a <= m[1] < b]
        values = [(seen[i] - sent) * 1000 for i, sent, _ in window if i in seen]
        return latency_fields(values, len(window))

    saturation["latency"] = latencies(s0.at, s1.at)
    if fixed is not None:
        fixed["latency"] = latencies(f0.at, f1.at)
        # Kept up: the offered load went out (rounds are whole, so a window sees +-1 round
        # of some agents: 90 %), every marker became visible, and p99 stays under half the
        # lag bound: a system falling behind shows latency growing past it. (The commit
        # counters move in steps, VictoriaMetrics' about once a second: the window's
        # committed rate is not precise enough to judge by.)
        p99 = fixed["latency"].get("p99_ms")
        fixed["kept_up"] = (
            fixed["acked_samples_per_s"] >= 0.9 * fixed["offered_samples_per_s"]
            and p99 is not None
            and p99 <= params.max_lag_s * 500
            and fixed["latency"]["visible"] == fixed["latency"]["markers"]
        )
    # What a query returns may trail the commit counters briefly (VictoriaMetrics makes
    # buffered rows searchable about once a second): ask again for up to 15 s.
    deadline = time.monotonic() + 15
    while True:
        queryable = system.queryable_total(time.time() - started + 60)
        if queryable >= acked or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    out: dict[str, Any] = {
        "load_1m_before": load_before,
        "warmup_until_steady_s": round(warmed_s, 1),
        "saturation": saturation,
        "fixed_rate": fixed,
        "acked_samples_total": acked,
        "queryable_samples_total": queryable,
        "all_acked_queryable": queryable == acked,
        "drain_s": round(drained_s, 2),
        "markers_never_visible": sum(1 for m in markers if m[0] not in seen),
        "gate_max_staleness_s": round(gate.max_staleness_s, 2),
        "send_errors": errors,
    }
    if errors:
        out["last_send_error"] = last_error
    return out


def _sleep_checked(system: System, procs: list[Any], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        system.check()
        if any(p.exitcode is not None for p in procs):
            raise RuntimeError("a load generator exited during the run")
        time.sleep(min(0.5, left))


def _loadgen_errors(paths: list[Path]) -> str:
    out = []
    for path in paths:
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(path.read_text())["last_error"])
    return "; ".join(e for e in out if e) or "(no detail)"


# --- YakPanel ---------------------------------------------------------------------------------


class YakPanel(System):
    name = "yakpanel"
    protocol = "otlp"

    def __init__(self, root: Path, params: Params) -> None:
        super().__init__(root, params)
        self.pg: Any = None
        self.broker: Any = None
        self.api = Proc("api", root / "api.log")
        self.gateway = Proc("gateway", root / "gateway.log")
        self.aggregator = Proc("aggregator", root / "aggregator.log")
        self.gateway_port = 0
        self.tenant_id = ""
        self.agents: list[AgentSpec] = []
        self._ca = b""
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()
        self.final: dict[str, Any] = {}
        self.max_new_series = max(100_000, 2 * (params.series + params.agents))
        self._profilers: list[subprocess.Popen[bytes]] = []

    def env(self, dsn: str, bootstrap: str, api_port: int, gateway_port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("YAKPANEL_")}
        env.pop("GRPC_ENABLE_FORK_SUPPORT", None)
        env.update(
            {
                "YAKPANEL_STATE_DIR": str(self.root / "state"),
                "YAKPANEL_POSTGRES_DSN": dsn,
                "YAKPANEL_KAFKA_BOOTSTRAP": bootstrap,
                # Neither the API nor the gateway reads ClickHouse here; the chDB path
                # belongs to the aggregator process.
                "YAKPANEL_CLICKHOUSE_DSN": "http://127.0.0.1:9",
                "YAKPANEL_MASTER_KEY": base64.b64encode(self._master_key).decode(),
                "YAKPANEL_INTERNAL_TOKEN": self._internal_token,
                "YAKPANEL_API_PORT": str(api_port),
                "YAKPANEL_CONTROLPLANE_URL": f"http://127.0.0.1:{api_port}",
                "YAKPANEL_GATEWAY_PORT": str(gateway_port),
                "YAKPANEL_GATEWAY_ENROLL_PORT": str(free_port()),
                "YAKPANEL_OTLP_MAX_NEW_SERIES_PER_HOUR": str(self.max_new_series),
                "YAKPANEL_LOG_LEVEL": "WARNING",
            }
        )
        return env

    def start(self) -> None:
        import psycopg
        from psycopg.conninfo import make_conninfo

        from controlplane.access.permissions import STAFF_PERMISSIONS
        from controlplane.passwords import hash_password
        from yakpanel.embedded import EmbeddedBroker, EmbeddedPostgres
        from yakpanel.ids import new_id
        from yakpanel.migrations import POSTGRES_SOURCES, PostgresMigrator
        from yakpanel.topics import ensure_topics

        self._master_key = secrets.token_bytes(32)
        self._internal_token = secrets.token_urlsafe(32)
        self.pg = EmbeddedPostgres(self.root / "pg" / "data")
        self.pg.start()
        with psycopg.connect(self.pg.dsn, autocommit=True) as conn:
            conn.execute("CREATE DATABASE yakpanel")
        dsn = make_conninfo(self.pg.dsn, dbname="yakpanel")
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrator = PostgresMigrator(conn)
            migrator.lock()
            try:
                migrator.apply([m for s in POSTGRES_SOURCES for m in s.load()])
            finally:
                migrator.unlock()
            conn.execute(
                "INSERT INTO platform_staff (id, email, password_hash, permissions)"
                " VALUES (%s, %s, %s, %s)",
                (new_id(), STAFF_EMAIL, hash_password(STAFF_PASSWORD), sorted(STAFF_PERMISSIONS)),
            )
        self.monitor.add("postgres", [self.pg.pid], tree=True)
        self.broker = EmbeddedBroker(free_port(), log_path=self.root / "broker.log")
        self.broker.start()
        asyncio.run(ensure_topics(self.broker.bootstrap, ""))
        self.monitor.add("broker", [self.broker.pid])

        api_port = free_port()
        self.gateway_port = free_port()
        env = self.env(dsn, self.broker.bootstrap, api_port, self.gateway_port)
        yakpanel = [sys.executable, "-m", "yakpanel"]
        self.api.start([*yakpanel, "serve", "api"], env)
        self.monitor.add("api", [self.api.pid])
        self.api.wait_port(api_port)
        api_url = f"http://127.0.0.1:{api_port}"
        server_ids, tokens = asyncio.run(self._tenant(api_url))

        self.aggregator.start(
            [
                sys.executable,
                "-m",
                "bench._ingest_workers",
                "aggregator",
                "--ch-path",
                str(self.root / "ch"),
                "--database",
                "bench",
                "--bootstrap",
                self.broker.bootstrap,
                "--tenant",
                self.tenant_id,
                "--agents",
                str(self.params.agents),
                "--poll-ms",
                str(self.params.poll_ms),
                "--marker-window-s",
                str(MARKER_QUERY_WINDOW_S),
                *(
                    ["--max-wait-s", str(self.params.aggregator_max_wait_s)]
                    if self.params.aggregator_max_wait_s is not None
                    else []
                ),
            ],
            {k: v for k, v in os.environ.items() if not k.startswith("YAKPANEL_")},
            pipe=True,
        )
        self.monitor.add("aggregator", [self.aggregator.pid])
        assert self.aggregator.proc is not None
        assert self.aggregator.proc.stdout is not None
        self._reader = threading.Thread(
            target=self._read, args=(self.aggregator.proc.stdout,), daemon=True
        )
        self._reader.start()

        self.gateway.start([*yakpanel, "serve", "gateway"], env)
        self.monitor.add("gateway", [self.gateway.pid])
        self.gateway.wait_port(self.gateway_port)
        self.agents = asyncio.run(self._enroll(env, server_ids, tokens))
        deadline = time.monotonic() + 120
        while not self._ready.wait(0.2):
            self.aggregator.check()
            if time.monotonic() > deadline:
                raise RuntimeError("the aggregator was not ready in 120 s")

    async def _tenant(self, api_url: str) -> tuple[list[str], list[str]]:
        import httpx

        async def login(email: str, password: str) -> httpx.AsyncClient:
            client = httpx.AsyncClient(base_url=api_url, timeout=30)
            r = await client.post("/v1/auth/login", json={"email": email, "password": password})
            if r.status_code != 200:
                raise RuntimeError(f"login as {email} failed: {r.status_code} {r.text}")
            client.headers["X-CSRF-Token"] = r.json()["csrf_token"]
            return client

        def body(r: httpx.Response, what: str) -> dict[str, Any]:
            if r.status_code != 201:
                raise RuntimeError(f"{what}: {r.status_code} {r.text}")
            data: dict[str, Any] = r.json()
            return data

        from controlplane.bootstrap import DEFAULT_PLANS

        staff = await login(STAFF_EMAIL, STAFF_PASSWORD)
        try:
            business = next(p for p in DEFAULT_PLANS if p["code"] == "business")
            plan = f"bench-{uuid.uuid4().hex[:8]}"
            limits = {"max_servers": self.params.agents + 10, "api_requests_per_minute": 1_000_000}
            body(
                await staff.post(
                    "/v1/plans", json={**business, "code": plan, "name": plan, **limits}
                ),
                "create plan",
            )
            slug = f"bench-{uuid.uuid4().hex[:8]}"
            owner_email = f"owner@{slug}.test"
            tenant = body(
                await staff.post(
                    "/v1/tenants",
                    json={
                        "slug": slug,
                        "name": "Bench tenant",
                        "plan": plan,
                        "owner_email": owner_email,
                        "owner_password": OWNER_PASSWORD,
                    },
                ),
                "create tenant",
            )
        finally:
            await staff.aclose()
        self.tenant_id = tenant["id"]
        owner = await login(owner_email, OWNER_PASSWORD)
        base = f"/v1/tenants/{self.tenant_id}/servers"
        try:
            server_ids, tokens = [], []
            for i in range(self.params.agents):
                sid = body(await owner.post(base, json={"name": f"bench-{i:04d}"}), "server")["id"]
                grant = body(await owner.post(f"{base}/{sid}/enrollment-tokens", json={}), "token")
                server_ids.append(sid)
                tokens.append(grant["token"])
                self._ca = grant["ca_certificate_pem"].encode()
        finally:
            await owner.aclose()
        return server_ids, tokens

    async def _enroll(
        self, env: dict[str, str], server_ids: list[str], tokens: list[str]
    ) -> list[AgentSpec]:
        from agent.enroll import enroll

        address = f"127.0.0.1:{env['YAKPANEL_GATEWAY_ENROLL_PORT']}"
        gate = asyncio.Semaphore(8)

        async def one(i: int) -> AgentSpec:
            state = self.root / "agents" / f"{i:04d}"
            async with gate:
                identity = await enroll(address, tokens[i], self._ca, state, f"bench-{i:04d}")
            assert str(identity.server_id) == server_ids[i]
            return AgentSpec(
                i,
                server_ids[i],
                (state / "key.pem").read_bytes(),
                (state / "cert.pem").read_bytes(),
            )

        return list(await asyncio.gather(*(one(i) for i in range(len(tokens)))))

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "t" in record:
                self.progress.update(record["t"], record["raw"], record["markers"])
            elif "ready" in record:
                self.final["aggregator_config"] = record["config"]
                self._ready.set()
            else:
                self.final.update(record)

    def target(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    def ca_pem(self) -> bytes:
        return self._ca

    def agent_specs(self) -> list[AgentSpec]:
        return self.agents

    def check(self) -> None:
        for proc in (self.api, self.gateway, self.aggregator):
            proc.check()

    def on_measure_start(self) -> None:
        profile_dir = self.params.profile_dir
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if profile_dir is None:
            return
        if not os.access(py_spy, os.X_OK):
            print("py-spy not found: no profiles", file=sys.stderr)
            return
        profile_dir.mkdir(parents=True, exist_ok=True)
        for proc in (self.gateway, self.aggregator):
            self._profilers.append(
                subprocess.Popen(
                    [
                        py_spy,
                        "record",
                        "--pid",
                        str(proc.pid),
                        "--duration",
                        str(int(self.params.measure_s)),
                        "--rate",
                        "50",
                        "--nonblocking",
                        "--threads",
                        "--format",
                        "raw",
                        "--output",
                        str(profile_dir / f"{proc.name}.txt"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

    def queryable_total(self, horizon_s: float) -> int:
        with self.progress.lock:
            return self.progress.committed

    def stop(self) -> None:
        for profiler in self._profilers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                profiler.wait(30)
        proc = self.aggregator.proc
        if proc is not None and proc.poll() is None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.write(b"stop\n")
                proc.stdin.flush()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
        if self._reader is not None:
            self._reader.join(5)
        self.gateway.stop()
        self.aggregator.stop()
        self.api.stop()
        if self.broker is not None:
            self.broker.stop()
        if self.pg is not None:
            self.pg.stop()

    def extra(self) -> dict[str, Any]:
        return {
            "pipeline": "OTLP/gRPC mTLS -> gateway (yakpanel serve gateway) -> Tansu "
            "yak.metrics.v1 -> aggregator (polars) -> chDB samples_raw + rollup_10s/1m/1h",
            "committed": "rows in ClickHouse samples_raw (count())",
            "queryable": "marker row returned by SELECT on samples_raw",
            "gateway_settings": {"otlp_max_new_series_per_hour": self.max_new_series},
            **self.final,
        }


# --- the peers --------------------------------------------------------------------------------


def deb_version(package: str) -> str:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or "unknown"


class Peer(System, abc.ABC):
    protocol = "remote_write"
    binary = ""
    package = ""
    committed_metric = ""

    def __init__(self, root: Path, params: Params) -> None:
        super().__init__(root, params)
        self.port = free_port()
        self.proc = Proc(self.name, root / f"{self.name}.log")
        self._poller: threading.Thread | None = None
        self._halt = threading.Event()
        self.agents = [AgentSpec(i, str(uuid.uuid4())) for i in range(params.agents)]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @abc.abstractmethod
    def command(self) -> list[str]:
        """Overridden by each system."""

    @abc.abstractmethod
    def ready_path(self) -> str:
        """Overridden by each system."""

    def start(self) -> None:
        import httpx

        self.root.mkdir(parents=True, exist_ok=True)
        self.proc.start(self.command())
        self.monitor.add(self.name, [self.proc.pid])
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=self.url, timeout=2) as http:
            while True:
                self.proc.check()
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(self.ready_path()).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.name} was not ready in 60 s:\n{tail(self.proc.log_path)}"
                    )
                time.sleep(0.1)
        self._poller = threading.Thread(target=self._poll, daemon=True, name=f"{self.name}-poll")
        self._poller.start()

    def _poll(self) -> None:
        import httpx

        interval = self.params.poll_ms / 1000
        query = f"{MARKER_METRIC.replace('.', '_')}[{MARKER_QUERY_WINDOW_S}s]"
        with httpx.Client(base_url=self.url, timeout=10) as http:
            while not self._halt.is_set():
                started = time.monotonic()
                try:
                    committed = self.counter(http.get("/metrics").text)
                    r = http.get("/api/v1/query", params={"query": query})
                    r.raise_for_status()
                    at = time.time()
                    markers = [
                        int(float(v))
                        for series in r.json()["data"]["result"]
                        for _, v in series["values"]
                    ]
                    self.progress.update(at, committed, markers)
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    self.progress.error = f"{type(exc).__name__}: {exc}"
                self._halt.wait(max(0.0, interval - (time.monotonic() - started)))

    def counter(self, text: str) -> int:
        total = 0.0
        for line in text.splitlines():
            if line.startswith(self.committed_metric) and line[len(self.committed_metric)] in " {":
                total += float(line.rsplit(" ", 1)[1])
        return int(total)

    def queryable_total(self, horizon_s: float) -> int:
        """Sum of `count_over_time` over the run, one query per metric name."""
        import httpx

        names = [
            self.params.model.prom_name(self.params.model.metric_name(m))
            for m in range(self.params.metrics)
        ] + [MARKER_METRIC.replace(".", "_")]
        total = 0
        with httpx.Client(base_url=self.url, timeout=120) as http:
            for name in names:
                r = http.get(
                    "/api/v1/query",
                    params={"query": f"sum(count_over_time({name}[{int(horizon_s)}s]))"},
                )
                r.raise_for_status()
                for series in r.json()["data"]["result"]:
                    total += int(float(series["value"][1]))
        return total

    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def agent_specs(self) -> list[AgentSpec]:
        return self.agents

    def check(self) -> None:
        self.proc.check()

    def stop(self) -> None:
        self._halt.set()
        if self._poller is not None:
            self._poller.join(15)
        self.proc.stop()

    def extra(self) -> dict[str, Any]:
        return {
            "version": deb_version(self.package),
            "ingest": "Prometheus remote write 1.0 (protobuf + snappy) POST /api/v1/write",
            "committed": self.committed_metric,
            "queryable": f"marker sample returned by PromQL {MARKER_METRIC.replace('.', '_')}"
            f"[{MARKER_QUERY_WINDOW_S}s]",
            "command": self.command(),
            "poll_errors_last": self.progress.error or None,
        }


class VictoriaMetrics(Peer):
    name = "victoriametrics"
    binary = VICTORIA_METRICS
    package = "victoria-metrics"
    committed_metric = "vm_rows_added_to_storage_total"

    def command(self) -> list[str]:
        return [
            self.binary,
            f"-storageDataPath={self.root / 'data'}",
            f"-httpListenAddr=127.0.0.1:{self.port}",
            # Answer with the newest samples (the default hides the last 30 s) and no cache:
            # the latency markers must be seen as soon as they are searchable.
            "-search.latencyOffset=0s",
            "-search.disableCache",
            "-loggerLevel=WARN",
        ]

    def ready_path(self) -> str:
        return "/health"


class Prometheus(Peer):
    name = "prometheus"
    binary = PROMETHEUS
    package = "prometheus"
    committed_metric = "prometheus_tsdb_head_samples_appended_total"

    def command(self) -> list[str]:
        config = self.root / "prometheus.yml"
        return [
            self.binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={self.root / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-remote-write-receiver",
            "--log.level=warn",
        ]

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "prometheus.yml").write_text("global:\n  scrape_interval: 15s\n")
        super().start()

    def ready_path(self) -> str:
        return "/-/ready"


def require_peers(systems: tuple[str, ...]) -> None:
    missing = [
        f"{binary} (Debian {package})"
        for name, binary, package in (
            ("victoriametrics", VICTORIA_METRICS, "victoria-metrics"),
            ("prometheus", PROMETHEUS, "prometheus"),
        )
        if name in systems and not os.access(binary, os.X_OK)
    ]
    if missing:
        fail(
            "bench.ingest needs its peers, missing: "
            + ", ".join(missing)
            + ". Install with `make bench-deps` (apt-get install victoria-metrics prometheus)."
        )


# --- main ------------------------------------------------------------------------------------


def run_system(system: System, params: Params, fixed_rate: float | None) -> dict[str, Any]:
    try:
        system.start()
        system.monitor.start()
        fields = run_load(system, params, fixed_rate)
    finally:
        try:
            system.stop()
        finally:
            system.monitor.stop()
    peaks = system.monitor.peaks_mib()
    return {
        **params.fields(),
        **fields,
        "peak_rss_mib": peaks,
        "peak_rss_mib_services": round(
            sum(v for k, v in peaks.items() if k != "load_generators"), 1
        ),
        **system.extra(),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if not a or not b:
        return None
    return round(a / b, 3)


def summary(results: dict[str, dict[str, Any]], params: Params) -> dict[str, Any]:
    def rate(r: dict[str, Any]) -> float:
        return float(r["saturation"]["samples_per_s"])

    def p99(r: dict[str, Any], phase: str) -> float | None:
        section: dict[str, Any] = r.get(phase) or {}
        value = section.get("latency", {}).get("p99_ms")
        return float(value) if value is not None else None

    def rss(r: dict[str, Any]) -> float:
        return float(r["peak_rss_mib_services"])

    def sustained(r: dict[str, Any]) -> tuple[float, bool] | None:
        """(rate, is a lower bound): the offered fixed rate when it kept up, else what was
        committed under it (the steady-state capacity, batches of steady-state size)."""
        fixed = r.get("fixed_rate")
        if not fixed:
            return None
        if fixed["kept_up"]:
            return float(fixed["offered_samples_per_s"]), True
        return float(fixed["samples_per_s"]), False

    out: dict[str, Any] = {"series": params.series, "agents": params.agents}
    for name, r in results.items():
        out[f"{name}_samples_per_s"] = rate(r)
        steady = sustained(r)
        if steady is not None:
            out[f"{name}_fixed_rate_kept_up"] = steady[1]
        out[f"{name}_p99_ms_fixed_rate"] = p99(r, "fixed_rate")
        out[f"{name}_p99_ms_saturation"] = p99(r, "saturation")
        out[f"{name}_peak_rss_mib"] = rss(r)
    yak = results.get("yakpanel")
    if yak is not None:
        aggregator_mib = yak["peak_rss_mib"].get("aggregator", 0.0)
        pipeline_mib = aggregator_mib + yak["peak_rss_mib"].get("gateway", 0.0)
        for peer in ("victoriametrics", "prometheus"):
            other = results.get(peer)
            if other is None:
                continue
            out[f"yakpanel_over_{peer}"] = {
                "throughput": _ratio(rate(yak), rate(other)),
                "p99_fixed_rate": _ratio(p99(yak, "fixed_rate"), p99(other, "fixed_rate")),
                "p99_saturation": _ratio(p99(yak, "saturation"), p99(other, "saturation")),
                "peak_rss_all_services": _ratio(rss(yak), rss(other)),
                "peak_rss_gateway_and_aggregator": _ratio(pipeline_mib, rss(other)),
                "peak_rss_aggregator_only": _ratio(aggregator_mib, rss(other)),
            }
        steady = sustained(yak)
        out["targets"] = {
            "samples_per_s": TARGET_SAMPLES_PER_S,
            "samples_per_s_met": rate(yak) >= TARGET_SAMPLES_PER_S
            and (steady is None or steady[0] >= TARGET_SAMPLES_PER_S),
            "yakpanel_steady_samples_per_s": steady[0] if steady else None,
            "yakpanel_steady_is_lower_bound": steady[1] if steady else None,
            "aggregator_rss_mib": TARGET_AGGREGATOR_RSS_MIB,
            "aggregator_rss_mib_met": aggregator_mib <= TARGET_AGGREGATOR_RSS_MIB,
        }
    out["note"] = (
        "samples_per_s: committed at saturation with at most max_lag_s queued (for YakPanel "
        "this includes draining its Kafka backlog in large batches); steady: the fixed-rate "
        "phase (offered rate if kept up, else what was committed = steady-state capacity). "
        "throughput ratio > 1: YakPanel commits more samples/s; latency and RSS ratios > 1: "
        "YakPanel is slower / uses more memory. YakPanel's RSS (all services) = sum of the "
        "peaks of gateway, aggregator, broker (Tansu keeps every record in memory), API "
        "and PostgreSQL."
    )
    return out


def main(argv: list[str] | None = None) -> None:
    params = parse_args(argv)
    require_peers(params.systems)
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    for key in [k for k in os.environ if k.startswith("YAKPANEL_")]:
        del os.environ[key]
    root = Path(tempfile.mkdtemp(prefix="yak-bench-ingest-"))
    classes: dict[str, Callable[[Path, Params], System]] = {
        "yakpanel": YakPanel,
        "victoriametrics": VictoriaMetrics,
        "prometheus": Prometheus,
    }
    results: dict[str, dict[str, Any]] = {}
    fixed_rate = params.fixed_rate
    try:
        for name in params.systems:
            system = classes[name](root / name, params)
            fields = run_system(system, params, fixed_rate)
            results[name] = fields
            emit(f"ingest.{name}", **fields)
            if fixed_rate is None and fields["fixed_rate"] is not None:
                # Every later system gets the same offered load.
                fixed_rate = float(fields["fixed_rate"]["offered_samples_per_s"])
    except Exception as exc:  # noqa: BLE001 - any failure: traceback, clear message, exit 1
        import traceback

        traceback.print_exc()
        fail(f"bench.ingest failed: {type(exc).__name__}: {exc} (logs kept in {root})")
    shutil.rmtree(root, ignore_errors=True)
    emit("ingest.summary", **summary(results, params))


if __name__ == "__main__":
    main()
