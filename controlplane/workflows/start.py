"""Starting a workflow inside the caller's transaction, and the hooks run when one ends.

The caller (an API use case) stores its desired state and starts the workflow in one
unit of work, so either both happen or neither; the driver in the worker picks the
workflow up from there.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from controlplane.db import UnitOfWork
from controlplane.problems import Problem
from controlplane.registry.commands import MAX_PAYLOAD_BYTES
from controlplane.workflows.model import COMMAND_TYPE, StepSpec, WorkflowOutcome
from controlplane.workflows.secrets import box_secrets, current_box
from yakpanel.ids import new_id
from yakpanel.sealing import has_plain_secrets
from yakpanel.secretbox import SecretBox

KIND = "workflow"
MAX_STEPS = 100

Hook = Callable[[UnitOfWork, WorkflowOutcome], Awaitable[None]]
_hooks: dict[str, list[Hook]] = {}


def on_workflow_finished(kind: str, hook: Hook) -> None:
    """Run `hook` inside the driver's transaction when a workflow of `kind` ends.

    A hook that raises rolls the ending back; the driver tries again on its next round,
    so hooks must be safe to run again (they usually update the subject's state).
    """
    hooks = _hooks.setdefault(kind, [])
    if hook not in hooks:
        hooks.append(hook)


def hooks_for(kind: str) -> list[Hook]:
    return list(_hooks.get(kind, ()))


def step_context(workflow_id: uuid.UUID, index: int) -> str:
    """What a boxed secret is bound to: it opens only for this workflow's step."""
    return f"workflow:{workflow_id}:step:{index}"


async def transition(
    uow: UnitOfWork, event: str, workflow_id: uuid.UUID, data: dict[str, Any]
) -> None:
    """Audit entry and domain event for one state change. `data` never holds payloads."""
    await uow.audit(event, KIND, workflow_id, None, data)
    await uow.emit(event, KIND, workflow_id, data)


def _check(steps: Sequence[StepSpec]) -> None:
    if not steps:
        raise ValueError("a workflow needs at least one step")
    if len(steps) > MAX_STEPS:
        raise ValueError(f"a workflow has at most {MAX_STEPS} steps")
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ValueError("step names must be unique within a workflow (outputs are keyed by name)")
    for step in steps:
        types = [step.command_type] + ([step.compensation[0]] if step.compensation else [])
        for command_type in types:
            if not COMMAND_TYPE.match(command_type):
                raise ValueError(f"step {step.name!r}: {command_type!r} is not a command type")
        if not 1 <= step.timeout_s <= 86_400:
            raise ValueError(f"step {step.name!r}: timeout_s must be within 1..86400")
        for payload in [step.payload] + ([step.compensation[1]] if step.compensation else []):
            if len(json.dumps(payload).encode()) > MAX_PAYLOAD_BYTES:
                raise Problem(
                    413,
                    "payload_too_large",
                    f"step {step.name!r}: payloads are limited to {MAX_PAYLOAD_BYTES} bytes",
                )


async def start_workflow(
    uow: UnitOfWork,
    tenant_id: uuid.UUID,
    kind: str,
    subject_type: str,
    subject_id: uuid.UUID,
    steps: Sequence[StepSpec],
    *,
    box: SecretBox | None = None,
) -> uuid.UUID:
    """Record a workflow whose steps run in order; returns its id.

    Runs in the caller's transaction (the unit of work must be scoped to `tenant_id`).
    `box` seals payload secrets at rest; without it the box registered with
    `use_secret_box` at start is used. Raises ValueError for a malformed step list (a
    programming error), Problem 422 `unknown_server` when a step names a server the
    tenant does not have, Problem 413 for an oversized payload.
    """
    _check(steps)
    if uow.tenant_id != tenant_id:
        raise ValueError("start_workflow needs a unit of work scoped to the workflow's tenant")
    servers = {s.server_id for s in steps}
    rows = await (
        await uow.conn.execute(
            "SELECT id FROM servers WHERE tenant_id = %s AND id = ANY(%s)",
            (tenant_id, list(servers)),
        )
    ).fetchall()
    missing = servers - {r["id"] for r in rows}
    if missing:
        raise Problem(
            422,
            "unknown_server",
            f"no such server in this tenant: {', '.join(sorted(map(str, missing)))}",
        )
    needs_box = any(
        has_plain_secrets(s.payload) or (s.compensation and has_plain_secrets(s.compensation[1]))
        for s in steps
    )
    sealer = current_box(box) if needs_box else None
    workflow_id = new_id()
    now = uow.clock.now()
    await uow.conn.execute(
        """INSERT INTO workflows (tenant_id, id, kind, subject_type, subject_id, state,
               step_count, wake_at, created_by, created_at, updated_at)
           VALUES (%s, %s, %s, %s, %s, 'running', %s, %s, %s, %s, %s)""",
        (
            tenant_id,
            workflow_id,
            kind,
            subject_type,
            subject_id,
            len(steps),
            now,
            json.dumps(uow.actor.as_json()),
            now,
            now,
        ),
    )
    for index, step in enumerate(steps):
        context = step_context(workflow_id, index)

        def stored(payload: dict[str, Any], context: str = context) -> str:
            value = box_secrets(payload, sealer, context) if sealer is not None else payload
            return json.dumps(value)

        await uow.conn.execute(
            """INSERT INTO workflow_steps (tenant_id, workflow_id, index, name, server_id,
                   command_type, payload, compensation_type, compensation_payload,
                   max_attempts, base_delay_s, max_delay_s, timeout_s)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
            (
                tenant_id,
                workflow_id,
                index,
                step.name,
                step.server_id,
                step.command_type,
                stored(step.payload),
                step.compensation[0] if step.compensation else None,
                stored(step.compensation[1]) if step.compensation else None,
                step.retry.max_attempts,
                step.retry.base_delay_s,
                step.retry.max_delay_s,
                step.timeout_s,
            ),
        )
    await transition(
        uow,
        "workflow.started",
        workflow_id,
        {
            "kind": kind,
            "subject_type": subject_type,
            "subject_id": str(subject_id),
            "steps": [
                {
                    "index": i,
                    "name": s.name,
                    "server_id": str(s.server_id),
                    "command_type": s.command_type,
                    "compensation": s.compensation[0] if s.compensation else None,
                    "max_attempts": s.retry.max_attempts,
                }
                for i, s in enumerate(steps)
            ],
        },
    )
    return workflow_id
