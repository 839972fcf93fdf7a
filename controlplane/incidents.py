"""Use cases of the incidents API: list, read with the timeline, acknowledge, assign,
notes, resolve.

Incidents are opened (and resolved when their alert resolves) by the alerting service in
the transaction that records the alert's transitions (`alerting.store`); here people
work on them. Every write runs in a unit of work (tenant context, row-level security),
locks the incident row, appends to its timeline (`incident_events`) and records the
audit entry and the domain event in the same transaction. Reads need `alerts:read`,
writes `alerts:write`. Tables: `controlplane/schema/0007_incidents.sql`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from controlplane.access.policy import Resource, authorize, not_found
from controlplane.access.principal import TenantAccess
from controlplane.db import Database, UnitOfWork
from controlplane.problems import Problem
from yakpanel.ids import new_id

READ, WRITE = "alerts:read", "alerts:write"
KIND = "incident"

IncidentState = Literal["open", "acknowledged", "resolved"]
EventKind = Literal[
    "opened", "acknowledged", "assigned", "note", "alert_resolved", "resolved", "reopened"
]

# --- models ------------------------------------------------------------------------------


class IncidentOut(BaseModel):
    id: uuid.UUID
    fingerprint: str
    alertname: str
    labels: dict[str, str]
    severity: str | None = Field(description="the alert's `severity` label")
    state: IncidentState
    opened_at: datetime
    acknowledged_at: datetime | None
    acknowledged_by: uuid.UUID | None
    assignee: uuid.UUID | None = Field(description="a member of the tenant (user id)")
    resolved_at: datetime | None
    resolved_by: uuid.UUID | None = Field(description="null when the alert resolved it")
    resolution: str | None = Field(description="'alert resolved', or the resolver's comment")


class IncidentEventOut(BaseModel):
    id: uuid.UUID
    kind: EventKind
    author: uuid.UUID | None = Field(description="null for the alerting service")
    text: str | None
    at: datetime


class IncidentDetail(IncidentOut):
    timeline: list[IncidentEventOut] = Field(description="oldest first")


class IncidentPage(BaseModel):
    items: list[IncidentOut]
    next_cursor: str | None


class AssignBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: uuid.UUID | None = Field(description="a member of the tenant; null unassigns")


class ResolveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    comment: str | None = Field(None, min_length=1, max_length=2000)


class NoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=10_000)


# --- helpers -----------------------------------------------------------------------------

_COLUMNS = """id, fingerprint, alertname, labels, severity, state, opened_at, acknowledged_at,
    acknowledged_by, assignee, resolved_at, resolved_by, resolution"""


def _out(row: dict[str, Any]) -> IncidentOut:
    return IncidentOut(**{k: row[k] for k in IncidentOut.model_fields})


def _no_nul(text: str | None, name: str) -> None:
    if text is not None and "\x00" in text:
        raise Problem(422, "validation", f"{name}: NUL characters are not allowed")


async def _row(uow: UnitOfWork, incident_id: uuid.UUID, lock: bool = False) -> dict[str, Any]:
    row = await (
        await uow.conn.execute(
            f"SELECT {_COLUMNS} FROM incidents WHERE tenant_id = %s AND id = %s"
            + (" FOR UPDATE" if lock else ""),
            (uow.tenant_id, incident_id),
        )
    ).fetchone()
    if row is None:
        raise not_found(KIND)
    return row


async def _event(
    uow: UnitOfWork, incident_id: uuid.UUID, kind: str, text: str | None, at: datetime
) -> None:
    await uow.conn.execute(
        """INSERT INTO incident_events (tenant_id, id, incident_id, kind, author, text, at)
           VALUES (%s, %s, %s, %s, %s, %s, %s)""",
        (uow.tenant_id, new_id(), incident_id, kind, uow.actor.id, text, at),
    )


async def _timeline(uow: UnitOfWork, incident_id: uuid.UUID) -> list[IncidentEventOut]:
    rows = await (
        await uow.conn.execute(
            """SELECT id, kind, author, text, at FROM incident_events
               WHERE tenant_id = %s AND incident_id = %s ORDER BY seq""",
            (uow.tenant_id, incident_id),
        )
    ).fetchall()
    return [IncidentEventOut(**r) for r in rows]


async def _detail(uow: UnitOfWork, incident_id: uuid.UUID) -> IncidentDetail:
    row = await _row(uow, incident_id)
    return IncidentDetail(**_out(row).model_dump(), timeline=await _timeline(uow, incident_id))


def _json(out: IncidentOut) -> dict[str, Any]:
    return out.model_dump(mode="json")


# --- reads -------------------------------------------------------------------------------


async def list_incidents(
    db: Database,
    access: TenantAccess,
    state: IncidentState | None,
    limit: int,
    after: uuid.UUID | None,
) -> tuple[list[IncidentOut], bool]:
    """Newest first; `after` is the last id of the previous page."""
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, READ, Resource(KIND))
        rows = await (
            await uow.conn.execute(
                f"SELECT {_COLUMNS} FROM incidents WHERE tenant_id = %(tenant)s"
                " AND (%(after)s::uuid IS NULL OR id < %(after)s::uuid)"
                " AND (%(state)s::text IS NULL OR state = %(state)s::text)"
                " ORDER BY id DESC LIMIT %(limit)s",
                {"tenant": uow.tenant_id, "after": after, "state": state, "limit": limit + 1},
            )
        ).fetchall()
    return [_out(r) for r in rows[:limit]], len(rows) > limit


async def get_incident(
    db: Database, access: TenantAccess, incident_id: uuid.UUID
) -> IncidentDetail:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, READ, Resource(KIND, incident_id))
        return await _detail(uow, incident_id)


# --- writes ------------------------------------------------------------------------------


async def _write(
    uow: UnitOfWork, action: str, before: IncidentOut, incident_id: uuid.UUID
) -> IncidentDetail:
    detail = await _detail(uow, incident_id)
    after = IncidentOut(**detail.model_dump(exclude={"timeline"}))
    await uow.record(f"incident.{action}", KIND, incident_id, _json(before), _json(after))
    return detail


async def acknowledge(db: Database, access: TenantAccess, incident_id: uuid.UUID) -> IncidentDetail:
    """Open → acknowledged (by the caller). Resolved or already acknowledged: 409."""
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, WRITE, Resource(KIND, incident_id))
        row = await _row(uow, incident_id, lock=True)
        if row["state"] != "open":
            raise Problem(409, "conflict", f"the incident is {row['state']}")
        now = uow.clock.now()
        await uow.conn.execute(
            """UPDATE incidents SET state = 'acknowledged', acknowledged_at = %s,
                   acknowledged_by = %s WHERE tenant_id = %s AND id = %s""",
            (now, uow.actor.id, uow.tenant_id, incident_id),
        )
        await _event(uow, incident_id, "acknowledged", None, now)
        return await _write(uow, "acknowledged", _out(row), incident_id)


async def assign(
    db: Database, access: TenantAccess, incident_id: uuid.UUID, body: AssignBody
) -> IncidentDetail:
    """Assign to a member of the tenant (422 `not_a_member` otherwise), or unassign."""
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, WRITE, Resource(KIND, incident_id))
        row = await _row(uow, incident_id, lock=True)
        if body.user_id is not None:
            member = await (
                await uow.conn.execute(
                    "SELECT 1 FROM memberships WHERE tenant_id = %s AND user_id = %s",
                    (uow.tenant_id, body.user_id),
                )
            ).fetchone()
            if member is None:
                raise Problem(422, "not_a_member", "the assignee must be a member of the tenant")
        now = uow.clock.now()
        await uow.conn.execute(
            "UPDATE incidents SET assignee = %s WHERE tenant_id = %s AND id = %s",
            (body.user_id, uow.tenant_id, incident_id),
        )
        text = str(body.user_id) if body.user_id else None
        await _event(uow, incident_id, "assigned", text, now)
        return await _write(uow, "assigned", _out(row), incident_id)


async def add_note(
    db: Database, access: TenantAccess, incident_id: uuid.UUID, body: NoteBody
) -> IncidentDetail:
    _no_nul(body.text, "text")
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, WRITE, Resource(KIND, incident_id))
        row = await _row(uow, incident_id, lock=True)
        await _event(uow, incident_id, "note", body.text, uow.clock.now())
        return await _write(uow, "noted", _out(row), incident_id)


async def resolve(
    db: Database, access: TenantAccess, incident_id: uuid.UUID, body: ResolveBody
) -> IncidentDetail:
    """Resolve by hand; the comment (default 'resolved manually') is the resolution.
    Already resolved: 409."""
    _no_nul(body.comment, "comment")
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, WRITE, Resource(KIND, incident_id))
        row = await _row(uow, incident_id, lock=True)
        if row["state"] == "resolved":
            raise Problem(409, "conflict", "the incident is resolved")
        now = uow.clock.now()
        resolution = body.comment or "resolved manually"
        await uow.conn.execute(
            """UPDATE incidents SET state = 'resolved', resolved_at = %s, resolved_by = %s,
                   resolution = %s WHERE tenant_id = %s AND id = %s""",
            (now, uow.actor.id, resolution, uow.tenant_id, incident_id),
        )
        await _event(uow, incident_id, "resolved", resolution, now)
        return await _write(uow, "resolved", _out(row), incident_id)
