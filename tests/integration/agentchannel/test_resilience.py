"""Crashes and restarts: the agent killed mid-command, the gateway restarted."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.ledger import Ledger
from agent.runtime import AgentRuntime
from ingest.gateway.service import GatewayService

from .conftest import Channel, enroll_agent, eventually, wait_presence

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

REPO = Path(__file__).resolve().parents[3]


class AgentProcess:
    """`yakpanel agent run` in its own process, as on a node."""

    def __init__(self, state_dir: Path, log_path: Path) -> None:
        self.state_dir = state_dir
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "yakpanel", "agent", "run", "--state-dir", str(self.state_dir)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[AgentProcess]:
    process = AgentProcess(tmp_path / "agent", tmp_path / "agent.log")
    yield process
    process.stop()


async def test_agent_killed_mid_command_runs_it_once_and_reports(
    channel: Channel, agent_process: AgentProcess, tmp_path: Path
) -> None:
    server_id = await enroll_agent(channel, "crashy", agent_process.state_dir)
    agent_process.start()
    await wait_presence(channel, server_id, "online")

    effects = tmp_path / "effects"
    effects.mkdir()
    command = await channel.command(
        server_id, "test.effect", {"dir": str(effects), "hold_seconds": 4}
    )
    await channel.wait_command(command["id"], states=("acknowledged",))
    await eventually(lambda: asyncio.sleep(0, list(effects.iterdir())), bool, 20)
    agent_process.kill()

    agent_process.start()
    done = await channel.wait_command(command["id"], timeout_s=60)
    assert done["state"] == "succeeded", (done, agent_process.log_path.read_text()[-2000:])
    assert done["output"] == {"effects": 1}
    assert len(list(effects.iterdir())) == 1
    agent_process.stop()
    with Ledger(agent_process.state_dir / "ledger.sqlite3") as ledger:
        entry = ledger.get(command["idempotency_key"])
    assert entry is not None
    assert entry.attempts == 2, "the interrupted run was resumed, not started afresh"


async def test_after_a_gateway_restart_agents_reconnect_and_pending_commands_complete(
    channel: Channel, tmp_path: Path
) -> None:
    state = tmp_path / "agent"
    server_id = await enroll_agent(channel, "steady", state)
    runtime = AgentRuntime(state, max_backoff_s=1.0)
    await runtime.start()
    try:
        first_session = await asyncio.wait_for(runtime.wait_connected(), 20)
        await wait_presence(channel, server_id, "online")
        ports = channel.gateway.port, channel.gateway.enroll_port
        await channel.gateway.stop()

        pending = await channel.command(server_id, "system.ping")
        await asyncio.sleep(1)
        assert (await channel.get_command(pending["id"]))["state"] == "pending"

        channel.stack.settings.gateway_port, channel.stack.settings.gateway_enroll_port = ports
        channel.gateway = GatewayService(channel.stack)
        await channel.gateway.start()
        done = await channel.wait_command(pending["id"], timeout_s=60)
        assert done["state"] == "succeeded"
        assert runtime.session_id != first_session
        assert runtime.counters.reconnects >= 1
        server = await wait_presence(channel, server_id, "online")
        assert server["presence"] == "online"
    finally:
        await runtime.stop()
