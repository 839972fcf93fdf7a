"""Errors of the query layer, typed like Prometheus's `errorType` so that HTTP front ends
can map them onto status codes without parsing messages."""

from __future__ import annotations

from typing import Literal

ErrorKind = Literal["bad_data", "execution", "timeout", "unavailable", "internal"]


class QueryError(Exception):
    """A query that cannot be answered.

    `kind`: `bad_data` — the query or a parameter is wrong (fix the request);
    `execution` — valid but refused by a limit or failed while evaluating (narrow it);
    `timeout` — it ran past its time budget (narrow it or raise `timeout`);
    `unavailable` — the metrics store cannot be reached (retry later);
    `internal` — a defect on our side.
    """

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.message = message


def bad_data(message: str) -> QueryError:
    return QueryError("bad_data", message)


def unsupported(construct: str) -> QueryError:
    return QueryError(
        "bad_data",
        f"unsupported PromQL: {construct} is not supported by this server "
        "(see docs/query.md for the supported subset)",
    )
