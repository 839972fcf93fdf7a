"""The workflow driver: advances workflows one transition at a time from their rows.

Each round it finds unfinished workflows that can move (a backoff has passed, or the
command they wait for has finished), locks each with `FOR UPDATE SKIP LOCKED` (several
workers never move the same workflow at once) and advances it as far as it can in one
transaction: dispatch a step as a command, record its result, schedule a retry, start
compensating, finish. Every transition is audited and published as an event in that
same transaction.

A step's command carries the idempotency key `wf:{workflow}:{step}:{attempt}`
(compensations `wf:{workflow}:{step}:undo:{attempt}`): a redelivered command is the
same attempt and the agent's ledger runs it at most once, while a retry is a new
attempt the agent runs afresh. Only failures that may pass are retried: a failure the
engine marks retryable, a command that expired (agent offline, deadline passed), a
server whose agent is not enrolled yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controlplane.db import SYSTEM, Database, UnitOfWork
from controlplane.problems import Problem
from controlplane.registry.commands import FINAL, issue_command
from controlplane.workflows.model import ACTIVE, FinalState, RetryPolicy, WorkflowOutcome
from controlplane.workflows.secrets import has_boxed_secrets, unbox_secrets
from controlplane.workflows.start import hooks_for, step_context, transition
from yakpanel.secretbox import SecretBox

log = logging.getLogger(__name__)

# Failure codes that may pass on their own; an engine says so per failure otherwise.
RETRYABLE_CODES = frozenset({"expired", "deadline_exceeded", "server_not_enrolled"})

Row = dict[str, Any]
Jitter = Callable[[float], float]


def full_jitter(cap: float) -> float:
    return random.uniform(0.0, cap)  # noqa: S311 - spreading retries, not a secret


def is_retryable(state: str, error_code: str | None, output: Any) -> bool:
    """Whether a finished, unsuccessful command may succeed if tried again."""
    if state == "expired" or error_code in RETRYABLE_CODES:
        return True
    return isinstance(output, dict) and output.get("retryable") is True


def _policy(step: Row) -> RetryPolicy:
    return RetryPolicy(step["max_attempts"], step["base_delay_s"], step["max_delay_s"])


def _label(step: Row) -> str:
    return f"step {step['index'] + 1} ({step['name']})"


class WorkflowDriver:
    """Moves workflows forward; `run()` loops until `stop()`, `tick()` is one round."""

    def __init__(
        self,
        db: Database,
        signing_key: Ed25519PrivateKey,
        box: SecretBox,
        poll_interval_s: float = 0.25,
        batch_size: int = 100,
        jitter: Jitter = full_jitter,
    ) -> None:
        self.db = db
        self.signing_key = signing_key
        self.box = box
        self.poll_interval_s = poll_interval_s
        self.batch_size = batch_size
        self.jitter = jitter
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.tick()
            except Exception:
                log.exception("workflow round failed; retrying next round")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.poll_interval_s)

    async def tick(self) -> int:
        """One round over the workflows that can move; returns how many moved."""
        async with self.db.unit_of_work(SYSTEM, staff_read=True) as uow:
            due = await (
                await uow.conn.execute(
                    """SELECT w.tenant_id, w.id FROM workflows w
                       WHERE w.state IN ('running', 'compensating')
                         AND ((w.wake_at IS NOT NULL AND w.wake_at <= %s)
                              OR (w.awaiting_command IS NOT NULL
                                  AND NOT EXISTS (SELECT 1 FROM commands c
                                                  WHERE c.id = w.awaiting_command
                                                    AND c.state <> ALL(%s))))
                       ORDER BY w.wake_at NULLS FIRST LIMIT %s""",
                    (uow.clock.now(), sorted(FINAL), self.batch_size),
                )
            ).fetchall()
        moved = 0
        for row in due:
            try:
                if await self.advance(row["tenant_id"], row["id"]):
                    moved += 1
            except Exception:
                # One broken workflow (or hook) must not stall the others.
                log.exception("workflow %s could not advance; retrying next round", row["id"])
        return moved

    async def advance(self, tenant_id: uuid.UUID, workflow_id: uuid.UUID) -> bool:
        """Advance one workflow as far as it goes now; False if another driver holds it."""
        async with self.db.unit_of_work(SYSTEM, tenant_id) as uow:
            wf = await (
                await uow.conn.execute(
                    """SELECT * FROM workflows WHERE tenant_id = %s AND id = %s
                       AND state = ANY(%s) FOR UPDATE SKIP LOCKED""",
                    (tenant_id, workflow_id, list(ACTIVE)),
                )
            ).fetchone()
            if wf is None:
                return False
            steps = await (
                await uow.conn.execute(
                    """SELECT * FROM workflow_steps WHERE tenant_id = %s AND workflow_id = %s
                       ORDER BY index FOR UPDATE""",
                    (tenant_id, workflow_id),
                )
            ).fetchall()
            run = _Run(self, uow, wf, steps)
            # Each pass makes one transition; a workflow has finitely many before it waits.
            for _ in range(8 * len(steps) + 8):
                if not await run.step():
                    break
            else:  # more to do than one round allows: continue next round
                wf["awaiting_command"], wf["wake_at"] = None, uow.clock.now()
            await uow.conn.execute(
                """UPDATE workflows SET state = %s, error = %s, awaiting_command = %s,
                       wake_at = %s, updated_at = %s, finished_at = %s
                   WHERE tenant_id = %s AND id = %s""",
                (
                    wf["state"],
                    wf["error"],
                    wf["awaiting_command"],
                    wf["wake_at"],
                    uow.clock.now(),
                    wf["finished_at"],
                    tenant_id,
                    workflow_id,
                ),
            )
        return True


class _Run:
    """One workflow inside one transaction: rows in memory, every change written through."""

    def __init__(self, driver: WorkflowDriver, uow: UnitOfWork, wf: Row, steps: list[Row]):
        self.driver = driver
        self.uow = uow
        self.wf = wf
        self.steps = steps

    @property
    def id(self) -> uuid.UUID:
        workflow_id: uuid.UUID = self.wf["id"]
        return workflow_id

    async def step(self) -> bool:
        """Make one transition; False when the workflow waits (or ended)."""
        if self.wf["state"] == "running":
            return await self._forward()
        if self.wf["state"] == "compensating":
            return await self._backward()
        return False

    # --- forward -------------------------------------------------------------------------

    async def _forward(self) -> bool:
        step = next((s for s in self.steps if s["state"] != "succeeded"), None)
        if step is None:
            await self._finish("succeeded", None)
            return False
        if step["state"] == "pending":
            return await self._dispatch_when_due(step, undo=False)
        command = await self._command(step)
        if command is None:
            await self._command_lost(step, undo=False)
            return True
        if command["state"] not in FINAL:
            return self._wait_for(step)
        attempt = step["attempts"]
        if command["state"] == "succeeded":
            output = command["output"] if isinstance(command["output"], dict) else {}
            await self._update(
                step,
                state="succeeded",
                output=json.dumps(output),
                finished_at=command["finished_at"],
                error_code=None,
                last_error=None,
            )
            step["output"] = output
            await self._event("workflow.step.succeeded", step, attempt=attempt)
            return True
        await self._attempt_failed(
            step,
            command["error_code"] or command["state"],
            command["message"] or f"the command ended {command['state']}",
            is_retryable(command["state"], command["error_code"], command["output"]),
            undo=False,
        )
        return True

    # --- backward (compensation) ---------------------------------------------------------

    async def _backward(self) -> bool:
        step = next(
            (
                s
                for s in reversed(self.steps)
                if s["state"] in ("succeeded", "compensating") and s["compensation_type"]
            ),
            None,
        )
        if step is None:
            await self._finish("compensated", self.wf["error"])
            return False
        if step["state"] == "succeeded":
            await self._update(
                step, state="compensating", next_attempt_at=self.uow.clock.now(), last_error=None
            )
            await self._event("workflow.step.compensating", step)
            return True
        if step["next_attempt_at"] is not None:
            return await self._dispatch_when_due(step, undo=True)
        command = await self._command(step)
        if command is None:
            await self._command_lost(step, undo=True)
            return True
        if command["state"] not in FINAL:
            return self._wait_for(step)
        if command["state"] == "succeeded":
            await self._update(step, state="compensated", compensated_at=command["finished_at"])
            await self._event(
                "workflow.step.compensated", step, attempt=step["compensation_attempts"]
            )
            return True
        await self._attempt_failed(
            step,
            command["error_code"] or command["state"],
            command["message"] or f"the command ended {command['state']}",
            is_retryable(command["state"], command["error_code"], command["output"]),
            undo=True,
        )
        return True

    # --- shared --------------------------------------------------------------------------

    async def _command(self, step: Row) -> Row | None:
        if step["command_id"] is None:
            return None
        return await (
            await self.uow.conn.execute(
                """SELECT id, state, output, error_code, message, finished_at FROM commands
                   WHERE tenant_id = %s AND id = %s""",
                (self.wf["tenant_id"], step["command_id"]),
            )
        ).fetchone()

    async def _command_lost(self, step: Row, undo: bool) -> None:
        # Commands go with their server (ON DELETE CASCADE): nothing will ever finish it.
        await self._attempt_failed(
            step,
            "command_lost",
            "the step's command no longer exists (was its server removed?)",
            retryable=False,
            undo=undo,
        )

    def _wait_for(self, step: Row) -> bool:
        self.wf["awaiting_command"] = step["command_id"]
        self.wf["wake_at"] = None
        return False

    async def _dispatch_when_due(self, step: Row, undo: bool) -> bool:
        now = self.uow.clock.now()
        if step["next_attempt_at"] is not None and step["next_attempt_at"] > now:
            self.wf["awaiting_command"] = None
            self.wf["wake_at"] = step["next_attempt_at"]
            return False
        counter = "compensation_attempts" if undo else "attempts"
        attempt = step[counter] + 1
        command_type = step["compensation_type"] if undo else step["command_type"]
        payload = step["compensation_payload"] if undo else step["payload"]
        if has_boxed_secrets(payload):
            context = step_context(self.id, step["index"])
            payload = unbox_secrets(payload, self.driver.box, context)
        key = f"wf:{self.id}:{step['index']}:{'undo:' if undo else ''}{attempt}"
        try:
            command, _ = await issue_command(
                self.uow,
                self.wf["tenant_id"],
                step["server_id"],
                command_type,
                payload,
                key,
                step["timeout_s"],
                signing_key=self.driver.signing_key,
            )
        except Problem as exc:
            # Nothing was written: the issuer refuses before it inserts.
            await self._update(step, **{counter: attempt})
            await self._attempt_failed(
                step, exc.code, exc.detail, exc.code in RETRYABLE_CODES, undo=undo
            )
            return True
        changes: dict[str, Any] = {
            counter: attempt,
            "command_id": command["id"],
            "command_ids": [*step["command_ids"], command["id"]],
            "next_attempt_at": None,
        }
        if not undo:
            changes["state"] = "running"
            if step["started_at"] is None:
                changes["started_at"] = command["issued_at"]
        await self._update(step, **changes)
        event = "workflow.step.compensation_running" if undo else "workflow.step.running"
        await self._event(event, step, attempt=attempt, command_id=str(command["id"]))
        return True

    async def _attempt_failed(
        self, step: Row, code: str, message: str, retryable: bool, undo: bool
    ) -> None:
        attempt = step["compensation_attempts"] if undo else step["attempts"]
        policy = _policy(step)
        if retryable and attempt < policy.max_attempts:
            cap = policy.cap(attempt)
            delay = max(0.0, min(cap, self.driver.jitter(cap)))
            at = self.uow.clock.now() + timedelta(seconds=delay)
            changes: dict[str, Any] = {
                "next_attempt_at": at,
                "error_code": code,
                "last_error": message,
            }
            if not undo:
                changes["state"] = "pending"
            await self._update(step, **changes)
            await self._event(
                "workflow.step.retry_scheduled",
                step,
                attempt=attempt,
                compensation=undo,
                error_code=code,
                error=message,
                delay_s=round(delay, 3),
                cap_s=cap,
                next_attempt_at=at.isoformat(),
            )
            return
        why = "" if retryable else " (not retryable)"
        if attempt >= policy.max_attempts and retryable:
            why = f" after {attempt} attempts"
        if undo:
            await self._update(
                step, state="compensation_failed", error_code=code, last_error=message
            )
            await self._event(
                "workflow.step.compensation_failed",
                step,
                attempt=attempt,
                error_code=code,
                error=message,
            )
            left = [
                _label(s)
                for s in self.steps
                if s["state"] in ("succeeded", "compensating", "compensation_failed")
            ]
            error = (
                f"{self.wf['error']}; undoing {_label(step)} with {step['compensation_type']} "
                f"failed{why}: {message} [{code}]. Left in place: {', '.join(left)}; "
                "check the server(s) and clean up by hand"
            )
            await self._finish("failed", error)
            return
        await self._update(
            step,
            state="failed",
            error_code=code,
            last_error=message,
            finished_at=self.uow.clock.now(),
        )
        await self._event(
            "workflow.step.failed", step, attempt=attempt, error_code=code, error=message
        )
        self.wf["error"] = f"{_label(step)} failed{why}: {message} [{code}]"
        self.wf["state"] = "compensating"
        await transition(
            self.uow,
            "workflow.compensating",
            self.id,
            {"error": self.wf["error"], "failed_step": step["index"]},
        )

    async def _finish(self, state: FinalState, error: str | None) -> None:
        now = self.uow.clock.now()
        self.wf.update(
            state=state, error=error, finished_at=now, awaiting_command=None, wake_at=None
        )
        await transition(
            self.uow,
            f"workflow.{state}",
            self.id,
            {
                "kind": self.wf["kind"],
                "subject_type": self.wf["subject_type"],
                "subject_id": str(self.wf["subject_id"]),
                "error": error,
                "steps": {s["name"]: s["state"] for s in self.steps},
            },
        )
        outcome = WorkflowOutcome(
            workflow_id=self.id,
            tenant_id=self.wf["tenant_id"],
            kind=self.wf["kind"],
            subject_type=self.wf["subject_type"],
            subject_id=self.wf["subject_id"],
            state=state,
            error=error,
            outputs={s["name"]: s["output"] for s in self.steps if s["output"] is not None},
        )
        for hook in hooks_for(self.wf["kind"]):
            await hook(self.uow, outcome)

    async def _update(self, step: Row, **changes: Any) -> None:
        step.update(changes)
        columns = ", ".join(f"{name} = %s" for name in changes)
        await self.uow.conn.execute(
            # Column names come from this module, never from input.
            f"UPDATE workflow_steps SET {columns}"
            " WHERE tenant_id = %s AND workflow_id = %s AND index = %s",
            (*changes.values(), self.wf["tenant_id"], self.id, step["index"]),
        )
        if "output" in changes and isinstance(changes["output"], str):
            step["output"] = json.loads(changes["output"])

    async def _event(self, event: str, step: Row, **data: Any) -> None:
        undo = step["state"] in ("compensating", "compensated", "compensation_failed")
        await transition(
            self.uow,
            event,
            self.id,
            {
                "step": step["index"],
                "name": step["name"],
                "command_type": step["compensation_type"] if undo else step["command_type"],
                "state": step["state"],
                **data,
            },
        )
