"""The agent `yakpanel up` runs in its own process for the demo server."""

from __future__ import annotations

from typing import Any

from agent.enroll import enroll
from agent.runtime import AgentRuntime
from agent.state import CONFIG_FILE, is_enrolled, load_config
from yakpanel.services import Service, Stack


async def build_local_agent(stack: Stack, enrollment: dict[str, Any]) -> tuple[list[str], Service]:
    state_dir = stack.settings.state_dir.expanduser().resolve() / "agent"
    lines: list[str] = []
    if enrollment.get("token") and not is_enrolled(state_dir):
        identity = await enroll(
            enrollment["enroll_address"], enrollment["token"], enrollment["ca_pem"], state_dir
        )
        lines.append(f"local agent enrolled as server {identity.server_id}")
    # Host metrics and site probes start with the runtime (agent.toml's [telemetry]).
    telemetry = load_config(state_dir / CONFIG_FILE).telemetry
    if telemetry.enabled:
        lines.append(
            f"local agent: host metrics every {telemetry.export_interval_s:g} s, site probes "
            f"from {state_dir / telemetry.probes_file}"
        )
    return lines, AgentRuntime(state_dir)
