"""Test engines that agents load through `engines = [...]` in agent.toml."""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
from pathlib import Path
from typing import Any

from engines.base import CommandContext, CommandSpec, EngineError


class CountingEngine:
    """`test.effect` leaves one file per idempotency key in `payload["dir"]`, so a test can
    count how many times a command's effect really happened.

    Payload: `{"dir": "/abs/path", "hold_seconds": float}`. The effect happens first (an
    O_CREAT|O_EXCL file named after the key), then the handler holds for `hold_seconds`
    reporting progress, so that a test can kill the agent mid-command. Output:
    `{"effects": <files in dir>}`.
    """

    name = "test"

    def commands(self) -> dict[str, CommandSpec]:
        return {
            "test.effect": CommandSpec(
                self.effect,
                idempotent=True,
                description="Record an effect once per idempotency key, then hold.",
            ),
            "test.secret_digest": CommandSpec(
                self.secret_digest,
                idempotent=True,
                description="Prove a sealed secret arrived opened, without echoing it.",
            ),
        }

    async def secret_digest(self, ctx: CommandContext, payload: dict[str, Any]) -> dict[str, Any]:
        secret = payload.get("secret")
        if not isinstance(secret, str):
            raise EngineError("invalid_payload", "secret must be a string")
        return {"sha256": hashlib.sha256(secret.encode()).hexdigest(), "length": len(secret)}

    async def effect(self, ctx: CommandContext, payload: dict[str, Any]) -> dict[str, Any]:
        directory = payload.get("dir")
        hold = payload.get("hold_seconds", 0)
        if not isinstance(directory, str) or not Path(directory).is_absolute():
            raise EngineError("invalid_payload", "dir must be an absolute path")
        if isinstance(hold, bool) or not isinstance(hold, int | float) or not 0 <= hold <= 600:
            raise EngineError("invalid_payload", "hold_seconds must be a number in 0..600")
        key = ctx.idempotency_key
        if not key or "/" in key or key in {".", ".."}:
            raise EngineError("invalid_payload", "the idempotency key cannot name a file")
        try:
            fd = os.open(Path(directory) / key, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass  # the effect of this key already happened: idempotent
        else:
            os.close(fd)
        steps = math.ceil(hold / 0.5)
        for step in range(1, steps + 1):
            await asyncio.sleep(hold / steps)
            await ctx.progress(100 * step // steps, f"holding {step}/{steps}")
        return {"effects": len(os.listdir(directory))}
