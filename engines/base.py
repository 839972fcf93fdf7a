"""The engine protocol: how the agent finds and runs the handler for a command type.

An engine is a named group of command handlers (`system.ping`, `site.create`, …). The
agent builds one `EngineRegistry` from the built-in engines and the import strings
listed in the node's `agent.toml`, and runs a handler only for a signed command whose
type the node has approved.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ValidationError

from yakpanel.clock import Clock

ProgressReport = Callable[[int, str], Awaitable[None]]


class EngineError(Exception):
    """A handler's way to fail with a reason: the command ends FAILED with this code.

    `code` is a short machine-readable reason (`invalid_payload`, `nginx_test_failed`);
    `message` tells a person what went wrong and what to do; `retryable` says whether
    running the same command again later may succeed.
    """

    def __init__(self, code: str, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


@dataclass(frozen=True)
class CommandContext:
    """What a handler knows about the command it runs, besides its payload.

    `deadline` is when the control plane stops waiting; the agent cancels the handler
    then. Report progress with `await ctx.progress(percent, message)`; each report is
    streamed back to the control plane in order.
    """

    command_id: str
    idempotency_key: str
    deadline: datetime
    clock: Clock
    report: ProgressReport

    async def progress(self, percent: int, message: str) -> None:
        """Stream a progress update; `percent` is clamped to 0..100."""
        await self.report(max(0, min(100, int(percent))), message)


Handler = Callable[[CommandContext, dict[str, Any]], Awaitable[dict[str, Any]]]
"""`async def handler(ctx, payload) -> output`: payload and output are JSON objects.

Secrets sealed to the agent arrive already opened as plain strings; never log them.
Raise `EngineError` to fail with a reason; anything else is reported as `engine_error`.
"""


@dataclass(frozen=True)
class CommandSpec:
    """One command type an engine handles.

    `idempotent` promises that running the handler again with the same payload after
    an interruption (the agent was killed mid-command) does no harm; the agent re-runs
    only idempotent commands and fails the others as `interrupted`.
    """

    handler: Handler
    idempotent: bool
    description: str


@runtime_checkable
class Engine(Protocol):
    """A named group of handlers; every command type it offers starts with `name.`."""

    name: str

    def commands(self) -> dict[str, CommandSpec]:
        """Command type → spec, e.g. `{"system.ping": CommandSpec(...)}`."""
        ...


class EngineLoadError(ValueError):
    """An engine import string in `agent.toml` does not name a usable engine."""


class EngineRegistry:
    """Command type → spec, built once from a list of engines."""

    def __init__(self, engines: Iterable[Engine]) -> None:
        self._specs: dict[str, CommandSpec] = {}
        self._owners: dict[str, str] = {}
        for engine in engines:
            for command_type, spec in engine.commands().items():
                if not command_type.startswith(f"{engine.name}."):
                    raise EngineLoadError(
                        f"engine {engine.name!r} offers {command_type!r}; its command types "
                        f"must start with {engine.name + '.'!r}"
                    )
                if command_type in self._specs:
                    raise EngineLoadError(
                        f"{command_type!r} is offered by both engine "
                        f"{self._owners[command_type]!r} and engine {engine.name!r}"
                    )
                self._specs[command_type] = spec
                self._owners[command_type] = engine.name

    def get(self, command_type: str) -> CommandSpec | None:
        """The spec for a command type, or None when no engine handles it."""
        return self._specs.get(command_type)

    def __contains__(self, command_type: object) -> bool:
        return command_type in self._specs

    def types(self) -> list[str]:
        """Every registered command type, sorted."""
        return sorted(self._specs)


def load_engine(target: str) -> Engine:
    """Import `"package.module:ClassName"` and instantiate it without arguments."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise EngineLoadError(f"engine {target!r} must look like 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineLoadError(f"engine {target!r}: cannot import {module_name!r}: {exc}") from None
    factory = getattr(module, attribute, None)
    if factory is None:
        raise EngineLoadError(f"engine {target!r}: {module_name!r} has no {attribute!r}")
    if not callable(factory):
        raise EngineLoadError(f"engine {target!r}: {attribute!r} is not a class")
    engine = factory()
    if not isinstance(engine, Engine) or not isinstance(engine.name, str):
        raise EngineLoadError(
            f"engine {target!r} is not an engine: it needs a `name` and a `commands()` method"
        )
    return engine


PayloadModel = TypeVar("PayloadModel", bound=BaseModel)


def parse_payload(model: type[PayloadModel], payload: dict[str, Any]) -> PayloadModel:
    """Validate a payload against a pydantic model, failing with `invalid_payload`.

    The message names the offending fields and rules but never echoes their values,
    which may be opened secrets.
    """
    try:
        return model.model_validate(payload, strict=True)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            where = ".".join(str(part) for part in error["loc"]) or "payload"
            problems.append(f"{where}: {error['msg']}")
        raise EngineError("invalid_payload", "; ".join(problems)) from None
