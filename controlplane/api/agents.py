"""Enrolling agents, their certificates, and commands run on servers."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Path, Response

from controlplane.api.common import AUTHED, WRITES, Cursor, Limit, after, problems
from controlplane.api.deps import ControlPlaneDep, TenantScope
from controlplane.api.models import (
    CertificateOut,
    CommandCreate,
    CommandOut,
    EnrollmentTokenCreate,
    EnrollmentTokenCreated,
    Page,
    RevokeBody,
    page_of,
)
from controlplane.registry import agents, commands

router = APIRouter(prefix="/v1/tenants/{tenant_id}", tags=["agents"])

Serial = Annotated[str, Path(pattern=r"^[0-9a-f]{1,40}$", description="certificate serial (hex)")]


@router.post("/servers/{server_id}/enrollment-tokens", status_code=201, responses=WRITES)
async def create_enrollment_token(
    access: TenantScope, server_id: uuid.UUID, body: EnrollmentTokenCreate, cp: ControlPlaneDep
) -> EnrollmentTokenCreated:
    """A one-time token for `yakpanel agent enroll` on the server. Shown once."""
    return await agents.create_enrollment_token(cp, access, server_id, body)


@router.get("/servers/{server_id}/certificates", responses=AUTHED)
async def list_certificates(
    access: TenantScope, server_id: uuid.UUID, cp: ControlPlaneDep
) -> list[CertificateOut]:
    return await agents.list_certificates(cp.db, access, server_id)


@router.post("/servers/{server_id}/certificates/{serial}/revoke", responses=WRITES)
async def revoke_certificate(
    access: TenantScope, server_id: uuid.UUID, serial: Serial, body: RevokeBody, cp: ControlPlaneDep
) -> CertificateOut:
    """The agent holding this certificate is refused at its next connect."""
    return await agents.revoke_certificate(cp.db, access, server_id, serial, body)


@router.post(
    "/servers/{server_id}/commands",
    status_code=202,
    responses={
        **WRITES,
        200: {"model": CommandOut, "description": "an earlier command with this idempotency key"},
        **problems(413),
    },
)
async def create_command(
    access: TenantScope,
    server_id: uuid.UUID,
    body: CommandCreate,
    response: Response,
    cp: ControlPlaneDep,
) -> CommandOut:
    """Signs the command and queues it for the server's agent. Values written as
    `{"$secret": "…"}` in the payload are sealed to the agent's key before they are
    stored or sent."""
    command, created = await commands.create_command(cp, access, server_id, body)
    if not created:
        response.status_code = 200
    return command


@router.get("/servers/{server_id}/commands", responses=AUTHED)
async def list_commands(
    access: TenantScope,
    server_id: uuid.UUID,
    cp: ControlPlaneDep,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[CommandOut]:
    items = await commands.list_commands(cp.db, access, server_id, limit, after(cursor))
    return page_of(items, limit, lambda c: c.id)


@router.get("/commands/{command_id}", responses=AUTHED)
async def get_command(
    access: TenantScope, command_id: uuid.UUID, cp: ControlPlaneDep
) -> CommandOut:
    return await commands.get_command(cp.db, access, command_id)
