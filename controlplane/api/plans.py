"""Plans and their limits (platform-wide)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from controlplane.api.common import AUTHED, WRITES
from controlplane.api.deps import ControlPlaneDep, CurrentPrincipal
from controlplane.api.models import PlanCreate, PlanOut, PlanUpdate
from controlplane.tenancy import service

router = APIRouter(prefix="/v1/plans", tags=["plans"])


@router.get("", responses=AUTHED)
async def list_plans(principal: CurrentPrincipal, cp: ControlPlaneDep) -> list[PlanOut]:
    return await service.list_plans(cp.db, principal)


@router.post("", status_code=201, responses=WRITES)
async def create_plan(
    body: PlanCreate, principal: CurrentPrincipal, cp: ControlPlaneDep
) -> PlanOut:
    """Staff only (`platform:plans:write`)."""
    return await service.create_plan(cp.db, principal, body)


@router.patch("/{plan_id}", responses=WRITES)
async def update_plan(
    plan_id: uuid.UUID, body: PlanUpdate, principal: CurrentPrincipal, cp: ControlPlaneDep
) -> PlanOut:
    """Staff only (`platform:plans:write`)."""
    return await service.update_plan(cp.db, principal, plan_id, body)
