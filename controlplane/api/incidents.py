"""The incidents API: list (state filter, newest first, paginated), one incident with its
timeline, acknowledge, assign, notes, resolve. Reads need `alerts:read`, writes
`alerts:write`."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Path, Query

from controlplane import incidents as svc
from controlplane.api.common import AUTHED, WRITES, Cursor, Limit, after
from controlplane.api.deps import ControlPlaneDep, TenantScope
from controlplane.api.models import encode_cursor

router = APIRouter(prefix="/v1/tenants/{tenant_id}/incidents", tags=["incidents"])

IncidentId = Annotated[uuid.UUID, Path(description="the incident")]


@router.get("", responses=AUTHED)
async def list_incidents(
    access: TenantScope,
    cp: ControlPlaneDep,
    state: Annotated[svc.IncidentState | None, Query()] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> svc.IncidentPage:
    """The tenant's incidents, newest first."""
    items, more = await svc.list_incidents(cp.db, access, state, limit, after(cursor))
    last = items[-1].id if more and items else None
    return svc.IncidentPage(items=items, next_cursor=encode_cursor(last) if last else None)


@router.get("/{incident_id}", responses=AUTHED)
async def get_incident(
    access: TenantScope, incident_id: IncidentId, cp: ControlPlaneDep
) -> svc.IncidentDetail:
    """The incident and its timeline, oldest event first."""
    return await svc.get_incident(cp.db, access, incident_id)


@router.post("/{incident_id}/acknowledge", responses=WRITES)
async def acknowledge_incident(
    access: TenantScope, incident_id: IncidentId, cp: ControlPlaneDep
) -> svc.IncidentDetail:
    """Open → acknowledged by the caller. Not open: 409 `conflict`."""
    return await svc.acknowledge(cp.db, access, incident_id)


@router.post("/{incident_id}/assign", responses=WRITES)
async def assign_incident(
    access: TenantScope, incident_id: IncidentId, body: svc.AssignBody, cp: ControlPlaneDep
) -> svc.IncidentDetail:
    """Assign to a member (422 `not_a_member` otherwise); `user_id` null unassigns."""
    return await svc.assign(cp.db, access, incident_id, body)


@router.post("/{incident_id}/notes", responses=WRITES)
async def add_incident_note(
    access: TenantScope, incident_id: IncidentId, body: svc.NoteBody, cp: ControlPlaneDep
) -> svc.IncidentDetail:
    """A note on the timeline."""
    return await svc.add_note(cp.db, access, incident_id, body)


@router.post("/{incident_id}/resolve", responses=WRITES)
async def resolve_incident(
    access: TenantScope, incident_id: IncidentId, body: svc.ResolveBody, cp: ControlPlaneDep
) -> svc.IncidentDetail:
    """Resolve by hand (the comment is the resolution). Already resolved: 409."""
    return await svc.resolve(cp.db, access, incident_id, body)
