"""The NOC alert pages (`/noc/alerts…`, `/noc/incidents…`): current alerts with their
incident, one alert with its history, silences and incident, the incidents list and one
incident; silencing and working on incidents (acknowledge, assign, note, resolve) from the
page. HTML for browser sessions, not part of the API.

Who sees what: platform staff with `platform:tenants:read` see every tenant's alerts and
incidents (each list audited as one platform `staff.read` entry, like the fleet; an
alert's or incident's page in the tenant's own log); a tenant user sees those of each
tenant where their role grants `alerts:read`. Writes go through the API's own use cases
(`controlplane.alerting_admin` for silences, `controlplane.incidents` for incidents),
which check `alerts:write`; the forms carry the session's CSRF token. Another tenant's
alert or incident gets the page of one that does not exist, before the form is read.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
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
from controlplane import incidents as incident_cases
from controlplane.access import service as access_service
from controlplane.access.credentials import authenticate_session
from controlplane.access.policy import Resource, authorize, resolve_access
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

# One router for the alert and incident pages (mounted by the app as `noc_alerts.router`).
router = APIRouter(prefix="/noc", include_in_schema=False)

READ, WRITE = alerting_admin.READ, alerting_admin.WRITE
SHOWN_STATES = ("firing", "pending")
DURATIONS = {"1h": timedelta(hours=1), "4h": timedelta(hours=4), "24h": timedelta(hours=24)}
HISTORY_LIMIT = 50
SILENCE_LIMIT = 500
_FINGERPRINT = re.compile(r"^[0-9a-f]{32}$")
_SEVERITY = re.compile(r"^[A-Za-z0-9_-]{0,40}$")
INCIDENT_STATES: tuple[incident_cases.IncidentState, ...] = ("open", "acknowledged", "resolved")
INCIDENT_LIMIT = 200  # per tenant and state on the incidents page
STAFF_INCIDENT_LIMIT = 500
MEMBER_LIMIT = 500
# Where an incident form was sent from, to go back there (never a URL from the form).
ORIGINS = ("alert", "incident")
EVENT_LABELS = {
    "opened": "opened",
    "acknowledged": "acknowledged",
    "assigned": "assigned",
    "note": "note",
    "alert_resolved": "alert resolved",
    "resolved": "resolved",
    "reopened": "fired again",
}


# --- view models -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IncidentBadge:
    """The alert's incident on the alerts list: its unresolved one, else its latest."""

    id: str
    state: str
    assignee: str  # a name to show; "" when nobody is assigned
    href: str


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
    incident: IncidentBadge | None = None

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


# The incident each alert of the list links to: the unresolved one (at most one per alert),
# else the latest. Assignee emails come from `users`, shown only to whom may read members.
_LATEST_INCIDENTS = """SELECT DISTINCT ON (i.tenant_id, i.fingerprint) i.tenant_id, i.id,
    i.fingerprint, i.state, i.assignee, u.email AS assignee_email
    FROM incidents i LEFT JOIN users u ON u.id = i.assignee
    WHERE i.fingerprint = ANY(%(fingerprints)s)
      AND (%(tenant)s::uuid IS NULL OR i.tenant_id = %(tenant)s::uuid)
    ORDER BY i.tenant_id, i.fingerprint, i.state = 'resolved', i.opened_at DESC"""


def _badge(row: Mapping[str, Any], names_allowed: bool, me: uuid.UUID | None) -> IncidentBadge:
    assignee = ""
    if row["assignee"] is not None:
        if names_allowed and row["assignee_email"]:
            assignee = row["assignee_email"]
        else:
            assignee = "you" if row["assignee"] == me else "someone"
    return IncidentBadge(
        id=str(row["id"]),
        state=row["state"],
        assignee=assignee,
        href=f"/noc/incidents/{row['tenant_id']}/{row['id']}",
    )


async def _staff_alerts(cp: ControlPlane, session: Session) -> list[AlertRow]:
    """Every tenant's current alerts and their incidents in one read, audited once in the
    platform log."""
    principal = session.principal
    if STAFF_READ not in principal.staff_permissions:
        raise Problem(403, "forbidden", f"this needs the permission {STAFF_READ}")
    out: list[AlertRow] = []
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
            silences.setdefault(r["tenant_id"], Silences()).restore(
                [Silence.from_dict(r["silence"])]
            )
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
        found = []
        if out:
            found = await (
                await uow.conn.execute(
                    _LATEST_INCIDENTS,
                    {"fingerprints": sorted({r.fingerprint for r in out}), "tenant": None},
                )
            ).fetchall()
    badges = {(str(r["tenant_id"]), r["fingerprint"]): _badge(r, True, None) for r in found}
    return [dataclasses.replace(r, incident=badges.get((r.tenant_id, r.fingerprint))) for r in out]


async def _tenant_badges(
    cp: ControlPlane, access: TenantAccess, fingerprints: Sequence[str]
) -> dict[str, IncidentBadge]:
    if not fingerprints:
        return {}
    async with cp.db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, incident_cases.READ, Resource(incident_cases.KIND))
        rows = await (
            await uow.conn.execute(
                _LATEST_INCIDENTS,
                {"fingerprints": list(fingerprints), "tenant": access.tenant_id},
            )
        ).fetchall()
    names = "members:read" in access.permissions
    me = access.principal.user_id
    return {r["fingerprint"]: _badge(r, names, me) for r in rows}


async def visible_alerts(cp: ControlPlane, session: Session) -> list[AlertRow]:
    if session.principal.is_staff:
        return _sorted(await _staff_alerts(cp, session))
    out: list[AlertRow] = []
    for access in await _tenant_accesses(cp, session):
        tenant = await _tenant_row(cp, access)
        if tenant is None:
            continue
        listed = await alerting_admin.list_alerts(cp.db, access, None, None)
        rows = [r for a in listed.items if (r := _row(tenant, a)) is not None]
        badges = await _tenant_badges(cp, access, [r.fingerprint for r in rows])
        out.extend(dataclasses.replace(r, incident=badges.get(r.fingerprint)) for r in rows)
    return _sorted(out)


async def _access_to(
    cp: ControlPlane, session: Session, tenant: str
) -> tuple[TenantAccess, dict[str, Any]] | None:
    """The viewer's access to the tenant named in a page's path, with the tenant's row;
    None when they may not read its alerts (as for a tenant that does not exist)."""
    try:
        tenant_id = uuid.UUID(tenant)
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
    row = await _tenant_row(cp, access)
    if row is None:
        return None
    return access, row


@dataclasses.dataclass(frozen=True)
class FoundAlert:
    access: TenantAccess
    tenant: dict[str, Any]
    alert: alerting_admin.AlertOut


async def _current_alert(
    cp: ControlPlane, access: TenantAccess, fingerprint: str
) -> alerting_admin.AlertOut | None:
    listed = await alerting_admin.list_alerts(cp.db, access, None, None)
    return next((a for a in listed.items if a.fingerprint == fingerprint), None)


async def find_alert(
    cp: ControlPlane, session: Session, tenant: str, fingerprint: str
) -> FoundAlert | None:
    """The alert if the viewer may see it; None for another tenant's and a missing one."""
    if not _FINGERPRINT.match(fingerprint):
        return None
    resolved = await _access_to(cp, session, tenant)
    if resolved is None:
        return None
    access, row = resolved
    alert = await _current_alert(cp, access, fingerprint)
    return None if alert is None else FoundAlert(access, row, alert)


@dataclasses.dataclass(frozen=True)
class FoundIncident:
    access: TenantAccess
    tenant: dict[str, Any]
    incident: incident_cases.IncidentDetail

    @property
    def href(self) -> str:
        return f"/noc/incidents/{self.tenant['id']}/{self.incident.id}"

    @property
    def alert_href(self) -> str:
        return f"/noc/alerts/{self.tenant['id']}/{self.incident.fingerprint}"


async def find_incident(
    cp: ControlPlane, session: Session, tenant: str, incident_id: str
) -> FoundIncident | None:
    """The incident if the viewer may see it; None for another tenant's and a missing one."""
    try:
        iid = uuid.UUID(incident_id)
    except ValueError:
        return None
    resolved = await _access_to(cp, session, tenant)
    if resolved is None:
        return None
    access, row = resolved
    try:
        detail = await incident_cases.get_incident(cp.db, access, iid)
    except Problem as problem:
        if problem.status == 404:
            return None
        raise
    return FoundIncident(access, row, detail)


async def _alert_incident(
    cp: ControlPlane, access: TenantAccess, fingerprint: str
) -> incident_cases.IncidentDetail | None:
    """The alert's unresolved incident, else its latest; None if it never fired."""
    async with cp.db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, incident_cases.READ, Resource(incident_cases.KIND))
        row = await (
            await uow.conn.execute(
                """SELECT id FROM incidents WHERE tenant_id = %s AND fingerprint = %s
                   ORDER BY state = 'resolved', opened_at DESC LIMIT 1""",
                (access.tenant_id, fingerprint),
            )
        ).fetchone()
    if row is None:
        return None
    return await incident_cases.get_incident(cp.db, access, row["id"])


async def _people(cp: ControlPlane, access: TenantAccess) -> dict[uuid.UUID, str]:
    """Member emails by user id, to name assignees and authors; empty without
    `members:read` (the page then names only the viewer)."""
    if "members:read" not in access.permissions:
        return {}
    members = await access_service.list_members(cp.db, access, MEMBER_LIMIT, None)
    return {m.user_id: m.email for m in members[:MEMBER_LIMIT]}


# --- incident view models --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TimelineEntry:
    at: datetime
    kind: str
    label: str
    who: str
    text: str


@dataclasses.dataclass(frozen=True)
class IncidentPanel:
    """An incident as its page and the alert's page show it, with what the forms need."""

    tenant_id: str
    incident: incident_cases.IncidentDetail
    assignee: str
    acknowledged_by: str
    resolved_by: str
    timeline: list[TimelineEntry]
    can_write: bool
    members: list[tuple[str, str]]  # (user id, email): who the assign form offers
    origin: str  # "alert" or "incident": where the forms come back to

    @property
    def action_base(self) -> str:
        return f"/noc/incidents/{self.tenant_id}/{self.incident.id}"


def _user_id(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def _panel(
    access: TenantAccess,
    detail: incident_cases.IncidentDetail,
    people: Mapping[uuid.UUID, str],
    origin: str,
) -> IncidentPanel:
    me = access.principal.user_id

    def name(user: uuid.UUID | None, nobody: str = "") -> str:
        if user is None:
            return nobody
        if user in people:
            return people[user]
        return "you" if user == me else f"user {str(user)[:8]}"

    timeline = []
    for e in detail.timeline:
        text = e.text or ""
        if e.kind == "assigned":
            text = name(_user_id(text), "nobody")
        timeline.append(
            TimelineEntry(
                e.at, e.kind, EVENT_LABELS.get(e.kind, e.kind), name(e.author, "alerting"), text
            )
        )
    members = sorted(((str(k), v) for k, v in people.items()), key=lambda m: m[1])
    if not members and me is not None:
        members = [(str(me), "you")]
    return IncidentPanel(
        tenant_id=str(access.tenant_id),
        incident=detail,
        assignee=name(detail.assignee, "nobody"),
        acknowledged_by=name(detail.acknowledged_by),
        resolved_by=name(detail.resolved_by, "alerting" if detail.resolved_at else ""),
        timeline=timeline,
        can_write=incident_cases.WRITE in access.permissions and not access.staff_read,
        members=members,
        origin=origin,
    )


@dataclasses.dataclass(frozen=True)
class IncidentRow:
    tenant_id: str
    tenant_slug: str
    tenant_name: str
    id: str
    alertname: str
    severity: str
    labels: dict[str, str]
    state: str
    opened_at: datetime
    assignee: str

    @property
    def href(self) -> str:
        return f"/noc/incidents/{self.tenant_id}/{self.id}"

    @property
    def server(self) -> str:
        return self.labels.get("server_name") or self.labels.get("host_name") or ""


@dataclasses.dataclass(frozen=True)
class IncidentFilter:
    state: str = ""
    tenant: str = ""

    @classmethod
    def parse(cls, state: str | None, tenant: str | None) -> IncidentFilter:
        state = (state or "").strip()
        if state and state not in INCIDENT_STATES:
            raise pages.FilterError(f"state must be one of {', '.join(INCIDENT_STATES)}")
        return cls(state, (tenant or "").strip()[:64])

    def matches(self, row: IncidentRow) -> bool:
        return (not self.state or row.state == self.state) and (
            not self.tenant or self.tenant in (row.tenant_slug, row.tenant_id)
        )

    def query(self, **extra: str) -> str:
        values = {k: v for k, v in dataclasses.asdict(self).items() if v} | extra
        return urlencode(values)

    @property
    def active(self) -> bool:
        return any(dataclasses.asdict(self).values())


def _plain_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """The labels but alertname and severity, which have their own columns."""
    return {k: v for k, v in labels.items() if k not in ("alertname", "severity")}


def _sorted_incidents(rows: Iterable[IncidentRow]) -> list[IncidentRow]:
    """Open first, then acknowledged, then resolved; newest first within each."""
    order: dict[str, int] = {s: i for i, s in enumerate(INCIDENT_STATES)}
    return sorted(rows, key=lambda r: (order[r.state], -r.opened_at.timestamp(), r.id))


_STAFF_INCIDENTS = """SELECT i.tenant_id, t.slug, t.name, i.id, i.alertname, i.severity,
    i.labels, i.state, i.opened_at, u.email AS assignee_email
    FROM incidents i JOIN tenants t ON t.id = i.tenant_id
    LEFT JOIN users u ON u.id = i.assignee
    WHERE t.state <> 'deleted' AND (%(state)s::text IS NULL OR i.state = %(state)s::text)
    ORDER BY array_position(ARRAY['open', 'acknowledged', 'resolved'], i.state),
        i.opened_at DESC
    LIMIT %(limit)s"""


async def visible_incidents(
    cp: ControlPlane, session: Session, state: incident_cases.IncidentState | None
) -> list[IncidentRow]:
    principal = session.principal
    out: list[IncidentRow] = []
    if principal.is_staff:
        if STAFF_READ not in principal.staff_permissions:
            raise Problem(403, "forbidden", f"this needs the permission {STAFF_READ}")
        async with cp.db.unit_of_work(principal.actor(), staff_read=True) as uow:
            await uow.audit("staff.read", "incidents", None)
            rows = await (
                await uow.conn.execute(
                    _STAFF_INCIDENTS, {"state": state, "limit": STAFF_INCIDENT_LIMIT}
                )
            ).fetchall()
        for r in rows:
            out.append(
                IncidentRow(
                    tenant_id=str(r["tenant_id"]),
                    tenant_slug=r["slug"],
                    tenant_name=r["name"],
                    id=str(r["id"]),
                    alertname=r["alertname"],
                    severity=r["severity"] or "",
                    labels=_plain_labels(r["labels"]),
                    state=r["state"],
                    opened_at=r["opened_at"],
                    assignee=r["assignee_email"] or "",
                )
            )
        return _sorted_incidents(out)
    for access in await _tenant_accesses(cp, session):
        tenant = await _tenant_row(cp, access)
        if tenant is None:
            continue
        items: list[incident_cases.IncidentOut] = []
        # Per state, so that old open incidents are not pushed out by recent resolved ones.
        for s in (state,) if state else INCIDENT_STATES:
            listed, _ = await incident_cases.list_incidents(cp.db, access, s, INCIDENT_LIMIT, None)
            items.extend(listed)
        people = await _people(cp, access) if any(i.assignee for i in items) else {}
        me = access.principal.user_id
        for i in items:
            assignee = ""
            if i.assignee is not None:
                assignee = people.get(i.assignee) or ("you" if i.assignee == me else "someone")
            out.append(
                IncidentRow(
                    tenant_id=str(tenant["id"]),
                    tenant_slug=tenant["slug"],
                    tenant_name=tenant["name"],
                    id=str(i.id),
                    alertname=i.alertname,
                    severity=i.severity or "",
                    labels=_plain_labels(i.labels),
                    state=i.state,
                    opened_at=i.opened_at,
                    assignee=assignee,
                )
            )
    return _sorted_incidents(out)


# --- alert pages ----------------------------------------------------------------------------


def _not_found(viewer: pages.Viewer | None) -> HTMLResponse:
    return _error(viewer, 404, "Not found", "There is no such alert, or it is not yours to see.")


def _incident_not_found(viewer: pages.Viewer | None) -> HTMLResponse:
    return _error(viewer, 404, "Not found", "There is no such incident, or it is not yours to see.")


def _unauthenticated(request: Request, fragment: str | None) -> Response:
    if fragment is not None:
        return _html("<p>Log in again.</p>", 401)
    return _login_redirect(request)


@router.get("/alerts")
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
    incident_error: str | None = None,
    incident_form: Mapping[str, str] | None = None,
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
    incident = await _alert_incident(cp, access, alert.fingerprint)
    panel = None
    if incident is not None:
        panel = _panel(access, incident, await _people(cp, access), "alert")
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
        panel=panel,
        incident_error=incident_error,
        incident_form=incident_form or {},
        now=cp.clock.now(),
        base=f"/noc/alerts/{found.tenant['id']}/{alert.fingerprint}",
    )
    return _html(page, status)


@router.get("/alerts/{tenant}/{fingerprint}")
async def alert_page(
    request: Request, cp: ControlPlaneDep, tenant: str, fingerprint: str
) -> Response:
    """One alert: labels, annotations, its incident, history, matching silences, and the
    silence and incident forms."""
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


async def _csrf_refused(
    request: Request, cp: ControlPlane, session: Session, form: Mapping[str, str]
) -> Response | None:
    """403 unless the form carries the session's CSRF token."""
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
    return None


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
    refused = await _csrf_refused(request, cp, session, form)
    if refused is not None:
        return refused
    if WRITE not in found.access.permissions:
        return _error(
            session.viewer, 403, "Not allowed", f"Silencing alerts needs the permission {WRITE}."
        )
    return session, found, form


@router.post("/alerts/{tenant}/{fingerprint}/silences")
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


@router.post("/alerts/{tenant}/{fingerprint}/silences/{silence_id}/expire")
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


# --- incident pages -------------------------------------------------------------------------


@router.get("/incidents")
async def incidents_page(
    request: Request,
    cp: ControlPlaneDep,
    state: str | None = None,
    tenant: str | None = None,
    fragment: str | None = None,
) -> Response:
    """The incidents the viewer may see: open first, then acknowledged, then resolved."""
    session = await _session(request, cp)
    if session is None:
        return _unauthenticated(request, fragment)
    if fragment is not None and fragment != "rows":
        return _error(session.viewer, 400, "Bad request", "Unknown fragment.")
    try:
        filters = IncidentFilter.parse(state, tenant)
    except pages.FilterError as exc:
        return _error(session.viewer, 400, "Bad filter", str(exc))
    try:
        chosen = next((s for s in INCIDENT_STATES if s == filters.state), None)
        every = await visible_incidents(cp, session, chosen)
    except Problem as problem:
        return _problem_page(session.viewer, problem)
    rows = [r for r in every if filters.matches(r)]
    now = cp.clock.now()
    if fragment == "rows":
        return _html(pages.render("_incident_rows.html", rows=rows, now=now))
    tenants = sorted({(r.tenant_slug, r.tenant_name) for r in every})
    return _html(
        pages.render(
            "incidents.html",
            viewer=session.viewer,
            rows=rows,
            total=len(every),
            tenants=tenants,
            states=INCIDENT_STATES,
            filters=filters,
            now=now,
            refresh_seconds=pages.REFRESH_SECONDS,
        )
    )


async def _incident_detail(
    cp: ControlPlane,
    session: Session,
    found: FoundIncident,
    status: int = 200,
    error: str | None = None,
    form: Mapping[str, str] | None = None,
) -> HTMLResponse:
    alert = await _current_alert(cp, found.access, found.incident.fingerprint)
    page = pages.render(
        "incident.html",
        viewer=session.viewer,
        tenant=found.tenant,
        panel=_panel(found.access, found.incident, await _people(cp, found.access), "incident"),
        alert_href=found.alert_href if alert is not None else None,
        incident_error=error,
        incident_form=form or {},
        now=cp.clock.now(),
    )
    return _html(page, status)


@router.get("/incidents/{tenant}/{incident_id}")
async def incident_page(
    request: Request, cp: ControlPlaneDep, tenant: str, incident_id: str
) -> Response:
    """One incident: state, assignee, the timeline, and the forms to work on it."""
    session = await _session(request, cp)
    if session is None:
        return _login_redirect(request)
    try:
        found = await find_incident(cp, session, tenant, incident_id)
        if found is None:
            return _incident_not_found(session.viewer)
        return await _incident_detail(cp, session, found)
    except Problem as problem:
        return _problem_page(session.viewer, problem)


IncidentAction = Callable[[ControlPlane, FoundIncident, Mapping[str, str]], Awaitable[object]]


async def _incident_form(
    request: Request, cp: ControlPlane, tenant: str, incident_id: str, action: IncidentAction
) -> Response:
    """Session, the incident (404 when not visible, before the form is read), the form's
    CSRF token (403), `alerts:write` (403); then the use case, and back to the page the
    form is on — or that page again with the problem (409, 422)."""
    try:
        session = await _session(request, cp)
        if session is None:
            return _redirect("/noc/login")
        found = await find_incident(cp, session, tenant, incident_id)
        if found is None:
            return _incident_not_found(session.viewer)
        form = await _form(request) or {}
        refused = await _csrf_refused(request, cp, session, form)
        if refused is not None:
            return refused
        if incident_cases.WRITE not in found.access.permissions:
            return _error(
                session.viewer,
                403,
                "Not allowed",
                f"Working on incidents needs the permission {incident_cases.WRITE}.",
            )
        origin = form.get("from", "")
        try:
            await action(cp, found, form)
        except Problem as problem:
            if problem.status not in (409, 422):
                raise
            return await _incident_again(
                cp, session, found, origin, problem.status, problem.detail, form
            )
        alert = None
        if origin == "alert":
            alert = await _current_alert(cp, found.access, found.incident.fingerprint)
        return _redirect(found.alert_href if alert is not None else found.href)
    except Problem as problem:
        return _problem_page(None, problem)


async def _incident_again(
    cp: ControlPlane,
    session: Session,
    found: FoundIncident,
    origin: str,
    status: int,
    detail: str,
    form: Mapping[str, str],
) -> HTMLResponse:
    """The page the form was on, with what went wrong and what was typed."""
    fresh = await incident_cases.get_incident(cp.db, found.access, found.incident.id)
    found = dataclasses.replace(found, incident=fresh)
    if origin == "alert":
        alert = await _current_alert(cp, found.access, fresh.fingerprint)
        if alert is not None:
            on_alert = FoundAlert(found.access, found.tenant, alert)
            return await _detail(
                cp, session, on_alert, status, incident_error=detail, incident_form=form
            )
    return await _incident_detail(cp, session, found, status, detail, form)


def _invalid(message: str) -> Problem:
    return Problem(422, "validation", message)


async def _acknowledge(cp: ControlPlane, found: FoundIncident, form: Mapping[str, str]) -> None:
    await incident_cases.acknowledge(cp.db, found.access, found.incident.id)


async def _assign(cp: ControlPlane, found: FoundIncident, form: Mapping[str, str]) -> None:
    chosen = form.get("user_id", "").strip()
    try:
        user_id = uuid.UUID(chosen) if chosen else None
    except ValueError:
        raise _invalid("Choose a member of the tenant to assign.") from None
    body = incident_cases.AssignBody(user_id=user_id)
    await incident_cases.assign(cp.db, found.access, found.incident.id, body)


async def _note(cp: ControlPlane, found: FoundIncident, form: Mapping[str, str]) -> None:
    text = form.get("text", "").strip()
    if not text:
        raise _invalid("Write the note before adding it.")
    try:
        body = incident_cases.NoteBody(text=text)
    except ValidationError:
        raise _invalid("The note is too long: at most 10000 characters.") from None
    await incident_cases.add_note(cp.db, found.access, found.incident.id, body)


async def _resolve(cp: ControlPlane, found: FoundIncident, form: Mapping[str, str]) -> None:
    comment = form.get("comment", "").strip() or None
    try:
        body = incident_cases.ResolveBody(comment=comment)
    except ValidationError:
        raise _invalid("The comment is too long: at most 2000 characters.") from None
    await incident_cases.resolve(cp.db, found.access, found.incident.id, body)


@router.post("/incidents/{tenant}/{incident_id}/acknowledge")
async def acknowledge_incident(
    request: Request, cp: ControlPlaneDep, tenant: str, incident_id: str
) -> Response:
    """Open → acknowledged by the viewer, through the incidents API's use case."""
    return await _incident_form(request, cp, tenant, incident_id, _acknowledge)


@router.post("/incidents/{tenant}/{incident_id}/assign")
async def assign_incident(
    request: Request, cp: ControlPlaneDep, tenant: str, incident_id: str
) -> Response:
    """Assign to a member of the tenant (an empty choice unassigns)."""
    return await _incident_form(request, cp, tenant, incident_id, _assign)


@router.post("/incidents/{tenant}/{incident_id}/notes")
async def note_incident(
    request: Request, cp: ControlPlaneDep, tenant: str, incident_id: str
) -> Response:
    """A note on the incident's timeline."""
    return await _incident_form(request, cp, tenant, incident_id, _note)


@router.post("/incidents/{tenant}/{incident_id}/resolve")
async def resolve_incident(
    request: Request, cp: ControlPlaneDep, tenant: str, incident_id: str
) -> Response:
    """Resolve by hand; the comment, if any, is the resolution."""
    return await _incident_form(request, cp, tenant, incident_id, _resolve)
