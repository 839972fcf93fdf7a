"""FTP accounts against a real pure-ftpd: log in with ftplib, stay inside the site.

`pure-pw` runs through a tiny wrapper that records its argv, so the tests can prove
that passwords never reach the command line (where /proc shows them to everyone).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ftplib
import io
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from engines.base import CommandContext, EngineError
from engines.site.config import SiteSettings
from engines.site.ftp import FtpAccounts
from tests.support.pureftpd import PureFtpd
from yakpanel.clock import SystemClock

pytestmark = pytest.mark.ftp


@dataclass
class Env:
    settings: SiteSettings
    server: PureFtpd
    argv_log: Path

    def accounts(self) -> FtpAccounts:
        return FtpAccounts(self.settings)

    def new_site(self) -> tuple[str, Path]:
        site_id = str(uuid.uuid4())
        home = self.settings.site_dir(site_id)
        self.settings.document_root(site_id).mkdir(parents=True)
        (self.settings.document_root(site_id) / "index.html").write_text(f"site {site_id}")
        return site_id, home

    def login(self, user: str, password: str) -> ftplib.FTP:
        ftp = self.server.connect()
        try:
            ftp.login(user, password)
        except BaseException:
            ftp.close()
            raise
        return ftp

    def works(self, user: str, password: str) -> bool:
        self.login(user, password).quit()
        return True

    def refused(self, user: str, password: str) -> bool:
        try:
            self.login(user, password).quit()
        except ftplib.error_perm:
            return True
        return False


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("ftp")
    # pure-ftpd drops to the FTP system account; it must be able to reach the homes.
    for path in [root, *root.parents]:
        if os.geteuid() == 0 and not path.stat().st_mode & 0o001:
            path.chmod(path.stat().st_mode | 0o001)
    pure_pw = shutil.which("pure-pw")
    if pure_pw is None:
        pytest.fail("pure-pw is required: apt-get install pure-ftpd", pytrace=False)
    argv_log = root / "pure-pw-argv.log"
    wrapper = root / "pure-pw-wrapper"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {argv_log}\nexec {pure_pw} "$@"\n')
    wrapper.chmod(0o755)
    server = PureFtpd(root / "ftpd")
    try:
        server.start()
    except Exception as exc:
        pytest.fail(f"pure-ftpd did not start: {exc}", pytrace=False)
    settings = SiteSettings(
        sites_root=root / "www",
        conf_dir=root / "conf",
        certs_dir=root / "certs",
        acme_webroot=root / "acme",
        pure_pw=str(wrapper),
        ftp_passwd_file=server.passwd_file,
        ftp_db_file=server.db_file,
        ftp_system_user="www-data",
    )
    yield Env(settings, server, argv_log)
    server.stop()


def ctx() -> CommandContext:
    async def report(percent: int, message: str) -> None:
        pass

    return CommandContext(
        command_id=str(uuid.uuid4()),
        idempotency_key=str(uuid.uuid4()),
        deadline=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5),
        clock=SystemClock(),
        report=report,
    )


def user() -> str:
    return f"u{uuid.uuid4().hex[:10]}"


PASSWORD = "Corr3ct-Horse-Battery"


async def test_account_logs_in_and_cannot_leave_its_site(env: Env) -> None:
    site_id, home = env.new_site()
    other_id, other_home = env.new_site()
    (other_home / "secret.txt").write_text("other tenant")
    name = user()

    out = await env.accounts().create(
        ctx(), {"site_id": site_id, "username": name, "password": PASSWORD}
    )

    assert out == {"username": name, "home": str(home)}
    ftp = env.login(name, PASSWORD)
    try:
        assert ftp.pwd() == "/"
        top = sorted(ftp.nlst())
        assert "public" in top
        ftp.cwd("public")
        ftp.storbinary("STOR upload.txt", io.BytesIO(b"hello from ftp"))
        assert "upload.txt" in ftp.nlst()
        assert (home / "public" / "upload.txt").read_bytes() == b"hello from ftp"
        # The page the node put there first (as the agent's user) can be replaced.
        ftp.storbinary("STOR index.html", io.BytesIO(b"my own page"))
        assert (home / "public" / "index.html").read_bytes() == b"my own page"

        for escape in ("../../..", "/", "../../../../../../.."):
            ftp.cwd(escape)
            assert ftp.pwd() == "/"
            assert sorted(ftp.nlst()) == top
        assert "secret.txt" not in " ".join(top)
        with pytest.raises(ftplib.error_perm):
            ftp.cwd(str(other_home))
        with pytest.raises(ftplib.error_perm):
            ftp.retrbinary(f"RETR ../{other_id}/secret.txt", lambda _: None)
        with pytest.raises(ftplib.error_perm):
            ftp.retrbinary("RETR /etc/passwd", lambda _: None)
    finally:
        ftp.quit()


async def test_rotation_and_delete_lock_out_old_credentials(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    site_id, _ = env.new_site()
    name = user()
    first, second, third = "Canary-Secret-One1", "Canary-Secret-Two2", "Canary-Secret-Three3"
    accounts = env.accounts()
    outputs = [
        await accounts.create(ctx(), {"site_id": site_id, "username": name, "password": first}),
        await accounts.password(ctx(), {"username": name, "password": second}),
    ]
    assert outputs[1] == {"username": name}

    # pure-ftpd makes every login slow on purpose (password hashing, a delay after a
    # failure); check the old and the new password at the same time.
    old_refused, new_works = await asyncio.gather(
        asyncio.to_thread(env.refused, name, first), asyncio.to_thread(env.works, name, second)
    )
    assert old_refused
    assert new_works

    # Creating the same account for the same site again is a password change.
    outputs.append(
        await accounts.create(ctx(), {"site_id": site_id, "username": name, "password": third})
    )
    assert outputs[2]["username"] == name
    assert env.works(name, third)

    outputs.append(await accounts.delete(ctx(), {"username": name}))
    assert outputs[3] == {"username": name, "deleted": True}
    assert env.refused(name, third)
    assert await accounts.delete(ctx(), {"username": name}) == {
        "username": name,
        "deleted": False,
    }

    # The passwords went to pure-pw on stdin only: not in argv (world-readable through
    # /proc), not in logs, not in any output.
    recorded = env.argv_log.read_text()
    assert f"passwd {name}" in recorded  # the wrapper really saw the commands
    assert name in caplog.text
    for secret in (first, second, third):
        assert secret not in caplog.text
        assert secret not in json.dumps(outputs)
        assert secret not in recorded


async def test_a_name_cannot_be_moved_to_another_site(env: Env) -> None:
    site_id, home = env.new_site()
    other_id, _ = env.new_site()
    name = user()
    accounts = env.accounts()
    await accounts.create(ctx(), {"site_id": site_id, "username": name, "password": PASSWORD})
    record = account_record(env, name)
    assert f":{home}/./:" in record

    with pytest.raises(EngineError) as failure:
        await accounts.create(
            ctx(), {"site_id": other_id, "username": name, "password": "Hijack-Attempt-1"}
        )

    assert failure.value.code == "ftp_user_taken"
    # Same home, same password hash: the account is exactly as it was.
    assert account_record(env, name) == record


def account_record(env: Env, name: str) -> str:
    lines = env.settings.ftp_passwd_file.read_text().splitlines()
    return next(line for line in lines if line.startswith(f"{name}:"))


async def test_password_of_a_missing_account_fails_clearly(env: Env) -> None:
    with pytest.raises(EngineError) as failure:
        await env.accounts().password(ctx(), {"username": user(), "password": PASSWORD})
    assert failure.value.code == "ftp_user_missing"
    assert PASSWORD not in failure.value.message


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"username": "ab"}, "username"),
        ({"username": "Admin"}, "username"),
        ({"username": "a;b-user"}, "username"),
        ({"username": "bob user"}, "username"),
        ({"username": "user\nroot"}, "username"),
        ({"username": "../../etc"}, "username"),
        ({"username": "us\u0435r-one"}, "username"),  # Cyrillic small ie, a look-alike
        ({"password": "short"}, "password"),
        ({"password": "has space in it"}, "password"),
        ({"password": "line\nbreak-password"}, "password"),
        ({"password": "x" * 129}, "password"),
        ({"password": 123456789012345}, "password"),
        ({"site_id": "../other"}, "site_id"),
        ({"home": "/etc"}, "home"),
    ],
)
async def test_bad_input_is_refused_before_pure_pw_runs(
    env: Env, change: dict[str, Any], field: str
) -> None:
    site_id, _ = env.new_site()
    payload = {"site_id": site_id, "username": user(), "password": PASSWORD, **change}
    passwd_before = env.settings.ftp_passwd_file.read_bytes()
    argv_before = env.argv_log.read_text() if env.argv_log.exists() else ""

    with pytest.raises(EngineError) as failure:
        await env.accounts().create(ctx(), payload)

    assert failure.value.code == "invalid_payload"
    assert field in failure.value.message
    assert str(change.get("password", "\0")) not in failure.value.message
    assert env.settings.ftp_passwd_file.read_bytes() == passwd_before
    assert (env.argv_log.read_text() if env.argv_log.exists() else "") == argv_before
