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
    InternalMetricLimits,
)
from controlplane.context import ControlPlane
from controlplane.db import SYSTEM
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


@router.get("/tenants/{tenant_id}/metric-limits")
async def metric_limits(tenant_id: uuid.UUID, cp: Internal) -> InternalMetricLimits:
    """What the gateway stamps on a tenant's metrics: the plan's retention."""
    async with cp.db.unit_of_work(SYSTEM, tenant_id) as uow:
        cur = await uow.conn.execute(
            "SELECT p.metric_retention_days FROM tenants t JOIN plans p ON p.id = t.plan_id"
            " WHERE t.id = %s",
            (tenant_id,),
        )
        row = await cur.fetchone()
    if row is None:
        raise Problem(404, "tenant_not_found", "no such tenant")
    return InternalMetricLimits(metric_retention_days=row["metric_retention_days"])
