"""Command round trip: YakPanel's `system.ping` against a command over a fresh SSH connection.

YakPanel (real components, temp dirs, loopback): embedded PostgreSQL with every migration,
the Tansu broker, chDB; the API, the control-plane worker (outbox relay, results
consumer) and the gateway in this process; one enrolled agent, as a subprocess by default
(`yakpanel agent run`, as on a node) or in this process with `--agent-in-process`.
A round trip runs from the API's 202 for POST /v1/tenants/{t}/servers/{s}/commands to
the command's state `succeeded` being visible in PostgreSQL, observed by polling the
`commands` table (one query for every command in flight, every `--poll-ms`).

Peer: what Forge, Coolify and Dokploy do for each action, a new `ssh` connection that
runs one command (`true`), against a private `sshd` on a loopback port.

Both run the same sequential series (after a warm-up) and a concurrent series with a
window of `--in-flight` commands in flight (`--concurrent` commands for YakPanel,
`--ssh-concurrent` for SSH: ~8 SSH round trips/s on 2 cores make 1000 take minutes).
JSON lines: `commands.yakpanel`, `commands.ssh`, `commands.summary` (ratios).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench._common import emit, fail, percentile

REPO = Path(__file__).resolve().parent.parent
# 5-9 SSH round trips/s on 2 cores: 1000 of them alone would take two to three minutes.
SSH_CONCURRENT = 150
RELAY_POLL_S = 0.01  # the outbox relay's poll interval: its latency is on the measured path
SSHD = "/usr/sbin/sshd"  # sshd refuses to start unless run by its absolute path
FINAL_STATES = ("succeeded", "failed", "expired")
COMMAND_TIMEOUT_S = 60.0
OWNER_PASSWORD = "bench-owner-password-123"  # noqa: S105 - a throwaway tenant in a temp dir
STAFF_EMAIL = "bench@yakpanel.test"
STAFF_PASSWORD = "bench-staff-password-123"  # noqa: S105


@dataclass
class Params:
    warmup: int
    sequential: int
    concurrent: int
    ssh_concurrent: int
    in_flight: int
    poll_ms: float
    agent_process: bool


def parse_args(argv: list[str] | None) -> Params:
    p = argparse.ArgumentParser(prog="python -m bench.commands", description=__doc__.split("\n")[0])
    p.add_argument("--warmup", type=int, default=10, help="unmeasured round trips first")
    p.add_argument("--sequential", "-n", type=int, default=200, help="sequential round trips")
    p.add_argument("--concurrent", "-m", type=int, default=1000, help="commands for throughput")
    p.add_argument(
        "--ssh-concurrent",
        type=int,
        default=SSH_CONCURRENT,
        help=f"commands for the SSH throughput run (default {SSH_CONCURRENT}; its rate is "
        "steady after the first window, and 1000 would take minutes)",
    )
    p.add_argument("--in-flight", type=int, default=50, help="commands in flight at once")
    p.add_argument("--poll-ms", type=float, default=2.0, help="PostgreSQL poll interval")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--agent-process",
        dest="agent_process",
        action="store_true",
        default=True,
        help="run the agent as a subprocess, as on a node (default)",
    )
    mode.add_argument(
        "--agent-in-process",
        dest="agent_process",
        action="store_false",
        help="run the agent in this process and event loop",
    )
    a = p.parse_args(argv)
    for name in ("sequential", "concurrent", "in_flight"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.warmup < 0 or a.poll_ms <= 0:
        p.error("--warmup must be >= 0 and --poll-ms > 0")
    if a.ssh_concurrent < 1:
        p.error("--ssh-concurrent must be at least 1")
    return Params(
        a.warmup,
        a.sequential,
        a.concurrent,
        a.ssh_concurrent,
        a.in_flight,
        a.poll_ms,
        a.agent_process,
    )


# --- shared -----------------------------------------------------------------------------


def _die_with_parent() -> None:
    # Between fork and exec: if this benchmark dies, even by SIGKILL, the child gets SIGTERM.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def latency_fields(values_ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values_ms, 50), 2),
        "p90_ms": round(percentile(values_ms, 90), 2),
        "p99_ms": round(percentile(values_ms, 99), 2),
        "mean_ms": round(statistics.fmean(values_ms), 2),
        "min_ms": round(min(values_ms), 2),
        "max_ms": round(max(values_ms), 2),
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def windowed(
    total: int, in_flight: int, one: Callable[[], Awaitable[float]]
) -> tuple[float, list[float]]:
    """Run `one` `total` times, at most `in_flight` at once; (seconds, latencies in ms)."""
    gate = asyncio.Semaphore(in_flight)
    latencies: list[float] = []

    async def slot() -> None:
        async with gate:
            latencies.append(await one())

    started = time.perf_counter()
    await asyncio.gather(*(slot() for _ in range(total)))
    return time.perf_counter() - started, latencies


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- the SSH peer -----------------------------------------------------------------------


def require_ssh() -> tuple[str, str]:
    missing = []
    if not os.access(SSHD, os.X_OK):
        missing.append(f"{SSHD} (Debian openssh-server)")
    ssh = shutil.which("ssh")
    keygen = shutil.which("ssh-keygen")
    if ssh is None:
        missing.append("ssh (Debian openssh-client)")
    if keygen is None:
        missing.append("ssh-keygen (Debian openssh-client)")
    if missing or ssh is None or keygen is None:
        fail(
            "bench.commands needs the SSH peer, missing: "
            + ", ".join(missing)
            + ". Install with `make bench-deps` (apt-get install openssh-server openssh-client)."
        )
        raise AssertionError("unreachable")
    return ssh, keygen


class PrivateSshd:
    """sshd on a free loopback port, keys and config in `root`, root login by key only."""

    def __init__(self, root: Path, ssh: str, keygen: str) -> None:
        self.root = root
        self.ssh = ssh
        self.keygen = keygen
        self.port = free_port()
        self.log_path = root / "sshd.log"
        self.client_key = root / "client_ed25519"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        host_key = self.root / "host_ed25519"
        for key in (host_key, self.client_key):
            subprocess.run(
                [self.keygen, "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", str(key)],
                check=True,
                stdin=subprocess.DEVNULL,
            )
        authorized = self.root / "authorized_keys"
        authorized.write_bytes(self.client_key.with_suffix(".pub").read_bytes())
        config = self.root / "sshd_config"
        config.write_text(
            f"ListenAddress 127.0.0.1\n"
            f"Port {self.port}\n"
            f"HostKey {host_key}\n"
            f"PidFile {self.root / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {authorized}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            # The default 10:30:100 drops connections past 10 unauthenticated ones at once;
            # the concurrent series must measure sshd, not its refusals.
            "MaxStartups 1000\n"
        )
        # The privilege-separation directory sshd insists on.
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        check = subprocess.run(
            [SSHD, "-t", "-f", str(config)], capture_output=True, text=True, check=False
        )
        if check.returncode != 0:
            raise RuntimeError(f"sshd refused its config: {check.stderr.strip()}")
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_die_with_parent,
                start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while not port_open(self.port):
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"sshd exited with {self._proc.returncode}:\n{tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not listen in 10 s:\n{tail(self.log_path)}")
            time.sleep(0.02)
        probe = subprocess.run(self.command(), capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            raise RuntimeError(
                f"ssh to the private sshd failed ({probe.returncode}): {probe.stderr.strip()}\n"
                f"sshd log:\n{tail(self.log_path)}"
            )

    def command(self) -> list[str]:
        return [
            self.ssh,
            "-F",
            "/dev/null",  # no user or system config: no ControlMaster, a new connection
            "-i",
            str(self.client_key),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-p",
            str(self.port),
            "root@127.0.0.1",
            "true",
        ]

    def kex(self) -> str:
        out = subprocess.run(
            [*self.command()[:-2], "-v", "root@127.0.0.1", "true"],
            capture_output=True,
            text=True,
            check=False,
        )
        for line in out.stderr.splitlines():
            if "kex: algorithm:" in line:
                return line.split("kex: algorithm:")[1].strip()
        return "unknown"

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def ssh_bench(root: Path, params: Params, ssh: str, keygen: str) -> dict[str, Any]:
    sshd = PrivateSshd(root, ssh, keygen)
    try:
        sshd.start()
        cmd = sshd.command()
        load = round(os.getloadavg()[0], 2)

        def once() -> float:
            started = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, check=False)
            elapsed = (time.perf_counter() - started) * 1000
            if done.returncode != 0:
                raise RuntimeError(f"ssh exited {done.returncode}: {done.stderr.decode().strip()}")
            return elapsed

        for _ in range(params.warmup):
            once()
        sequential = [once() for _ in range(params.sequential)]

        async def concurrent_one() -> float:
            started = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            _, err = await proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"ssh exited {proc.returncode}: {err.decode().strip()}")
            return (time.perf_counter() - started) * 1000

        seconds, under_load = asyncio.run(
            windowed(params.ssh_concurrent, params.in_flight, concurrent_one)
        )
        version = subprocess.run([ssh, "-V"], capture_output=True, text=True, check=False)
        return {
            "peer": "new ssh connection per command (Forge/Coolify/Dokploy style)",
            "command": "true",
            "ssh_version": version.stderr.strip(),
            "kex": sshd.kex(),
            "load_1m_before": load,
            "warmup": params.warmup,
            "sequential": {"n": params.sequential, **latency_fields(sequential)},
            "concurrent": {
                "m": params.ssh_concurrent,
                "in_flight": params.in_flight,
                "seconds": round(seconds, 3),
                "commands_per_s": round(params.ssh_concurrent / seconds, 1),
                "latency_p50_ms": round(percentile(under_load, 50), 2),
                "latency_p99_ms": round(percentile(under_load, 99), 2),
            },
        }
    finally:
        sshd.stop()


# --- YakPanel ---------------------------------------------------------------------------


class CompletionPoller:
    """Watches the `commands` table for commands reaching a final state.

    One query per round for every command in flight, every `interval_s`; the time a
    command is seen final is its completion (so the poll interval bounds the error)."""

    def __init__(self, dsn: str, interval_s: float) -> None:
        self.dsn = dsn
        self.interval_s = interval_s
        self.polls = 0
        self._waiting: dict[uuid.UUID, asyncio.Future[tuple[float, float, str]]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        import psycopg

        self._conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        self._task = asyncio.create_task(self._run(), name="bench-completion-poller")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            await self._conn.close()

    def watch(self, command_id: uuid.UUID) -> asyncio.Future[tuple[float, float, str]]:
        """A future for (perf_counter, wall time, state) when the command is seen final."""
        future: asyncio.Future[tuple[float, float, str]] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiting[command_id] = future
        self._wake.set()
        return future

    async def _run(self) -> None:
        while True:
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            ids = list(self._waiting)
            try:
                cur = await self._conn.execute(
                    "SELECT id, state FROM commands WHERE id = ANY(%s) AND state = ANY(%s)",
                    (ids, list(FINAL_STATES)),
                )
                rows = await cur.fetchall()
            except Exception as exc:
                # Whoever waits learns why at once instead of at their timeout.
                for waiter in self._waiting.values():
                    if not waiter.done():
                        waiter.set_exception(exc)
                raise
            seen, wall = time.perf_counter(), time.time()
            self.polls += 1
            for command_id, state in rows:
                future = self._waiting.pop(command_id, None)
                if future is not None and not future.done():
                    future.set_result((seen, wall, state))
            await asyncio.sleep(self.interval_s)


@dataclass
class Trip:
    command_id: uuid.UUID
    post_ms: float
    round_trip_ms: float
    accepted_wall: float
    observed_wall: float


@dataclass
class YakRun:
    agent_mode: str
    sequential: list[Trip] = field(default_factory=list)
    concurrent: list[Trip] = field(default_factory=list)
    concurrent_seconds: float = 0.0
    # CPU seconds per wall second during the concurrent series: ~1.0 for this process means
    # its one event loop (API + worker + gateway + driver) is saturated.
    stack_cpu_per_wall: float = 0.0
    agent_cpu_ms_per_command: float | None = None
    stages_sequential: dict[str, float] = field(default_factory=dict)
    stages_concurrent: dict[str, float] = field(default_factory=dict)
    polls: int = 0
    load_1m: float = 0.0
    relay_published: int = 0
    gateway_delivered: int = 0
    results_applied: int = 0


class Driver:
    """Issues `system.ping` through the public API with a bearer token and awaits it."""

    def __init__(self, http: Any, tenant_id: str, server_id: str, poller: CompletionPoller):
        self.http = http
        self.path = f"/v1/tenants/{tenant_id}/servers/{server_id}/commands"
        self.poller = poller

    async def trip(self) -> Trip:
        started = time.perf_counter()
        r = await self.http.post(self.path, json={"type": "system.ping", "payload": {}})
        accepted, accepted_wall = time.perf_counter(), time.time()
        if r.status_code != 202:
            raise RuntimeError(f"POST {self.path} answered {r.status_code}: {r.text}")
        command_id = uuid.UUID(r.json()["id"])
        try:
            seen, wall, state = await asyncio.wait_for(
                self.poller.watch(command_id), COMMAND_TIMEOUT_S
            )
        except TimeoutError:
            raise RuntimeError(
                f"command {command_id} not final in {COMMAND_TIMEOUT_S:.0f} s"
            ) from None
        if state != "succeeded":
            raise RuntimeError(f"command {command_id} ended {state}, not succeeded")
        return Trip(
            command_id,
            (accepted - started) * 1000,
            (seen - accepted) * 1000,
            accepted_wall,
            wall,
        )


STAGES = (
    # name, from, to: what the interval holds
    ("relay", "issued_at", "published_at"),  # API commit, outbox poll, produce, durable check
    ("kafka_to_gateway_push", "published_at", "dispatched_at"),  # consume, session queue, gRPC
    ("gateway_to_agent_ack", "dispatched_at", "acknowledged_at"),  # gRPC, verify, ledger fsync
    ("agent_run", "acknowledged_at", "finished_at"),  # engine + ledger fsync
    ("results_to_postgres", "finished_at", "updated_at"),  # agent→gateway→Kafka→worker tx start
    ("commit_to_observed", "updated_at", "observed"),  # commit + poll interval
)


def stage_medians(rows: list[dict[str, Any]], trips: dict[uuid.UUID, Trip]) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name, _, _ in STAGES}
    before_accept: list[float] = []
    for row in rows:
        trip = trips[row["id"]]
        at: dict[str, float] = {k: v.timestamp() for k, v in row.items() if isinstance(v, datetime)}
        at["observed"] = trip.observed_wall
        if any(src not in at or dst not in at for _, src, dst in STAGES):
            continue
        for name, src, dst in STAGES:
            samples[name].append((at[dst] - at[src]) * 1000)
        before_accept.append((trip.accepted_wall - at["issued_at"]) * 1000)
    out = {f"{name}_ms": round(statistics.median(v), 2) for name, v in samples.items() if v}
    if before_accept:
        out["issued_to_accepted_ms"] = round(statistics.median(before_accept), 2)
    out["samples"] = len(before_accept)
    return out


async def fetch_stages(dsn: str, trips: list[Trip]) -> dict[str, float]:
    import psycopg
    from psycopg.rows import dict_row

    by_id = {t.command_id: t for t in trips}
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, row_factory=dict_row
    ) as conn:
        cur = await conn.execute(
            """SELECT c.id, c.issued_at, o.published_at, c.dispatched_at, c.acknowledged_at,
                      c.finished_at, c.updated_at
               FROM commands c JOIN outbox o
                 ON o.aggregate_id = c.id::text AND o.event_type = 'command.issued'
               WHERE c.id = ANY(%s)""",
            (list(by_id),),
        )
        rows = await cur.fetchall()
    return stage_medians(rows, by_id)


async def login(http_cls: Any, url: str, email: str, password: str) -> Any:
    client = http_cls(base_url=url, timeout=30)
    r = await client.post("/v1/auth/login", json={"email": email, "password": password})
    if r.status_code != 200:
        await client.aclose()
        raise RuntimeError(f"login as {email} failed: {r.status_code} {r.text}")
    client.headers["X-CSRF-Token"] = r.json()["csrf_token"]
    return client


def expect(r: Any, status: int, what: str) -> dict[str, Any]:
    if r.status_code != status:
        raise RuntimeError(f"{what}: {r.status_code} {r.text}")
    body: dict[str, Any] = r.json()
    return body


class AgentProcess:
    """`yakpanel agent run` as a subprocess, the way a node runs it."""

    def __init__(self, state_dir: Path, log_path: Path) -> None:
        self.state_dir = state_dir
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from agent.cli import agent_app; agent_app()",
                    "run",
                    "--state-dir",
                    str(self.state_dir),
                ],
                cwd=REPO,
                env={k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_die_with_parent,
                start_new_session=True,
            )

    def cpu_s(self) -> float:
        """User + system CPU seconds the agent has used so far."""
        if self._proc is None:
            return 0.0
        fields = Path(f"/proc/{self._proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def check(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(
                f"the agent exited with {self._proc.returncode}:\n{tail(self.log_path)}"
            )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def yakpanel_bench(root: Path, params: Params) -> YakRun:
    import httpx
    import psycopg
    from psycopg.conninfo import make_conninfo

    from agent.enroll import enroll
    from agent.runtime import AgentRuntime
    from controlplane.access.permissions import STAFF_PERMISSIONS
    from controlplane.app import create_app
    from controlplane.bootstrap import DEFAULT_PLANS
    from controlplane.passwords import hash_password
    from controlplane.service import ApiService
    from controlplane.worker import ControlPlaneWorker
    from ingest.gateway.service import GatewayService
    from yakpanel.clickhouse import ClickHouseTarget
    from yakpanel.embedded import EmbeddedBroker, EmbeddedPostgres
    from yakpanel.embedded import free_port as broker_port
    from yakpanel.ids import new_id
    from yakpanel.migrations import migrate_all
    from yakpanel.services import Stack
    from yakpanel.settings import Settings
    from yakpanel.topics import ensure_topics

    run = YakRun("process" if params.agent_process else "in-process")
    async with contextlib.AsyncExitStack() as cleanup:
        # Backing services.
        pg = EmbeddedPostgres(root / "pg" / "data")
        cleanup.push_async_callback(asyncio.to_thread, pg.stop)
        await asyncio.to_thread(pg.start)
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute("CREATE DATABASE yakpanel")
        dsn = make_conninfo(pg.dsn, dbname="yakpanel")
        ch_dsn = f"chdb://{root / 'ch'}"
        ch_client = ClickHouseTarget(ch_dsn, "bench").client()
        try:
            await asyncio.to_thread(migrate_all, dsn, ch_client, "bench")
        finally:
            ch_client.close()
        broker = EmbeddedBroker(broker_port(), log_path=root / "broker.log")
        cleanup.push_async_callback(asyncio.to_thread, broker.stop)
        await asyncio.to_thread(broker.start)
        await ensure_topics(broker.bootstrap, "")

        settings = Settings(
            state_dir=root / "state",
            postgres_dsn=dsn,
            kafka_bootstrap=broker.bootstrap,
            clickhouse_dsn=ch_dsn,
            clickhouse_database="bench",
            api_port=0,
            gateway_port=0,
            gateway_enroll_port=0,
            heartbeat_interval_ms=5000,
        )
        stack = Stack(settings, dsn, broker.bootstrap, ClickHouseTarget(ch_dsn, "bench"))
        with psycopg.connect(dsn) as conn:
            conn.execute(
                "INSERT INTO platform_staff (id, email, password_hash, permissions)"
                " VALUES (%s, %s, %s, %s)",
                (new_id(), STAFF_EMAIL, hash_password(STAFF_PASSWORD), sorted(STAFF_PERMISSIONS)),
            )

        # Services, in the order `yakpanel up` starts them.
        api = ApiService(create_app(stack), "127.0.0.1", 0)
        await api.start()
        cleanup.push_async_callback(api.stop)
        settings.controlplane_url = api.url
        worker = ControlPlaneWorker(stack, housekeeping_interval_s=1.0)
        worker.relay.poll_interval_s = RELAY_POLL_S
        await worker.start()
        cleanup.push_async_callback(worker.stop)
        gateway = GatewayService(stack)
        await gateway.start()
        cleanup.push_async_callback(gateway.stop)

        # A tenant on business limits with a request rate that does not throttle the run.
        staff = await login(httpx.AsyncClient, api.url, STAFF_EMAIL, STAFF_PASSWORD)
        cleanup.push_async_callback(staff.aclose)
        business = next(p for p in DEFAULT_PLANS if p["code"] == "business")
        plan = f"bench-{uuid.uuid4().hex[:8]}"
        expect(
            await staff.post(
                "/v1/plans",
                json={**business, "code": plan, "name": plan, "api_requests_per_minute": 1_000_000},
            ),
            201,
            "create plan",
        )
        slug = f"bench-{uuid.uuid4().hex[:8]}"
        owner_email = f"owner@{slug}.test"
        tenant = expect(
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
            201,
            "create tenant",
        )
        tenant_id = tenant["id"]
        owner = await login(httpx.AsyncClient, api.url, owner_email, OWNER_PASSWORD)
        cleanup.push_async_callback(owner.aclose)
        server_id = expect(
            await owner.post(f"/v1/tenants/{tenant_id}/servers", json={"name": "bench-node"}),
            201,
            "create server",
        )["id"]
        api_token = expect(
            await owner.post(
                f"/v1/tenants/{tenant_id}/tokens",
                json={"name": "bench", "scopes": ["commands:write", "commands:read"]},
            ),
            201,
            "create API token",
        )["token"]
        enrollment = expect(
            await owner.post(
                f"/v1/tenants/{tenant_id}/servers/{server_id}/enrollment-tokens", json={}
            ),
            201,
            "create enrollment token",
        )["token"]

        # The agent: enrolled with the default agent.toml (system.ping approved).
        agent_dir = root / "agent"
        await enroll(f"127.0.0.1:{gateway.enroll_port}", enrollment, gateway.ca_pem, agent_dir)
        agent_process: AgentProcess | None = None
        if params.agent_process:
            agent_process = AgentProcess(agent_dir, root / "agent.log")
            cleanup.push_async_callback(asyncio.to_thread, agent_process.stop)
            agent_process.start()
        else:
            runtime = AgentRuntime(agent_dir, max_backoff_s=1.0)
            await runtime.start()
            cleanup.push_async_callback(runtime.stop)
        deadline = time.monotonic() + 60
        while gateway.sessions.get(uuid.UUID(server_id)) is None:
            if agent_process is not None:
                agent_process.check()
            if time.monotonic() > deadline:
                log = tail(root / "agent.log")
                raise RuntimeError(f"the agent did not connect in 60 s:\n{log}")
            await asyncio.sleep(0.05)

        poller = CompletionPoller(dsn, params.poll_ms / 1000)
        await poller.start()
        cleanup.push_async_callback(poller.stop)
        limits = httpx.Limits(
            max_connections=params.in_flight + 10, max_keepalive_connections=params.in_flight + 10
        )
        http = httpx.AsyncClient(
            base_url=api.url,
            timeout=30,
            headers={"Authorization": f"Bearer {api_token}"},
            limits=limits,
        )
        cleanup.push_async_callback(http.aclose)
        driver = Driver(http, tenant_id, server_id, poller)

        run.load_1m = round(os.getloadavg()[0], 2)
        # Warm-up also waits out the results consumer joining its group (~3 s on Tansu).
        for _ in range(params.warmup):
            await driver.trip()
        for _ in range(params.sequential):
            run.sequential.append(await driver.trip())
            if agent_process is not None:
                agent_process.check()

        async def concurrent_one() -> float:
            trip = await driver.trip()
            run.concurrent.append(trip)
            return trip.round_trip_ms

        cpu_before = time.process_time()
        agent_before = agent_process.cpu_s() if agent_process is not None else 0.0
        run.concurrent_seconds, _ = await windowed(
            params.concurrent, params.in_flight, concurrent_one
        )
        run.stack_cpu_per_wall = round(
            (time.process_time() - cpu_before) / run.concurrent_seconds, 2
        )
        if agent_process is not None:
            agent_cpu = agent_process.cpu_s() - agent_before
            run.agent_cpu_ms_per_command = round(agent_cpu * 1000 / params.concurrent, 2)
        if agent_process is not None:
            agent_process.check()

        run.stages_sequential = await fetch_stages(dsn, run.sequential)
        run.stages_concurrent = await fetch_stages(dsn, run.concurrent)
        run.polls = poller.polls
        run.relay_published = worker.relay.stats.published
        run.gateway_delivered = gateway.stats.commands_delivered
        run.results_applied = worker.results.stats.applied
    return run


def yakpanel_fields(run: YakRun, params: Params) -> dict[str, Any]:
    seq = [t.round_trip_ms for t in run.sequential]
    conc = [t.round_trip_ms for t in run.concurrent]
    return {
        "command": "system.ping",
        "agent_mode": run.agent_mode,
        "measured": "POST .../commands 202 -> state 'succeeded' visible in PostgreSQL",
        "completion_method": f"poll commands table via psycopg every {params.poll_ms:g} ms",
        "relay_poll_interval_ms": RELAY_POLL_S * 1000,
        "load_1m_before": run.load_1m,
        "warmup": params.warmup,
        "sequential": {
            "n": params.sequential,
            **latency_fields(seq),
            "api_post_p50_ms": round(percentile([t.post_ms for t in run.sequential], 50), 2),
        },
        "concurrent": {
            "m": params.concurrent,
            "in_flight": params.in_flight,
            "seconds": round(run.concurrent_seconds, 3),
            "commands_per_s": round(params.concurrent / run.concurrent_seconds, 1),
            "stack_process_cpu_per_wall_s": run.stack_cpu_per_wall,
            "agent_cpu_ms_per_command": run.agent_cpu_ms_per_command,
            "latency_p50_ms": round(percentile(conc, 50), 2),
            "latency_p99_ms": round(percentile(conc, 99), 2),
            "api_post_p50_ms": round(percentile([t.post_ms for t in run.concurrent], 50), 2),
        },
        "stage_medians_sequential": run.stages_sequential,
        "stage_medians_concurrent": run.stages_concurrent,
        "counters": {
            "completion_polls": run.polls,
            "outbox_published": run.relay_published,
            "gateway_delivered": run.gateway_delivered,
            "results_applied": run.results_applied,
        },
    }


def main(argv: list[str] | None = None) -> None:
    params = parse_args(argv)
    # Nothing here forks a process that goes on using gRPC (the agent subprocess execs a
    # fresh interpreter); without this gRPC warns at every fork that threads are running.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    ssh, keygen = require_ssh()  # fail before anything starts: the peer is not optional
    # A developer's YAKPANEL_* must not reshape the stack (nor reach the agent subprocess).
    for key in [k for k in os.environ if k.startswith("YAKPANEL_")]:
        del os.environ[key]
    root = Path(tempfile.mkdtemp(prefix="yak-bench-commands-"))
    try:
        run = asyncio.run(yakpanel_bench(root / "yak", params))
        yak = yakpanel_fields(run, params)
        emit("commands.yakpanel", **yak)
        peer = ssh_bench(root / "ssh", params, ssh, keygen)
        emit("commands.ssh", **peer)
    except Exception as exc:  # noqa: BLE001 - any failure: traceback, clear message, exit 1
        import traceback

        traceback.print_exc()
        fail(f"bench.commands failed: {type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    ys, ss = yak["sequential"], peer["sequential"]
    yc, sc = yak["concurrent"], peer["concurrent"]
    emit(
        "commands.summary",
        agent_mode=run.agent_mode,
        ssh_over_yakpanel={
            "p50": round(ss["p50_ms"] / ys["p50_ms"], 2),
            "p90": round(ss["p90_ms"] / ys["p90_ms"], 2),
            "p99": round(ss["p99_ms"] / ys["p99_ms"], 2),
            "mean": round(ss["mean_ms"] / ys["mean_ms"], 2),
        },
        yakpanel_over_ssh_throughput=round(yc["commands_per_s"] / sc["commands_per_s"], 2),
        yakpanel_commands_per_s=yc["commands_per_s"],
        ssh_commands_per_s=sc["commands_per_s"],
        note="latency ratios > 1: SSH slower; throughput ratio > 1: YakPanel completes more/s",
    )


if __name__ == "__main__":
    main()
