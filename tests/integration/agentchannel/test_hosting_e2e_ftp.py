"""FTP accounts end to end (issue #7): a site and its FTP account created through the API
are set up by a real agent (the `site` engine, configured through `YAKPANEL_SITE_*`) on a
real nginx and a real pure-ftpd; the tenant logs in with the password the API returned,
lands in the site's home, uploads a page that nginx then serves, and cannot leave.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ftplib
import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.runtime import AgentRuntime
from tests.support.hosting_node import hosting_agent, open_to_service_users, site_env
from tests.support.nginx import PrivateNginx
from tests.support.pureftpd import PureFtpd, PureFtpdUnavailable

from .conftest import Channel, eventually
from .test_hosting_e2e import get, nginx, serves, settled_site

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.kafka,
    pytest.mark.clickhouse,
    pytest.mark.nginx,
    pytest.mark.ftp,
]

__all__ = ["nginx"]  # the module-scoped fixture, used here too


@pytest.fixture(scope="module")
def ftpd(tmp_path_factory: pytest.TempPathFactory, nginx: PrivateNginx) -> Iterator[PureFtpd]:
    # pure-ftpd drops to the FTP system account, which must reach the sites' homes.
    open_to_service_users(nginx.root)
    server = PureFtpd(tmp_path_factory.mktemp("e2e-ftpd"))
    try:
        server.start()
    except PureFtpdUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture
async def node(
    channel: Channel, nginx: PrivateNginx, ftpd: PureFtpd, tmp_path: Path
) -> AsyncIterator[tuple[str, AgentRuntime]]:
    settings = dataclasses.replace(
        nginx.settings(),
        ftp_passwd_file=ftpd.passwd_file,
        ftp_db_file=ftpd.db_file,
        ftp_system_user="www-data",
    )
    async with hosting_agent(
        channel, channel.tenant, "ftp-node", tmp_path / "agent", site_env(settings)
    ) as running:
        yield running


async def new_site(channel: Channel, server_id: str, domain: str) -> dict[str, Any]:
    r = await channel.tenant.owner.post(
        f"/v1/tenants/{channel.tenant.id}/sites",
        json={"server_id": server_id, "kind": "static", "domains": [domain]},
    )
    assert r.status_code == 202, r.text
    site = await settled_site(channel, r.json()["id"])
    assert site["status"] == "active", site
    return site


def login(ftpd: PureFtpd, user: str, password: str) -> ftplib.FTP:
    ftp = ftpd.connect()
    ftp.login(user, password)
    return ftp


def names(ftp: ftplib.FTP) -> list[str]:
    return sorted(n for n in ftp.nlst() if n not in (".", ".."))


def session(ftpd: PureFtpd, user: str, password: str, other_site_id: str) -> dict[str, Any]:
    """What the account sees and can do, from a real FTP client."""
    ftp = login(ftpd, user, password)
    seen: dict[str, Any] = {}
    try:
        seen["pwd"] = ftp.pwd()
        seen["top"] = names(ftp)
        ftp.cwd("public")
        seen["public"] = names(ftp)
        page = io.BytesIO()
        ftp.retrbinary("RETR index.html", page.write)
        seen["index"] = page.getvalue().decode()
        ftp.storbinary("STOR index.html", io.BytesIO(b"<h1>uploaded over FTP</h1>\n"))
        # Escapes: up past the root, absolute paths, the other site's home.
        ftp.cwd("/")
        ftp.cwd("../../..")
        seen["after_dotdot"] = (ftp.pwd(), names(ftp))
        escapes = []
        for target in (f"/../{other_site_id}", f"../{other_site_id}/public", "/etc", "/tmp"):
            try:
                ftp.cwd(target)
                escapes.append((target, ftp.pwd(), names(ftp)))
                ftp.cwd("/")
            except ftplib.error_perm:
                pass
        seen["escapes"] = escapes
    finally:
        ftp.quit()
    return seen


async def test_an_ftp_account_works_in_its_site_and_cannot_leave_it(
    channel: Channel, node: tuple[str, AgentRuntime], nginx: PrivateNginx, ftpd: PureFtpd
) -> None:
    server_id, _ = node
    site = await new_site(channel, server_id, "files.example.test")
    other = await new_site(channel, server_id, "neighbour.example.test")
    settings = nginx.settings()
    (settings.document_root(other["id"]) / "secret.txt").write_text("the neighbour's secret\n")

    r = await channel.tenant.owner.post(
        f"/v1/tenants/{channel.tenant.id}/sites/{site['id']}/ftp-accounts",
        json={"username": "files-deploy"},
    )
    assert r.status_code == 202, r.text
    created = r.json()
    password = created["password"]
    accounts = f"/sites/{site['id']}/ftp-accounts"

    async def account() -> dict[str, Any]:
        listed = await channel.tenant.owner.get(f"/v1/tenants/{channel.tenant.id}{accounts}")
        assert listed.status_code == 200, listed.text
        [row] = [a for a in listed.json() if a["id"] == created["id"]]
        out: dict[str, Any] = row
        return out

    row = await eventually(account, lambda a: a["status"] in ("active", "failed"), 60)
    assert row["status"] == "active", row
    assert row["home"] == str(settings.site_dir(site["id"]))
    workflow = await get(channel, f"/workflows/{created['workflow_id']}")
    assert workflow["state"] == "succeeded", workflow

    seen = await asyncio.to_thread(session, ftpd, "files-deploy", password, other["id"])

    assert seen["pwd"] == "/"
    assert "public" in seen["top"]
    assert seen["public"] == ["index.html"]
    assert "<h1>files.example.test</h1>" in seen["index"]
    assert seen["after_dotdot"][0] == "/"
    assert "public" in seen["after_dotdot"][1]
    for target, where, listing in seen["escapes"]:
        assert "secret.txt" not in listing, (target, where, listing)
        assert "passwd" not in listing, (target, where, listing)
    # The upload is the site: nginx serves what the account wrote.
    await serves(nginx, "files.example.test", 200, "uploaded over FTP")
    assert (settings.document_root(other["id"]) / "secret.txt").exists()

    # A wrong password is refused.
    with pytest.raises(ftplib.error_perm):
        await asyncio.to_thread(login, ftpd, "files-deploy", password + "x")
