"""Reading workflows for the API: the list (filters, newest first) and one workflow with
its steps, attempts, commands and the live progress of the command running now.

Payloads are not shown: the commands API shows each attempt's payload (secrets sealed).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from controlplane.access.policy import Resource, authorize, not_found
from controlplane.access.principal import TenantAccess
from controlplane.db import Database
from controlplane.workflows.model import StepState, WorkflowState

READ = "workflows:read"


class WorkflowOut(BaseModel):
    id: uuid.UUID
    kind: str = Field(description="what the workflow does, e.g. `site.create`")
    subject_type: str = Field(description="the kind of resource it works on, e.g. `site`")
    subject_id: uuid.UUID
    state: WorkflowState
    error: str | None = Field(description="why it failed, and what was left in place")
    step_count: int
    steps_succeeded: int = Field(description="steps whose command succeeded, undone or not")
    progress: int = Field(description="0..100 over the steps, counting the running command")
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class WorkflowStepOut(BaseModel):
    index: int
    name: str
    server_id: uuid.UUID
    command_type: str
    compensation_type: str | None
    state: StepState
    attempts: int
    max_attempts: int
    compensation_attempts: int
    command_id: uuid.UUID | None = Field(description="the latest command of this step")
    command_ids: list[uuid.UUID] = Field(description="every attempt's command, in order")
    progress: int = Field(description="progress of the latest command, 0..100")
    message: str | None = Field(description="the latest command's last message")
    error_code: str | None
    last_error: str | None
    next_attempt_at: datetime | None = Field(description="when a scheduled retry runs")
    output: dict[str, Any] | None
    started_at: datetime | None
    finished_at: datetime | None
    compensated_at: datetime | None


class WorkflowDetail(WorkflowOut):
    steps: list[WorkflowStepOut]


class WorkflowPage(BaseModel):
    items: list[WorkflowOut]
    next_cursor: str | None


_LIST = """
SELECT w.*,
       (SELECT count(*) FROM workflow_steps s WHERE s.tenant_id = w.tenant_id
            AND s.workflow_id = w.id AND s.state <> 'pending' AND s.state <> 'running'
            AND s.state <> 'failed') AS steps_succeeded,
       (SELECT c.progress FROM workflow_steps s JOIN commands c
            ON c.tenant_id = s.tenant_id AND c.id = s.command_id
         WHERE s.tenant_id = w.tenant_id AND s.workflow_id = w.id AND s.state = 'running'
         LIMIT 1) AS running_progress
  FROM workflows w
"""


def _out(row: dict[str, Any]) -> WorkflowOut:
    count = row["step_count"]
    done = int(row["steps_succeeded"])
    if row["state"] == "succeeded":
        progress = 100
    else:
        progress = min(99, (100 * done + int(row["running_progress"] or 0)) // count)
    return WorkflowOut(
        id=row["id"],
        kind=row["kind"],
        subject_type=row["subject_type"],
        subject_id=row["subject_id"],
        state=row["state"],
        error=row["error"],
        step_count=count,
        steps_succeeded=done,
        progress=progress,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        finished_at=row["finished_at"],
    )


async def list_workflows(
    db: Database,
    access: TenantAccess,
    state: WorkflowState | None,
    subject_type: str | None,
    subject_id: uuid.UUID | None,
    limit: int,
    after: uuid.UUID | None,
) -> tuple[list[WorkflowOut], bool]:
    """Newest first; `after` is the last id of the previous page."""
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, READ, Resource("workflow"))
        rows = await (
            await uow.conn.execute(
                _LIST + " WHERE w.tenant_id = %(tenant)s"
                " AND (%(after)s::uuid IS NULL OR w.id < %(after)s::uuid)"
                " AND (%(state)s::text IS NULL OR w.state = %(state)s::text)"
                " AND (%(stype)s::text IS NULL OR w.subject_type = %(stype)s::text)"
                " AND (%(sid)s::uuid IS NULL OR w.subject_id = %(sid)s::uuid)"
                " ORDER BY w.id DESC LIMIT %(limit)s",
                {
                    "tenant": access.tenant_id,
                    "after": after,
                    "state": state,
                    "stype": subject_type,
                    "sid": subject_id,
                    "limit": limit + 1,
                },
            )
        ).fetchall()
    return [_out(r) for r in rows[:limit]], len(rows) > limit


async def get_workflow(
    db: Database, access: TenantAccess, workflow_id: uuid.UUID
) -> WorkflowDetail:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, READ, Resource("workflow", workflow_id))
        row = await (
            await uow.conn.execute(
                _LIST + " WHERE w.tenant_id = %s AND w.id = %s", (access.tenant_id, workflow_id)
            )
        ).fetchone()
        if row is None:
            raise not_found("workflow")
        steps = await (
            await uow.conn.execute(
                """SELECT s.*, c.progress, c.message FROM workflow_steps s
                   LEFT JOIN commands c ON c.tenant_id = s.tenant_id AND c.id = s.command_id
                   WHERE s.tenant_id = %s AND s.workflow_id = %s ORDER BY s.index""",
                (access.tenant_id, workflow_id),
            )
        ).fetchall()
    return WorkflowDetail(
        **_out(row).model_dump(),
        steps=[
            WorkflowStepOut(
                index=s["index"],
                name=s["name"],
                server_id=s["server_id"],
                command_type=s["command_type"],
                compensation_type=s["compensation_type"],
                state=s["state"],
                attempts=s["attempts"],
                max_attempts=s["max_attempts"],
                compensation_attempts=s["compensation_attempts"],
                command_id=s["command_id"],
                command_ids=list(s["command_ids"]),
                progress=s["progress"] or 0,
                message=s["message"] or None,
                error_code=s["error_code"],
                last_error=s["last_error"],
                next_attempt_at=s["next_attempt_at"],
                output=s["output"],
                started_at=s["started_at"],
                finished_at=s["finished_at"],
                compensated_at=s["compensated_at"],
            )
            for s in steps
        ],
    )
