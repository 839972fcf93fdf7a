"""FTP accounts of a site: pure-ftpd virtual users chrooted to the site's directory."""

from __future__ import annotations

import uuid
from typing import Any

from psycopg.errors import UniqueViolation

from controlplane.access.policy import Resource, authorize, not_found
from controlplane.access.principal import TenantAccess
from controlplane.db import Database, UnitOfWork
from controlplane.hosting import models as hm
from controlplane.hosting.common import (
    checked,
    invalid,
    load,
    new_password,
    require_settled,
    secret,
)
from controlplane.hosting.common import seal_password as _seal
from controlplane.hosting.credentials import CredentialKind
from controlplane.hosting.sites import READ, WRITE
from controlplane.problems import Problem
from controlplane.workflows import StepSpec, WorkflowOutcome
from yakpanel import identifiers
from yakpanel.ids import new_id
from yakpanel.secretbox import SecretBox

TABLE = "ftp_accounts"


def account_out(row: dict[str, Any]) -> hm.FtpAccountOut:
    return hm.FtpAccountOut(
        id=row["id"],
        site_id=row["site_id"],
        server_id=row["server_id"],
        username=row["username"],
        home=row["home"],
        status=row["status"],
        workflow_id=row["workflow_id"],
        last_error=row["last_error"],
        password_rotated_at=row["password_rotated_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


async def _home(uow: UnitOfWork, row: dict[str, Any], outcome: WorkflowOutcome) -> None:
    home = outcome.outputs.get("create", {}).get("home")
    if isinstance(home, str):
        await uow.conn.execute("UPDATE ftp_accounts SET home = %s WHERE id = %s", (home, row["id"]))


FTP = CredentialKind(TABLE, "ftp_account", "FTP account", account_out, _home)


async def _account(uow: UnitOfWork, site_id: uuid.UUID, account_id: uuid.UUID) -> dict[str, Any]:
    await load(uow, "sites", site_id, "site")
    row = await load(uow, TABLE, account_id, "FTP account", lock=True)
    if row["site_id"] != site_id:
        raise not_found("FTP account")
    return row


async def list_accounts(
    db: Database, access: TenantAccess, site_id: uuid.UUID
) -> list[hm.FtpAccountOut]:
    async with db.unit_of_work(access.actor(), access.tenant_id, access.staff_read) as uow:
        await authorize(uow, access, READ, Resource("ftp_account"))
        await load(uow, "sites", site_id, "site")
        rows = await (
            await uow.conn.execute(
                "SELECT * FROM ftp_accounts WHERE site_id = %s AND tenant_id = %s"
                " ORDER BY username",
                (site_id, access.tenant_id),
            )
        ).fetchall()
    return [account_out(r) for r in rows]


async def create_account(
    db: Database,
    box: SecretBox,
    access: TenantAccess,
    site_id: uuid.UUID,
    body: hm.FtpAccountCreate,
) -> hm.FtpAccountCreated:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, WRITE, Resource("ftp_accounts", creating=True))
        username = checked(identifiers.ftp_user, body.username, "username")
        if ".." in username:
            # Path-like names are refused: the name is also a label in pure-ftpd's files.
            raise invalid("username", "username must not contain '..'")
        password = new_password(body.password)
        site = await load(uow, "sites", site_id, "site", lock=True)
        if site["status"] == "deleting":
            raise Problem(409, "site_deleting", "the site is being deleted")
        account_id = new_id()
        try:
            async with uow.conn.transaction():
                await uow.conn.execute(
                    """INSERT INTO ftp_accounts (id, tenant_id, site_id, server_id, username,
                           password_sealed) VALUES (%s, %s, %s, %s, %s, %s)""",
                    (
                        account_id,
                        access.tenant_id,
                        site_id,
                        site["server_id"],
                        username,
                        _seal(box, TABLE, account_id, password),
                    ),
                )
        except UniqueViolation:
            raise Problem(
                409,
                "conflict",
                f"the server already has an FTP account named {username}",
                field="username",
            ) from None
        step = StepSpec(
            "create",
            site["server_id"],
            "site.ftp.create",
            {"site_id": str(site_id), "username": username, "password": secret(password)},
            compensation=("site.ftp.delete", {"username": username}),
        )
        await FTP.started(uow, box, FTP.create_kind, account_id, step)
        out = account_out(await load(uow, TABLE, account_id, "FTP account"))
        await uow.record(
            "ftp_account.created", "ftp_account", account_id, None, out.model_dump(mode="json")
        )
    return hm.FtpAccountCreated(**out.model_dump(), password=password)


async def rotate_password(
    db: Database,
    box: SecretBox,
    access: TenantAccess,
    site_id: uuid.UUID,
    account_id: uuid.UUID,
    body: hm.PasswordRotate,
) -> hm.PasswordRotated:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, WRITE, Resource("ftp_account", account_id))
        password = new_password(body.password)
        row = await _account(uow, site_id, account_id)
        require_settled(row, "FTP account")
        step = StepSpec(
            "password",
            row["server_id"],
            "site.ftp.password",
            {"username": row["username"], "password": secret(password)},
        )
        workflow_id = await FTP.rotate(uow, box, row, password, step)
    return hm.PasswordRotated(id=account_id, workflow_id=workflow_id, password=password)


async def delete_account(
    db: Database, box: SecretBox, access: TenantAccess, site_id: uuid.UUID, account_id: uuid.UUID
) -> hm.FtpAccountOut:
    async with db.unit_of_work(access.actor(), access.tenant_id) as uow:
        await authorize(uow, access, WRITE, Resource("ftp_account", account_id))
        row = await _account(uow, site_id, account_id)
        if row["status"] == "deleting":
            return account_out(row)
        step = StepSpec(
            "delete", row["server_id"], "site.ftp.delete", {"username": row["username"]}
        )
        out = await FTP.delete(uow, box, row, step)
    assert isinstance(out, hm.FtpAccountOut)
    return out
