"""The life of a resource with a password (FTP account, database user, Redis user):
create, rotate, delete, each one workflow, and what each outcome does to the row.

The password lives in `password_sealed` (sealed under the master key, bound to the row).
A rotation keeps the new one in `pending_password_sealed` until the node confirms it, so
the stored password is always the one the node has. Audit entries and events say that
a rotation happened, never what the password is.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from controlplane.db import UnitOfWork
from controlplane.hosting.common import (
    delete_row,
    error_text,
    load,
    owned_row,
    require_idle,
    seal_password,
    set_status,
    start,
)
from controlplane.workflows import StepSpec, WorkflowOutcome
from yakpanel.secretbox import SecretBox


@dataclass(frozen=True)
class CredentialKind:
    table: str
    resource_type: str  # audit resource type and event prefix, e.g. "database_user"
    label: str  # in messages, e.g. "database user"
    render: Callable[[dict[str, Any]], BaseModel]
    on_created: Callable[[UnitOfWork, dict[str, Any], WorkflowOutcome], Awaitable[None]] | None = (
        None
    )

    @property
    def create_kind(self) -> str:
        return f"{self.resource_type}.create"

    @property
    def rotate_kind(self) -> str:
        return f"{self.resource_type}.password"

    @property
    def delete_kind(self) -> str:
        return f"{self.resource_type}.delete"

    async def out(self, uow: UnitOfWork, resource_id: uuid.UUID) -> BaseModel:
        return self.render(await load(uow, self.table, resource_id, self.label))

    async def started(
        self, uow: UnitOfWork, box: SecretBox, kind: str, resource_id: uuid.UUID, step: StepSpec
    ) -> uuid.UUID:
        workflow_id = await start(uow, box, kind, self.resource_type, resource_id, [step])
        await uow.conn.execute(
            f"UPDATE {self.table} SET workflow_id = %s, updated_at = now() WHERE id = %s",
            (workflow_id, resource_id),
        )
        return workflow_id

    async def rotate(
        self,
        uow: UnitOfWork,
        box: SecretBox,
        row: dict[str, Any],
        password: str,
        step: StepSpec,
    ) -> uuid.UUID:
        """Rotate the password of a row the caller locked (FOR UPDATE) and found `active`.

        Refused while any workflow of the row runs: two rotations at once could reach
        the node in either order, and the stored password would not be the node's."""
        await require_idle(uow, [(self.resource_type, row["id"])])
        await uow.conn.execute(
            f"UPDATE {self.table} SET pending_password_sealed = %s WHERE id = %s",
            (seal_password(box, self.table, row["id"], password), row["id"]),
        )
        workflow_id = await self.started(uow, box, self.rotate_kind, row["id"], step)
        await uow.record(
            f"{self.resource_type}.password_rotation_requested",
            self.resource_type,
            row["id"],
            None,
            {"id": str(row["id"]), "workflow_id": str(workflow_id)},
        )
        return workflow_id

    async def delete(
        self, uow: UnitOfWork, box: SecretBox, row: dict[str, Any], step: StepSpec
    ) -> BaseModel:
        """Delete a row the caller locked (FOR UPDATE); not while its create or a rotation
        runs (the node could run the delete first). A `failed` row can be deleted."""
        await require_idle(uow, [(self.resource_type, row["id"])])
        before = self.render(row).model_dump(mode="json")
        await set_status(uow, self.table, row["id"], "deleting", None)
        await self.started(uow, box, self.delete_kind, row["id"], step)
        out = await self.out(uow, row["id"])
        await uow.record(
            f"{self.resource_type}.delete_requested",
            self.resource_type,
            row["id"],
            before,
            out.model_dump(mode="json"),
        )
        return out

    # --- outcomes ------------------------------------------------------------------------

    async def on_create(self, uow: UnitOfWork, outcome: WorkflowOutcome) -> None:
        row = await owned_row(uow, self.table, outcome)
        if row is None:
            return
        if outcome.state == "succeeded":
            if self.on_created is not None:
                await self.on_created(uow, row, outcome)
            await set_status(uow, self.table, row["id"], "active", None)
            action = f"{self.resource_type}.provisioned"
        else:
            await set_status(uow, self.table, row["id"], "failed", error_text(outcome))
            action = f"{self.resource_type}.failed"
        out = await self.out(uow, row["id"])
        await uow.record(action, self.resource_type, row["id"], None, out.model_dump(mode="json"))

    async def on_rotate(self, uow: UnitOfWork, outcome: WorkflowOutcome) -> None:
        row = await owned_row(uow, self.table, outcome)
        if row is None:
            return
        if outcome.state == "succeeded":
            await uow.conn.execute(
                f"""UPDATE {self.table} SET password_sealed = coalesce(pending_password_sealed,
                        password_sealed), pending_password_sealed = NULL, last_error = NULL,
                        password_rotated_at = %s, updated_at = now() WHERE id = %s""",
                (uow.clock.now(), row["id"]),
            )
            action = f"{self.resource_type}.password_rotated"
            error = None
        else:
            # The node kept the old password, and so do we.
            error = error_text(outcome)
            await uow.conn.execute(
                f"""UPDATE {self.table} SET pending_password_sealed = NULL, last_error = %s,
                        updated_at = now() WHERE id = %s""",
                (error, row["id"]),
            )
            action = f"{self.resource_type}.password_rotation_failed"
        await uow.record(
            action,
            self.resource_type,
            row["id"],
            None,
            {"id": str(row["id"]), "workflow_id": str(outcome.workflow_id), "error": error},
        )

    async def on_delete(self, uow: UnitOfWork, outcome: WorkflowOutcome) -> None:
        row = await owned_row(uow, self.table, outcome)
        if row is None:
            return
        before = self.render(row).model_dump(mode="json")
        if outcome.state == "succeeded":
            await delete_row(uow, self.table, row["id"])
            await uow.record(
                f"{self.resource_type}.deleted", self.resource_type, row["id"], before, None
            )
            return
        await set_status(uow, self.table, row["id"], "failed", error_text(outcome))
        out = await self.out(uow, row["id"])
        await uow.record(
            f"{self.resource_type}.delete_failed",
            self.resource_type,
            row["id"],
            before,
            out.model_dump(mode="json"),
        )
