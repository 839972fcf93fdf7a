"""The workflows API: list (filters by state and subject, newest first, paginated) and
one workflow with its steps. Reads need `workflows:read`; workflows are started by the
use cases that need them (sites, databases …), never directly through the API."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Path, Query

from controlplane.api.common import AUTHED, Cursor, Limit, after
from controlplane.api.deps import ControlPlaneDep, TenantScope
from controlplane.api.models import encode_cursor
from controlplane.workflows import WorkflowState
from controlplane.workflows import views as svc

router = APIRouter(prefix="/v1/tenants/{tenant_id}/workflows", tags=["workflows"])

WorkflowId = Annotated[uuid.UUID, Path(description="the workflow")]


@router.get("", responses=AUTHED)
async def list_workflows(
    access: TenantScope,
    cp: ControlPlaneDep,
    state: Annotated[WorkflowState | None, Query()] = None,
    subject_type: Annotated[
        str | None, Query(max_length=64, description="e.g. `site`; with subject_id")
    ] = None,
    subject_id: Annotated[uuid.UUID | None, Query(description="the resource worked on")] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> svc.WorkflowPage:
    """The tenant's workflows, newest first."""
    items, more = await svc.list_workflows(
        cp.db, access, state, subject_type, subject_id, limit, after(cursor)
    )
    last = items[-1].id if more and items else None
    return svc.WorkflowPage(items=items, next_cursor=encode_cursor(last) if last else None)


@router.get("/{workflow_id}", responses=AUTHED)
async def get_workflow(
    access: TenantScope, workflow_id: WorkflowId, cp: ControlPlaneDep
) -> svc.WorkflowDetail:
    """The workflow and its steps: state, attempts, commands, errors, live progress."""
    return await svc.get_workflow(cp.db, access, workflow_id)
