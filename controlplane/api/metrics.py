"""Metrics: the structured `/v1/metrics/*` API and a Prometheus-compatible one under
`/prometheus/api/v1/*` (for Grafana), both over the published query functions of
`ingest.query`.

The tenant is the API token's own, or — for dashboard sessions and platform staff — the
`tenant_id` parameter; either way it goes through `resolve_access` (a tenant the caller
cannot see is 404) and needs `metrics:read`. The query layer then filters every read on
that tenant.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, StringConstraints

from controlplane.access.policy import Resource, authorize, resolve_access
from controlplane.access.principal import Principal, TenantAccess
from controlplane.api.common import ProblemBody, problems
from controlplane.api.deps import ControlPlaneDep, CurrentPrincipal
from controlplane.api.models import Page
from controlplane.context import ControlPlane
from controlplane.problems import PROBLEM_JSON, Problem
from ingest.query import (
    ERROR_STATUS,
    LABEL_NAME,
    METRIC_NAME,
    ClickHouseStore,
    MetricsQueries,
    PrometheusParams,
    QueryError,
    Selector,
    SeriesRef,
    metric_selector,
    parse_duration,
    parse_matcher,
    parse_selectors,
    parse_time,
    prometheus_data,
    prometheus_error,
    prometheus_openapi,
    prometheus_success,
)
from yakpanel import __version__
from yakpanel.services import Stack

PERMISSION = "metrics:read"
MAX_MATCHERS = 20


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    stack: Stack = app.state.stack
    # The client opens on the first query, so the API starts without ClickHouse.
    store = ClickHouseStore(stack.clickhouse.client, stack.clickhouse.database)
    app.state.metrics_queries = MetricsQueries(store, stack.clock)
    try:
        yield
    finally:
        await asyncio.to_thread(store.close)


def _queries(request: Request) -> MetricsQueries:
    queries: MetricsQueries = request.app.state.metrics_queries
    return queries


Queries = Annotated[MetricsQueries, Depends(_queries)]


async def metrics_access(
    cp: ControlPlane, principal: Principal, tenant_id: uuid.UUID | None
) -> TenantAccess:
    """The tenant whose metrics the caller reads, checked like any tenant route."""
    if tenant_id is None:
        if principal.kind != "token" or principal.token_tenant_id is None:
            raise Problem(
                400,
                "tenant_required",
                "pass tenant_id: dashboard sessions and staff choose the tenant whose"
                " metrics they read (API tokens read their own tenant's)",
            )
        tenant_id = principal.token_tenant_id
    access = await resolve_access(cp.db, principal, tenant_id)
    async with cp.db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, PERMISSION, Resource("metrics"))
    return access


def _problem(exc: QueryError) -> Problem:
    code = {
        "bad_data": "invalid_query",
        "execution": "query_refused",
        "timeout": "query_timeout",
        "unavailable": "metrics_unavailable",
        "internal": "query_failed",
    }[exc.kind]
    return Problem(ERROR_STATUS[exc.kind], code, exc.message)


async def _run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except QueryError as exc:
        raise _problem(exc) from None


def _ms(value: datetime | None) -> int | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)


# --- /v1/metrics ----------------------------------------------------------------------

v1 = APIRouter(prefix="/v1/metrics", tags=["metrics"])

_RESPONSES: dict[int | str, dict[str, Any]] = {
    **problems(400, 401, 403, 404, 422, 429),
    503: {
        "description": "the query timed out or the metrics store is unavailable; retry",
        "content": {PROBLEM_JSON: {"schema": ProblemBody.model_json_schema()}},
    },
}

TenantParam = Annotated[
    uuid.UUID | None,
    Query(description="the tenant; required for sessions and staff, an API token's by default"),
]
MetricParam = Annotated[
    str, Query(min_length=1, max_length=200, pattern=METRIC_NAME.pattern, description="metric")
]
MatchParam = Annotated[
    list[Annotated[str, StringConstraints(max_length=400)]],
    Query(
        max_length=MAX_MATCHERS,
        description="label matchers `name=value`, `name!=value`, `name=~regex`, `name!~regex`"
        " (RE2, fully anchored); repeat for several",
    ),
]
Start = Annotated[datetime | None, Query(description="RFC 3339 or unix seconds")]
End = Annotated[datetime | None, Query(description="RFC 3339 or unix seconds; default now")]


async def _access(
    principal: CurrentPrincipal, cp: ControlPlaneDep, tenant_id: TenantParam = None
) -> TenantAccess:
    return await metrics_access(cp, principal, tenant_id)


MetricsAccess = Annotated[TenantAccess, Depends(_access)]


def _selector(metric: str | None, match: Sequence[str]) -> Selector:
    try:
        return metric_selector(metric, [parse_matcher(m) for m in match])
    except QueryError as exc:
        raise _problem(exc) from None


class SeriesPoints(BaseModel):
    labels: dict[str, str]
    points: list[tuple[int, float | None]] = Field(
        description="[bucket start (unix seconds), value]; null when the value is not finite"
    )


class RangeOut(BaseModel):
    metric: str
    tier: str = Field(description="the stored resolution read: raw, 10s, 1m or 1h")
    step: int = Field(description="bucket width in seconds")
    start: int = Field(description="first bucket start, unix seconds")
    end: int = Field(description="last bucket start, unix seconds")
    aggregation: str
    series: list[SeriesPoints]


class SeriesOut(BaseModel):
    metric: str
    labels: dict[str, str]


class LabelList(BaseModel):
    items: list[str]


@v1.get("/query_range", responses=_RESPONSES)
async def query_range(
    access: MetricsAccess,
    queries: Queries,
    metric: MetricParam,
    match: MatchParam = [],  # noqa: B006 — FastAPI copies defaults
    start: Start = None,
    end: End = None,
    step: Annotated[int, Query(ge=1, le=31 * 86_400, description="seconds")] = 60,
    aggregation: Annotated[
        Literal["avg", "min", "max", "sum", "count", "last"],
        Query(description="of the samples in each bucket"),
    ] = "avg",
    group_by: Annotated[
        list[Annotated[str, StringConstraints(max_length=100)]] | None,
        Query(
            max_length=20,
            description="merge the series per value of these labels (exact: partial"
            " aggregates are merged, not averaged)",
        ),
    ] = None,
) -> RangeOut:
    """Per series (or per `group_by` group), one value per step-aligned bucket
    [t, t + step). Reads the coarsest tier whose resolution divides `step`."""
    end_ms = _ms(end)
    if end_ms is None:
        end_ms = int(queries.clock.now().timestamp() * 1000)
    start_ms = _ms(start)
    if start_ms is None:
        start_ms = end_ms - 3_600_000
    for label in group_by or ():
        if not LABEL_NAME.match(label):
            raise Problem(400, "invalid_query", f"invalid label name {label!r} in group_by")
    result = await _run(
        queries.buckets,
        str(access.tenant_id),
        _selector(metric, match),
        start_ms // 1000,
        end_ms // 1000,
        step,
        aggregation,
        group_by,
    )
    return RangeOut(
        metric=metric,
        tier=result.tier,
        step=result.step_s,
        start=result.start_s,
        end=result.end_s,
        aggregation=result.aggregation,
        series=[
            SeriesPoints(
                labels=s.labels,
                points=[
                    (b, v if abs(v) != float("inf") and v == v else None)
                    for b, v in zip(s.buckets_s.tolist(), s.values.tolist(), strict=True)
                ],
            )
            for s in result.series
        ],
    )


def _encode_cursor(ref: SeriesRef) -> str:
    raw = f"{ref.metric}\n{ref.series_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> tuple[str, int] | None:
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        metric, series_id = raw.split("\n")
        return metric, int(series_id)
    except (binascii.Error, ValueError):
        raise Problem(400, "bad_cursor", "the cursor is not one this API returned") from None


@v1.get("/series", responses=_RESPONSES)
async def list_series(
    access: MetricsAccess,
    queries: Queries,
    metric: Annotated[str | None, Query(max_length=200, pattern=METRIC_NAME.pattern)] = None,
    match: MatchParam = [],  # noqa: B006
    start: Start = None,
    end: End = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 100,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
) -> Page[SeriesOut]:
    """Series of the tenant (that may have samples between `start` and `end`), ordered
    by metric; `tenant_id` is never a label, `server_id` always is."""
    selector = _selector(metric, match)
    refs: list[SeriesRef] = await _run(
        queries.series,
        str(access.tenant_id),
        [selector] if selector else [],
        _ms(start),
        _ms(end),
        limit + 1,
        _decode_cursor(cursor),
    )
    items = [
        SeriesOut(metric=r.metric, labels={k: v for k, v in r.labels if k != "__name__"})
        for r in refs[:limit]
    ]
    next_cursor = _encode_cursor(refs[limit - 1]) if len(refs) > limit else None
    return Page(items=items, next_cursor=next_cursor)


@v1.get("/labels", responses=_RESPONSES)
async def list_labels(
    access: MetricsAccess,
    queries: Queries,
    metric: Annotated[str | None, Query(max_length=200, pattern=METRIC_NAME.pattern)] = None,
    match: MatchParam = [],  # noqa: B006
    start: Start = None,
    end: End = None,
) -> LabelList:
    """Label names of the selected series (`__name__` included)."""
    selector = _selector(metric, match)
    names = await _run(
        queries.label_names,
        str(access.tenant_id),
        [selector] if selector else [],
        _ms(start),
        _ms(end),
    )
    return LabelList(items=names)


@v1.get("/labels/{name}/values", responses=_RESPONSES)
async def list_label_values(
    access: MetricsAccess,
    queries: Queries,
    name: Annotated[str, Path(max_length=200, pattern=LABEL_NAME.pattern)],
    metric: Annotated[str | None, Query(max_length=200, pattern=METRIC_NAME.pattern)] = None,
    match: MatchParam = [],  # noqa: B006
    start: Start = None,
    end: End = None,
) -> LabelList:
    """Values of one label among the selected series (`__name__`: metric names)."""
    selector = _selector(metric, match)
    values = await _run(
        queries.label_values,
        str(access.tenant_id),
        name,
        [selector] if selector else [],
        _ms(start),
        _ms(end),
    )
    return LabelList(items=values)


# --- /prometheus/api/v1 ---------------------------------------------------------------


def _prometheus_response(status: int, error_type: str, message: str, **headers: str) -> Response:
    return JSONResponse(prometheus_error(error_type, message), status_code=status, headers=headers)


class PrometheusRoute(APIRoute):
    """Every answer in the Prometheus envelope, errors of authentication, tenant access
    and validation included (Grafana shows the `error` text)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except QueryError as exc:
                return _prometheus_response(ERROR_STATUS[exc.kind], exc.kind, exc.message)
            except Problem as exc:
                headers = {}
                if "retry_after" in exc.extensions:
                    headers["Retry-After"] = str(exc.extensions["retry_after"])
                if exc.status == 401:
                    headers["WWW-Authenticate"] = 'Bearer realm="yakpanel"'
                error_type = "bad_data" if exc.status == 400 else exc.code
                return _prometheus_response(exc.status, error_type, exc.detail, **headers)
            except RequestValidationError as exc:
                errors = "; ".join(str(e.get("msg", "")) for e in exc.errors())
                return _prometheus_response(400, "bad_data", f"invalid request: {errors}")

        return route


prometheus = APIRouter(
    prefix="/prometheus/api/v1", tags=["prometheus"], route_class=PrometheusRoute
)


class PromSuccess(BaseModel):
    status: Literal["success"]
    data: Any
    warnings: list[str] | None = None


class PromError(BaseModel):
    status: Literal["error"]
    errorType: str  # the Prometheus field name
    error: str


def _prometheus_responses() -> dict[int | str, dict[str, Any]]:
    described = {
        400: "bad_data: the query or a parameter is invalid",
        401: "not authenticated, or the token is invalid, expired or revoked",
        403: "the token lacks metrics:read",
        404: "no such tenant, or not visible to the caller",
        422: "execution: valid, but refused by a limit or failed while evaluating",
        429: "rate limited; see Retry-After",
        503: "timeout, or the metrics store is unavailable",
    }
    error = {"application/json": {"schema": PromError.model_json_schema()}}
    out: dict[int | str, dict[str, Any]] = {
        200: {
            "description": "success",
            "content": {"application/json": {"schema": PromSuccess.model_json_schema()}},
        }
    }
    out.update({s: {"description": d, "content": error} for s, d in described.items()})
    return out


async def _params(request: Request) -> PrometheusParams:
    """Query-string and form parameters (a POST's form body first, as Prometheus)."""
    body = b""
    if request.method == "POST":
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media == "application/x-www-form-urlencoded":
            body = await request.body()
    return PrometheusParams.of(list(request.query_params.multi_items()), body)


async def _prometheus_access(
    request: Request, cp: ControlPlane, principal: Principal
) -> tuple[PrometheusParams, str]:
    params = await _params(request)
    access = await metrics_access(cp, principal, params.tenant())
    return params, str(access.tenant_id)


def _ok(data: Any, warnings: list[str] | None = None) -> JSONResponse:
    return JSONResponse(prometheus_success(data, warnings))


async def _instant(
    request: Request, cp: ControlPlane, principal: Principal, q: MetricsQueries
) -> Response:
    params, tenant = await _prometheus_access(request, cp, principal)
    result = await asyncio.to_thread(
        q.instant,
        tenant,
        params.required("query"),
        params.time("time"),
        params.duration("lookback_delta"),
        params.timeout_s(),
    )
    return _ok(prometheus_data(result))


async def _range(
    request: Request, cp: ControlPlane, principal: Principal, q: MetricsQueries
) -> Response:
    params, tenant = await _prometheus_access(request, cp, principal)
    query = params.required("query")
    start = parse_time("start", params.required("start"))
    end = parse_time("end", params.required("end"))
    step = parse_duration("step", params.required("step"))
    result = await asyncio.to_thread(
        q.range,
        tenant,
        query,
        start,
        end,
        step,
        params.duration("lookback_delta"),
        params.timeout_s(),
    )
    return _ok(prometheus_data(result))


def _truncated(found: list[Any], limit: int | None) -> tuple[list[Any], list[str] | None]:
    if limit is not None and len(found) > limit:
        return found[:limit], ["results truncated due to limit"]
    return found, None


async def _series(
    request: Request, cp: ControlPlane, principal: Principal, q: MetricsQueries
) -> Response:
    params, tenant = await _prometheus_access(request, cp, principal)
    match = params.all("match[]")
    if not match:
        raise QueryError("bad_data", "no match[] parameter provided")
    limit = params.limit()
    refs = await asyncio.to_thread(
        q.series,
        tenant,
        parse_selectors(match),
        params.time("start"),
        params.time("end"),
        None if limit is None else limit + 1,
    )
    refs, warnings = _truncated(refs, limit)
    return _ok([dict(r.labels) for r in refs], warnings)


async def _labels(
    request: Request, cp: ControlPlane, principal: Principal, q: MetricsQueries
) -> Response:
    params, tenant = await _prometheus_access(request, cp, principal)
    limit = params.limit()
    names = await asyncio.to_thread(
        q.label_names,
        tenant,
        parse_selectors(params.all("match[]")),
        params.time("start"),
        params.time("end"),
        None if limit is None else limit + 1,
    )
    names, warnings = _truncated(names, limit)
    return _ok(names, warnings)


async def _label_values(
    request: Request, cp: ControlPlane, principal: Principal, q: MetricsQueries, name: str
) -> Response:
    params, tenant = await _prometheus_access(request, cp, principal)
    if not LABEL_NAME.match(name):
        raise QueryError("bad_data", f'invalid label name: "{name}"')
    limit = params.limit()
    values = await asyncio.to_thread(
        q.label_values,
        tenant,
        name,
        parse_selectors(params.all("match[]")),
        params.time("start"),
        params.time("end"),
        None if limit is None else limit + 1,
    )
    values, warnings = _truncated(values, limit)
    return _ok(values, warnings)


_PROM_RESPONSES = _prometheus_responses()
Handler = Callable[[Request, ControlPlane, Principal, MetricsQueries], Awaitable[Response]]


def _endpoint(handler: Handler) -> Callable[..., Awaitable[Response]]:
    async def endpoint(
        request: Request, cp: ControlPlaneDep, principal: CurrentPrincipal, queries: Queries
    ) -> Response:
        return await handler(request, cp, principal, queries)

    return endpoint


def _register(path: str, kind: str, endpoint: Callable[..., Any], summary: str) -> None:
    """GET with the query string, POST with a form body (what Grafana sends)."""
    for method in ("GET", "POST"):
        prometheus.add_api_route(
            path,
            endpoint,
            methods=[method],
            name=f"prometheus_{kind}_{method.lower()}",
            summary=f"{summary} ({'form body' if method == 'POST' else 'query string'})",
            response_class=JSONResponse,
            responses=_PROM_RESPONSES,
            openapi_extra=prometheus_openapi(kind, method),
        )


async def _label_values_endpoint(
    request: Request,
    cp: ControlPlaneDep,
    principal: CurrentPrincipal,
    queries: Queries,
    name: Annotated[str, Path(max_length=200, description="label name (`__name__`: metrics)")],
) -> Response:
    return await _label_values(request, cp, principal, queries, name)


_register("/query", "query", _endpoint(_instant), "Instant query")
_register("/query_range", "query_range", _endpoint(_range), "Range query")
_register("/series", "series", _endpoint(_series), "Series matching match[]")
_register("/labels", "labels", _endpoint(_labels), "Label names")
_register("/label/{name}/values", "label_values", _label_values_endpoint, "Label values")


class BuildInfo(BaseModel):
    status: Literal["success"]
    data: dict[str, str]


@prometheus.get("/status/buildinfo", responses={200: {"model": BuildInfo}})
async def buildinfo() -> JSONResponse:
    """What Grafana's data source test reads: the Prometheus API level served (the PromQL
    of Prometheus 2.45, as promql-parser declares) and this YakPanel's version."""
    return _ok(
        {
            "version": "2.45.0",
            "revision": f"yakpanel-{__version__}",
            "branch": "",
            "buildUser": "yakpanel",
            "buildDate": "",
            "goVersion": "",
            "application": "YakPanel",
        }
    )


router = APIRouter(lifespan=_lifespan)
router.include_router(v1)
router.include_router(prometheus)
