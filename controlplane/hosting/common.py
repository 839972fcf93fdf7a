"""What every hosting resource shares: grammar checks that become 422 problems, sealed
passwords, the server a resource lives on, starting its workflow, and following that
workflow's outcome on the resource row.

A resource row is the desired state; `workflow_id` names the workflow that last set out
to enforce it. An outcome only changes the row while it is still that workflow's, so a
later change (an update, a delete) supersedes an earlier one that finishes late.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from psycopg import sql

from controlplane.access.policy import not_found
from controlplane.db import UnitOfWork
from controlplane.problems import Problem
from controlplane.workflows import StepSpec, WorkflowOutcome, start_workflow
from yakpanel import identifiers
from yakpanel.hostnames import InvalidName
from yakpanel.identifiers import InvalidIdentifier
from yakpanel.sealing import SECRET_KEY
from yakpanel.secretbox import SecretBox


def invalid(field: str, message: str) -> Problem:
    """422 naming the field; raised before anything is stored or started."""
    return Problem(422, "invalid_input", message, field=field)


def checked(check: Callable[..., str], value: object, field: str) -> str:
    """`check(value, field=field)` with its grammar error turned into a 422 problem."""
    try:
        return check(value, field=field)
    except (InvalidName, InvalidIdentifier) as exc:
        raise invalid(field, str(exc)) from None


def new_password(given: str | None, field: str = "password") -> str:
    """The caller's password if it follows the rules, else a generated one."""
    if given is None:
        return identifiers.generate_password()
    return checked(identifiers.password, given, field)


def secret(value: str) -> dict[str, str]:
    """A payload value the workflow engine seals before it stores or sends anything."""
    return {SECRET_KEY: value}


def password_context(table: str, resource_id: uuid.UUID) -> str:
    # Bound to the row: a sealed password copied to another row does not open there.
    return f"hosting:{table}:{resource_id}:password"


def seal_password(box: SecretBox, table: str, resource_id: uuid.UUID, password: str) -> bytes:
    return box.seal(password.encode(), password_context(table, resource_id))


async def require_server(uow: UnitOfWork, server_id: uuid.UUID) -> None:
    row = await (
        await uow.conn.execute(
            "SELECT 1 FROM servers WHERE id = %s AND tenant_id = %s FOR SHARE",
            (server_id, uow.tenant_id),
        )
    ).fetchone()
    if row is None:
        raise not_found("server")


async def load(
    uow: UnitOfWork, table: str, resource_id: uuid.UUID, kind: str, lock: bool = False
) -> dict[str, Any]:
    query = sql.SQL("SELECT * FROM {} WHERE id = %s AND tenant_id = %s").format(
        sql.Identifier(table)
    )
    if lock:
        query = query + sql.SQL(" FOR UPDATE")
    row = await (await uow.conn.execute(query, (resource_id, uow.tenant_id))).fetchone()
    if row is None:
        raise not_found(kind)
    return row


RUNNING_STATES = ("running", "compensating")

# What a running workflow is doing, for the 409 that makes a second write wait.
_DOING = {
    "site.create": "the site is being provisioned",
    "site.update": "a change to the site is being applied",
    "site.delete": "the site is being deleted",
    "certificate.issue": "a certificate is being issued for the site",
    "certificate.renew": "the site's certificate is being renewed",
}
_LABELS = {
    "ftp_account": "FTP account",
    "database": "database",
    "database_user": "database user",
    "redis_user": "Redis user",
}


def describe_workflow(kind: str) -> str:
    if kind in _DOING:
        return _DOING[kind]
    resource, _, verb = kind.rpartition(".")
    label = _LABELS.get(resource, resource.replace("_", " "))
    if verb == "password":
        return f"a password rotation of the {label} is pending"
    if verb == "create":
        return f"the {label} is being created"
    if verb == "delete":
        return f"the {label} is being deleted"
    return f"a {kind} workflow is running"


async def require_idle(uow: UnitOfWork, subjects: Sequence[tuple[str, uuid.UUID]]) -> None:
    """Refuse a write while a workflow for any of `subjects` (subject type, id) runs.

    The node may run two commands for one resource in either order, so two workflows at
    once could leave the stored state (or password) and the node apart: one change at a
    time. Callers lock the resource row (FOR UPDATE) first, so of two concurrent
    requests the second waits, then sees the first one's workflow here."""
    if not subjects:
        return
    row = await (
        await uow.conn.execute(
            """SELECT id, kind FROM workflows WHERE tenant_id = %s
               AND state IN ('running', 'compensating')
               AND (subject_type, subject_id) IN
                   (SELECT * FROM unnest(%s::text[], %s::uuid[]))
               ORDER BY created_at LIMIT 1""",
            (uow.tenant_id, [t for t, _ in subjects], [i for _, i in subjects]),
        )
    ).fetchone()
    if row is not None:
        raise Problem(
            409,
            "resource_busy",
            f"{describe_workflow(row['kind'])} (workflow {row['id']}); retry when it has finished",
            workflow_id=str(row["id"]),
            workflow_kind=row["kind"],
        )


def require_settled(row: dict[str, Any], kind: str, allowed: Sequence[str] = ("active",)) -> None:
    """The row's own status must allow the write (e.g. a rotation needs an `active` row)."""
    if row["status"] in allowed:
        return
    if row["status"] == "failed":
        raise Problem(
            409,
            "resource_failed",
            f"the {kind} is failed (its last change did not reach the server, see"
            " last_error); delete it and create it again",
            resource_status=row["status"],
            workflow_id=str(row["workflow_id"]) if row["workflow_id"] else None,
        )
    raise Problem(
        409,
        "resource_busy",
        f"the {kind} is {row['status']}; retry when its current change has finished",
        resource_status=row["status"],
        workflow_id=str(row["workflow_id"]) if row["workflow_id"] else None,
    )


def read_ca_bundle(path: Path | None) -> str | None:
    """The PEM text of the operator's private ACME CA (e.g. Pebble), sent with the order."""
    if path is None:
        return None
    try:
        return path.read_text()
    except OSError as exc:
        raise Problem(
            503,
            "acme_ca_bundle_unreadable",
            f"the configured ACME CA bundle {path} cannot be read ({exc.strerror});"
            " fix YAKPANEL_ACME_CA_BUNDLE",
        ) from None


async def start(
    uow: UnitOfWork,
    box: SecretBox,
    kind: str,
    subject_type: str,
    subject_id: uuid.UUID,
    steps: list[StepSpec],
) -> uuid.UUID:
    """Start the workflow in the caller's transaction (it commits with the desired state)."""
    assert uow.tenant_id is not None
    return await start_workflow(uow, uow.tenant_id, kind, subject_type, subject_id, steps, box=box)


async def owned_row(uow: UnitOfWork, table: str, outcome: WorkflowOutcome) -> dict[str, Any] | None:
    """The subject row locked, if this outcome is still the row's current workflow."""
    row = await (
        await uow.conn.execute(
            sql.SQL("SELECT * FROM {} WHERE id = %s AND tenant_id = %s FOR UPDATE").format(
                sql.Identifier(table)
            ),
            (outcome.subject_id, outcome.tenant_id),
        )
    ).fetchone()
    if row is None or row["workflow_id"] != outcome.workflow_id:
        return None
    return row


def error_text(outcome: WorkflowOutcome) -> str:
    if outcome.error:
        return outcome.error[:2000]
    return f"the workflow ended {outcome.state}"


async def set_status(
    uow: UnitOfWork, table: str, resource_id: uuid.UUID, status: str, error: str | None
) -> None:
    await uow.conn.execute(
        sql.SQL(
            "UPDATE {} SET status = %s, last_error = %s, updated_at = now() WHERE id = %s"
        ).format(sql.Identifier(table)),
        (status, error, resource_id),
    )


async def delete_row(uow: UnitOfWork, table: str, resource_id: uuid.UUID) -> None:
    await uow.conn.execute(
        sql.SQL("DELETE FROM {} WHERE id = %s").format(sql.Identifier(table)), (resource_id,)
    )
