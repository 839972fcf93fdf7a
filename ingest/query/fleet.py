"""ClickHouse reads for the NOC pages: the fleet's current vitals and one server's charts.

Host metrics as the agent emits them (OpenTelemetry host metrics; the aggregator
normalises names and attribute keys, `.` becomes `_`):

- `system_cpu_utilization` (gauge, 0-1) with `cpu_mode`: CPU busy = 1 - mean of the
  `idle` series (one per CPU, or one in total);
- `system_memory_utilization` (gauge, 0-1): memory used = `system_memory_state="used"`;
- `system_filesystem_utilization` (gauge, 0-1) per `system_filesystem_mountpoint`: disk
  used per mountpoint; the fleet shows "/";
- `system_cpu_load_average_1m` (gauge): load 1m;
- `system_network_io` (cumulative counter, bytes) per `network_interface_name` and
  `network_io_direction`: bytes/s per direction, summed over all interfaces but `lo`.

Every query is filtered on the tenant ids the caller passes, which must be the ones the
control plane resolved for the viewer (never ids taken from a request alone); server ids
are checked together with their tenant. Rollup rows are partials and are merged here.
The functions are synchronous (clickhouse-connect is): run them with `asyncio.to_thread`.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ingest.metrics_schema import ROLLUP_1M_TABLE, ROLLUP_10S_TABLE, SERIES_TABLE

CPU = "system_cpu_utilization"
MEMORY = "system_memory_utilization"
FILESYSTEM = "system_filesystem_utilization"
LOAD_1M = "system_cpu_load_average_1m"
NETWORK_IO = "system_network_io"
LOOPBACK_INTERFACES = frozenset({"lo"})

# The series the pages read, as a WHERE clause on metric_series (no parameters).
_FLEET_SERIES = f"""(
    (metric = '{CPU}' AND labels['cpu_mode'] = 'idle')
    OR (metric = '{MEMORY}' AND labels['system_memory_state'] = 'used')
    OR (metric = '{FILESYSTEM}' AND labels['system_filesystem_mountpoint'] = '/')
    OR metric = '{LOAD_1M}')"""
_CHART_SERIES = f"""(
    (metric = '{CPU}' AND labels['cpu_mode'] = 'idle')
    OR (metric = '{MEMORY}' AND labels['system_memory_state'] = 'used')
    OR metric IN ('{FILESYSTEM}', '{LOAD_1M}', '{NETWORK_IO}'))"""


@dataclass(frozen=True)
class ServerRef:
    """A server and the tenant it belongs to, as the control plane resolved them."""

    tenant_id: uuid.UUID
    server_id: uuid.UUID


@dataclass(frozen=True)
class Vitals:
    """A server's latest values (fractions 0-1 for utilizations); None = no recent sample."""

    cpu_busy: float | None = None
    memory_used: float | None = None
    root_disk_used: float | None = None
    load_1m: float | None = None
    last_sample_at: datetime | None = None


def _dt(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC)


def _scope(servers: Sequence[ServerRef]) -> dict[str, Any]:
    tenants = sorted({s.tenant_id for s in servers})
    pairs = sorted({(s.tenant_id, s.server_id) for s in servers})
    return {"tenants": tenants, "pairs": pairs}


def fleet_vitals(
    client: Any,
    servers: Sequence[ServerRef],
    now: datetime,
    lookback: timedelta = timedelta(minutes=10),
) -> dict[uuid.UUID, Vitals]:
    """Latest CPU busy, memory used, root disk used and load of every server, in two
    queries whatever the number of servers. Values older than `lookback` are left out;
    `last_sample_at` is the newest sample of any metric (from `metric_series`, which may
    lag up to 15 minutes, unless a host metric in the lookback is newer)."""
    if not servers:
        return {}
    params = _scope(servers) | {"since": now - lookback}
    latest = client.query(
        f"""WITH wanted AS (
                SELECT tenant_id, series_id, server_id, metric
                FROM {SERIES_TABLE} FINAL
                WHERE tenant_id IN {{tenants:Array(UUID)}}
                  AND (tenant_id, server_id) IN {{pairs:Array(Tuple(UUID, UUID))}}
                  AND {_FLEET_SERIES})
            SELECT toString(w.server_id), w.metric,
                   toUnixTimestamp64Milli(r.last.1) AS last_ms, r.last.2 AS last_value
            FROM (
                SELECT tenant_id, series_id, max(last) AS last
                FROM {ROLLUP_10S_TABLE}
                WHERE tenant_id IN {{tenants:Array(UUID)}}
                  AND bucket >= {{since:DateTime}}
                  AND (tenant_id, series_id) IN (SELECT tenant_id, series_id FROM wanted)
                GROUP BY tenant_id, series_id) AS r
            INNER JOIN wanted AS w ON w.tenant_id = r.tenant_id AND w.series_id = r.series_id""",
        parameters=params,
    ).result_rows
    seen = client.query(
        f"""SELECT toString(server_id), toUnixTimestamp64Milli(max(last_seen))
            FROM {SERIES_TABLE}
            WHERE tenant_id IN {{tenants:Array(UUID)}}
              AND (tenant_id, server_id) IN {{pairs:Array(Tuple(UUID, UUID))}}
            GROUP BY server_id""",
        parameters=_scope(servers),
    ).result_rows

    values: dict[uuid.UUID, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    newest: dict[uuid.UUID, int] = {}
    for server, metric, last_ms, last_value in latest:
        sid = uuid.UUID(server)
        values[sid][metric].append(float(last_value))
        newest[sid] = max(newest.get(sid, 0), int(last_ms))
    for server, last_seen_ms in seen:
        sid = uuid.UUID(server)
        newest[sid] = max(newest.get(sid, 0), int(last_seen_ms))

    out: dict[uuid.UUID, Vitals] = {}
    for ref in servers:
        v = values.get(ref.server_id, {})
        idle = v.get(CPU)
        out[ref.server_id] = Vitals(
            cpu_busy=_clamp(1.0 - sum(idle) / len(idle)) if idle else None,
            memory_used=_first(v.get(MEMORY), max),
            root_disk_used=_first(v.get(FILESYSTEM), max),
            load_1m=_first(v.get(LOAD_1M), max),
            last_sample_at=_dt(newest.get(ref.server_id)),
        )
    return out


def _first(values: list[float] | None, pick: Any) -> float | None:
    return float(pick(values)) if values else None


def _clamp(value: float) -> float:
    return min(max(value, 0.0), 1.0)


# --- one server's charts ---------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A chart range: how far back, which rollup tier, and the step of one point."""

    name: str
    seconds: int
    table: str
    step_s: int


WINDOWS: dict[str, Window] = {
    "1h": Window("1h", 3600, ROLLUP_10S_TABLE, 10),
    "6h": Window("6h", 6 * 3600, ROLLUP_10S_TABLE, 60),
    "24h": Window("24h", 24 * 3600, ROLLUP_1M_TABLE, 240),
}
DEFAULT_WINDOW = "1h"

Point = tuple[int, float | None]  # (bucket start, unix seconds; value or None)


@dataclass(frozen=True)
class Line:
    label: str
    points: tuple[Point, ...]


@dataclass(frozen=True)
class ServerCharts:
    """Per-step values over a window; every line has one point per step (None = no data).

    Utilizations are fractions 0-1, load is the load average, network is bytes/s."""

    window: Window
    start: int  # unix seconds, first bucket
    end: int  # unix seconds, end of the last bucket (exclusive)
    cpu_busy: Line
    memory_used: Line
    disk_used: tuple[Line, ...]  # per mountpoint
    load_1m: Line
    network: tuple[Line, ...]  # receive, transmit
    timeline: tuple[int, ...] = field(default=())


@dataclass
class _Bucket:
    sum: float
    count: int
    last_ms: int
    last_value: float


def window_bounds(window: Window, now: datetime) -> tuple[int, int]:
    """[start, end) aligned on the step; the last bucket is the one holding `now`."""
    step = window.step_s
    end = (int(now.timestamp()) // step + 1) * step
    return end - window.seconds, end


def empty_charts(window: Window, now: datetime) -> ServerCharts:
    """Charts with no data (a viewer without `metrics:read`, the store unreachable)."""
    start, end = window_bounds(window, now)
    timeline = tuple(range(start, end, window.step_s))

    def line(label: str) -> Line:
        return Line(label, tuple((t, None) for t in timeline))

    return ServerCharts(
        window,
        start,
        end,
        line("CPU busy"),
        line("memory used"),
        (),
        line("load 1m"),
        (line("receive"), line("transmit")),
        timeline,
    )


def server_charts(client: Any, server: ServerRef, window: Window, now: datetime) -> ServerCharts:
    """The chart lines of one server over `window`, from one query."""
    start, end = window_bounds(window, now)
    step = window.step_s
    rows = client.query(
        f"""WITH wanted AS (
                SELECT series_id, metric, labels
                FROM {SERIES_TABLE} FINAL
                WHERE tenant_id = {{tenant:UUID}} AND server_id = {{server:UUID}}
                  AND {_CHART_SERIES})
            SELECT w.metric, w.labels['system_filesystem_mountpoint'] AS mountpoint,
                   w.labels['network_interface_name'] AS interface,
                   w.labels['network_io_direction'] AS direction,
                   r.series_id, r.t, r.sum, r.count,
                   toUnixTimestamp64Milli(r.last.1), r.last.2
            FROM (
                SELECT series_id,
                       intDiv(toUnixTimestamp(bucket), {{step:UInt32}}) * {{step:UInt32}} AS t,
                       sum(sum) AS sum, sum(count) AS count, max(last) AS last
                FROM {window.table}
                WHERE tenant_id = {{tenant:UUID}}
                  AND bucket >= {{start:DateTime}} AND bucket < {{end:DateTime}}
                  AND series_id IN (SELECT series_id FROM wanted)
                GROUP BY series_id, t) AS r
            INNER JOIN wanted AS w ON w.series_id = r.series_id
            ORDER BY r.series_id, r.t""",
        parameters={
            "tenant": server.tenant_id,
            "server": server.server_id,
            "step": step,
            # One step before the window, so that the first network rate has a base.
            "start": datetime.fromtimestamp(start - step, tz=UTC),
            "end": datetime.fromtimestamp(end, tz=UTC),
        },
    ).result_rows

    timeline = tuple(range(start, end, step))
    buckets: dict[tuple[str, str, str, str, int], dict[int, _Bucket]] = defaultdict(dict)
    for metric, mountpoint, interface, direction, sid, t, s, c, last_ms, last_value in rows:
        key = (metric, mountpoint, interface, direction, int(sid))
        buckets[key][int(t)] = _Bucket(float(s), int(c), int(last_ms), float(last_value))

    def averaged(metric: str, transform: Any = None) -> dict[str, dict[int, float]]:
        """Mean per step over the series of `metric`, by mountpoint ("" for others)."""
        sums: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        for (m, mountpoint, _, _, _), series in buckets.items():
            if m != metric:
                continue
            for t, b in series.items():
                acc = sums[mountpoint][t]
                acc[0] += b.sum
                acc[1] += b.count
        out: dict[str, dict[int, float]] = {}
        for mountpoint, per_step in sums.items():
            means = {t: total / n for t, (total, n) in per_step.items() if n}
            out[mountpoint] = {t: transform(v) if transform else v for t, v in means.items()}
        return out

    def line(label: str, values: dict[int, float]) -> Line:
        return Line(label, tuple((t, values.get(t)) for t in timeline))

    cpu = averaged(CPU, lambda idle: _clamp(1.0 - idle)).get("", {})
    memory = averaged(MEMORY).get("", {})
    disks = averaged(FILESYSTEM)
    load = averaged(LOAD_1M).get("", {})

    rates: dict[str, dict[int, float]] = {"receive": {}, "transmit": {}}
    for (metric, _, interface, direction, _), series in buckets.items():
        if metric != NETWORK_IO or interface in LOOPBACK_INTERFACES or direction not in rates:
            continue
        for t, rate in counter_rates(series, step).items():
            rates[direction][t] = rates[direction].get(t, 0.0) + rate

    return ServerCharts(
        window=window,
        start=start,
        end=end,
        cpu_busy=line("CPU busy", cpu),
        memory_used=line("memory used", memory),
        disk_used=tuple(line(mp, disks[mp]) for mp in sorted(disks)),
        load_1m=line("load 1m", load),
        network=(line("receive", rates["receive"]), line("transmit", rates["transmit"])),
        timeline=timeline,
    )


def counter_rates(by_t: dict[int, _Bucket], step: int, max_gap_steps: int = 5) -> dict[int, float]:
    """Per-second rate at each bucket from the `last` of the bucket before it.

    A value lower than the previous one is a counter reset: the increase is the new value
    (counted from zero). Across a gap longer than `max_gap_steps` there is no rate."""
    out: dict[int, float] = {}
    previous: tuple[int, _Bucket] | None = None
    for t in sorted(by_t):
        b = by_t[t]
        if previous is not None and t - previous[0] <= max_gap_steps * step:
            before = previous[1]
            seconds = (b.last_ms - before.last_ms) / 1000
            if seconds > 0:
                increase = b.last_value - before.last_value
                if increase < 0:
                    increase = b.last_value
                out[t] = increase / seconds
        previous = (t, b)
    return out
