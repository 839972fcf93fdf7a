"""The Prometheus HTTP API's wire format: parameters (parsing, and their OpenAPI
description), response bodies and error statuses. HTTP-framework free; the control
plane's routes use it.

Times are RFC 3339 or unix seconds (fractions allowed); durations are seconds or
Prometheus durations (`5m`, `1h30m`). Sample values are strings formatted like Go's
`strconv.FormatFloat(v, 'f', -1, 64)` ("NaN", "+Inf", "-Inf"), timestamps are unix
seconds as JSON numbers.
"""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

import promql_parser as pp

from ingest.query.engine import QueryResult
from ingest.query.errors import ErrorKind, bad_data

# What each errorType answers with, as Prometheus does.
ERROR_STATUS: dict[ErrorKind, int] = {
    "bad_data": 400,
    "execution": 422,
    "timeout": 503,
    "unavailable": 503,
    "internal": 500,
}

_MIN_S = datetime(1, 1, 2, tzinfo=UTC).timestamp()
_MAX_S = datetime(9999, 12, 30, tzinfo=UTC).timestamp()
_MAX_DURATION_MS = 100 * 365 * 86_400_000  # a century
MAX_FORM_BYTES = 1024 * 1024


def parse_time(name: str, text: str) -> int:
    """A timestamp parameter in unix milliseconds."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
        try:
            parsed = datetime.fromisoformat(text.strip())
        except ValueError:
            pass
        else:
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            seconds = parsed.timestamp()
    if not math.isfinite(seconds) or not _MIN_S <= seconds <= _MAX_S:
        raise bad_data(f'invalid parameter "{name}": cannot parse "{text}" to a valid timestamp')
    return round(seconds * 1000)


def parse_duration(name: str, text: str) -> int:
    """A duration parameter in milliseconds."""
    ms: float | None = None
    try:
        ms = float(text) * 1000
    except ValueError:
        try:
            if text.strip() and text.strip()[0].isdigit():
                ms = pp.parse_duration(text.strip()) / timedelta(milliseconds=1)
        except (ValueError, OverflowError):
            ms = None
        except BaseException as exc:  # the Rust parser's panics are BaseExceptions
            if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
                raise
            ms = None
    if ms is None or not math.isfinite(ms) or abs(ms) > _MAX_DURATION_MS:
        raise bad_data(f'invalid parameter "{name}": cannot parse "{text}" to a valid duration')
    return round(ms)


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    text = repr(value)
    if "e" in text:
        text = format(Decimal(text), "f")
    return text


def format_time(ms: int) -> float | int:
    return ms // 1000 if ms % 1000 == 0 else ms / 1000


def _point(ms: int, value: float) -> list[float | int | str]:
    return [format_time(ms), format_value(value)]


def query_data(result: QueryResult) -> dict[str, Any]:
    """`data` of a /query or /query_range answer."""
    if result.result_type == "scalar":
        assert result.scalar is not None
        at, value = result.scalar
        return {"resultType": "scalar", "result": [format_time(at), format_value(value)]}
    if result.result_type == "vector":
        return {
            "resultType": "vector",
            "result": [
                {"metric": s.labels, "value": _point(int(s.timestamps_ms[0]), float(s.values[0]))}
                for s in result.series
            ],
        }
    return {
        "resultType": "matrix",
        "result": [
            {
                "metric": s.labels,
                "values": [
                    _point(t, v)
                    for t, v in zip(s.timestamps_ms.tolist(), s.values.tolist(), strict=True)
                ],
            }
            for s in result.series
        ],
    }


def success(data: Any, warnings: list[str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"status": "success", "data": data}
    if warnings:
        body["warnings"] = warnings
    return body


def error(error_type: str, message: str) -> dict[str, Any]:
    return {"status": "error", "errorType": error_type, "error": message}


# (name, required, description, repeated)
_Param = tuple[str, bool, str, bool]
_TENANT: _Param = (
    "tenant_id",
    False,
    "the tenant (sessions and staff); API tokens read their own tenant's",
    False,
)
_PARAMS: dict[str, list[_Param]] = {
    "query": [
        ("query", True, "PromQL expression", False),
        ("time", False, "evaluation time: RFC 3339 or unix seconds; default now", False),
        ("timeout", False, "evaluation timeout (duration); capped at 30 s", False),
        ("lookback_delta", False, "instant-vector lookback (duration); default 5m", False),
    ],
    "query_range": [
        ("query", True, "PromQL expression", False),
        ("start", True, "RFC 3339 or unix seconds", False),
        ("end", True, "RFC 3339 or unix seconds", False),
        ("step", True, "resolution: duration or seconds", False),
        ("timeout", False, "evaluation timeout (duration); capped at 30 s", False),
        ("lookback_delta", False, "instant-vector lookback (duration); default 5m", False),
    ],
    "series": [
        ("match[]", True, "series selector; repeat for several", True),
        ("start", False, "RFC 3339 or unix seconds", False),
        ("end", False, "RFC 3339 or unix seconds", False),
        ("limit", False, "most series returned", False),
    ],
    "labels": [
        ("match[]", False, "series selector; repeat for several", True),
        ("start", False, "RFC 3339 or unix seconds", False),
        ("end", False, "RFC 3339 or unix seconds", False),
        ("limit", False, "most names returned", False),
    ],
}
_PARAMS["label_values"] = _PARAMS["labels"]


# Documented sizes keep a GET's URL under the 64 KiB a request line may have, even
# percent-encoded; longer queries go in a POST's form body (what Grafana sends).
_GET_SIZES = {"query": 2000, "match[]": 400, "items": 5, "other": 64}
_POST_SIZES = {"query": 16384, "match[]": 1024, "items": 20, "other": 64}


def openapi(kind: str, method: str) -> dict[str, Any]:
    """`openapi_extra` of an endpoint (`query`, `query_range`, `series`, `labels`,
    `label_values`): its parameters in the query string (GET) or a form body (POST)."""
    sizes = _GET_SIZES if method == "GET" else _POST_SIZES

    def schema(name: str, repeated: bool) -> dict[str, Any]:
        if repeated:
            item = {"type": "string", "maxLength": sizes[name]}
            return {"type": "array", "items": item, "maxItems": sizes["items"]}
        return {"type": "string", "maxLength": sizes.get(name, sizes["other"])}

    tenant = {
        "name": "tenant_id",
        "in": "query",
        "required": False,
        "description": _TENANT[2],
        "schema": {"type": "string", "format": "uuid"},
    }
    params = _PARAMS[kind]
    if method == "GET":
        return {
            "parameters": [
                tenant,
                *(
                    {
                        "name": name,
                        "in": "query",
                        "required": required,
                        "description": text,
                        "schema": schema(name, repeated),
                        **({"style": "form", "explode": True} if repeated else {}),
                    }
                    for name, required, text, repeated in params
                ),
            ]
        }
    body = {
        "type": "object",
        "properties": {
            name: {**schema(name, repeated), "description": text}
            for name, required, text, repeated in params
        },
        "required": [name for name, required, _, _ in params if required],
    }
    return {
        "parameters": [tenant],
        "requestBody": {
            "required": True,
            "content": {"application/x-www-form-urlencoded": {"schema": body}},
        },
    }


class PrometheusParams:
    """Query-string and form parameters, form first (as Prometheus's `FormValue`)."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self.items = items

    @staticmethod
    def of(query: list[tuple[str, str]], form: bytes = b"") -> PrometheusParams:
        """From the query string's items and an urlencoded form body."""
        items: list[tuple[str, str]] = []
        if len(form) > MAX_FORM_BYTES:
            raise bad_data(f"the form is larger than {MAX_FORM_BYTES} bytes")
        if form:
            try:
                text = form.decode()
                items.extend(parse_qsl(text, keep_blank_values=True, max_num_fields=1000))
            except (UnicodeDecodeError, ValueError) as exc:
                raise bad_data(f"invalid form body: {exc}") from None
        return PrometheusParams(items + query)

    def get(self, name: str) -> str | None:
        return next((v for k, v in self.items if k == name), None)

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.items if k == name]

    def required(self, name: str) -> str:
        value = self.get(name)
        if value is None or value == "":
            raise bad_data(f'invalid parameter "{name}": it is required')
        return value

    def time(self, name: str) -> int | None:
        value = self.get(name)
        return None if value is None or value == "" else parse_time(name, value)

    def duration(self, name: str) -> int | None:
        value = self.get(name)
        return None if value is None or value == "" else parse_duration(name, value)

    def limit(self) -> int | None:
        value = self.get("limit")
        if value is None or value in ("", "0"):
            return None
        try:
            limit = int(value)
        except ValueError:
            limit = -1
        if limit < 0:
            raise bad_data(f'invalid parameter "limit": cannot parse "{value}"')
        return limit

    def tenant(self) -> uuid.UUID | None:
        value = self.get("tenant_id")
        if value in (None, ""):
            return None
        try:
            return uuid.UUID(value)
        except (ValueError, TypeError):
            raise bad_data('invalid parameter "tenant_id": not a UUID') from None

    def timeout_s(self) -> float | None:
        ms = self.duration("timeout")
        if ms is not None and ms <= 0:
            raise bad_data('invalid parameter "timeout": must be positive')
        return None if ms is None else ms / 1000
