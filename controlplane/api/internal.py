"""Endpoints for other YakPanel services (the gateway), not for users.

Authenticated by the shared internal token (`X-Yak-Internal-Token`) and left out of
the public OpenAPI document.
"""

from __future__ import annotations

import base64
import hmac
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path

from controlplane.api.deps import ControlPlaneDep
from controlplane.api.models import (
    InternalCertificateStatus,
    InternalEnroll,
    InternalEnrolled,
    InternalGatewayCertificate,
    InternalGatewayCertificateOut,
)
from controlplane.context import ControlPlane
from controlplane.problems import Problem
from controlplane.registry import agents, commands

INTERNAL_HEADER = "X-Yak-Internal-Token"


async def _internal_only(
    cp: ControlPlaneDep,
    token: Annotated[str | None, Header(alias=INTERNAL_HEADER)] = None,
) -> ControlPlane:
    if token is None or not hmac.compare_digest(token, cp.internal_token):
        raise Problem(401, "internal_only", "this endpoint is for YakPanel services")
    return cp


Internal = Annotated[ControlPlane, Depends(_internal_only)]

router = APIRouter(prefix="/internal/v1", include_in_schema=False)


@router.post("/enroll")
async def enroll(body: InternalEnroll, cp: Internal) -> InternalEnrolled:
    return await agents.redeem(cp, body)


@router.get("/certificates/{serial}")
async def certificate_status(
    serial: Annotated[str, Path(pattern=r"^[0-9a-f]{1,40}$")], cp: Internal
) -> InternalCertificateStatus:
    return await agents.certificate_status(cp, serial)


@router.post("/gateway-certificate")
async def gateway_certificate(
    body: InternalGatewayCertificate, cp: Internal
) -> InternalGatewayCertificateOut:
    return agents.issue_gateway_certificate(cp, body)


@router.get("/tenants/{tenant_id}/servers/{server_id}/pending-commands")
async def pending_commands(tenant_id: uuid.UUID, server_id: uuid.UUID, cp: Internal) -> list[str]:
    """Envelopes (base64 protobuf) to deliver to an agent that just connected."""
    envelopes = await commands.pending_envelopes(cp.db, tenant_id, server_id, cp.clock.now())
    return [base64.b64encode(e).decode() for e in envelopes]
