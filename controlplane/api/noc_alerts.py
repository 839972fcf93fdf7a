"""The NOC alert pages (`/noc/alerts…`): current alerts, one alert with its history and
silences, and silencing from the page. HTML for browser sessions, not part of the API.

Who sees what: platform staff with `platform:tenants:read` see every tenant's alerts (the
list audited as one platform `staff.read` entry, like the fleet; an alert's page in the
tenant's own log); a tenant user sees the alerts of each tenant where their role grants
`alerts:read`. Silences are created and expired through the alerting API's own use cases
(`controlplane.alerting_admin`), which check `alerts:write`; the forms carry the
session's CSRF token. Another tenant's alert gets the page of one that does not exist.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from pydantic import ValidationError
from starlette.responses import Response

from alerting.matchers import Matcher, matches_all
from alerting.silences import Silence, Silences
from alerting.state import GroupState, encode_value
from controlplane import alerting_admin
from controlplane.access.credentials import authenticate_session
from controlplane.access.policy import resolve_access
from controlplane.access.principal import TenantAccess
from controlplane.api.deps import SESSION_COOKIE, ControlPlaneDep
from controlplane.api.noc import (
    STAFF_READ,
    Session,
    _error,
    _form,
    _html,
    _login_redirect,
    _problem_page,
    _redirect,
    _session,
)
from controlplane.context import ControlPlane
from controlplane.problems import Problem
from dashboards import pages

router = APIRouter(prefix="/noc/alerts", include_in_schema=False)

READ, WRITE = alerting_admin.READ, alerting_admin.WRITE
SHOWN_STATES = ("firing", "pending")
DURATIONS = {"1h": timedelta(hours=1), "4h": timedelta(hours=4), "24h": timedelta(hours=24)}
HISTORY_LIMIT = 50
SILENCE_LIMIT = 500
_FINGERPRINT = re.compile(r"^[0-9a-f]{32}$")
_SEVERITY = re.compile(r"^[A-Za-z0-9_-]{0,40}$")


# --- view models -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AlertRow:
    tenant_id: str
    tenant_slug: str
    tenant_name: str
    fingerprint: str
    alertname: str
    severity: str
    labels: dict[str, str]  # all but alertname and severity
    annotations: dict[str, str]
    state: str
    since: datetime
    value: str
    silenced_by: list[str]

    @property
    def summary(self) -> str:
        return self.annotations.get("summary", "")

    @property
    def server(self) -> str:
        return self.labels.get("server_name") or self.labels.get("host_name") or ""

    @property
    def href(self) -> str:
        return f"/noc/alerts/{self.tenant_id}/{self.fingerprint}"


@dataclasses.dataclass(frozen=True)
class AlertFilter:
    state: str = ""
    severity: str = ""
    tenant: str = ""
    alertname: str = ""

    @classmethod
    def parse(
        cls, state: str | None, severity: str | None, tenant: str | None, alertname: str | None
    ) -> AlertFilter:
        state, severity = (state or "").strip(), (severity or "").strip()
        if state and state not in SHOWN_STATES:
            raise pages.FilterError(f"state must be one of {', '.join(SHOWN_STATES)}")
        if not _SEVERITY.match(severity):
            raise pages.FilterError("severity: letters, digits, '-' and '_' only")
        return cls(state, severity, (tenant or "").strip()[:64], (alertname or "").strip()[:200])

    def matches(self, row: AlertRow) -> bool:
        return (
            (not self.state or row.state == self.state)
            and (not self.severity or row.severity == self.severity)
            and (not self.tenant or self.tenant in (row.tenant_slug, row.tenant_id))
            and (not self.alertname or self.alertname.lower() in row.alertname.lower())
        )

    def query(self, **extra: str) -> str:
        values = {k: v for k, v in dataclasses.asdict(self).items() if v} | extra
        return urlencode(values)

    @property
    def active(self) -> bool:
        return any(dataclasses.asdict(self).values())


def _value_text(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return f"{value:.6g}"


def _row(
    tenant: Mapping[str, Any], alert: alerting_admin.AlertOut | dict[str, Any]
) -> AlertRow | None:
    a = alert if isinstance(alert, alerting_admin.AlertOut) else alerting_admin.AlertOut(**alert)
    if a.state not in SHOWN_STATES:
        return None
    rest = {k: v for k, v in a.labels.items() if k not in ("alertname", "severity")}
    return AlertRow(
        tenant_id=str(tenant["id"]),
        tenant_slug=tenant["slug"],
        tenant_name=tenant["name"],
        fingerprint=a.fingerprint,
        alertname=a.alertname,
        severity=a.labels.get("severity", ""),
        labels=rest,
        annotations=a.annotations,
        state=a.state,
        since=a.active_since,
        value=_value_text(a.value),
        silenced_by=a.silenced_by,
    )


def _sorted(rows: Iterable[AlertRow]) -> list[AlertRow]:
    return sorted(
        rows,
        key=lambda r: (r.state != "firing", r.tenant_slug, r.alertname, sorted(r.labels.items())),
    )


# --- reads ---------------------------------------------------------------------------------


async def _tenant_accesses(cp: ControlPlane, session: Session) -> list[TenantAccess]:
    out = []
    for membership in session.me.memberships:
        if READ not in membership.permissions:
            continue
        try:
            out.append(await resolve_access(cp.db, session.principal, membership.tenant_id))
        except Problem as problem:
            if problem.status != 404:
                raise
    return out


async def _tenant_row(cp: ControlPlane, access: TenantAccess) -> dict[str, Any] | None:
    async with cp.db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        return await (
            await uow.conn.execute(
                "SELECT id, slug, name FROM tenants WHERE id = %s", (access.tenant_id,)
            )
        ).fetchone()


async def _staff_alerts(cp: ControlPlane, session: Session) -> list[AlertRow]:
    """Every tenant's current alerts in one read, audited once in the platform log."""
    principal = session.principal
    if STAFF_READ not in principal.staff_permissions:
        raise Problem(403, "forbidden", f"this needs the permission {STAFF_READ}")
    async with cp.db.unit_of_work(principal.actor(), staff_read=True) as uow:
        await uow.audit("staff.read", "alerts", None)
        now = uow.clock.now()
        states = await (
            await uow.conn.execute(
                """SELECT g.tenant_id, g.state, t.slug, t.name FROM alert_group_state g
                   JOIN tenants t ON t.id = g.tenant_id WHERE t.state <> 'deleted'
                   ORDER BY g.tenant_id, g.group_name"""
            )
        ).fetchall()
        silence_rows = await (
            await uow.conn.execute(
                "SELECT tenant_id, silence FROM alert_silences WHERE ends_at > %s", (now,)
            )
        ).fetchall()
    silences: dict[uuid.UUID, Silences] = {}
    for r in silence_rows:
        silences.setdefault(r["tenant_id"], Silences()).restore([Silence.from_dict(r["silence"])])
    out: list[AlertRow] = []
    for r in states:
        tenant = {"id": r["tenant_id"], "slug": r["slug"], "name": r["name"]}
        muting = silences.get(r["tenant_id"], Silences())
        for alert in GroupState.from_dict(r["state"]).alerts():
            row = _row(
                tenant,
                {
                    "fingerprint": alert.fingerprint,
                    "group": "",
                    "rule_id": alert.rule_id,
                    "alertname": alert.alertname,
                    "labels": dict(alert.labels),
                    "annotations": dict(alert.annotations),
                    "state": alert.state.value,
                    "value": encode_value(alert.value),
                    "active_since": alert.active_since,
                    "last_active_at": alert.last_active_at,
                    "fired_at": alert.fired_at,
                    "resolved_at": alert.resolved_at,
                    "silenced_by": muting.muted_by(alert.labels, now),
                },
            )
            if row is not None:
                out.append(row)
    return out


async def visible_alerts(cp: ControlPlane, session: Session) -> list[AlertRow]:
    if session.principal.is_staff:
        return _sorted(await _staff_alerts(cp, session))
    out: list[AlertRow] = []
    for access in await _tenant_accesses(cp, session):
        tenant = await _tenant_row(cp, access)
        if tenant is None:
            continue
        listed = await alerting_admin.list_alerts(cp.db, access, None, None)
        out.extend(r for a in listed.items if (r := _row(tenant, a)) is not None)
    return _sorted(out)


@dataclasses.dataclass(frozen=True)
class FoundAlert:
    access: TenantAccess
    tenant: dict[str, Any]
    alert: alerting_admin.AlertOut


async def find_alert(
    cp: ControlPlane, session: Session, tenant: str, fingerprint: str
) -> FoundAlert | None:
    """The alert if the viewer may see it; None for another tenant's and a missing one."""
    try:
        tenant_id = uuid.UUID(tenant)
    except ValueError:
        return None
    if not _FINGERPRINT.match(fingerprint):
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
    row = await _tenant_row(cp, access)
    if row is None:
        return None
    listed = await alerting_admin.list_alerts(cp.db, access, None, None)
    for alert in listed.items:
        if alert.fingerprint == fingerprint:
            return FoundAlert(access, row, alert)
    return None


# --- pages -----------------------------------------------------------------------------------


def _not_found(viewer: pages.Viewer | None) -> HTMLResponse:
    return _error(viewer, 404, "Not found", "There is no such alert, or it is not yours to see.")


def _unauthenticated(request: Request, fragment: str | None) -> Response:
    if fragment is not None:
        return _html("<p>Log in again.</p>", 401)
    return _login_redirect(request)


@router.get("")
async def alerts(
    request: Request,
    cp: ControlPlaneDep,
    state: str | None = None,
    severity: str | None = None,
    tenant: str | None = None,
    alertname: str | None = None,
    fragment: str | None = None,
) -> Response:
    """Current firing and pending alerts the viewer may see, firing first."""
    session = await _session(request, cp)
    if session is None:
        return _unauthenticated(request, fragment)
    if fragment is not None and fragment != "rows":
        return _error(session.viewer, 400, "Bad request", "Unknown fragment.")
    try:
        filters = AlertFilter.parse(state, severity, tenant, alertname)
    except pages.FilterError as exc:
        return _error(session.viewer, 400, "Bad filter", str(exc))
    try:
        every = await visible_alerts(cp, session)
    except Problem as problem:
        return _problem_page(session.viewer, problem)
    rows = [r for r in every if filters.matches(r)]
    now = cp.clock.now()
    if fragment == "rows":
        return _html(pages.render("_alert_rows.html", rows=rows, now=now))
    tenants = sorted({(r.tenant_slug, r.tenant_name) for r in every})
    severities = sorted({r.severity for r in every if r.severity})
    return _html(
        pages.render(
            "alerts.html",
            viewer=session.viewer,
            rows=rows,
            total=len(every),
            tenants=tenants,
            severities=severities,
            states=SHOWN_STATES,
            filters=filters,
            now=now,
            refresh_seconds=pages.REFRESH_SECONDS,
        )
    )


def _silence_view(silence: alerting_admin.SilenceOut) -> dict[str, Any]:
    matchers = [
        str(Matcher.from_dict(m.model_dump()))  # `name="value"` as the API takes it
        for m in silence.matchers
    ]
    return {
        "id": silence.id,
        "matchers": matchers,
        "starts_at": silence.starts_at,
        "ends_at": silence.ends_at,
        "created_by": silence.created_by,
        "comment": silence.comment,
        "state": silence.state,
    }


async def _detail(
    cp: ControlPlane,
    session: Session,
    found: FoundAlert,
    status: int = 200,
    error: str | None = None,
    form: Mapping[str, str] | None = None,
) -> HTMLResponse:
    access, alert = found.access, found.alert
    history = await alerting_admin.list_transitions(
        cp.db, access, HISTORY_LIMIT, None, alert.fingerprint
    )
    listed, _ = await alerting_admin.list_silences(cp.db, access, None, SILENCE_LIMIT, None)
    matching = [
        _silence_view(s)
        for s in listed
        if s.state != "expired"
        and matches_all([Matcher.from_dict(m.model_dump()) for m in s.matchers], alert.labels)
    ]
    matching.sort(key=lambda s: (s["state"] != "active", s["ends_at"]))
    prefilled = "\n".join(
        str(Matcher.from_dict({"name": k, "value": v, "isRegex": False, "isEqual": True}))
        for k, v in sorted(alert.labels.items())
    )
    form = form or {}
    page = pages.render(
        "alert.html",
        viewer=session.viewer,
        tenant=found.tenant,
        alert=alert,
        value=_value_text(alert.value),
        history=history.items,
        silences=matching,
        can_write=WRITE in access.permissions,
        durations=list(DURATIONS),
        chosen_duration=form.get("duration", "1h"),
        matchers_text=form.get("matchers", prefilled),
        comment=form.get("comment", ""),
        error=error,
        now=cp.clock.now(),
        base=f"/noc/alerts/{found.tenant['id']}/{alert.fingerprint}",
    )
    return _html(page, status)


@router.get("/{tenant}/{fingerprint}")
async def alert_page(
    request: Request, cp: ControlPlaneDep, tenant: str, fingerprint: str
) -> Response:
    """One alert: labels, annotations, history, matching silences, and the silence form."""
    session = await _session(request, cp)
    if session is None:
        return _login_redirect(request)
    try:
        found = await find_alert(cp, session, tenant, fingerprint)
        if found is None:
            return _not_found(session.viewer)
        return await _detail(cp, session, found)
    except Problem as problem:
        return _problem_page(session.viewer, problem)


async def _checked_post(
    request: Request, cp: ControlPlane, tenant: str, fingerprint: str
) -> tuple[Session, FoundAlert, dict[str, str]] | Response:
    """Session, the alert (404 when not visible), then the form's CSRF token (403)."""
    session = await _session(request, cp)
    if session is None:
        return _redirect("/noc/login")
    found = await find_alert(cp, session, tenant, fingerprint)
    if found is None:
        return _not_found(session.viewer)
    form = await _form(request) or {}  # not a form: no token, refused below
    try:
        await authenticate_session(
            cp.db, request.cookies.get(SESSION_COOKIE, ""), form.get("csrf_token"), True, cp.clock
        )
    except Problem as problem:
        if problem.code == "csrf_failed" or problem.status == 401:
            return _error(
                session.viewer, 403, "Not allowed", "The form expired; reload the page and retry."
            )
        raise
    if WRITE not in found.access.permissions:
        return _error(
            session.viewer, 403, "Not allowed", f"Silencing alerts needs the permission {WRITE}."
        )
    return session, found, form


@router.post("/{tenant}/{fingerprint}/silences")
async def silence_alert(
    request: Request, cp: ControlPlaneDep, tenant: str, fingerprint: str
) -> Response:
    """Create a silence from the form, through the alerting API's own use case."""
    try:
        checked = await _checked_post(request, cp, tenant, fingerprint)
        if isinstance(checked, Response):
            return checked
        session, found, form = checked
        duration = DURATIONS.get(form.get("duration", ""))
        lines = [line.strip() for line in form.get("matchers", "").splitlines() if line.strip()]
        comment = form.get("comment", "").strip()
        problems = _form_problems(duration, lines, comment)
        if problems or duration is None:
            return await _detail(cp, session, found, 422, "; ".join(problems), form)
        try:
            body = alerting_admin.SilenceCreate(
                matchers=list(lines),
                starts_at=None,
                ends_at=cp.clock.now() + duration,
                comment=comment,
            )
        except ValidationError as exc:
            detail = "; ".join(str(e["msg"]) for e in exc.errors()[:3])
            return await _detail(cp, session, found, 422, detail, form)
        try:
            await alerting_admin.create_silence(cp.db, found.access, body)
        except Problem as problem:
            if problem.status != 422:
                raise
            return await _detail(cp, session, found, 422, problem.detail, form)
        return _redirect(f"/noc/alerts/{found.tenant['id']}/{found.alert.fingerprint}")
    except Problem as problem:
        return _problem_page(None, problem)


def _form_problems(duration: timedelta | None, lines: Sequence[str], comment: str) -> list[str]:
    problems = []
    if duration is None:
        problems.append("choose a duration: " + ", ".join(DURATIONS))
    if not lines:
        problems.append('give at least one matcher (name="value")')
    if not comment:
        problems.append("say why in the comment")
    return problems


@router.post("/{tenant}/{fingerprint}/silences/{silence_id}/expire")
async def expire_silence(
    request: Request, cp: ControlPlaneDep, tenant: str, fingerprint: str, silence_id: str
) -> Response:
    """Expire a silence shown on the alert's page, through the alerting API's use case."""
    try:
        checked = await _checked_post(request, cp, tenant, fingerprint)
        if isinstance(checked, Response):
            return checked
        session, found, _ = checked
        try:
            sid = uuid.UUID(silence_id)
        except ValueError:
            return _error(session.viewer, 404, "Not found", "There is no such silence.")
        try:
            await alerting_admin.expire_silence(cp.db, found.access, sid)
        except Problem as problem:
            if problem.status == 409:
                return await _detail(cp, session, found, 409, problem.detail)
            if problem.status == 404:
                return _error(session.viewer, 404, "Not found", "There is no such silence.")
            return _problem_page(session.viewer, problem)
        return _redirect(f"/noc/alerts/{found.tenant['id']}/{found.alert.fingerprint}")
    except Problem as problem:
        return _problem_page(None, problem)
