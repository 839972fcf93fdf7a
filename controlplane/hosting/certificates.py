"""Site certificates: issue through ACME on the node, then serve HTTPS with them.

The issue workflow has two steps: `site.certificate.issue` (the node talks to the ACME
directory and writes the files) and `site.apply` with `tls: true`. A failed renewal
leaves the old certificate serving: the row keeps its dates, turns `renewal_failed`
and a `certificate.renewal_failed` event tells whoever listens.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from controlplane.access.policy import Resource, authorize, not_found
from controlplane.access.principal import TenantAccess
from controlplane.db import Database, UnitOfWork
from controlplane.hosting import models as hm
from controlplane.hosting.common import error_text, load, read_ca_bundle, require_idle, start
from controlplane.hosting.sites import (
    ISSUE_TIMEOUT_S,
    READ,
    WRITE,
    apply_payload,
    days_left,
    issue_payload,
    site_subjects,
    spec_of,
)
from controlplane.problems import Problem
from controlplane.workflows import StepSpec, WorkflowOutcome
from yakpanel.secretbox import SecretBox
from yakpanel.settings import Settings

ISSUE, RENEW = "certificate.issue", "certificate.renew"
ISSUE_STEP, APPLY_STEP = "issue", "apply-tls"

__all__ = ["ISSUE", "RENEW", "begin", "read_ca_bundle", "request_certificate"]


def certificate_out(row: dict[str, Any], now: datetime) -> hm.CertificateOut:
    return hm.CertificateOut(
        site_id=row["site_id"],
        domains=list(row["domains"]),
        state=row["state"],
        issuer=row["issuer"],
        serial=row["serial"],
        not_before=row["not_before"],
        not_after=row["not_after"],
        days_left=days_left(row["not_after"], now),
        workflow_id=row["workflow_id"],
        last_error=row["last_error"],
        last_attempt_at=row["last_attempt_at"],
        requested_at=row["requested_at"],
        updated_at=row["updated_at"],
    )


def issue_steps(
    site: dict[str, Any], settings: Settings, ca_bundle: str | None, force: bool
) -> list[StepSpec]:
    site_id: uuid.UUID = site["id"]
    issue = issue_payload(site_id, site["domains"], settings, ca_bundle, force)
    return [
        StepSpec(
            ISSUE_STEP,
            site["server_id"],
            "site.certificate.issue",
            issue,
            timeout_s=ISSUE_TIMEOUT_S,
        ),
        StepSpec(
            APPLY_STEP, site["server_id"], "site.apply", apply_payload(site_id, spec_of(site), True)
        ),
    ]


async def begin(
    uow: UnitOfWork,
    box: SecretBox,
    settings: Settings,
    site: dict[str, Any],
    current: dict[str, Any] | None,
    kind: str,
    force: bool,
    ca_bundle: str | None,
) -> dict[str, Any]:
    """Start an issue or renewal workflow and record it on the certificate row."""
    workflow_id = await start(
        uow,
        box,
        kind,
        "site_certificate",
        site["id"],
        issue_steps(site, settings, ca_bundle, force),
    )
    # `renewing` only while a certificate is served (the site has tls): one issued but
    # never served (its `apply-tls` failed) is still a first issuance.
    serving = site["tls"] and current is not None and current["not_after"] is not None
    state = "renewing" if serving else "requested"
    now = uow.clock.now()
    row = await (
        await uow.conn.execute(
            """INSERT INTO site_certificates (site_id, tenant_id, domains, state, workflow_id,
                   last_attempt_at, requested_at, updated_at)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (site_id) DO UPDATE SET state = EXCLUDED.state,
                   workflow_id = EXCLUDED.workflow_id, last_attempt_at = EXCLUDED.last_attempt_at,
                   last_error = NULL, updated_at = EXCLUDED.updated_at
               RETURNING *""",
            (site["id"], uow.tenant_id, list(site["domains"]), state, workflow_id, now, now, now),
        )
    ).fetchone()
    assert row is not None
    return row


async def request_certificate(
    db: Database,
    box: SecretBox,
    settings: Settings,
    access: TenantAccess,
    site_id: uuid.UUID,
    body: hm.CertificateRequest,
) -> hm.CertificateOut:
    ca_bundle = read_ca_bundle(settings.acme_ca_bundle)
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, WRITE, Resource("site", site_id))
        site = await load(uow, "sites", site_id, "site", lock=True)
        current = await _row(uow, site_id, lock=True)
        await require_idle(uow, site_subjects(site_id))
        if site["status"] == "deleting":
            raise Problem(409, "site_deleting", "the site is being deleted")
        if site["status"] != "active":
            raise Problem(
                409,
                "site_not_active",
                f"the site is {site['status']} (its last change did not apply; see its"
                " last_error); the CA checks the domains over HTTP through the site's own"
                " config, so fix the site first (PATCH it) and request the certificate once"
                " it is active",
                site_status=site["status"],
            )
        before = certificate_out(current, uow.clock.now()) if current else None
        row = await begin(uow, box, settings, site, current, ISSUE, body.force, ca_bundle)
        out = certificate_out(row, uow.clock.now())
        await uow.record(
            "certificate.requested",
            "site_certificate",
            site_id,
            before.model_dump(mode="json") if before else None,
            out.model_dump(mode="json"),
        )
    return out


async def _row(uow: UnitOfWork, site_id: uuid.UUID, lock: bool = False) -> dict[str, Any] | None:
    return await (
        await uow.conn.execute(
            "SELECT * FROM site_certificates WHERE site_id = %s AND tenant_id = %s"
            + (" FOR UPDATE" if lock else ""),
            (site_id, uow.tenant_id),
        )
    ).fetchone()


async def get_certificate(
    db: Database, access: TenantAccess, site_id: uuid.UUID
) -> hm.CertificateOut:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, READ, Resource("site", site_id))
        await load(uow, "sites", site_id, "site")
        row = await _row(uow, site_id)
        if row is None:
            raise not_found("certificate")
        return certificate_out(row, uow.clock.now())


async def on_finished(uow: UnitOfWork, outcome: WorkflowOutcome) -> None:
    row = await (
        await uow.conn.execute(
            "SELECT * FROM site_certificates WHERE site_id = %s AND tenant_id = %s FOR UPDATE",
            (outcome.subject_id, outcome.tenant_id),
        )
    ).fetchone()
    if row is None or row["workflow_id"] != outcome.workflow_id:
        return
    before = certificate_out(row, uow.clock.now()).model_dump(mode="json")
    issued = outcome.outputs.get(ISSUE_STEP)
    if issued and issued.get("not_after"):
        # The node holds these files now, whatever the later step did.
        await uow.conn.execute(
            """UPDATE site_certificates SET issuer = %s, serial = %s, not_before = %s,
                   not_after = %s, domains = coalesce(%s, domains), updated_at = now()
               WHERE site_id = %s""",
            (
                issued.get("issuer"),
                issued.get("serial"),
                issued.get("not_before"),
                issued.get("not_after"),
                issued.get("domains"),
                row["site_id"],
            ),
        )
    if outcome.state == "succeeded":
        await uow.conn.execute(
            "UPDATE site_certificates SET state = 'valid', last_error = NULL WHERE site_id = %s",
            (row["site_id"],),
        )
        await uow.conn.execute(
            "UPDATE sites SET tls = true, updated_at = now() WHERE id = %s", (row["site_id"],)
        )
        action = "certificate.issued" if issued and issued.get("issued") else "certificate.checked"
    else:
        site = await (
            await uow.conn.execute("SELECT tls FROM sites WHERE id = %s", (row["site_id"],))
        ).fetchone()
        # A renewal failed when a certificate is served: the previous one keeps serving.
        renewal = bool(site and site["tls"])
        error = error_text(outcome)
        if not renewal and issued and issued.get("not_after"):
            error = (
                "the certificate was issued and installed on the server, but serving it"
                f" failed: {error}. Fix the cause and request the certificate again: the"
                " installed certificate is reused, nothing new is ordered"
            )[:2000]
        state = "renewal_failed" if renewal else "failed"
        await uow.conn.execute(
            "UPDATE site_certificates SET state = %s, last_error = %s, updated_at = now()"
            " WHERE site_id = %s",
            (state, error, row["site_id"]),
        )
        action = "certificate.renewal_failed" if renewal else "certificate.failed"
    after = await _row(uow, row["site_id"])
    assert after is not None
    await uow.record(
        action,
        "site_certificate",
        row["site_id"],
        before,
        certificate_out(after, uow.clock.now()).model_dump(mode="json"),
    )
