"""Login sessions for the dashboards, and one's own account."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from controlplane.access import login as usecase
from controlplane.api.common import AUTHED, WRITES, problems
from controlplane.api.deps import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    ControlPlaneDep,
    CurrentPrincipal,
    client_address,
)
from controlplane.api.models import (
    LoginBody,
    LoginOut,
    MeOut,
    PasswordChange,
    TotpCode,
    TotpEnrollment,
)

router = APIRouter(prefix="/v1", tags=["auth"])


@router.post("/auth/login", responses=problems(400, 401, 422, 429))
async def login(
    body: LoginBody, request: Request, response: Response, cp: ControlPlaneDep
) -> LoginOut:
    """Log in with email and password (and a TOTP code when enabled). Sets the session
    cookie; send the returned `csrf_token` as `X-CSRF-Token` on every non-GET request."""
    session, me = await usecase.login(
        cp, body, client_address(request), request.headers.get("user-agent")
    )
    max_age = int(session.expires_in.total_seconds())
    response.set_cookie(
        SESSION_COOKIE,
        session.token,
        max_age=max_age,
        httponly=True,
        secure=cp.cookie_secure,
        samesite="strict",
        path="/",
    )
    response.set_cookie(
        CSRF_COOKIE,
        session.csrf_token,
        max_age=max_age,
        httponly=False,
        secure=cp.cookie_secure,
        samesite="strict",
        path="/",
    )
    return LoginOut(**me.model_dump(), csrf_token=session.csrf_token)


@router.post("/auth/logout", status_code=204, responses=AUTHED)
async def logout(principal: CurrentPrincipal, response: Response, cp: ControlPlaneDep) -> None:
    await usecase.logout(cp, principal)
    response.delete_cookie(SESSION_COOKIE, path="/")
    response.delete_cookie(CSRF_COOKIE, path="/")


@router.get("/auth/me", responses=AUTHED)
async def whoami(principal: CurrentPrincipal, cp: ControlPlaneDep) -> MeOut:
    return await usecase.me(cp, principal)


@router.post("/users/me/password", status_code=204, responses=WRITES)
async def change_password(
    body: PasswordChange, principal: CurrentPrincipal, cp: ControlPlaneDep
) -> None:
    await usecase.change_password(cp, principal, body)


@router.post("/users/me/totp", responses=WRITES)
async def begin_totp(principal: CurrentPrincipal, cp: ControlPlaneDep) -> TotpEnrollment:
    """Start enrolling a second factor: add the secret to an authenticator app, then confirm."""
    return await usecase.begin_totp(cp, principal)


@router.post("/users/me/totp/confirm", status_code=204, responses=WRITES)
async def confirm_totp(body: TotpCode, principal: CurrentPrincipal, cp: ControlPlaneDep) -> None:
    await usecase.confirm_totp(cp, principal, body)


@router.post("/users/me/totp/disable", status_code=204, responses=WRITES)
async def disable_totp(body: TotpCode, principal: CurrentPrincipal, cp: ControlPlaneDep) -> None:
    await usecase.disable_totp(cp, principal, body)
