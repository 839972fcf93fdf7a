"""The `system` engine: liveness, host facts, and a long command to exercise progress."""

from __future__ import annotations

import asyncio
import math
import os
import platform
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engines.base import CommandContext, CommandSpec, parse_payload

MAX_SLEEP_SECONDS = 300.0


class _NoFields(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _SleepPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(gt=0, le=MAX_SLEEP_SECONDS, allow_inf_nan=False)


class SystemEngine:
    """Built into every agent; `proc_root` lets tests point it at a fake /proc."""

    name = "system"

    def __init__(self, proc_root: Path = Path("/proc")) -> None:
        self._proc = proc_root

    def commands(self) -> dict[str, CommandSpec]:
        return {
            "system.ping": CommandSpec(
                self.ping, idempotent=True, description="Answer with the agent's clock."
            ),
            "system.info": CommandSpec(
                self.info,
                idempotent=True,
                description="Hostname, OS and kernel, CPUs, memory, Python, boot time.",
            ),
            "system.sleep": CommandSpec(
                self.sleep,
                idempotent=True,
                description="Wait up to 300 s reporting progress each second (for testing).",
            ),
        }

    async def ping(self, ctx: CommandContext, payload: dict[str, Any]) -> dict[str, Any]:
        parse_payload(_NoFields, payload)
        return {"pong": True, "agent_time": ctx.clock.now().isoformat()}

    async def info(self, ctx: CommandContext, payload: dict[str, Any]) -> dict[str, Any]:
        parse_payload(_NoFields, payload)
        uptime = self._uptime_seconds()
        boot_time = None
        if uptime is not None:
            boot_time = (ctx.clock.now() - timedelta(seconds=uptime)).isoformat()
        return {
            "hostname": socket.gethostname(),
            "os": platform.system(),
            "os_release": self._os_pretty_name(),
            "kernel": platform.release(),
            "architecture": platform.machine(),
            "cpu_count": os.cpu_count(),
            "memory_total_bytes": self._memory_total_bytes(),
            "python_version": platform.python_version(),
            "uptime_seconds": uptime,
            "boot_time": boot_time,
        }

    async def sleep(self, ctx: CommandContext, payload: dict[str, Any]) -> dict[str, Any]:
        total = parse_payload(_SleepPayload, payload).seconds
        steps = math.ceil(total)
        # Count elapsed time by steps, not by the clock, so a test clock cannot stall it.
        for step in range(1, steps + 1):
            await asyncio.sleep(min(1.0, total - (step - 1)))
            done = min(float(step), total)
            await ctx.progress(round(100 * done / total), f"slept {done:g} s of {total:g} s")
        return {"slept_seconds": total}

    def _memory_total_bytes(self) -> int | None:
        try:
            lines = (self._proc / "meminfo").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            name, _, rest = line.partition(":")
            if name == "MemTotal":
                value, _, unit = rest.strip().partition(" ")
                return int(value) * (1024 if unit.strip() == "kB" else 1)
        return None

    def _uptime_seconds(self) -> float | None:
        try:
            return float((self._proc / "uptime").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            return None

    @staticmethod
    def _os_pretty_name() -> str | None:
        try:
            return platform.freedesktop_os_release().get("PRETTY_NAME")
        except OSError:
            return None
