"""From a signed command envelope to a stream of results, executing at most what it should.

Order of checks (each refusal is one REJECTED result and runs nothing): signature,
target identity, deadline, approved capability, payload JSON, ledger conflict. Then the
ledger decides: run, resume, or replay the stored result of a duplicate.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from agent.ledger import Conflict, FinalStatus, Ledger, LedgerEntry, Replay, Resume, Run
from engines.base import CommandContext, CommandSpec, EngineError, EngineRegistry, ProgressReport
from proto import agent_pb2, signing
from yakpanel.clock import Clock
from yakpanel.pki import NodeIdentity
from yakpanel.sealing import open_secrets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Final:
    """A final outcome, as sent and as stored in the ledger."""

    status: agent_pb2.ResultStatus
    output: str
    error_code: str = ""
    message: str = ""


class CommandProcessor:
    """Verifies, deduplicates and executes command envelopes for one node identity."""

    def __init__(
        self,
        identity: NodeIdentity,
        signing_public_key: bytes,
        private_key: ec.EllipticCurvePrivateKey,
        capabilities: set[str] | frozenset[str],
        registry: EngineRegistry,
        ledger: Ledger,
        clock: Clock,
    ) -> None:
        self._identity = identity
        self._signing_key = signing_public_key
        self._private_key = private_key
        self._capabilities = frozenset(capabilities)
        self._registry = registry
        self._ledger = ledger
        self._clock = clock
        self._key_locks = _KeyedLocks()

    async def handle(
        self, envelope: agent_pb2.CommandEnvelope
    ) -> AsyncIterator[agent_pb2.CommandResult]:
        """Yield the results of one delivery in order: REJECTED alone, or ACKNOWLEDGED,
        any PROGRESS, then SUCCEEDED or FAILED (`replayed=True` for a duplicate)."""
        refusal = self._refusal(envelope)
        if refusal is not None:
            code, message = refusal
            yield self._rejected(envelope, code, message)
            return
        spec = self._registry.get(envelope.type)
        assert spec is not None  # _refusal checked it
        try:
            payload = json.loads(envelope.payload)
        except (ValueError, UnicodeDecodeError):
            payload = None
        if not isinstance(payload, dict):
            yield self._rejected(envelope, "invalid_payload", "the payload is not a JSON object")
            return

        # Two deliveries of one key at once would both see "new" or "started": serialize.
        async with self._key_locks.hold(envelope.idempotency_key):
            # The deadline may have passed while an earlier delivery of this key ran.
            if self._clock.now() >= _deadline(envelope):
                yield self._rejected(envelope, "expired", _expired_message(envelope, self._clock))
                return
            decision = await asyncio.to_thread(self._ledger.begin, envelope)
            match decision:
                case Conflict(entry):
                    yield self._rejected(
                        envelope,
                        "conflict",
                        f"idempotency key {envelope.idempotency_key} was already used by "
                        f"command {entry.command_id} ({entry.type}) with a different payload",
                    )
                case Replay(entry):
                    log.info(
                        "command %s (%s): duplicate of a finished command, replaying its %s",
                        envelope.command_id,
                        envelope.type,
                        entry.status,
                        extra=_log_fields(envelope),
                    )
                    yield self._result(envelope, agent_pb2.ACKNOWLEDGED)
                    yield self._stored(envelope, entry)
                case Resume(entry) if not spec.idempotent:
                    yield self._result(envelope, agent_pb2.ACKNOWLEDGED)
                    final = _failed(
                        "interrupted",
                        f"the agent stopped while running {envelope.type} (attempt "
                        f"{entry.attempts - 1}); it is not idempotent, so it was not run "
                        "again: check the node before retrying with a new idempotency key",
                    )
                    await self._finish(envelope, final)
                    yield self._final(envelope, final)
                case Resume(entry):
                    log.warning(
                        "command %s (%s) was interrupted; it is idempotent, running attempt %d",
                        envelope.command_id,
                        envelope.type,
                        entry.attempts,
                        extra=_log_fields(envelope),
                    )
                    async for result in self._execute(envelope, spec, payload):
                        yield result
                case Run():
                    async for result in self._execute(envelope, spec, payload):
                        yield result

    def _refusal(self, envelope: agent_pb2.CommandEnvelope) -> tuple[str, str] | None:
        if not signing.verify(envelope, self._signing_key):
            return "bad_signature", "the envelope signature does not verify with the signing key"
        if envelope.tenant_id != str(self._identity.tenant_id) or envelope.server_id != str(
            self._identity.server_id
        ):
            return (
                "wrong_target",
                f"the command is for tenant {envelope.tenant_id} server {envelope.server_id}, "
                f"but this node is {self._identity.uri}",
            )
        if self._clock.now() >= _deadline(envelope):
            return "expired", _expired_message(envelope, self._clock)
        if envelope.type not in self._capabilities:
            return (
                "not_capable",
                f"{envelope.type} is not approved on this node: the node's agent.toml must "
                "list it under capabilities",
            )
        if envelope.type not in self._registry:
            return (
                "not_capable",
                f"{envelope.type} is approved in this node's agent.toml but no engine on the "
                "node handles it: add the engine to engines in agent.toml",
            )
        return None

    async def _execute(
        self, envelope: agent_pb2.CommandEnvelope, spec: CommandSpec, payload: dict[str, Any]
    ) -> AsyncIterator[agent_pb2.CommandResult]:
        yield self._result(envelope, agent_pb2.ACKNOWLEDGED)
        # Unbounded: a handler never waits on the stream, and the end marker always fits.
        progress: asyncio.Queue[agent_pb2.CommandResult | None] = asyncio.Queue()

        async def report(percent: int, message: str) -> None:
            progress.put_nowait(
                self._result(
                    envelope, agent_pb2.PROGRESS, progress_percent=percent, message=message
                )
            )

        async def run() -> _Final:
            try:
                return await self._run_handler(envelope, spec, payload, report)
            finally:
                progress.put_nowait(None)

        task = asyncio.create_task(run(), name=f"command {envelope.command_id}")
        try:
            while (item := await progress.get()) is not None:
                yield item
            final = await task
        finally:
            # The consumer went away (agent stopping): stop the handler too. The ledger
            # keeps the key as started, so the next delivery resumes it.
            if not task.done():
                task.cancel()
        await self._finish(envelope, final)
        yield self._final(envelope, final)

    async def _run_handler(
        self,
        envelope: agent_pb2.CommandEnvelope,
        spec: CommandSpec,
        payload: dict[str, Any],
        report: ProgressReport,
    ) -> _Final:
        deadline = _deadline(envelope)
        ctx = CommandContext(
            command_id=envelope.command_id,
            idempotency_key=envelope.idempotency_key,
            deadline=deadline,
            clock=self._clock,
            report=report,
        )
        try:
            opened = open_secrets(payload, self._private_key, envelope.command_id)
        except (ValueError, TypeError):
            return _failed(
                "sealed_secret",
                "a sealed secret in the payload does not open with this node's key; it must "
                "be sealed to this node's certificate for this command",
            )
        remaining = (deadline - self._clock.now()).total_seconds()
        try:
            async with asyncio.timeout(max(remaining, 0.0)) as window:
                output = await spec.handler(ctx, opened)
            if not isinstance(output, dict):
                raise TypeError(f"the handler returned {type(output).__name__}, not a dict")
            text = json.dumps(output, separators=(",", ":"), sort_keys=True, allow_nan=False)
        except EngineError as exc:
            return _failed(exc.code, exc.message, exc.retryable)
        except TimeoutError:
            if window.expired():
                return _failed(
                    "deadline_exceeded",
                    f"{envelope.type} did not finish before its deadline {deadline.isoformat()}",
                    retryable=True,
                )
            log.exception("command %s (%s) failed", envelope.command_id, envelope.type)
            return _engine_error(envelope)
        except Exception:
            # The exception text may quote opened secrets: the traceback stays in the local
            # log, the result only says where to look.
            log.exception("command %s (%s) failed", envelope.command_id, envelope.type)
            return _engine_error(envelope)
        return _Final(agent_pb2.SUCCEEDED, text)

    async def _finish(self, envelope: agent_pb2.CommandEnvelope, final: _Final) -> None:
        status: FinalStatus = "SUCCEEDED" if final.status == agent_pb2.SUCCEEDED else "FAILED"
        await asyncio.to_thread(
            self._ledger.finish,
            envelope.idempotency_key,
            status,
            final.output,
            final.error_code,
            final.message,
        )
        log.info(
            "command %s (%s) %s%s",
            envelope.command_id,
            envelope.type,
            status,
            f": {final.error_code}" if final.error_code else "",
            extra=_log_fields(envelope),
        )

    def _result(
        self,
        envelope: agent_pb2.CommandEnvelope,
        status: agent_pb2.ResultStatus,
        *,
        progress_percent: int = 0,
        message: str = "",
        output: str = "",
        error_code: str = "",
        replayed: bool = False,
    ) -> agent_pb2.CommandResult:
        result = agent_pb2.CommandResult(
            command_id=envelope.command_id,
            idempotency_key=envelope.idempotency_key,
            tenant_id=str(self._identity.tenant_id),
            server_id=str(self._identity.server_id),
            status=status,
            progress_percent=progress_percent,
            message=message,
            output=output.encode(),
            error_code=error_code,
            replayed=replayed,
        )
        result.at.FromDatetime(self._clock.now())
        return result

    def _rejected(
        self, envelope: agent_pb2.CommandEnvelope, code: str, message: str
    ) -> agent_pb2.CommandResult:
        log.warning(
            "command %s (%s) rejected, %s: %s",
            envelope.command_id,
            envelope.type,
            code,
            message,
            extra=_log_fields(envelope),
        )
        return self._result(envelope, agent_pb2.REJECTED, error_code=code, message=message)

    def _final(
        self, envelope: agent_pb2.CommandEnvelope, final: _Final, replayed: bool = False
    ) -> agent_pb2.CommandResult:
        return self._result(
            envelope,
            final.status,
            progress_percent=100,
            message=final.message,
            output=final.output,
            error_code=final.error_code,
            replayed=replayed,
        )

    def _stored(
        self, envelope: agent_pb2.CommandEnvelope, entry: LedgerEntry
    ) -> agent_pb2.CommandResult:
        status = agent_pb2.SUCCEEDED if entry.status == "SUCCEEDED" else agent_pb2.FAILED
        final = _Final(status, entry.output or "", entry.error_code or "", entry.message or "")
        return self._final(envelope, final, replayed=True)


class _KeyedLocks:
    """One asyncio.Lock per idempotency key, dropped when nobody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if self._users[key] == 0:
                del self._users[key]
                del self._locks[key]


def _deadline(envelope: agent_pb2.CommandEnvelope) -> datetime:
    return envelope.deadline.ToDatetime(tzinfo=UTC)


def _expired_message(envelope: agent_pb2.CommandEnvelope, clock: Clock) -> str:
    return (
        f"the deadline {_deadline(envelope).isoformat()} passed "
        f"(agent time {clock.now().isoformat()})"
    )


def _engine_error(envelope: agent_pb2.CommandEnvelope) -> _Final:
    return _failed(
        "engine_error",
        f"the {envelope.type} handler failed unexpectedly; see the agent log for command "
        f"{envelope.command_id}",
    )


def _failed(code: str, message: str, retryable: bool = False) -> _Final:
    return _Final(agent_pb2.FAILED, json.dumps({"retryable": retryable}), code, message)


def _log_fields(envelope: agent_pb2.CommandEnvelope) -> dict[str, object]:
    # Identifiers only: payloads may hold opened secrets and never reach a log.
    return {
        "command_id": envelope.command_id,
        "idempotency_key": envelope.idempotency_key,
        "command_type": envelope.type,
    }
