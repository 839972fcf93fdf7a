"""The NOC pages (`/noc/…`): server-rendered HTML for browsers, not part of the API schema.

Who sees what is decided here, with the same policy point as the API: platform staff
with `platform:tenants:read` see every tenant's servers (each read audited as
`staff.read`); a tenant user sees the servers of each tenant where their role grants
`servers:read`, and metric values where it also grants `metrics:read`. The pages use the
dashboard session cookie only (API tokens are for the API); a page without a valid
session redirects to the login form, a fragment answers 401.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import importlib.resources
import logging
import re
import secrets
import uuid
from collections.abc import Callable
from typing import Annotated, Any, TypeVar
from urllib.parse import parse_qsl, quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError

from controlplane.access import login as login_usecase
from controlplane.access.credentials import authenticate_session
from controlplane.access.policy import Resource, authorize, resolve_access
from controlplane.access.principal import Principal, TenantAccess
from controlplane.api.deps import CSRF_COOKIE, SESSION_COOKIE, ControlPlaneDep, client_address
from controlplane.api.models import LoginBody, MeOut
from controlplane.context import ControlPlane
from controlplane.problems import Problem
from dashboards import pages
from ingest.query import fleet as metrics

log = logging.getLogger(__name__)

router = APIRouter(prefix="/noc", include_in_schema=False)

STAFF_READ = "platform:tenants:read"
LOGIN_CSRF_COOKIE = "yak_login_csrf"
MAX_FORM_BYTES = 8 * 1024
STATIC_ASSETS = {
    "noc.js": "text/javascript; charset=utf-8",
    "noc.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
FLEET_FRAGMENTS = frozenset({"rows"})
SERVER_FRAGMENTS = frozenset({"live"})

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
        " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# Where the login form may send the browser afterwards: a NOC page of this site, as a
# path of known shape (never `//host` or a scheme: the login must not redirect off-site).
_LOGIN_TOKEN = re.compile(r"^[A-Za-z0-9_-]{43}$")
_NEXT_URL = re.compile(
    r"^/noc/(servers/[0-9a-f-]{36}"
    r"|alerts(/[0-9a-f-]{36}/[0-9a-f]{32})?"
    r"|incidents(/[0-9a-f-]{36}/[0-9a-f-]{36})?"
    r"|sites(/[0-9a-f-]{36}/[0-9a-f-]{36})?)?"
    r"(\?[A-Za-z0-9=&_.%-]{0,200})?\Z"
)


# --- responses --------------------------------------------------------------------------


def _html(body: str, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    return HTMLResponse(body, status, headers=SECURITY_HEADERS | NO_STORE | (headers or {}))


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, 303, headers=SECURITY_HEADERS | NO_STORE)


def _error(viewer: pages.Viewer | None, status: int, title: str, detail: str) -> HTMLResponse:
    return _html(pages.error_page(viewer, status, title, detail), status)


def _problem_page(viewer: pages.Viewer | None, problem: Problem) -> HTMLResponse:
    if problem.status == 404:
        return _not_found(viewer)
    headers = {}
    if "retry_after" in problem.extensions:
        headers["Retry-After"] = str(problem.extensions["retry_after"])
    titles = {403: "Not allowed", 409: "Conflict", 429: "Too many requests"}
    page = pages.error_page(
        viewer, problem.status, titles.get(problem.status, "Error"), problem.detail
    )
    return _html(page, problem.status, headers)


def _not_found(viewer: pages.Viewer | None) -> HTMLResponse:
    # The same page for a server that does not exist and one the viewer may not see.
    return _error(viewer, 404, "Not found", "There is no such server, or it is not yours to see.")


def _login_redirect(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if _NEXT_URL.match(target) and target != "/noc/":
        return _redirect("/noc/login?next=" + quote(target, safe=""))
    return _redirect("/noc/login")


# --- who is looking -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Session:
    principal: Principal
    me: MeOut
    viewer: pages.Viewer


async def _session(request: Request, cp: ControlPlane) -> Session | None:
    """The logged-in principal from the session cookie, or None (no session, expired)."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token or len(token) > 200:
        return None
    try:
        principal = await authenticate_session(cp.db, token, None, False, cp.clock)
    except Problem as problem:
        if problem.status == 401:
            return None
        raise
    principal = dataclasses.replace(
        principal,
        source_ip=client_address(request),
        user_agent=request.headers.get("user-agent"),
    )
    me = await login_usecase.me(cp, principal)
    csrf = request.cookies.get(CSRF_COOKIE)
    viewer = pages.Viewer(me.email or str(principal.id), principal.is_staff, csrf)
    return Session(principal, me, viewer)


# --- what the viewer may see (PostgreSQL, under row-level security) -----------------------

_SERVER_SQL = """SELECT s.id, s.tenant_id, s.name, s.region, s.labels, s.presence,
    s.presence_changed_at, s.last_seen_at, s.hostname, s.agent_version, s.created_at,
    t.slug AS tenant_slug, t.name AS tenant_name
    FROM servers s JOIN tenants t ON t.id = s.tenant_id"""


@dataclasses.dataclass(frozen=True)
class VisibleServer:
    row: dict[str, Any]
    metrics_allowed: bool

    @property
    def ref(self) -> metrics.ServerRef:
        return metrics.ServerRef(self.row["tenant_id"], self.row["id"])


async def _tenant_accesses(cp: ControlPlane, session: Session) -> list[TenantAccess]:
    """The viewer's tenants where they may read servers (each passes the policy point)."""
    out = []
    for membership in session.me.memberships:
        if "servers:read" not in membership.permissions:
            continue
        try:
            out.append(await resolve_access(cp.db, session.principal, membership.tenant_id))
        except Problem as problem:
            if problem.status != 404:  # a tenant deleted since the membership was read
                raise
    return out


async def visible_servers(cp: ControlPlane, session: Session) -> list[VisibleServer]:
    principal = session.principal
    if principal.is_staff:
        if STAFF_READ not in principal.staff_permissions:
            raise Problem(403, "forbidden", f"this needs the permission {STAFF_READ}")
        async with cp.db.unit_of_work(principal.actor(), staff_read=True) as uow:
            await uow.audit("staff.read", "fleet", None)
            rows = await (
                await uow.conn.execute(_SERVER_SQL + " WHERE t.state <> 'deleted'")
            ).fetchall()
        return [VisibleServer(r, True) for r in rows]
    out: list[VisibleServer] = []
    for access in await _tenant_accesses(cp, session):
        async with cp.db.unit_of_work(access.actor(), access.tenant_id) as uow:
            await authorize(uow, access, "servers:read", Resource("server"))
            rows = await (
                await uow.conn.execute(_SERVER_SQL + " WHERE s.tenant_id = %s", (access.tenant_id,))
            ).fetchall()
        out.extend(VisibleServer(r, "metrics:read" in access.permissions) for r in rows)
    return out


async def find_server(
    cp: ControlPlane, session: Session, server_id: uuid.UUID
) -> VisibleServer | None:
    """The server if the viewer may see it; None for another tenant's and a missing one."""
    principal = session.principal
    if principal.is_staff:
        if STAFF_READ not in principal.staff_permissions:
            return None
        async with cp.db.unit_of_work(principal.actor(), staff_read=True) as uow:
            found = await (
                await uow.conn.execute("SELECT tenant_id FROM servers WHERE id = %s", (server_id,))
            ).fetchone()
        if found is None:
            return None
        try:
            # Audits the read in the tenant's own log.
            accesses = [await resolve_access(cp.db, principal, found["tenant_id"])]
        except Problem as problem:
            if problem.status == 404:
                return None
            raise
    else:
        accesses = await _tenant_accesses(cp, session)
    for access in accesses:
        async with cp.db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
            await authorize(uow, access, "servers:read", Resource("server", server_id))
            row = await (
                await uow.conn.execute(
                    _SERVER_SQL + " WHERE s.id = %s AND s.tenant_id = %s",
                    (server_id, access.tenant_id),
                )
            ).fetchone()
        if row is not None:
            return VisibleServer(row, "metrics:read" in access.permissions)
    return None


# --- metrics (ClickHouse) -------------------------------------------------------------

T = TypeVar("T")


class _MetricsStore:
    """One ClickHouse client per app, opened on first use, one query at a time: a
    clickhouse-connect client is one session, which refuses concurrent queries. Waiting
    requests wait in the event loop (bounded), not in worker threads."""

    def __init__(self, open_client: Callable[[], Any], wait_s: float = 15.0) -> None:
        self._open = open_client
        self._client: Any = None
        self._lock = asyncio.Lock()
        self._wait_s = wait_s

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._client is None:
            self._client = self._open()
        return fn(self._client, *args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        async with asyncio.timeout(self._wait_s):
            await self._lock.acquire()
        # The lock is released when the query ends, even if this request is cancelled
        # first: the thread goes on using the client until then.
        task = asyncio.ensure_future(asyncio.to_thread(self._call, fn, *args))
        task.add_done_callback(lambda _: self._lock.release())
        return await asyncio.shield(task)


def _store(request: Request) -> _MetricsStore:
    state = request.app.state
    store: _MetricsStore | None = getattr(state, "noc_metrics", None)
    if store is None:
        store = _MetricsStore(state.stack.clickhouse.client)
        state.noc_metrics = store
    return store


METRICS_UNAVAILABLE = "The metrics store did not answer: values are missing; retrying."


# --- login and logout -------------------------------------------------------------------


def _login_form(
    cp: ControlPlane,
    request: Request,
    status: int = 200,
    error: str | None = None,
    email: str = "",
    totp: bool = False,
    next_url: str = "",
    headers: dict[str, str] | None = None,
) -> HTMLResponse:
    # Double-submit token for the login form itself (there is no session yet); kept while
    # the cookie lives, so that two open login tabs both work.
    token = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not _LOGIN_TOKEN.match(token):
        token = secrets.token_urlsafe(32)
    response = _html(pages.login_page(token, error, email, totp, next_url), status, headers=headers)
    response.set_cookie(
        LOGIN_CSRF_COOKIE,
        token,
        max_age=3600,
        httponly=True,
        secure=cp.cookie_secure,
        samesite="strict",
        path="/noc/login",
    )
    return response


def _safe_next(value: str | None) -> str:
    return value if value and _NEXT_URL.match(value) else ""


@router.get("/login")
async def login_form(
    request: Request,
    cp: ControlPlaneDep,
    next_url: Annotated[str | None, Query(alias="next")] = None,
) -> Response:
    if await _session(request, cp) is not None:
        return _redirect(_safe_next(next_url) or "/noc/")
    return _login_form(cp, request, next_url=_safe_next(next_url))


async def _form(request: Request) -> dict[str, str] | None:
    if request.headers.get("content-type", "").split(";")[0].strip() != (
        "application/x-www-form-urlencoded"
    ):
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        return None
    return dict(pairs)


@router.post("/login")
async def login(request: Request, cp: ControlPlaneDep) -> Response:
    form = await _form(request)
    if form is None:
        return _login_form(cp, request, 400, "Send the login form.")
    email = form.get("email", "").strip()[:254]
    next_url = _safe_next(form.get("next"))
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    sent = form.get("csrf_token", "")
    if not expected or not hmac.compare_digest(expected.encode(), sent.encode()):
        return _login_form(
            cp, request, 403, "The form expired; log in again.", email, next_url=next_url
        )
    try:
        body = LoginBody(
            email=email, password=form.get("password", ""), totp_code=form.get("totp_code") or None
        )
    except ValidationError:
        return _login_form(
            cp,
            request,
            400,
            "Enter your email and password (and the 6-digit one-time code if asked).",
            email,
            totp="totp_code" in form,
            next_url=next_url,
        )
    try:
        session, _ = await login_usecase.login(
            cp, body, client_address(request), request.headers.get("user-agent")
        )
    except Problem as problem:
        if problem.code == "totp_required":
            return _login_form(cp, request, 401, "Enter the one-time code.", email, True, next_url)
        if problem.status == 429:
            retry = str(problem.extensions.get("retry_after", 60))
            return _login_form(
                cp,
                request,
                429,
                f"Too many failed logins: try again in {retry} s.",
                email,
                next_url=next_url,
                headers={"Retry-After": retry},
            )
        if problem.status == 401:
            return _login_form(
                cp,
                request,
                401,
                "Wrong email, password or code.",
                email,
                body.totp_code is not None,
                next_url,
            )
        raise
    response = _redirect(next_url or "/noc/")
    # The same cookies as `POST /v1/auth/login`: the session, and the readable CSRF token.
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
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/noc/login")
    return response


@router.post("/logout")
async def logout(request: Request, cp: ControlPlaneDep) -> Response:
    form = await _form(request) or {}
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        try:
            principal = await authenticate_session(
                cp.db, token, form.get("csrf_token"), True, cp.clock
            )
        except Problem as problem:
            if problem.code == "csrf_failed":
                return _error(None, 403, "Not logged out", "The form expired; reload and retry.")
            if problem.status != 401:
                raise
        else:
            await login_usecase.logout(cp, principal)
    response = _redirect("/noc/login")
    response.delete_cookie(SESSION_COOKIE, path="/")
    response.delete_cookie(CSRF_COOKIE, path="/")
    return response


# --- the fleet ------------------------------------------------------------------------


def _fleet_row(server: VisibleServer, vitals: metrics.Vitals | None) -> pages.FleetRow:
    r = server.row
    v = vitals if vitals is not None and server.metrics_allowed else metrics.Vitals()
    return pages.FleetRow(
        server_id=str(r["id"]),
        name=r["name"],
        tenant_id=str(r["tenant_id"]),
        tenant_slug=r["tenant_slug"],
        tenant_name=r["tenant_name"],
        presence=r["presence"],
        presence_since=r["presence_changed_at"],
        cpu_busy=v.cpu_busy,
        memory_used=v.memory_used,
        root_disk_used=v.root_disk_used,
        load_1m=v.load_1m,
        last_sample_at=v.last_sample_at,
    )


@router.get("/")
async def fleet(
    request: Request,
    cp: ControlPlaneDep,
    state: str | None = None,
    tenant: str | None = None,
    name: str | None = None,
    fragment: str | None = None,
) -> Response:
    """Every server the viewer may see, offline first, with current vitals."""
    session = await _session(request, cp)
    if session is None:
        return _unauthenticated(request, fragment)
    if fragment is not None and fragment not in FLEET_FRAGMENTS:
        return _error(session.viewer, 400, "Bad request", "Unknown fragment.")
    try:
        filters = pages.FleetFilter.parse(state, tenant, name)
    except pages.FilterError as exc:
        return _error(session.viewer, 400, "Bad filter", str(exc))
    try:
        servers = await visible_servers(cp, session)
    except Problem as problem:
        return _problem_page(session.viewer, problem)
    now = cp.clock.now()
    shown = [
        s
        for s in servers
        if filters.matches(_fleet_row(s, None))  # filter on registry fields before querying
    ]
    wanted = [s.ref for s in shown if s.metrics_allowed]
    metrics_error = None
    vitals: dict[uuid.UUID, metrics.Vitals] = {}
    try:
        vitals = await _store(request).run(metrics.fleet_vitals, wanted, now)
    except Exception:
        log.exception("fleet vitals query failed")
        metrics_error = METRICS_UNAVAILABLE
    rows = [_fleet_row(s, vitals.get(s.row["id"])) for s in shown]
    if fragment == "rows":
        return _html(pages.fleet_rows(rows, now))
    tenants = sorted({(s.row["tenant_slug"], s.row["tenant_name"]) for s in servers})
    return _html(
        pages.fleet_page(session.viewer, rows, tenants, filters, len(servers), now, metrics_error)
    )


def _unauthenticated(request: Request, fragment: str | None) -> Response:
    if fragment is not None:
        return _html("<p>Log in again.</p>", 401)
    return _login_redirect(request)


# --- one server -----------------------------------------------------------------------


def _server_info(server: VisibleServer) -> pages.ServerInfo:
    r = server.row
    return pages.ServerInfo(
        server_id=str(r["id"]),
        name=r["name"],
        tenant_slug=r["tenant_slug"],
        tenant_name=r["tenant_name"],
        region=r["region"],
        labels=dict(r["labels"]),
        presence=r["presence"],
        presence_since=r["presence_changed_at"],
        last_seen_at=r["last_seen_at"],
        hostname=r["hostname"],
        agent_version=r["agent_version"],
        created_at=r["created_at"],
    )


@router.get("/servers/{server_id}")
async def server(
    request: Request,
    cp: ControlPlaneDep,
    server_id: str,
    window: str = metrics.DEFAULT_WINDOW,
    fragment: str | None = None,
) -> Response:
    """A server's details and charts of the last hour, 6 hours or day."""
    session = await _session(request, cp)
    if session is None:
        return _unauthenticated(request, fragment)
    if fragment is not None and fragment not in SERVER_FRAGMENTS:
        return _error(session.viewer, 400, "Bad request", "Unknown fragment.")
    chosen = metrics.WINDOWS.get(window)
    if chosen is None:
        return _error(
            session.viewer, 400, "Bad period", "window must be one of " + ", ".join(metrics.WINDOWS)
        )
    try:
        sid = uuid.UUID(server_id)
    except ValueError:
        return _not_found(session.viewer)
    try:
        found = await find_server(cp, session, sid)
    except Problem as problem:
        return _problem_page(session.viewer, problem)
    if found is None:
        return _not_found(session.viewer)
    now = cp.clock.now()
    note = None
    data = metrics.empty_charts(chosen, now)
    if not found.metrics_allowed:
        note = "Your role does not include metrics:read in this tenant: charts are empty."
    else:
        try:
            data = await _store(request).run(metrics.server_charts, found.ref, chosen, now)
        except Exception:
            log.exception("server charts query failed")
            note = METRICS_UNAVAILABLE
    info = _server_info(found)
    charts_view = pages.chart_set_of(data)
    if fragment == "live":
        return _html(pages.server_live(info, charts_view, note))
    return _html(pages.server_page(session.viewer, info, charts_view, now, note))


# --- static ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=len(STATIC_ASSETS))
def _asset(name: str) -> bytes:
    return importlib.resources.files("dashboards").joinpath("static", name).read_bytes()


@router.get("/static/{asset}")
async def static(asset: str) -> Response:
    media_type = STATIC_ASSETS.get(asset)
    if media_type is None:
        return Response(b"not found", 404, headers=SECURITY_HEADERS, media_type="text/plain")
    return Response(
        _asset(asset),
        media_type=media_type,
        headers=SECURITY_HEADERS | {"Cache-Control": "public, max-age=300"},
    )
