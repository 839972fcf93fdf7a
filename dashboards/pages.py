"""The NOC pages as view models in, HTML out (jinja2, autoescaped, strict undefined).

This module knows nothing of PostgreSQL, ClickHouse or HTTP: the control plane resolves
who may see what, reads the data (the published `ingest.query.fleet` functions) and hands
the results here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import jinja2
from markupsafe import Markup

from dashboards import charts, formatting
from ingest.query.fleet import Line, ServerCharts

REFRESH_SECONDS = 10
PRESENCE_STATES = ("offline", "never_connected", "online")
PRESENCE_LABELS = {"offline": "offline", "never_connected": "never connected", "online": "online"}
# Offline first: what needs someone's attention is at the top.
_PRESENCE_ORDER = {state: i for i, state in enumerate(PRESENCE_STATES)}
WINDOW_LABELS = {"1h": "last hour", "6h": "last 6 hours", "24h": "last 24 hours"}


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("dashboards", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        percent=formatting.percent,
        number=formatting.number,
        rate=formatting.bytes_per_second,
        timestamp=formatting.timestamp,
        duration=formatting.duration,
    )
    env.globals.update(presence_labels=PRESENCE_LABELS, age=formatting.age)
    return env


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)


@dataclass(frozen=True)
class Viewer:
    """Who is looking, for the page header (and the logout form's CSRF token)."""

    name: str
    is_staff: bool
    csrf_token: str | None


class FilterError(ValueError):
    """A filter value the fleet list does not accept; the message says which."""


@dataclass(frozen=True)
class FleetFilter:
    state: str = ""
    tenant: str = ""
    name: str = ""

    @classmethod
    def parse(cls, state: str | None, tenant: str | None, name: str | None) -> FleetFilter:
        state = (state or "").strip()
        tenant = (tenant or "").strip()
        name = (name or "").strip()
        if state and state not in PRESENCE_STATES:
            raise FilterError(f"state must be one of {', '.join(PRESENCE_STATES)}")
        if len(tenant) > 63 or len(name) > 63:
            raise FilterError("tenant and name filters are at most 63 characters")
        return cls(state, tenant.lower(), name.lower())

    def matches(self, row: FleetRow) -> bool:
        return (
            (not self.state or row.presence == self.state)
            and (not self.tenant or self.tenant in (row.tenant_slug, row.tenant_id))
            and (not self.name or self.name in row.name.lower())
        )

    def query(self, **extra: str) -> str:
        params = {"state": self.state, "tenant": self.tenant, "name": self.name} | extra
        return urlencode({k: v for k, v in params.items() if v})

    @property
    def active(self) -> bool:
        return bool(self.state or self.tenant or self.name)


@dataclass(frozen=True)
class FleetRow:
    server_id: str
    name: str
    tenant_id: str
    tenant_slug: str
    tenant_name: str
    presence: str
    presence_since: datetime | None
    cpu_busy: float | None
    memory_used: float | None
    root_disk_used: float | None
    load_1m: float | None
    last_sample_at: datetime | None


def sort_fleet(rows: Sequence[FleetRow]) -> list[FleetRow]:
    """Offline first, then never connected, then online; by tenant and name within."""
    return sorted(
        rows, key=lambda r: (_PRESENCE_ORDER.get(r.presence, 0), r.tenant_slug, r.name, r.server_id)
    )


def level(fraction: float | None) -> str:
    """A CSS class for a utilization: ok, warn (≥ 80 %), crit (≥ 90 %)."""
    if fraction is None:
        return "none"
    return "crit" if fraction >= 0.9 else "warn" if fraction >= 0.8 else "ok"


def fleet_page(
    viewer: Viewer,
    rows: Sequence[FleetRow],
    tenants: Sequence[tuple[str, str]],
    filters: FleetFilter,
    total: int,
    now: datetime,
    metrics_error: str | None = None,
) -> str:
    """The fleet list; `tenants` are (slug, name) for the filter, `total` before filtering."""
    return render(
        "fleet.html",
        viewer=viewer,
        metrics_error=metrics_error,
        rows=sort_fleet(rows),
        tenants=tenants,
        filters=filters,
        states=PRESENCE_STATES,
        total=total,
        now=now,
        level=level,
        refresh_seconds=REFRESH_SECONDS,
    )


def fleet_rows(rows: Sequence[FleetRow], now: datetime) -> str:
    """The table body alone, for the live refresh."""
    return render("_fleet_rows.html", rows=sort_fleet(rows), now=now, level=level)


@dataclass(frozen=True)
class ServerInfo:
    server_id: str
    name: str
    tenant_slug: str
    tenant_name: str
    region: str
    labels: dict[str, str]
    presence: str
    presence_since: datetime | None
    last_seen_at: datetime | None
    hostname: str | None
    agent_version: str | None
    created_at: datetime


@dataclass(frozen=True)
class Chart:
    chart_id: str
    title: str
    lines: Sequence[charts.ChartLine]
    scale: charts.Scale


@dataclass(frozen=True)
class ChartSet:
    window: str
    start: int
    end: int
    step: int
    charts: Sequence[Chart]

    def rendered(self) -> list[Markup]:
        period = f"{WINDOW_LABELS.get(self.window, self.window)}, one point per {self.step} s"
        return [
            charts.line_chart(
                c.chart_id, c.title, c.lines, self.start, self.end, self.step, c.scale, period
            )
            for c in self.charts
        ]


def _percent(line: Line) -> charts.ChartLine:
    return charts.ChartLine(
        line.label, [(t, None if v is None else v * 100) for t, v in line.points]
    )


def _plain(line: Line) -> charts.ChartLine:
    return charts.ChartLine(line.label, list(line.points))


def chart_set_of(data: ServerCharts) -> ChartSet:
    """The five charts of a server page from the query layer's lines."""
    disks = [_percent(line) for line in data.disk_used] or [
        charts.ChartLine("/", [(t, None) for t in data.timeline])
    ]
    return ChartSet(
        window=data.window.name,
        start=data.start,
        end=data.end,
        step=data.window.step_s,
        charts=[
            Chart("cpu", "CPU busy %", [_percent(data.cpu_busy)], charts.PERCENT),
            Chart("memory", "Memory used %", [_percent(data.memory_used)], charts.PERCENT),
            Chart("disk", "Disk used % by mountpoint", disks, charts.PERCENT),
            Chart("load", "Load average (1 min)", [_plain(data.load_1m)], charts.LOAD),
            Chart(
                "network",
                "Network, bytes per second",
                [_plain(line) for line in data.network],
                charts.BYTES_PER_SECOND,
            ),
        ],
    )


def server_page(
    viewer: Viewer,
    server: ServerInfo,
    chart_set: ChartSet,
    now: datetime,
    metrics_note: str | None = None,
) -> str:
    return render(
        "server.html",
        viewer=viewer,
        metrics_note=metrics_note,
        server=server,
        chart_set=chart_set,
        rendered=chart_set.rendered(),
        windows=list(WINDOW_LABELS.items()),
        now=now,
        refresh_seconds=REFRESH_SECONDS,
    )


def server_live(server: ServerInfo, chart_set: ChartSet, metrics_note: str | None = None) -> str:
    """The details and charts alone, for the live refresh."""
    return render(
        "_server_live.html",
        server=server,
        rendered=chart_set.rendered(),
        metrics_note=metrics_note,
    )


def login_page(
    csrf_token: str,
    error: str | None = None,
    email: str = "",
    totp: bool = False,
    next_url: str = "",
) -> str:
    return render(
        "login.html",
        viewer=None,
        csrf_token=csrf_token,
        error=error,
        email=email,
        totp=totp,
        next_url=next_url,
    )


def error_page(viewer: Viewer | None, status: int, title: str, detail: str) -> str:
    return render("error.html", viewer=viewer, status=status, title=title, detail=detail)
