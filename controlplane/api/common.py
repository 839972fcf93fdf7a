"""Shared route pieces: documented problem responses and pagination parameters."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import Query
from pydantic import BaseModel, Field

from controlplane.api.models import decode_cursor
from controlplane.problems import PROBLEM_JSON


class ProblemBody(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    code: str | None = None
    instance: str | None = None
    model_config = {"extra": "allow"}


# Inline, under the media type problems are sent with (a `model` would document them
# as `application/json`, leaving the real `application/problem+json` without a schema).
_PROBLEM_SCHEMA = ProblemBody.model_json_schema()


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    described = {
        400: "bad request",
        401: "not authenticated, or the credential is invalid, expired or revoked",
        403: "authenticated but not allowed (missing permission, CSRF, escalation)",
        404: "no such resource, or not visible to the caller",
        409: "conflicts with current state (lifecycle, quota, uniqueness)",
        413: "the request or its payload is too large",
        422: "the request body or parameters are not valid",
        429: "rate limited or throttled; see retry_after",
    }
    return {
        s: {
            "description": described[s],
            "content": {PROBLEM_JSON: {"schema": _PROBLEM_SCHEMA}},
        }
        for s in statuses
    }


AUTHED = problems(400, 401, 403, 404, 422, 429)
WRITES = problems(400, 401, 403, 404, 409, 422, 429)


class PageParams(BaseModel):
    limit: int = Field(50, ge=1, le=200)
    cursor: str | None = Field(None, max_length=100)


Limit = Annotated[int, Query(ge=1, le=200, description="page size")]
Cursor = Annotated[
    str | None, Query(max_length=100, description="`next_cursor` of the previous page")
]


def after(cursor: str | None) -> uuid.UUID | None:
    return decode_cursor(cursor)
