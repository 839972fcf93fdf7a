"""Commands run on servers: created signed, delivered through the outbox and the
gateway, and advanced by the results agents report.

States: pending → dispatched → acknowledged → succeeded | failed, or expired when the
deadline passes first. Results only move a command forward; a result for a finished
command changes nothing, so redelivered results are harmless.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.timestamp_pb2 import Timestamp

from controlplane.access.policy import Resource, authorize, not_found
from controlplane.access.principal import TenantAccess
from controlplane.api import models as m
from controlplane.context import ControlPlane
from controlplane.db import SYSTEM, Database, UnitOfWork
from controlplane.problems import Problem
from proto import agent_pb2, signing
from yakpanel.ids import new_id
from yakpanel.sealing import has_plain_secrets, mask_secrets, seal_secrets
from yakpanel.topics import COMMANDS

_ORDER = {"pending": 0, "dispatched": 1, "acknowledged": 2}
FINAL = frozenset({"succeeded", "failed", "expired"})
MAX_PAYLOAD_BYTES = 64 * 1024


def _ts(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when.astimezone(UTC))
    return ts


def command_out(row: dict[str, Any]) -> m.CommandOut:
    return m.CommandOut(
        id=row["id"],
        server_id=row["server_id"],
        idempotency_key=row["idempotency_key"],
        type=row["type"],
        payload=row["payload"],
        state=row["state"],
        issued_at=row["issued_at"],
        deadline=row["deadline"],
        dispatched_at=row["dispatched_at"],
        acknowledged_at=row["acknowledged_at"],
        finished_at=row["finished_at"],
        progress=row["progress"],
        message=row["message"],
        output=row["output"],
        error_code=row["error_code"],
    )


async def _active_public_key(uow: UnitOfWork, server_id: uuid.UUID) -> Any:
    row = await (
        await uow.conn.execute(
            """SELECT public_key_pem FROM agent_certificates WHERE server_id = %s
               AND revoked_at IS NULL AND not_after > %s ORDER BY issued_at DESC LIMIT 1""",
            (server_id, uow.clock.now()),
        )
    ).fetchone()
    if row is None:
        return None
    return serialization.load_pem_public_key(row["public_key_pem"].encode())


async def issue_command(
    uow: UnitOfWork,
    tenant_id: uuid.UUID,
    server_id: uuid.UUID,
    command_type: str,
    payload: dict[str, Any],
    idempotency_key: str,
    timeout_s: int,
    *,
    signing_key: Ed25519PrivateKey,
) -> tuple[dict[str, Any], bool]:
    """Store, sign and enqueue one command inside the caller's transaction.

    Returns the command row and whether it was created now; an earlier command with the
    same key and request is returned as it is (False), so issuing again is harmless.
    `{"$secret": …}` values are sealed to the server's agent key, never stored plain.
    Raises Problem 404 (no such server), 409 `idempotency_conflict` or
    `server_not_enrolled`.
    """
    # Secret values stay out of the stored request hash; the key names the request.
    raw_payload = json.dumps(mask_secrets(payload), sort_keys=True)
    fingerprint = hashlib.sha256(f"{command_type}\n{raw_payload}".encode()).hexdigest()
    server = await (
        await uow.conn.execute(
            "SELECT id FROM servers WHERE id = %s AND tenant_id = %s FOR SHARE",
            (server_id, tenant_id),
        )
    ).fetchone()
    if server is None:
        raise not_found("server")
    existing = await (
        await uow.conn.execute(
            "SELECT * FROM commands WHERE tenant_id = %s AND idempotency_key = %s",
            (tenant_id, idempotency_key),
        )
    ).fetchone()
    if existing is not None:
        same = existing["server_id"] == server_id and existing["request_sha256"] == fingerprint
        if not same:
            raise Problem(
                409,
                "idempotency_conflict",
                "this idempotency key was used for a different command",
            )
        return existing, False
    sealed: Any = payload
    command_id = new_id()
    if has_plain_secrets(sealed):
        recipient = await _active_public_key(uow, server_id)
        if recipient is None:
            raise Problem(
                409,
                "server_not_enrolled",
                "secrets are sealed to the server's agent key: enroll the agent first",
            )
        sealed = seal_secrets(sealed, recipient, str(command_id))
    now = uow.clock.now()
    deadline = now + timedelta(seconds=timeout_s)
    envelope = agent_pb2.CommandEnvelope(
        command_id=str(command_id),
        idempotency_key=idempotency_key,
        tenant_id=str(tenant_id),
        server_id=str(server_id),
        type=command_type,
        payload=json.dumps(sealed, sort_keys=True).encode(),
    )
    envelope.issued_at.CopyFrom(_ts(now))
    envelope.deadline.CopyFrom(_ts(deadline))
    signing.sign(envelope, signing_key)
    data = envelope.SerializeToString()
    row = await (
        await uow.conn.execute(
            """INSERT INTO commands (id, tenant_id, server_id, idempotency_key, type, payload,
                   request_sha256, issued_at, deadline, envelope)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING *""",
            (
                command_id,
                tenant_id,
                server_id,
                idempotency_key,
                command_type,
                json.dumps(sealed),
                fingerprint,
                now,
                deadline,
                data,
            ),
        )
    ).fetchone()
    assert row is not None
    await uow.publish(COMMANDS.name, str(server_id), data, "command.issued", "command", command_id)
    await uow.record(
        "command.created", "command", command_id, None, command_out(row).model_dump(mode="json")
    )
    return row, True


async def create_command(
    cp: ControlPlane, access: TenantAccess, server_id: uuid.UUID, body: m.CommandCreate
) -> tuple[m.CommandOut, bool]:
    """The command and whether it was created now (False: an earlier one with this key)."""
    raw_payload = json.dumps(body.payload, sort_keys=True)
    if len(raw_payload.encode()) > MAX_PAYLOAD_BYTES:
        raise Problem(
            413, "payload_too_large", f"payloads are limited to {MAX_PAYLOAD_BYTES} bytes"
        )
    key = body.idempotency_key or f"api:{new_id()}"
    async with cp.db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, "commands:write", Resource("command", creating=True))
        row, created = await issue_command(
            uow,
            access.tenant_id,
            server_id,
            body.type,
            body.payload,
            key,
            body.timeout_s,
            signing_key=cp.platform_keys.signing_key,
        )
    return command_out(row), created


async def list_commands(
    db: Database, access: TenantAccess, server_id: uuid.UUID, limit: int, after: uuid.UUID | None
) -> list[m.CommandOut]:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, "commands:read", Resource("command"))
        server = await (
            await uow.conn.execute(
                "SELECT 1 FROM servers WHERE id = %s AND tenant_id = %s",
                (server_id, access.tenant_id),
            )
        ).fetchone()
        if server is None:
            raise not_found("server")
        rows = await (
            await uow.conn.execute(
                """SELECT * FROM commands WHERE tenant_id = %s AND server_id = %s
                   AND (%s::uuid IS NULL OR id > %s) ORDER BY id LIMIT %s""",
                (access.tenant_id, server_id, after, after, limit + 1),
            )
        ).fetchall()
    return [command_out(r) for r in rows]


async def get_command(db: Database, access: TenantAccess, command_id: uuid.UUID) -> m.CommandOut:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, "commands:read", Resource("command", command_id))
        row = await (
            await uow.conn.execute(
                "SELECT * FROM commands WHERE id = %s AND tenant_id = %s",
                (command_id, access.tenant_id),
            )
        ).fetchone()
    if row is None:
        raise not_found("command")
    return command_out(row)


async def pending_envelopes(
    db: Database, tenant_id: uuid.UUID, server_id: uuid.UUID, now: datetime
) -> list[bytes]:
    """Envelopes a reconnecting agent should receive: unfinished and not past deadline."""
    async with db.unit_of_work(SYSTEM, tenant_id) as uow:
        rows = await (
            await uow.conn.execute(
                """SELECT envelope FROM commands WHERE tenant_id = %s AND server_id = %s
                   AND state IN ('pending', 'dispatched', 'acknowledged') AND deadline > %s
                   ORDER BY issued_at LIMIT 1000""",
                (tenant_id, server_id, now),
            )
        ).fetchall()
    return [bytes(r["envelope"]) for r in rows]


_STATUS_STATE = {
    agent_pb2.DISPATCHED: "dispatched",
    agent_pb2.ACKNOWLEDGED: "acknowledged",
    agent_pb2.PROGRESS: "acknowledged",
    agent_pb2.SUCCEEDED: "succeeded",
    agent_pb2.FAILED: "failed",
    agent_pb2.REJECTED: "failed",
}


async def apply_result(db: Database, result: agent_pb2.CommandResult) -> str | None:
    """Advance a command by one reported result; returns the new state if it changed."""
    try:
        tenant_id = uuid.UUID(result.tenant_id)
        command_id = uuid.UUID(result.command_id)
    except ValueError:
        return None
    target = _STATUS_STATE.get(result.status)
    if target is None:
        return None
    at = result.at.ToDatetime(tzinfo=UTC) if result.HasField("at") else datetime.now(UTC)
    async with db.unit_of_work(SYSTEM, tenant_id) as uow:
        row = await (
            await uow.conn.execute(
                "SELECT * FROM commands WHERE id = %s AND tenant_id = %s FOR UPDATE",
                (command_id, tenant_id),
            )
        ).fetchone()
        if row is None or row["state"] in FINAL or str(row["server_id"]) != result.server_id:
            return None
        before = command_out(row)
        if target in FINAL:
            output: Any = None
            if result.output:
                try:
                    output = json.loads(result.output)
                except ValueError:
                    output = {"raw": result.output.decode(errors="replace")[:4000]}
            await uow.conn.execute(
                """UPDATE commands SET state = %s, finished_at = %s, progress = 100,
                       message = %s, output = %s, error_code = %s, replayed = %s,
                       updated_at = now() WHERE id = %s""",
                (
                    target,
                    at,
                    result.message[:2000],
                    None if output is None else json.dumps(output),
                    result.error_code or None,
                    result.replayed,
                    command_id,
                ),
            )
        else:
            state = target if _ORDER[target] > _ORDER[row["state"]] else row["state"]
            column = {"dispatched": "dispatched_at", "acknowledged": "acknowledged_at"}[target]
            await uow.conn.execute(
                f"""UPDATE commands SET state = %s, {column} = coalesce({column}, %s),
                       progress = greatest(progress, %s), message = %s, updated_at = now()
                    WHERE id = %s""",
                (
                    state,
                    at,
                    min(result.progress_percent, 99),
                    result.message[:2000] or row["message"],
                    command_id,
                ),
            )
            target = state
        if target != row["state"] or target in FINAL:
            after = await (
                await uow.conn.execute("SELECT * FROM commands WHERE id = %s", (command_id,))
            ).fetchone()
            assert after is not None
            await uow.record(
                f"command.{target}",
                "command",
                command_id,
                before.model_dump(mode="json"),
                command_out(after).model_dump(mode="json"),
            )
            return target
    return None


async def expire_overdue(db: Database, now: datetime) -> int:
    """Mark unfinished commands past their deadline as expired (run by the worker)."""
    async with db.unit_of_work(SYSTEM, staff_read=True) as uow:
        rows = await (
            await uow.conn.execute(
                """SELECT id, tenant_id FROM commands WHERE deadline <= %s
                   AND state IN ('pending', 'dispatched', 'acknowledged') LIMIT 1000""",
                (now,),
            )
        ).fetchall()
    expired = 0
    for r in rows:
        async with db.unit_of_work(SYSTEM, r["tenant_id"]) as uow:
            row = await (
                await uow.conn.execute(
                    "SELECT * FROM commands WHERE id = %s FOR UPDATE", (r["id"],)
                )
            ).fetchone()
            if row is None or row["state"] in FINAL:
                continue
            await uow.conn.execute(
                """UPDATE commands SET state = 'expired', finished_at = %s, error_code = 'expired',
                       message = 'the deadline passed before the agent finished',
                       updated_at = now() WHERE id = %s""",
                (now, r["id"]),
            )
            await uow.record(
                "command.expired",
                "command",
                r["id"],
                command_out(row).model_dump(mode="json"),
                None,
            )
            expired += 1
    return expired
