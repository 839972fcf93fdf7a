"""FastAPI dependencies as `Annotated` aliases: the principal, the tenant scope."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from controlplane.access.credentials import authenticate_session, authenticate_token
from controlplane.access.policy import resolve_access
from controlplane.access.principal import Principal, TenantAccess
from controlplane.context import ControlPlane
from controlplane.problems import Problem

SESSION_COOKIE = "yak_session"
CSRF_COOKIE = "yak_csrf"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_bearer = HTTPBearer(auto_error=False, description="API token: `Authorization: Bearer yak_…`")
_cookie = APIKeyCookie(
    name=SESSION_COOKIE, auto_error=False, description="dashboard session (needs X-CSRF-Token)"
)


def _control_plane(request: Request) -> ControlPlane:
    cp: ControlPlane = request.app.state.control_plane
    return cp


ControlPlaneDep = Annotated[ControlPlane, Depends(_control_plane)]


def client_address(request: Request) -> str | None:
    return request.client.host if request.client else None


async def _current_principal(
    request: Request,
    cp: ControlPlaneDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    session: Annotated[str | None, Depends(_cookie)],
) -> Principal:
    if request.headers.get("authorization") and bearer is None:
        raise Problem(401, "token_invalid", "use `Authorization: Bearer <token>`")
    if bearer is not None:
        principal = await authenticate_token(cp.db, bearer.credentials, cp.clock)
    elif session:
        principal = await authenticate_session(
            cp.db,
            session,
            request.headers.get(CSRF_HEADER),
            request.method not in SAFE_METHODS,
            cp.clock,
        )
    else:
        raise Problem(401, "unauthenticated", "log in or send an API token")
    return dataclasses.replace(
        principal,
        source_ip=client_address(request),
        user_agent=request.headers.get("user-agent"),
    )


CurrentPrincipal = Annotated[Principal, Depends(_current_principal)]


async def _tenant_access(
    tenant_id: Annotated[uuid.UUID, Path(description="the tenant")],
    principal: CurrentPrincipal,
    cp: ControlPlaneDep,
) -> TenantAccess:
    return await resolve_access(cp.db, principal, tenant_id)


TenantScope = Annotated[TenantAccess, Depends(_tenant_access)]
