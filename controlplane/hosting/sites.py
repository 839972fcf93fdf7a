"""Sites: their desired state (kind, domains, upstream, redirects, HTTPS) and the
`site.apply` / `site.remove` workflows that put it on the node.

Every name that reaches the nginx config is checked against `yakpanel.hostnames` before
anything is stored; a refusal is a 422 naming the field, with no row, workflow or
command left behind. Domains are unique across all tenants (`site_domains`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.errors import UniqueViolation

from controlplane.access.policy import Resource, authorize
from controlplane.access.principal import TenantAccess
from controlplane.db import Database, UnitOfWork
from controlplane.hosting import models as hm
from controlplane.hosting.common import (
    checked,
    delete_row,
    error_text,
    invalid,
    load,
    owned_row,
    read_ca_bundle,
    require_idle,
    require_server,
    set_status,
    start,
)
from controlplane.problems import Problem
from controlplane.workflows import StepSpec, WorkflowOutcome
from yakpanel.hostnames import (
    normalize_domain,
    validate_fastcgi,
    validate_redirect_target,
    validate_upstream,
    validate_url_path,
)
from yakpanel.ids import new_id
from yakpanel.secretbox import SecretBox
from yakpanel.settings import Settings

READ, WRITE = "sites:read", "sites:write"
TABLE = "sites"
CREATE, UPDATE, DELETE = "site.create", "site.update", "site.delete"
CERTIFICATE_STEP = "certificate"  # the re-issue step of an update that changes domains
ISSUE_TIMEOUT_S = 600  # ACME orders wait for validation and finalization


@dataclass(frozen=True)
class SiteSpec:
    """A site's desired state after every grammar check."""

    kind: str
    domains: tuple[str, ...]
    upstream: str | None
    redirects: tuple[tuple[str, str, int], ...]
    force_https: bool


ACME_CHALLENGE_PATH = "/.well-known/acme-challenge/"


def validate_spec(
    kind: str,
    domains: list[str],
    upstream: str | None,
    redirects: list[hm.RedirectIn],
    force_https: bool,
) -> SiteSpec:
    names: list[str] = []
    for i, domain in enumerate(domains):
        field = f"domains[{i}]"
        name = checked(normalize_domain, domain, field)
        if name in names:
            raise invalid(field, f"{field} repeats {name}; list every name once")
        names.append(name)
    if kind == "proxy":
        if upstream is None:
            raise invalid("upstream", "upstream is required for a proxy site")
        upstream = checked(validate_upstream, upstream, "upstream")
    elif kind == "php":
        if upstream is None:
            raise invalid("upstream", "upstream (the PHP-FPM FastCGI address) is required")
        upstream = checked(validate_fastcgi, upstream, "upstream")
    elif upstream is not None:
        raise invalid("upstream", "a static site has no upstream; leave it out")
    rules: list[tuple[str, str, int]] = []
    sources: set[str] = set()
    for i, r in enumerate(redirects):
        source = checked(validate_url_path, r.source, f"redirects[{i}].source")
        if source.startswith(ACME_CHALLENGE_PATH) or source == ACME_CHALLENGE_PATH.rstrip("/"):
            raise invalid(
                f"redirects[{i}].source",
                f"redirects[{i}].source is under {ACME_CHALLENGE_PATH}, which serves "
                "certificate challenges; redirect another path",
            )
        target = checked(validate_redirect_target, r.target, f"redirects[{i}].target")
        if source in sources:
            raise invalid(f"redirects[{i}].source", f"redirects[{i}].source repeats {source}")
        sources.add(source)
        rules.append((source, target, r.code))
    return SiteSpec(kind, tuple(names), upstream, tuple(rules), force_https)


def spec_of(row: dict[str, Any]) -> SiteSpec:
    return SiteSpec(
        row["kind"],
        tuple(row["domains"]),
        row["upstream"],
        tuple((r["source"], r["target"], r["code"]) for r in row["redirects"]),
        row["force_https"],
    )


def apply_payload(site_id: uuid.UUID, spec: SiteSpec, tls: bool) -> dict[str, Any]:
    """The `site.apply` command payload (engines/site contract).

    `force_https` is the tenant's wish; it is sent only once the site serves HTTPS (the
    engine refuses to redirect to an HTTPS server that does not exist), so a site asked
    to force HTTPS before its certificate is issued serves HTTP until then."""
    return {
        "site_id": str(site_id),
        "kind": spec.kind,
        "domains": list(spec.domains),
        "upstream": spec.upstream,
        "redirects": [{"source": s, "target": t, "code": c} for s, t, c in spec.redirects],
        "force_https": spec.force_https and tls,
        "tls": tls,
    }


def remove_payload(site_id: uuid.UUID, delete_files: bool = False) -> dict[str, Any]:
    return {"site_id": str(site_id), "delete_files": delete_files}


def issue_payload(
    site_id: uuid.UUID,
    domains: tuple[str, ...] | list[str],
    settings: Settings,
    ca_bundle: str | None,
    force: bool,
) -> dict[str, Any]:
    """The `site.certificate.issue` payload (engines/site contract)."""
    return {
        "site_id": str(site_id),
        "domains": list(domains),
        "directory_url": settings.acme_directory_url,
        "email": settings.acme_email,
        "ca_bundle": ca_bundle,
        "force": force,
        "renew_before_days": settings.certificate_renew_before_days,
    }


def site_subjects(site_id: uuid.UUID) -> list[tuple[str, uuid.UUID]]:
    """The workflow subjects a site write waits for: the site's own workflows and its
    certificate's (an issuance ends by applying the site's config as it was when it
    started, so a change made meanwhile would be overwritten)."""
    return [("site", site_id), ("site_certificate", site_id)]


def needs_new_certificate(tls: bool, cert: dict[str, Any] | None, domains: tuple[str, ...]) -> bool:
    """A site serving HTTPS whose certificate does not cover exactly its names."""
    return tls and cert is not None and set(cert["domains"]) != set(domains)


def ftp_step(username: str) -> str:
    return f"ftp:{username}"


def days_left(not_after: datetime | None, now: datetime) -> int | None:
    if not_after is None:
        return None
    return int((not_after - now).total_seconds() // 86400)


def site_out(row: dict[str, Any], cert: dict[str, Any] | None, now: datetime) -> hm.SiteOut:
    summary = None
    if cert is not None:
        summary = hm.CertificateSummary(
            state=cert["state"],
            issuer=cert["issuer"],
            not_after=cert["not_after"],
            days_left=days_left(cert["not_after"], now),
            last_error=cert["last_error"],
        )
    return hm.SiteOut(
        id=row["id"],
        server_id=row["server_id"],
        kind=row["kind"],
        domains=list(row["domains"]),
        primary_domain=row["domains"][0],
        upstream=row["upstream"],
        redirects=[hm.RedirectOut(**r) for r in row["redirects"]],
        force_https=row["force_https"],
        tls=row["tls"],
        status=row["status"],
        workflow_id=row["workflow_id"],
        last_error=row["last_error"],
        document_root=row["document_root"],
        certificate=summary,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


async def _certificate(uow: UnitOfWork, site_id: uuid.UUID) -> dict[str, Any] | None:
    return await (
        await uow.conn.execute("SELECT * FROM site_certificates WHERE site_id = %s", (site_id,))
    ).fetchone()


async def _out(uow: UnitOfWork, site_id: uuid.UUID) -> hm.SiteOut:
    row = await load(uow, TABLE, site_id, "site")
    return site_out(row, await _certificate(uow, site_id), uow.clock.now())


async def _claim_domains(uow: UnitOfWork, site_id: uuid.UUID, domains: tuple[str, ...]) -> None:
    await uow.conn.execute("DELETE FROM site_domains WHERE site_id = %s", (site_id,))
    for position, domain in enumerate(domains):
        try:
            async with uow.conn.transaction():
                await uow.conn.execute(
                    "INSERT INTO site_domains (domain, tenant_id, site_id, position)"
                    " VALUES (%s, %s, %s, %s)",
                    (domain, uow.tenant_id, site_id, position),
                )
        except UniqueViolation:
            raise Problem(
                409,
                "domain_in_use",
                f"domain already in use: {domain} belongs to another site",
                field=f"domains[{position}]",
                domain=domain,
            ) from None


async def list_sites(
    db: Database, access: TenantAccess, limit: int, after: uuid.UUID | None
) -> list[hm.SiteOut]:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, READ, Resource("site"))
        rows = await (
            await uow.conn.execute(
                """SELECT * FROM sites WHERE tenant_id = %s AND (%s::uuid IS NULL OR id > %s)
                   ORDER BY id LIMIT %s""",
                (access.tenant_id, after, after, limit + 1),
            )
        ).fetchall()
        certs = {
            c["site_id"]: c
            for c in await (
                await uow.conn.execute(
                    "SELECT * FROM site_certificates WHERE site_id = ANY(%s)",
                    ([r["id"] for r in rows],),
                )
            ).fetchall()
        }
        now = uow.clock.now()
    return [site_out(r, certs.get(r["id"]), now) for r in rows]


async def get_site(db: Database, access: TenantAccess, site_id: uuid.UUID) -> hm.SiteOut:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, READ, Resource("site", site_id))
        return await _out(uow, site_id)


async def create_site(
    db: Database, box: SecretBox, access: TenantAccess, body: hm.SiteCreate
) -> hm.SiteOut:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, WRITE, Resource("sites", creating=True))
        spec = validate_spec(
            body.kind, body.domains, body.upstream, body.redirects, body.force_https
        )
        await require_server(uow, body.server_id)
        site_id = new_id()
        await uow.conn.execute(
            """INSERT INTO sites (id, tenant_id, server_id, kind, domains, upstream, redirects,
                   force_https) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)""",
            (
                site_id,
                access.tenant_id,
                body.server_id,
                spec.kind,
                list(spec.domains),
                spec.upstream,
                json.dumps(apply_payload(site_id, spec, False)["redirects"]),
                spec.force_https,
            ),
        )
        await _claim_domains(uow, site_id, spec.domains)
        step = StepSpec(
            "apply",
            body.server_id,
            "site.apply",
            apply_payload(site_id, spec, False),
            compensation=("site.remove", remove_payload(site_id)),
        )
        workflow_id = await start(uow, box, CREATE, "site", site_id, [step])
        await uow.conn.execute(
            "UPDATE sites SET workflow_id = %s WHERE id = %s", (workflow_id, site_id)
        )
        out = await _out(uow, site_id)
        await uow.record("site.created", "site", site_id, None, out.model_dump(mode="json"))
    return out


async def update_site(
    db: Database,
    box: SecretBox,
    settings: Settings,
    access: TenantAccess,
    site_id: uuid.UUID,
    body: hm.SiteUpdate,
) -> hm.SiteOut:
    """Store the new desired state and start `site.update`.

    When the names of a site that serves HTTPS change, the same workflow also orders a
    certificate for the new names: first the new config goes live with the old
    certificate (the old names keep working over HTTPS, and port 80 answers the new
    names' HTTP-01 challenges), then the engine issues and installs the new certificate,
    which nginx serves at once. If the order fails, the config change is undone, so the
    node keeps serving the old names with their valid certificate."""
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, WRITE, Resource("site", site_id))
        row = await load(uow, TABLE, site_id, "site", lock=True)
        cert = await _certificate(uow, site_id)
        before = site_out(row, cert, uow.clock.now())
        current = spec_of(row)
        fields = body.model_fields_set
        kind = body.kind if body.kind is not None else current.kind
        upstream = body.upstream if "upstream" in fields else current.upstream
        if "upstream" not in fields and kind != current.kind:
            upstream = None if kind == "static" else upstream
        spec = validate_spec(
            kind,
            body.domains if body.domains is not None else list(current.domains),
            upstream,
            body.redirects
            if body.redirects is not None
            else [hm.RedirectIn(source=s, target=t, code=c) for s, t, c in current.redirects],  # type: ignore[arg-type]
            body.force_https if body.force_https is not None else current.force_https,
        )
        # (After the grammar checks: a refused name is a 422 whatever runs.)
        await require_idle(uow, site_subjects(site_id))
        if row["status"] == "deleting":
            raise Problem(409, "site_deleting", "the site is being deleted; it cannot change")
        reissue = needs_new_certificate(row["tls"], cert, spec.domains)
        if spec == current and row["status"] != "failed" and not reissue:
            return before
        # (The same spec on a failed site applies it again: the way to retry.)
        if spec.domains != current.domains:
            await _claim_domains(uow, site_id, spec.domains)
        steps = [
            StepSpec(
                "apply",
                row["server_id"],
                "site.apply",
                apply_payload(site_id, spec, row["tls"]),
                compensation=("site.apply", apply_payload(site_id, current, row["tls"])),
            )
        ]
        if reissue:
            steps.append(
                StepSpec(
                    CERTIFICATE_STEP,
                    row["server_id"],
                    "site.certificate.issue",
                    issue_payload(
                        site_id,
                        spec.domains,
                        settings,
                        read_ca_bundle(settings.acme_ca_bundle),
                        force=False,
                    ),
                    timeout_s=ISSUE_TIMEOUT_S,
                )
            )
        workflow_id = await start(uow, box, UPDATE, "site", site_id, steps)
        await uow.conn.execute(
            """UPDATE sites SET kind = %s, domains = %s, upstream = %s, redirects = %s,
                   force_https = %s, status = 'provisioning', workflow_id = %s,
                   last_error = NULL, updated_at = now() WHERE id = %s""",
            (
                spec.kind,
                list(spec.domains),
                spec.upstream,
                json.dumps(apply_payload(site_id, spec, False)["redirects"]),
                spec.force_https,
                workflow_id,
                site_id,
            ),
        )
        after = await _out(uow, site_id)
        await uow.record(
            "site.updated",
            "site",
            site_id,
            before.model_dump(mode="json"),
            after.model_dump(mode="json"),
        )
    return after


async def delete_site(
    db: Database, box: SecretBox, access: TenantAccess, site_id: uuid.UUID, delete_files: bool
) -> hm.SiteOut:
    """Marks the site `deleting` and starts its removal (its FTP accounts first); the row
    goes when the node confirms. Asking again while it runs changes nothing."""
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, WRITE, Resource("site", site_id))
        row = await load(uow, TABLE, site_id, "site", lock=True)
        cert = await _certificate(uow, site_id)
        before = site_out(row, cert, uow.clock.now())
        if row["status"] == "deleting":
            return before
        # The accounts are locked too: a rotation or delete of one of them either ran
        # first (and is waited for below) or sees the account `deleting` afterwards.
        accounts = await (
            await uow.conn.execute(
                "SELECT id, username FROM ftp_accounts WHERE site_id = %s ORDER BY username"
                " FOR UPDATE",
                (site_id,),
            )
        ).fetchall()
        await require_idle(
            uow, site_subjects(site_id) + [("ftp_account", a["id"]) for a in accounts]
        )
        steps = [
            StepSpec(
                ftp_step(a["username"]),
                row["server_id"],
                "site.ftp.delete",
                {"username": a["username"]},
            )
            for a in accounts
        ]
        steps.append(
            StepSpec(
                "remove", row["server_id"], "site.remove", remove_payload(site_id, delete_files)
            )
        )
        workflow_id = await start(uow, box, DELETE, "site", site_id, steps)
        await uow.conn.execute(
            """UPDATE sites SET status = 'deleting', workflow_id = %s, last_error = NULL,
                   updated_at = now() WHERE id = %s""",
            (workflow_id, site_id),
        )
        await uow.conn.execute(
            "UPDATE ftp_accounts SET status = 'deleting', updated_at = now() WHERE site_id = %s",
            (site_id,),
        )
        after = await _out(uow, site_id)
        await uow.record(
            "site.delete_requested",
            "site",
            site_id,
            before.model_dump(mode="json"),
            after.model_dump(mode="json"),
        )
    return after


# --- workflow outcomes -------------------------------------------------------------------


async def on_applied(uow: UnitOfWork, outcome: WorkflowOutcome) -> None:
    row = await owned_row(uow, TABLE, outcome)
    if row is None:
        return
    if outcome.state == "succeeded":
        root = outcome.outputs.get("apply", {}).get("document_root")
        await uow.conn.execute(
            """UPDATE sites SET status = 'active', last_error = NULL,
                   document_root = coalesce(%s, document_root), updated_at = now()
               WHERE id = %s""",
            (root if isinstance(root, str) else None, row["id"]),
        )
        action = "site.applied"
        issued = outcome.outputs.get(CERTIFICATE_STEP)
        if isinstance(issued, dict) and issued.get("not_after"):
            # (Ordered for the site's names; a node that does not repeat them means those.)
            issued = {**issued, "domains": issued.get("domains") or list(row["domains"])}
            await _store_issued(uow, row["id"], outcome.workflow_id, issued)
    else:
        await set_status(uow, TABLE, row["id"], "failed", error_text(outcome))
        action = "site.apply_failed"
    after = await _out(uow, row["id"])
    await uow.record(action, "site", row["id"], None, after.model_dump(mode="json"))


async def _store_issued(
    uow: UnitOfWork, site_id: uuid.UUID, workflow_id: uuid.UUID, issued: dict[str, Any]
) -> None:
    """The certificate an update ordered for the site's new names is served now."""
    from controlplane.hosting.certificates import certificate_out  # (imports this module)

    now = uow.clock.now()
    before = await _certificate(uow, site_id)
    await uow.conn.execute(
        """UPDATE site_certificates SET state = 'valid', issuer = %s, serial = %s,
               not_before = %s, not_after = %s, domains = coalesce(%s, domains),
               workflow_id = %s, last_attempt_at = %s, last_error = NULL, updated_at = now()
           WHERE site_id = %s""",
        (
            issued.get("issuer"),
            issued.get("serial"),
            issued.get("not_before"),
            issued.get("not_after"),
            issued.get("domains"),
            workflow_id,
            now,
            site_id,
        ),
    )
    after = await _certificate(uow, site_id)
    assert after is not None
    action = "certificate.issued" if issued.get("issued") else "certificate.checked"
    await uow.record(
        action,
        "site_certificate",
        site_id,
        certificate_out(before, now).model_dump(mode="json") if before else None,
        certificate_out(after, now).model_dump(mode="json"),
    )


async def on_deleted(uow: UnitOfWork, outcome: WorkflowOutcome) -> None:
    row = await owned_row(uow, TABLE, outcome)
    if row is None:
        return
    before = await _out(uow, row["id"])
    if outcome.state == "succeeded":
        await delete_row(uow, TABLE, row["id"])
        await uow.record("site.deleted", "site", row["id"], before.model_dump(mode="json"), None)
        return
    await set_status(uow, TABLE, row["id"], "failed", error_text(outcome))
    # FTP accounts whose removal step finished are gone from the node; the others stay.
    accounts = await (
        await uow.conn.execute(
            "SELECT id, username FROM ftp_accounts WHERE site_id = %s AND status = 'deleting'",
            (row["id"],),
        )
    ).fetchall()
    for account in accounts:
        if ftp_step(account["username"]) in outcome.outputs:
            await delete_row(uow, "ftp_accounts", account["id"])
        else:
            await set_status(uow, "ftp_accounts", account["id"], "active", None)
    after = await _out(uow, row["id"])
    await uow.record(
        "site.delete_failed",
        "site",
        row["id"],
        before.model_dump(mode="json"),
        after.model_dump(mode="json"),
    )
