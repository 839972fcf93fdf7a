"""A test engine for workflows, loaded by agents through `engines = [...]` in agent.toml.

`wf.step` appends one line `<line>\\t<idempotency key>\\t<secret digest>` to a journal
file, at most once per idempotency key (it looks for its key first, as an idempotent
engine must), so a test reads from the journal which steps and compensations ran, in
which order, and how many times. It can also fail on purpose:

- `fail: true` fails non-retryably (`EngineError("refused", …)`) without writing;
- `fail_times: n` fails retryably the first n times it runs for this `line` (counted in
  `<journal>.failures`), then succeeds;
- `hold_seconds` holds after writing, reporting progress, so a test can kill the agent
  mid-step.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engines.base import CommandContext, CommandSpec, EngineError, parse_payload


class StepPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str
    line: str = Field(pattern=r"^[A-Za-z0-9:._-]{1,64}$")
    fail: bool = False
    fail_times: int = Field(default=0, ge=0, le=100)
    hold_seconds: float = Field(default=0, ge=0, le=60)
    secret: str | None = None


class WorkflowEngine:
    name = "wf"

    def commands(self) -> dict[str, CommandSpec]:
        return {
            "wf.step": CommandSpec(
                self.step,
                idempotent=True,
                description="Journal one line per idempotency key; fail on request.",
            )
        }

    async def step(self, ctx: CommandContext, payload: dict[str, Any]) -> dict[str, Any]:
        spec = parse_payload(StepPayload, payload)
        journal = Path(spec.file)
        if not journal.is_absolute():
            raise EngineError("invalid_payload", "file must be an absolute path")
        if spec.fail:
            raise EngineError("refused", f"step {spec.line} was told to fail")
        if spec.fail_times and await asyncio.to_thread(
            _fail_again, journal, spec.line, spec.fail_times
        ):
            raise EngineError(
                "flaky", f"step {spec.line} failed on purpose; try again", retryable=True
            )
        digest = hashlib.sha256(spec.secret.encode()).hexdigest() if spec.secret else "-"
        entry = f"{spec.line}\t{ctx.idempotency_key}\t{digest}"
        count = await asyncio.to_thread(_journal_once, journal, ctx.idempotency_key, entry)
        steps = math.ceil(spec.hold_seconds / 0.25)
        for n in range(1, steps + 1):
            await asyncio.sleep(spec.hold_seconds / steps)
            await ctx.progress(100 * n // steps, f"holding {n}/{steps}")
        return {"line": spec.line, "journal_lines": count}


def _fail_again(journal: Path, line: str, times: int) -> bool:
    """Whether to fail this run; counts the failures of `line` next to the journal."""
    failures = journal.with_name(journal.name + ".failures")
    seen = failures.read_text().split() if failures.exists() else []
    if seen.count(line) >= times:
        return False
    with failures.open("a") as handle:
        handle.write(line + "\n")
    return True


def _journal_once(journal: Path, key: str, entry: str) -> int:
    """Append `entry` unless this key already wrote one; returns the journal's length."""
    lines = journal.read_text().splitlines() if journal.exists() else []
    if not any(line.split("\t")[1] == key for line in lines):
        with journal.open("a") as handle:
            handle.write(entry + "\n")
        lines.append(entry)
    return len(lines)
