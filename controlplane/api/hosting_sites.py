"""Sites, their certificates and FTP accounts. Reads need `sites:read`, writes
`sites:write`. Writes answer 202: the desired state is stored and a workflow started;
`status` and `workflow_id` follow it."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Path, Query

from controlplane.api.common import AUTHED, WRITES, Cursor, Limit, after
from controlplane.api.deps import ControlPlaneDep, TenantScope
from controlplane.api.models import Page, page_of
from controlplane.hosting import certificates, ftp, sites
from controlplane.hosting import models as hm

router = APIRouter(prefix="/v1/tenants/{tenant_id}/sites", tags=["sites"])

SiteId = Annotated[uuid.UUID, Path(description="the site")]
AccountId = Annotated[uuid.UUID, Path(description="the FTP account")]


@router.get("", responses=AUTHED)
async def list_sites(
    access: TenantScope, cp: ControlPlaneDep, limit: Limit = 50, cursor: Cursor = None
) -> Page[hm.SiteOut]:
    items = await sites.list_sites(cp.db, access, limit, after(cursor))
    return page_of(items, limit, lambda s: s.id)


@router.post("", status_code=202, responses=WRITES)
async def create_site(access: TenantScope, body: hm.SiteCreate, cp: ControlPlaneDep) -> hm.SiteOut:
    """A new site (counts against `max_sites`). Names that break a grammar: 422
    `invalid_input` naming the `field`; a domain another site has: 409 `domain_in_use`."""
    return await sites.create_site(cp.db, cp.secrets, access, body)


@router.get("/{site_id}", responses=AUTHED)
async def get_site(access: TenantScope, site_id: SiteId, cp: ControlPlaneDep) -> hm.SiteOut:
    return await sites.get_site(cp.db, access, site_id)


@router.patch("/{site_id}", status_code=202, responses=WRITES)
async def update_site(
    access: TenantScope, site_id: SiteId, body: hm.SiteUpdate, cp: ControlPlaneDep
) -> hm.SiteOut:
    """Change kind, upstream, domains, redirects or force_https: a new `site.apply` (and,
    when the names of a site serving HTTPS change, a certificate for the new names).
    While a workflow of the site or its certificate runs: 409 `resource_busy`."""
    return await sites.update_site(cp.db, cp.secrets, cp.settings, access, site_id, body)


@router.delete("/{site_id}", status_code=202, responses=WRITES)
async def delete_site(
    access: TenantScope,
    site_id: SiteId,
    cp: ControlPlaneDep,
    delete_files: Annotated[
        bool, Query(description="also delete the document root on the node")
    ] = False,
) -> hm.SiteOut:
    """The site turns `deleting`; it disappears when the node has removed it."""
    return await sites.delete_site(cp.db, cp.secrets, access, site_id, delete_files)


# --- certificate -----------------------------------------------------------------------------


@router.post("/{site_id}/certificate", status_code=202, responses=WRITES)
async def request_certificate(
    access: TenantScope,
    site_id: SiteId,
    cp: ControlPlaneDep,
    body: Annotated[hm.CertificateRequest | None, Body()] = None,
) -> hm.CertificateOut:
    """Issue (or re-issue with `force`) a certificate for the site's domains via ACME,
    then serve HTTPS with it. The site must be `active` (409 `site_not_active`), with no
    workflow of it running (409 `resource_busy`). Also the way to retry a `failed` one."""
    return await certificates.request_certificate(
        cp.db, cp.secrets, cp.settings, access, site_id, body or hm.CertificateRequest(force=False)
    )


@router.get("/{site_id}/certificate", responses=AUTHED)
async def get_certificate(
    access: TenantScope, site_id: SiteId, cp: ControlPlaneDep
) -> hm.CertificateOut:
    return await certificates.get_certificate(cp.db, access, site_id)


# --- FTP accounts ----------------------------------------------------------------------------


@router.get("/{site_id}/ftp-accounts", responses=AUTHED)
async def list_ftp_accounts(
    access: TenantScope, site_id: SiteId, cp: ControlPlaneDep
) -> list[hm.FtpAccountOut]:
    return await ftp.list_accounts(cp.db, access, site_id)


@router.post("/{site_id}/ftp-accounts", status_code=202, responses=WRITES)
async def create_ftp_account(
    access: TenantScope, site_id: SiteId, body: hm.FtpAccountCreate, cp: ControlPlaneDep
) -> hm.FtpAccountCreated:
    """The password (given, or generated) is in this response only; it is stored sealed."""
    return await ftp.create_account(cp.db, cp.secrets, access, site_id, body)


@router.post("/{site_id}/ftp-accounts/{ftp_account_id}/password", status_code=202, responses=WRITES)
async def rotate_ftp_password(
    access: TenantScope,
    site_id: SiteId,
    ftp_account_id: AccountId,
    body: hm.PasswordRotate,
    cp: ControlPlaneDep,
) -> hm.PasswordRotated:
    """A new password (given, or generated), shown once."""
    return await ftp.rotate_password(cp.db, cp.secrets, access, site_id, ftp_account_id, body)


@router.delete("/{site_id}/ftp-accounts/{ftp_account_id}", status_code=202, responses=WRITES)
async def delete_ftp_account(
    access: TenantScope, site_id: SiteId, ftp_account_id: AccountId, cp: ControlPlaneDep
) -> hm.FtpAccountOut:
    return await ftp.delete_account(cp.db, cp.secrets, access, site_id, ftp_account_id)
