"""The agent `yakpanel up` runs in its own process for the demo server."""

from __future__ import annotations

from typing import Any

from agent.enroll import enroll
from agent.runtime import AgentRuntime
from agent.state import is_enrolled
from yakpanel.services import Service, Stack


async def build_local_agent(stack: Stack, enrollment: dict[str, Any]) -> tuple[list[str], Service]:
    state_dir = stack.settings.state_dir.expanduser().resolve() / "agent"
    lines: list[str] = []
    if enrollment.get("token") and not is_enrolled(state_dir):
        identity = await enroll(
            enrollment["enroll_address"], enrollment["token"], enrollment["ca_pem"], state_dir
        )
        lines.append(f"local agent enrolled as server {identity.server_id}")
    return lines, AgentRuntime(state_dir)
