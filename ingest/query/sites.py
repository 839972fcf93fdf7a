"""ClickHouse reads for the site health pages: every site's latest probe, one site's charts.

The agent probes each site it serves (`agent/telemetry/probes.py`) and reports gauges with
the labels `site` (the site id) and `url`; the aggregator normalises the names:

- `yakpanel_site_up` (1 if the site answered below 500, else 0);
- `yakpanel_site_http_status_code` (0: no HTTP response);
- `yakpanel_site_http_duration` (seconds until the response headers);
- `yakpanel_site_tls_days_left` (only for https targets).

A site may be probed at more than one URL: it is up only when every URL is up, and shows
the worst values (lowest up, slowest answer, fewest TLS days; the status code of a failing
URL first). Every query is filtered on the tenant ids the caller passes, which must be the
ones the control plane resolved for the viewer, and a site id is only ever matched together
with its tenant. The functions are synchronous (clickhouse-connect is): run them in a
thread.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from ingest.metrics_schema import ROLLUP_10S_TABLE, SERIES_TABLE
from ingest.query.fleet import Line, Window, window_bounds

UP = "yakpanel_site_up"
STATUS_CODE = "yakpanel_site_http_status_code"
DURATION = "yakpanel_site_http_duration"
TLS_DAYS_LEFT = "yakpanel_site_tls_days_left"
SITE_METRICS = (UP, STATUS_CODE, DURATION, TLS_DAYS_LEFT)
_SITE_SERIES = "metric IN ('" + "', '".join(SITE_METRICS) + "')"

ProbeState = Literal["up", "down", "unknown"]


@dataclass(frozen=True)
class SiteRef:
    """A site and the tenant it belongs to, as the control plane resolved them."""

    tenant_id: uuid.UUID
    site_id: uuid.UUID


@dataclass(frozen=True)
class SiteHealth:
    """A site's latest probe. `state` is unknown when no probe result is recent; `since`
    is when the current state began (to the 10 s bucket), or None when it began before
    the history that was read (`since_at_least` then holds the oldest sample read)."""

    state: ProbeState = "unknown"
    since: datetime | None = None
    since_at_least: datetime | None = None
    status_code: int | None = None
    duration_s: float | None = None
    tls_days_left: float | None = None
    last_probe_at: datetime | None = None


def _dt(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC)


def _scope(sites: Sequence[SiteRef]) -> dict[str, Any]:
    return {
        "tenants": sorted({s.tenant_id for s in sites}),
        "pairs": sorted({(s.tenant_id, str(s.site_id)) for s in sites}),
    }


_WANTED = f"""wanted AS (
    SELECT tenant_id, series_id, metric, labels['site'] AS site
    FROM {SERIES_TABLE} FINAL
    WHERE tenant_id IN {{tenants:Array(UUID)}}
      AND {_SITE_SERIES}
      AND (tenant_id, labels['site']) IN {{pairs:Array(Tuple(UUID, String))}})"""


def site_health(
    client: Any,
    sites: Sequence[SiteRef],
    now: datetime,
    lookback: timedelta = timedelta(minutes=5),
    history: timedelta = timedelta(hours=24),
) -> dict[uuid.UUID, SiteHealth]:
    """The latest probe of every site, in two queries whatever the number of sites: the
    newest value of each probe series within `lookback`, then when each site last was in
    the other state within `history` (from 10 s rollups)."""
    if not sites:
        return {}
    scope = _scope(sites)
    latest = client.query(
        f"""WITH {_WANTED}
            SELECT w.site, w.metric, toUnixTimestamp64Milli(r.last.1), r.last.2
            FROM (
                SELECT tenant_id, series_id, max(last) AS last
                FROM {ROLLUP_10S_TABLE}
                WHERE tenant_id IN {{tenants:Array(UUID)}}
                  AND bucket >= {{since:DateTime}}
                  AND (tenant_id, series_id) IN (SELECT tenant_id, series_id FROM wanted)
                GROUP BY tenant_id, series_id) AS r
            INNER JOIN wanted AS w ON w.tenant_id = r.tenant_id AND w.series_id = r.series_id""",
        parameters=scope | {"since": now - lookback},
    ).result_rows
    # Per site and 10 s bucket: was every probe of every URL up?
    changes = client.query(
        f"""WITH {_WANTED}
            SELECT site,
                   toUnixTimestamp(maxIf(bucket, all_up)) AS last_up,
                   countIf(all_up) AS up_buckets,
                   toUnixTimestamp(maxIf(bucket, NOT all_up)) AS last_down,
                   countIf(NOT all_up) AS down_buckets,
                   toUnixTimestamp(min(bucket)) AS first
            FROM (
                SELECT w.site AS site, r.bucket AS bucket, min(r.min) >= 0.5 AS all_up
                FROM (
                    SELECT tenant_id, series_id, bucket, min(min) AS min
                    FROM {ROLLUP_10S_TABLE}
                    WHERE tenant_id IN {{tenants:Array(UUID)}}
                      AND bucket >= {{since:DateTime}}
                      AND (tenant_id, series_id) IN (
                          SELECT tenant_id, series_id FROM wanted WHERE metric = '{UP}')
                    GROUP BY tenant_id, series_id, bucket) AS r
                INNER JOIN wanted AS w
                    ON w.tenant_id = r.tenant_id AND w.series_id = r.series_id
                GROUP BY w.site, r.bucket)
            GROUP BY site""",
        parameters=scope | {"since": now - history},
    ).result_rows

    up: dict[str, list[float]] = defaultdict(list)
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    newest: dict[str, int] = {}
    for site, metric, last_ms, last_value in latest:
        values[site][metric].append(float(last_value))
        if metric == UP:
            up[site].append(float(last_value))
        newest[site] = max(newest.get(site, 0), int(last_ms))
    history_of = {row[0]: row[1:] for row in changes}

    out: dict[uuid.UUID, SiteHealth] = {}
    for ref in sites:
        key = str(ref.site_id)
        v = values.get(key, {})
        ups = up.get(key)
        state: ProbeState = "unknown" if not ups else "up" if min(ups) >= 0.5 else "down"
        since = since_at_least = None
        if state != "unknown" and key in history_of:
            last_up, up_buckets, last_down, down_buckets, first = history_of[key]
            # The state began in the bucket after the last one in the other state.
            other, count = (last_down, down_buckets) if state == "up" else (last_up, up_buckets)
            if count:
                since = min(datetime.fromtimestamp(int(other) + 10, tz=UTC), now)
            else:
                since_at_least = datetime.fromtimestamp(int(first), tz=UTC)
        out[ref.site_id] = SiteHealth(
            state=state,
            since=since,
            since_at_least=since_at_least,
            status_code=_status(v.get(STATUS_CODE)),
            duration_s=max(v[DURATION]) if v.get(DURATION) else None,
            tls_days_left=min(v[TLS_DAYS_LEFT]) if v.get(TLS_DAYS_LEFT) else None,
            last_probe_at=_dt(newest.get(key)),
        )
    return out


def _status(codes: list[float] | None) -> int | None:
    """The code that explains a failure first: no response (0), then 5xx, then the rest."""
    if not codes:
        return None
    ints = [int(c) for c in codes]
    if 0 in ints:
        return 0
    return max(ints)


# --- one site's charts ---------------------------------------------------------------


@dataclass(frozen=True)
class SiteCharts:
    """Per-step values over a window; every line has one point per step (None = no data).

    `availability` is the share of up probes (0-1), `duration` the mean seconds to the
    response headers, `status_code` the highest status seen in the step."""

    window: Window
    start: int
    end: int
    availability: Line
    duration: Line
    status_code: Line
    tls_days_left: Line
    timeline: tuple[int, ...]


def empty_site_charts(window: Window, now: datetime) -> SiteCharts:
    """Charts with no data (the store unreachable)."""
    return _charts(window, now, {})


def _charts(window: Window, now: datetime, per_metric: dict[str, dict[int, float]]) -> SiteCharts:
    start, end = window_bounds(window, now)
    timeline = tuple(range(start, end, window.step_s))

    def line(label: str, metric: str) -> Line:
        values = per_metric.get(metric, {})
        return Line(label, tuple((t, values.get(t)) for t in timeline))

    return SiteCharts(
        window=window,
        start=start,
        end=end,
        availability=line("up", UP),
        duration=line("response time", DURATION),
        status_code=line("HTTP status", STATUS_CODE),
        tls_days_left=line("TLS days left", TLS_DAYS_LEFT),
        timeline=timeline,
    )


def site_charts(client: Any, site: SiteRef, window: Window, now: datetime) -> SiteCharts:
    """The chart lines of one site over `window`, from one query."""
    start, end = window_bounds(window, now)
    rows = client.query(
        f"""WITH wanted AS (
                SELECT series_id, metric
                FROM {SERIES_TABLE} FINAL
                WHERE tenant_id = {{tenant:UUID}} AND {_SITE_SERIES}
                  AND labels['site'] = {{site:String}})
            SELECT w.metric, r.t, sum(r.sum), sum(r.count), max(r.max), min(r.min)
            FROM (
                SELECT series_id,
                       intDiv(toUnixTimestamp(bucket), {{step:UInt32}}) * {{step:UInt32}} AS t,
                       sum(sum) AS sum, sum(count) AS count, max(max) AS max, min(min) AS min
                FROM {window.table}
                WHERE tenant_id = {{tenant:UUID}}
                  AND bucket >= {{start:DateTime}} AND bucket < {{end:DateTime}}
                  AND series_id IN (SELECT series_id FROM wanted)
                GROUP BY series_id, t) AS r
            INNER JOIN wanted AS w ON w.series_id = r.series_id
            GROUP BY w.metric, r.t
            ORDER BY w.metric, r.t""",
        parameters={
            "tenant": site.tenant_id,
            "site": str(site.site_id),
            "step": window.step_s,
            "start": datetime.fromtimestamp(start, tz=UTC),
            "end": datetime.fromtimestamp(end, tz=UTC),
        },
    ).result_rows
    per_metric: dict[str, dict[int, float]] = defaultdict(dict)
    for metric, t, total, count, highest, lowest in rows:
        if not count:
            continue
        if metric == STATUS_CODE:
            value = float(highest)
        elif metric == TLS_DAYS_LEFT:
            value = float(lowest)
        else:
            value = float(total) / int(count)
        per_metric[metric][int(t)] = value
    return _charts(window, now, per_metric)
