"""Liveness and readiness."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from yakpanel.readiness import Probe, check_all

router = APIRouter(tags=["health"])


def _probes(request: Request) -> list[Probe]:
    probes: list[Probe] = request.app.state.probes
    return probes


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive and serving HTTP."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={503: {"description": "a dependency is down; the body names it"}},
)
async def readyz(
    request: Request, probes: Annotated[list[Probe], Depends(_probes)]
) -> JSONResponse:
    """PostgreSQL, Kafka and ClickHouse are each reachable now."""
    report = await check_all(probes, request.app.state.readiness_timeout_s)
    body: dict[str, Any] = report.as_json()
    return JSONResponse(body, status_code=200 if report.ready else 503)
