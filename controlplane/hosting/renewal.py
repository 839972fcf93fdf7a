"""The certificate renewal loop, run by the control-plane worker.

Certificates that expire within `certificate_renew_before_days`, of `active` sites with
no workflow running, get a renewal workflow. A first issuance that failed (`failed`) is
left to the tenant: it usually failed validation (DNS or port 80 not reaching the node),
which retrying cannot fix, and the CA limits failed validations — `POST …/certificate`
retries it. A failed renewal is retried after
`certificate_renewal_retry_s`, not at every round: an ACME server that refused once is
not hammered, and the old certificate keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import timedelta

from controlplane.db import SYSTEM, Database
from controlplane.hosting.certificates import RENEW, begin, read_ca_bundle
from controlplane.hosting.common import require_idle
from controlplane.hosting.sites import site_subjects
from controlplane.problems import Problem
from yakpanel.secretbox import SecretBox
from yakpanel.settings import Settings

log = logging.getLogger(__name__)


async def renew_due(db: Database, box: SecretBox, settings: Settings) -> list[uuid.UUID]:
    """Start a renewal for every due certificate; returns the sites renewed."""
    now = db.clock.now()
    due_before = now + timedelta(days=settings.certificate_renew_before_days)
    retry_before = now - timedelta(seconds=settings.certificate_renewal_retry_s)
    async with db.unit_of_work(SYSTEM, staff_read=True) as uow:
        rows = await (
            await uow.conn.execute(
                """SELECT c.site_id, c.tenant_id FROM site_certificates c
                   WHERE c.not_after IS NOT NULL AND c.not_after <= %s
                   AND (c.state = 'valid' OR (c.state = 'renewal_failed'
                        AND (c.last_attempt_at IS NULL OR c.last_attempt_at <= %s)))
                   ORDER BY c.not_after LIMIT 500""",
                (due_before, retry_before),
            )
        ).fetchall()
    if not rows:
        return []
    ca_bundle = read_ca_bundle(settings.acme_ca_bundle)
    renewed: list[uuid.UUID] = []
    for r in rows:
        try:
            async with db.unit_of_work(SYSTEM, r["tenant_id"]) as uow:
                # The site first, as every site write locks it: one order, no deadlock.
                site = await (
                    await uow.conn.execute(
                        "SELECT * FROM sites WHERE id = %s FOR UPDATE", (r["site_id"],)
                    )
                ).fetchone()
                cert = await (
                    await uow.conn.execute(
                        "SELECT * FROM site_certificates WHERE site_id = %s FOR UPDATE",
                        (r["site_id"],),
                    )
                ).fetchone()
                if cert is None or site is None or site["status"] != "active":
                    # Deleting, or a change that did not apply: renewing would apply a
                    # config the node does not have. It is due again next round.
                    continue
                if cert["state"] not in ("valid", "renewal_failed"):
                    continue  # another worker got there first
                # A change of the site runs: it is due again next round.
                await require_idle(uow, site_subjects(r["site_id"]))
                row = await begin(uow, box, settings, site, cert, RENEW, False, ca_bundle)
                await uow.record(
                    "certificate.renewal_started",
                    "site_certificate",
                    r["site_id"],
                    None,
                    {"workflow_id": str(row["workflow_id"]), "not_after": str(cert["not_after"])},
                )
        except Problem as exc:
            log.warning(
                "certificate renewal not started: %s",
                exc.detail,
                extra={"site_id": str(r["site_id"])},
            )
            continue
        renewed.append(r["site_id"])
    return renewed


class CertificateRenewal:
    """Checks for due certificates every `certificate_renewal_interval_s` until stopped."""

    def __init__(self, db: Database, box: SecretBox, settings: Settings) -> None:
        self.db = db
        self.box = box
        self.settings = settings

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                renewed = await renew_due(self.db, self.box, self.settings)
                if renewed:
                    log.info("certificate renewals started", extra={"count": len(renewed)})
            except Exception:
                log.exception("certificate renewal check failed; retrying next round")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.certificate_renewal_interval_s)
