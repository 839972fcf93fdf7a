"""The site health pages (`/noc/sites…`): every hosted site the viewer may see with its
control-plane status and latest probe, and one site's details with probe charts. HTML for
browser sessions, not part of the API.

Who sees what, with the same policy point as the API: platform staff with
`platform:tenants:read` see every tenant's sites (the list audited as one platform
`staff.read` entry, a site's page in the tenant's own log); a tenant user sees the sites of
each tenant where their role grants `sites:read`, probe values where it also grants
`metrics:read`, and the server's name where it grants `servers:read`. Another tenant's
site gets the very page of a site that does not exist.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from starlette.responses import Response

from controlplane.access.policy import Resource, authorize, resolve_access
from controlplane.access.principal import TenantAccess
from controlplane.api.deps import ControlPlaneDep
from controlplane.api.noc import (
    METRICS_UNAVAILABLE,
    STAFF_READ,
    Session,
    _error,
    _html,
    _login_redirect,
    _problem_page,
    _session,
    _store,
)
from controlplane.context import ControlPlane
from controlplane.problems import Problem
from dashboards import charts, pages
from ingest.query import fleet as windows
from ingest.query import sites as probes

log = logging.getLogger(__name__)

router = APIRouter(prefix="/noc", include_in_schema=False)

READ = "sites:read"
STATUSES = ("provisioning", "active", "failed", "deleting")
TLS_WARN_DAYS = 14
TLS_CRIT_DAYS = 3
FAILED_CERTIFICATES = frozenset({"failed", "renewal_failed"})
PROBE_LABELS = {"up": "up", "down": "down", "unknown": "unknown"}
MILLISECONDS = charts.Scale("ms", lambda v: f"{v:.0f} ms", min_top=100.0)
STATUS_CODE = charts.Scale("status", lambda v: f"{v:.0f}", fixed_max=600.0)


# --- view models -------------------------------------------------------------------------


def tls_level(days: float | None) -> str:
    """A CSS class for TLS days left: crit (< 3 days), warn (< 14 days), ok, none."""
    if days is None:
        return "none"
    return "crit" if days < TLS_CRIT_DAYS else "warn" if days < TLS_WARN_DAYS else "ok"


@dataclasses.dataclass(frozen=True)
class SiteRow:
    site_id: str
    tenant_id: str
    tenant_slug: str
    tenant_name: str
    domains: tuple[str, ...]
    kind: str
    server_id: str
    server_name: str  # "" when the viewer may not read servers
    status: str
    last_error: str | None
    certificate_state: str | None
    certificate_not_after: datetime | None
    health: probes.SiteHealth

    @property
    def primary_domain(self) -> str:
        return self.domains[0]

    @property
    def href(self) -> str:
        return f"/noc/sites/{self.tenant_id}/{self.site_id}"

    @property
    def tls_days_left(self) -> float | None:
        return self.health.tls_days_left

    @property
    def problems(self) -> list[str]:
        """What needs someone's attention, worst first (empty: healthy)."""
        out = []
        if self.health.state == "down":
            out.append("down")
        if self.status == "failed":
            out.append("failed")
        if tls_level(self.tls_days_left) in ("crit", "warn"):
            out.append("tls")
        if self.certificate_state in FAILED_CERTIFICATES:
            out.append("certificate")
        return out

    @property
    def rank(self) -> int:
        order = {"down": 0, "failed": 1, "tls": 2, "certificate": 3}
        problems = self.problems
        return order[problems[0]] if problems else len(order)


def sort_sites(rows: Sequence[SiteRow]) -> list[SiteRow]:
    """Problem sites first (down, failed, TLS expiring, certificate failed), then by
    tenant and domain."""
    return sorted(rows, key=lambda r: (r.rank, r.tenant_slug, r.primary_domain, r.site_id))


@dataclasses.dataclass(frozen=True)
class SiteFilter:
    tenant: str = ""
    status: str = ""
    problem: bool = False

    @classmethod
    def parse(cls, tenant: str | None, status: str | None, problem: str | None) -> SiteFilter:
        tenant, status = (tenant or "").strip().lower(), (status or "").strip()
        if status and status not in STATUSES:
            raise pages.FilterError(f"status must be one of {', '.join(STATUSES)}")
        if len(tenant) > 63:
            raise pages.FilterError("the tenant filter is at most 63 characters")
        flag = (problem or "").strip().lower()
        if flag not in ("", "0", "1", "on", "true", "false"):
            raise pages.FilterError("problem must be 1 (problem sites only) or left out")
        return cls(tenant, status, flag in ("1", "on", "true"))

    def matches_registry(self, row: SiteRow) -> bool:
        return (not self.tenant or self.tenant in (row.tenant_slug, row.tenant_id)) and (
            not self.status or row.status == self.status
        )

    def query(self, **extra: str) -> str:
        params = {
            "tenant": self.tenant,
            "status": self.status,
            "problem": "1" if self.problem else "",
        } | extra
        return urlencode({k: v for k, v in params.items() if v})

    @property
    def active(self) -> bool:
        return bool(self.tenant or self.status or self.problem)


# --- reads (PostgreSQL, under row-level security) -------------------------------------------

_SITE_SQL = """SELECT s.id, s.tenant_id, s.server_id, s.kind, s.domains, s.upstream,
    s.redirects, s.force_https, s.tls, s.status, s.workflow_id, s.last_error,
    s.created_at, s.updated_at,
    t.slug AS tenant_slug, t.name AS tenant_name, sv.name AS server_name,
    c.state AS cert_state, c.issuer AS cert_issuer, c.not_before AS cert_not_before,
    c.not_after AS cert_not_after, c.last_error AS cert_error,
    c.last_attempt_at AS cert_last_attempt_at
    FROM sites s JOIN tenants t ON t.id = s.tenant_id
    JOIN servers sv ON sv.id = s.server_id
    LEFT JOIN site_certificates c ON c.site_id = s.id"""


@dataclasses.dataclass(frozen=True)
class VisibleSite:
    row: dict[str, Any]
    metrics_allowed: bool
    servers_allowed: bool

    @property
    def ref(self) -> probes.SiteRef:
        return probes.SiteRef(self.row["tenant_id"], self.row["id"])


def _visible(row: dict[str, Any], permissions: frozenset[str]) -> VisibleSite:
    return VisibleSite(row, "metrics:read" in permissions, "servers:read" in permissions)


async def _tenant_accesses(cp: ControlPlane, session: Session) -> list[TenantAccess]:
    out = []
    for membership in session.me.memberships:
        if READ not in membership.permissions:
            continue
        try:
            out.append(await resolve_access(cp.db, session.principal, membership.tenant_id))
        except Problem as problem:
            if problem.status != 404:  # a tenant deleted since the membership was read
                raise
    return out


async def visible_sites(cp: ControlPlane, session: Session) -> list[VisibleSite]:
    principal = session.principal
    if principal.is_staff:
        if STAFF_READ not in principal.staff_permissions:
            raise Problem(403, "forbidden", f"this needs the permission {STAFF_READ}")
        async with cp.db.unit_of_work(principal.actor(), staff_read=True) as uow:
            await uow.audit("staff.read", "sites", None)
            rows = await (
                await uow.conn.execute(_SITE_SQL + " WHERE t.state <> 'deleted'")
            ).fetchall()
        return [VisibleSite(r, True, True) for r in rows]
    out: list[VisibleSite] = []
    for access in await _tenant_accesses(cp, session):
        async with cp.db.unit_of_work(access.actor(), access.tenant_id) as uow:
            await authorize(uow, access, READ, Resource("site"))
            rows = await (
                await uow.conn.execute(_SITE_SQL + " WHERE s.tenant_id = %s", (access.tenant_id,))
            ).fetchall()
        out.extend(_visible(r, access.permissions) for r in rows)
    return out


@dataclasses.dataclass(frozen=True)
class FoundSite:
    site: VisibleSite
    workflow: dict[str, Any] | None


async def find_site(
    cp: ControlPlane, session: Session, tenant: str, site_id: str
) -> FoundSite | None:
    """The site if the viewer may see it; None for another tenant's and a missing one."""
    try:
        tenant_id, sid = uuid.UUID(tenant), uuid.UUID(site_id)
    except ValueError:
        return None
    principal = session.principal
    if principal.is_staff:
        if STAFF_READ not in principal.staff_permissions:
            return None
    elif not any(
        m.tenant_id == tenant_id and READ in m.permissions for m in session.me.memberships
    ):
        return None
    try:
        access = await resolve_access(cp.db, principal, tenant_id)  # staff: audited
    except Problem as problem:
        if problem.status == 404:
            return None
        raise
    async with cp.db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, READ, Resource("site", sid))
        row = await (
            await uow.conn.execute(
                _SITE_SQL + " WHERE s.id = %s AND s.tenant_id = %s", (sid, tenant_id)
            )
        ).fetchone()
        workflow = None
        if row is not None and row["workflow_id"] is not None:
            workflow = await (
                await uow.conn.execute(
                    """SELECT id, kind, state, error, created_at, finished_at FROM workflows
                       WHERE tenant_id = %s AND id = %s""",
                    (tenant_id, row["workflow_id"]),
                )
            ).fetchone()
    if row is None:
        return None
    staff = access.staff_read
    visible = VisibleSite(row, True, True) if staff else _visible(row, access.permissions)
    return FoundSite(visible, workflow)


def _row(site: VisibleSite, health: probes.SiteHealth | None) -> SiteRow:
    r = site.row
    return SiteRow(
        site_id=str(r["id"]),
        tenant_id=str(r["tenant_id"]),
        tenant_slug=r["tenant_slug"],
        tenant_name=r["tenant_name"],
        domains=tuple(r["domains"]),
        kind=r["kind"],
        server_id=str(r["server_id"]),
        server_name=r["server_name"] if site.servers_allowed else "",
        status=r["status"],
        last_error=r["last_error"],
        certificate_state=r["cert_state"],
        certificate_not_after=r["cert_not_after"],
        health=health if health is not None and site.metrics_allowed else probes.SiteHealth(),
    )


# --- pages ---------------------------------------------------------------------------------


def _not_found(viewer: pages.Viewer | None) -> HTMLResponse:
    return _error(viewer, 404, "Not found", "There is no such site, or it is not yours to see.")


def _unauthenticated(request: Request, fragment: str | None) -> Response:
    if fragment is not None:
        return _html("<p>Log in again.</p>", 401)
    return _login_redirect(request)


def _context(now: datetime) -> dict[str, Any]:
    return {
        "now": now,
        "tls_level": tls_level,
        "probe_labels": PROBE_LABELS,
        "tls_warn_days": TLS_WARN_DAYS,
    }


@router.get("/sites")
async def sites_page(
    request: Request,
    cp: ControlPlaneDep,
    tenant: str | None = None,
    status: str | None = None,
    problem: str | None = None,
    fragment: str | None = None,
) -> Response:
    """Every site the viewer may see with its status and latest probe, problems first."""
    session = await _session(request, cp)
    if session is None:
        return _unauthenticated(request, fragment)
    if fragment is not None and fragment != "rows":
        return _error(session.viewer, 400, "Bad request", "Unknown fragment.")
    try:
        filters = SiteFilter.parse(tenant, status, problem)
    except pages.FilterError as exc:
        return _error(session.viewer, 400, "Bad filter", str(exc))
    try:
        every = await visible_sites(cp, session)
    except Problem as problem_:
        return _problem_page(session.viewer, problem_)
    now = cp.clock.now()
    shown = [s for s in every if filters.matches_registry(_row(s, None))]
    wanted = [s.ref for s in shown if s.metrics_allowed]
    metrics_error = None
    health: dict[uuid.UUID, probes.SiteHealth] = {}
    try:
        health = await _store(request).run(probes.site_health, wanted, now)
    except Exception:
        log.exception("site health query failed")
        metrics_error = METRICS_UNAVAILABLE
    rows = [_row(s, health.get(s.row["id"])) for s in shown]
    if filters.problem:
        rows = [r for r in rows if r.problems]
    rows = sort_sites(rows)
    if fragment == "rows":
        return _html(pages.render("_site_rows.html", rows=rows, **_context(now)))
    tenants = sorted({(s.row["tenant_slug"], s.row["tenant_name"]) for s in every})
    return _html(
        pages.render(
            "sites.html",
            viewer=session.viewer,
            rows=rows,
            total=len(every),
            tenants=tenants,
            statuses=STATUSES,
            filters=filters,
            metrics_error=metrics_error,
            refresh_seconds=pages.REFRESH_SECONDS,
            **_context(now),
        )
    )


def _chart_set(data: probes.SiteCharts) -> pages.ChartSet:
    def scaled(line: windows.Line, factor: float) -> charts.ChartLine:
        return charts.ChartLine(
            line.label, [(t, None if v is None else v * factor) for t, v in line.points]
        )

    return pages.ChartSet(
        window=data.window.name,
        start=data.start,
        end=data.end,
        step=data.window.step_s,
        charts=[
            pages.Chart(
                "up",
                "Up % (share of probes answered below 500)",
                [scaled(data.availability, 100)],
                charts.PERCENT,
            ),
            pages.Chart(
                "latency", "Response time, ms", [scaled(data.duration, 1000)], MILLISECONDS
            ),
            pages.Chart(
                "status",
                "HTTP status (highest per step; 0: no response)",
                [scaled(data.status_code, 1)],
                STATUS_CODE,
            ),
        ],
    )


@router.get("/sites/{tenant}/{site_id}")
async def site_page(
    request: Request,
    cp: ControlPlaneDep,
    tenant: str,
    site_id: str,
    window: str = windows.DEFAULT_WINDOW,
    fragment: str | None = None,
) -> Response:
    """One site: domains, redirects, certificate, last workflow, and probe charts of the
    last hour, 6 hours or day."""
    session = await _session(request, cp)
    if session is None:
        return _unauthenticated(request, fragment)
    if fragment is not None and fragment != "live":
        return _error(session.viewer, 400, "Bad request", "Unknown fragment.")
    chosen = windows.WINDOWS.get(window)
    if chosen is None:
        return _error(
            session.viewer, 400, "Bad period", "window must be one of " + ", ".join(windows.WINDOWS)
        )
    try:
        found = await find_site(cp, session, tenant, site_id)
    except Problem as problem:
        return _problem_page(session.viewer, problem)
    if found is None:
        return _not_found(session.viewer)
    now = cp.clock.now()
    site = found.site
    note = None
    data = probes.empty_site_charts(chosen, now)
    health: probes.SiteHealth | None = None
    if not site.metrics_allowed:
        note = "Your role does not include metrics:read in this tenant: probe values are empty."
    else:
        try:
            store = _store(request)
            data = await store.run(probes.site_charts, site.ref, chosen, now)
            health = (await store.run(probes.site_health, [site.ref], now)).get(site.ref.site_id)
        except Exception:
            log.exception("site charts query failed")
            note = METRICS_UNAVAILABLE
    row = _row(site, health)
    r = site.row
    context = {
        "site": row,
        "detail": r,
        "workflow": found.workflow,
        "rendered": _chart_set(data).rendered(),
        "metrics_note": note,
        "window": chosen.name,
        **_context(now),
    }
    if fragment == "live":
        return _html(pages.render("_site_live.html", **context))
    return _html(
        pages.render(
            "site.html",
            viewer=session.viewer,
            windows=list(pages.WINDOW_LABELS.items()),
            refresh_seconds=pages.REFRESH_SECONDS,
            **context,
        )
    )
