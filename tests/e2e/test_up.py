"""`yakpanel up` from the CLI: the whole embedded stack in one supervisor process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest

from controlplane.passwords import verify_password
from yakpanel.embedded import EmbeddedPostgres, free_port

pytestmark = pytest.mark.e2e

YAKPANEL = [sys.executable, "-m", "yakpanel"]


class Up:
    """A running `yakpanel up` whose output is collected line by line."""

    def __init__(
        self, state_dir: Path, api_port: int, kafka_port: int, gateway_ports: tuple[int, int]
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("YAKPANEL_")}
        env.update(
            YAKPANEL_API_PORT=str(api_port),
            YAKPANEL_EMBEDDED_KAFKA_PORT=str(kafka_port),
            YAKPANEL_GATEWAY_PORT=str(gateway_ports[0]),
            YAKPANEL_GATEWAY_ENROLL_PORT=str(gateway_ports[1]),
            YAKPANEL_HEARTBEAT_INTERVAL_MS="1000",
            YAKPANEL_LOG_LEVEL="WARNING",
        )
        self.api = f"http://127.0.0.1:{api_port}"
        self.proc = subprocess.Popen(
            [*YAKPANEL, "up", "--state-dir", str(state_dir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout_s: float = 90) -> httpx.Response:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"`yakpanel up` exited early:\n{self.output}")
            try:
                response = httpx.get(f"{self.api}/readyz", timeout=5)
                if response.status_code == 200 and "YakPanel is up" in self.output:
                    return response
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        pytest.fail(f"/readyz not 200 within {timeout_s}s:\n{self.output}")

    def our_processes(self) -> list[psutil.Process]:
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def interrupt(self, timeout_s: float = 60) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout_s)
        self._reader.join(5)
        return code


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "state"
    yield path
    # Whatever happened, leave no server behind.
    pg = EmbeddedPostgres(path / "postgres")
    if (path / "postgres" / "postmaster.pid").exists():
        pg.start()
        pg.stop()


def _demo_server(api: str, password: str, timeout_s: float = 60) -> dict[str, object]:
    with httpx.Client(base_url=api, timeout=10) as client:
        r = client.post(
            "/v1/auth/login", json={"email": "demo@yakpanel.local", "password": password}
        )
        assert r.status_code == 200, r.text
        csrf = r.json()["csrf_token"]
        tenant = r.json()["memberships"][0]["tenant_id"]
        deadline = time.monotonic() + timeout_s
        while True:
            servers = client.get(f"/v1/tenants/{tenant}/servers").json()["items"]
            local = next(s for s in servers if s["name"] == "local")
            if local["presence"] == "online" or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        command = client.post(
            f"/v1/tenants/{tenant}/servers/{local['id']}/commands",
            json={"type": "system.ping"},
            headers={"X-CSRF-Token": csrf},
        )
        assert command.status_code == 202, command.text
        while time.monotonic() < deadline + 30:
            state = client.get(f"/v1/tenants/{tenant}/commands/{command.json()['id']}").json()
            if state["state"] in ("succeeded", "failed", "expired"):
                break
            time.sleep(0.25)
        assert state["state"] == "succeeded", state
        server: dict[str, object] = local
        return server


def _postgres_pid(state_dir: Path) -> int:
    return int((state_dir / "postgres" / "postmaster.pid").read_text().splitlines()[0])


def test_up_serves_stops_cleanly_and_keeps_its_data(state_dir: Path) -> None:
    api_port, kafka_port, gateway_ports = free_port(), free_port(), (free_port(), free_port())

    first = Up(state_dir, api_port, kafka_port, gateway_ports)
    try:
        ready = first.wait_ready()
        checks = ready.json()["checks"]
        assert {k: v["status"] for k, v in checks.items()} == {
            "postgres": "ok",
            "kafka": "ok",
            "clickhouse": "ok",
        }
        match = re.search(r"admin password: (\S+)", first.output)
        assert match, first.output
        password = match.group(1)
        assert f"api: http://127.0.0.1:{api_port}" in first.output
        demo = re.search(r"demo password:\s+(\S+)", first.output)
        assert demo, first.output
        demo_password = demo.group(1)
        assert "local agent enrolled" in first.output
        # The demo tenant's server is online through the local agent, and runs commands.
        server = _demo_server(first.api, demo_password)
        assert server["presence"] == "online"

        # A second `up` on the same state dir is refused while the first runs.
        clash = subprocess.run(
            [*YAKPANEL, "up", "--state-dir", str(state_dir)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert clash.returncode == 1
        assert "in use" in clash.stderr

        ours = first.our_processes()
        postgres = psutil.Process(_postgres_pid(state_dir))
        assert any("tansu" in " ".join(p.cmdline()) for p in ours)
    finally:
        code = first.interrupt()
    assert code == 0, first.output
    for proc in [*ours, postgres]:
        assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE, proc

    second = Up(state_dir, api_port, kafka_port, gateway_ports)
    try:
        second.wait_ready()
        assert _demo_server(second.api, demo_password)["presence"] == "online"
        assert "admin password" not in second.output
        assert "demo password" not in second.output
        assert "local agent enrolled" not in second.output
        assert "existing account" in second.output
        assert "migrated" not in second.output
    finally:
        assert second.interrupt() == 0, second.output

    pg = EmbeddedPostgres(state_dir / "postgres")
    pg.start()
    try:
        with psycopg.connect(pg.dsn) as conn:
            rows = conn.execute("SELECT email, password_hash FROM platform_staff").fetchall()
    finally:
        pg.stop()
    assert len(rows) == 1
    assert verify_password(rows[0][1], password)
    assert password not in rows[0][1]


def test_up_brings_a_dead_broker_back(state_dir: Path) -> None:
    up = Up(state_dir, free_port(), free_port(), (free_port(), free_port()))
    try:
        up.wait_ready()
        broker = next(p for p in up.our_processes() if "tansu" in " ".join(p.cmdline()))
        broker.kill()
        broker.wait(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            replacement = [p for p in up.our_processes() if "tansu" in " ".join(p.cmdline())]
            if replacement and replacement[0].pid != broker.pid:
                break
            time.sleep(0.2)
        up.wait_ready(timeout_s=30)
    finally:
        assert up.interrupt() == 0, up.output
