"""Enrollment tokens, agent certificates and what the gateway asks of the control plane."""

from __future__ import annotations

import base64
import secrets
import uuid
from datetime import timedelta
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.access.credentials import digest
from controlplane.access.policy import Resource, authorize, not_found
from controlplane.access.principal import TenantAccess
from controlplane.api import models as m
from controlplane.context import ControlPlane
from controlplane.db import SYSTEM, Database, UnitOfWork
from controlplane.problems import Problem
from yakpanel.ids import new_id
from yakpanel.pki import (
    IdentityError,
    NodeIdentity,
    cert_pem,
    fingerprint,
    public_key_of,
    serial_hex,
)

ENROLLMENT_PREFIX = "yke_"


async def _server_row(uow: UnitOfWork, server_id: uuid.UUID) -> dict[str, Any]:
    row = await (
        await uow.conn.execute(
            "SELECT * FROM servers WHERE id = %s AND tenant_id = %s", (server_id, uow.tenant_id)
        )
    ).fetchone()
    if row is None:
        raise not_found("server")
    return row


async def create_enrollment_token(
    cp: ControlPlane, access: TenantAccess, server_id: uuid.UUID, body: m.EnrollmentTokenCreate
) -> m.EnrollmentTokenCreated:
    async with cp.db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, "servers:write", Resource("server", server_id))
        await _server_row(uow, server_id)
        token = ENROLLMENT_PREFIX + secrets.token_urlsafe(32)
        expires_at = uow.clock.now() + timedelta(minutes=body.ttl_minutes)
        token_id = new_id()
        await uow.conn.execute(
            """INSERT INTO enrollment_tokens (id, tenant_id, server_id, token_hash, expires_at)
               VALUES (%s, %s, %s, %s, %s)""",
            (token_id, access.tenant_id, server_id, digest(token), expires_at),
        )
        await uow.record(
            "server.enrollment_token_created",
            "server",
            server_id,
            None,
            {"token_id": str(token_id), "expires_at": expires_at.isoformat()},
        )
    gateway = cp.settings.gateway_enroll_address
    return m.EnrollmentTokenCreated(
        token=token,
        expires_at=expires_at,
        gateway=gateway,
        ca_certificate_pem=cp.platform_keys.ca.cert_pem.decode(),
        command=(
            f"yakpanel agent enroll --gateway {gateway} --ca-file yakpanel-ca.pem"
            " --token $YAKPANEL_AGENT_TOKEN"
        ),
    )


def _certificate(row: dict[str, Any]) -> m.CertificateOut:
    return m.CertificateOut(
        serial=row["serial"],
        fingerprint=row["fingerprint"],
        not_after=row["not_after"],
        issued_at=row["issued_at"],
        revoked_at=row["revoked_at"],
        revoked_reason=row["revoked_reason"],
    )


async def list_certificates(
    db: Database, access: TenantAccess, server_id: uuid.UUID
) -> list[m.CertificateOut]:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, "servers:read", Resource("server", server_id))
        await _server_row(uow, server_id)
        rows = await (
            await uow.conn.execute(
                "SELECT * FROM agent_certificates WHERE server_id = %s AND tenant_id = %s"
                " ORDER BY issued_at",
                (server_id, access.tenant_id),
            )
        ).fetchall()
    return [_certificate(r) for r in rows]


async def revoke_certificate(
    db: Database, access: TenantAccess, server_id: uuid.UUID, serial: str, body: m.RevokeBody
) -> m.CertificateOut:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, "servers:write", Resource("server", server_id))
        row = await (
            await uow.conn.execute(
                "SELECT * FROM agent_certificates WHERE serial = %s AND server_id = %s"
                " AND tenant_id = %s FOR UPDATE",
                (serial, server_id, access.tenant_id),
            )
        ).fetchone()
        if row is None:
            raise not_found("certificate")
        before = _certificate(row)
        if row["revoked_at"] is not None:
            return before
        updated = await (
            await uow.conn.execute(
                "UPDATE agent_certificates SET revoked_at = %s, revoked_reason = %s"
                " WHERE serial = %s RETURNING *",
                (uow.clock.now(), body.reason, serial),
            )
        ).fetchone()
        assert updated is not None
        after = _certificate(updated)
        await uow.record(
            "server.certificate_revoked",
            "server",
            server_id,
            before.model_dump(mode="json"),
            after.model_dump(mode="json"),
        )
    return after


# --- internal: asked by the gateway ---------------------------------------------------


async def redeem(cp: ControlPlane, body: m.InternalEnroll) -> m.InternalEnrolled:
    async with cp.db.connection() as conn:
        row = await (
            await conn.execute(
                "SELECT * FROM redeem_enrollment_token(%s, %s)",
                (digest(body.token), cp.clock.now()),
            )
        ).fetchone()
    outcome = row["outcome"] if row else "unknown"
    if outcome != "ok":
        reasons = {
            "unknown": "the enrollment token is not valid",
            "used": "the enrollment token was already used; create a new one",
            "expired": "the enrollment token has expired; create a new one",
        }
        raise Problem(401, f"enrollment_token_{outcome}", reasons[outcome])
    assert row is not None
    identity = NodeIdentity(row["tenant_id"], row["server_id"])
    try:
        cert = cp.platform_keys.ca.issue_agent(body.csr_pem.encode(), identity)
    except IdentityError as exc:
        raise Problem(422, "bad_csr", str(exc)) from None
    pem = cert_pem(cert)
    async with cp.db.unit_of_work(SYSTEM, identity.tenant_id) as uow:
        await uow.conn.execute(
            """INSERT INTO agent_certificates (serial, tenant_id, server_id, fingerprint,
                   public_key_pem, not_after)
               VALUES (%s, %s, %s, %s, %s, %s)""",
            (
                serial_hex(cert),
                identity.tenant_id,
                identity.server_id,
                fingerprint(cert),
                public_key_pem(cert),
                cert.not_valid_after_utc,
            ),
        )
        await uow.conn.execute(
            "UPDATE servers SET hostname = %s, agent_version = %s, updated_at = now()"
            " WHERE id = %s",
            (body.hostname[:253], body.agent_version[:64], identity.server_id),
        )
        await uow.record(
            "server.enrolled",
            "server",
            identity.server_id,
            None,
            {"serial": serial_hex(cert), "hostname": body.hostname[:253]},
        )
    return m.InternalEnrolled(
        certificate_pem=pem.decode(),
        ca_chain_pem=cp.platform_keys.ca.cert_pem.decode(),
        command_signing_public_key=base64.b64encode(cp.platform_keys.signing_public_key).decode(),
        tenant_id=identity.tenant_id,
        server_id=identity.server_id,
    )


def public_key_pem(cert: x509.Certificate) -> str:
    return (
        public_key_of(cert)
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


async def certificate_status(cp: ControlPlane, serial: str) -> m.InternalCertificateStatus:
    async with cp.db.connection() as conn:
        row = await (
            await conn.execute("SELECT * FROM agent_certificate_status(%s)", (serial,))
        ).fetchone()
    if row is None:
        return m.InternalCertificateStatus(status="unknown")
    status: Literal["valid", "revoked", "expired"]
    if row["revoked_at"] is not None:
        status = "revoked"
    elif row["not_after"] <= cp.clock.now():
        status = "expired"
    else:
        status = "valid"
    return m.InternalCertificateStatus(
        status=status, tenant_id=row["tenant_id"], server_id=row["server_id"]
    )


def issue_gateway_certificate(
    cp: ControlPlane, body: m.InternalGatewayCertificate
) -> m.InternalGatewayCertificateOut:
    key = serialization.load_pem_public_key(body.public_key_pem.encode())
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise Problem(422, "bad_key", "the gateway key must be EC P-256")
    cert = cp.platform_keys.ca.issue_server(key, body.hostnames, days=30)
    return m.InternalGatewayCertificateOut(
        certificate_pem=cert_pem(cert).decode(), ca_chain_pem=cp.platform_keys.ca.cert_pem.decode()
    )
