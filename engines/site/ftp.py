"""FTP accounts for sites: pure-ftpd virtual users, each chrooted to its site's home.

Accounts live in pure-ftpd's passwd file and are compiled into the puredb that the
server reads at every login, so a change takes effect without restarting pure-ftpd.
Every virtual user maps to one unprivileged system account (`ftp_system_user`); the
chroot (`-d`, and pure-ftpd's `-A`) is what keeps one site's account out of another's
files, so the home is always `<sites_root>/<site_id>` and never taken from the payload.

Passwords reach `pure-pw` on stdin only: argv is readable by every local user through
/proc, and the password must not appear in logs, errors or outputs either.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import pwd
import stat
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from engines.base import CommandContext, CommandSpec, EngineError, parse_payload
from engines.site.config import SiteSettings
from yakpanel import identifiers

log = logging.getLogger(__name__)

PURE_PW_TIMEOUT_S = 60.0
# The default page `site.apply` writes into an empty document root (engines.site.engine).
PLACEHOLDER_PAGE = "index.html"


def _site_id(value: str) -> str:
    try:
        canonical = str(uuid.UUID(value))
    except ValueError:
        raise ValueError("site_id must be a UUID such as 0b6f…-…") from None
    if canonical != value:
        raise ValueError("site_id must be a lowercase, hyphenated UUID")
    return value


class _UserField(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str

    @field_validator("username")
    @classmethod
    def _username(cls, value: str) -> str:
        return identifiers.ftp_user(value)


class _PasswordField(_UserField):
    password: str

    @field_validator("password")
    @classmethod
    def _password(cls, value: str) -> str:
        return identifiers.password(value)


class _CreatePayload(_PasswordField):
    site_id: str

    _check_site = field_validator("site_id")(_site_id)


class FtpAccounts:
    """`site.ftp.create`, `site.ftp.password` and `site.ftp.delete`."""

    def __init__(self, settings: SiteSettings) -> None:
        self._settings = settings
        self._lock = asyncio.Lock()

    def commands(self) -> dict[str, CommandSpec]:
        return {
            "site.ftp.create": CommandSpec(
                self.create,
                idempotent=True,
                description=(
                    "Create an FTP account locked into the site's home, or set its password "
                    "if it already exists for that site."
                ),
            ),
            "site.ftp.password": CommandSpec(
                self.password,
                idempotent=True,
                description="Set a new password for an FTP account; the old one stops working.",
            ),
            "site.ftp.delete": CommandSpec(
                self.delete,
                idempotent=True,
                description="Delete an FTP account; deleting a missing account succeeds.",
            ),
        }

    async def create(self, ctx: CommandContext, payload: dict[str, Any]) -> dict[str, Any]:
        req = parse_payload(_CreatePayload, payload)
        home = self._settings.site_dir(req.site_id)
        uid, gid = self._system_ids()
        async with self._locked():
            existing = self._home_of(req.username)
            if existing is None:
                _prepare_home(home, self._settings.document_root(req.site_id), uid, gid)
                argv = ["useradd", req.username, "-f", str(self._settings.ftp_passwd_file)]
                argv += ["-u", str(uid), "-g", str(gid), "-d", str(home)]
                await self._pure_pw(argv, req.password)
                action = "created"
            elif existing == home:
                _prepare_home(home, self._settings.document_root(req.site_id), uid, gid)
                await self._set_password(req.username, req.password)
                action = "updated"
            else:
                raise EngineError(
                    "ftp_user_taken",
                    f"the FTP user name {req.username!r} already belongs to another site; "
                    "choose another name",
                )
            await self._mkdb()
        log.info("FTP account %s %s for site %s", req.username, action, req.site_id)
        return {"username": req.username, "home": str(home)}

    async def password(self, ctx: CommandContext, payload: dict[str, Any]) -> dict[str, Any]:
        req = parse_payload(_PasswordField, payload)
        async with self._locked():
            if self._home_of(req.username) is None:
                raise EngineError(
                    "ftp_user_missing",
                    f"there is no FTP account {req.username!r}; create it with site.ftp.create",
                )
            await self._set_password(req.username, req.password)
            await self._mkdb()
        log.info("FTP account %s: password changed", req.username)
        return {"username": req.username}

    async def delete(self, ctx: CommandContext, payload: dict[str, Any]) -> dict[str, Any]:
        req = parse_payload(_UserField, payload)
        async with self._locked():
            if self._home_of(req.username) is None:
                return {"username": req.username, "deleted": False}
            await self._pure_pw(
                ["userdel", req.username, "-f", str(self._settings.ftp_passwd_file)], None
            )
            await self._mkdb()
        log.info("FTP account %s deleted", req.username)
        return {"username": req.username, "deleted": True}

    # --- helpers ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """One writer at a time, in this process (asyncio) and across processes (flock)."""
        passwd = self._settings.ftp_passwd_file
        passwd.parent.mkdir(parents=True, exist_ok=True)
        async with self._lock:
            fd = os.open(passwd.with_name(passwd.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing drops the flock

    def _system_ids(self) -> tuple[int, int]:
        name = self._settings.ftp_system_user
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise EngineError(
                "ftp_system_user_missing",
                f"the system account {name!r} that FTP users map to does not exist on this "
                "node; create it or set YAKPANEL_SITE_FTP_SYSTEM_USER",
            ) from None
        if entry.pw_uid == 0:
            raise EngineError(
                "ftp_system_user_invalid",
                f"FTP users must not map to root ({name!r}); set an unprivileged account",
            )
        return entry.pw_uid, entry.pw_gid

    def _home_of(self, username: str) -> Path | None:
        """The account's home from the passwd file (`name:hash:uid:gid:gecos:home/./:…`)."""
        try:
            lines = self._settings.ftp_passwd_file.read_text().splitlines()
        except FileNotFoundError:
            return None
        for line in lines:
            fields = line.split(":")
            if fields[0] == username and len(fields) > 5:
                return Path(fields[5].removesuffix("/./").rstrip("/") or "/")
        return None

    async def _set_password(self, username: str, password: str) -> None:
        await self._pure_pw(
            ["passwd", username, "-f", str(self._settings.ftp_passwd_file)], password
        )

    async def _mkdb(self) -> None:
        await self._pure_pw(
            [
                "mkdb",
                str(self._settings.ftp_db_file),
                "-f",
                str(self._settings.ftp_passwd_file),
            ],
            None,
        )

    async def _pure_pw(self, args: list[str], password: str | None) -> None:
        """Run pure-pw; a password goes to stdin twice (entry and confirmation)."""
        stdin = f"{password}\n{password}\n".encode() if password is not None else b""
        try:
            proc = await asyncio.create_subprocess_exec(
                self._settings.pure_pw,
                *args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError:
            raise EngineError(
                "ftp_unavailable",
                f"{self._settings.pure_pw!r} was not found; install pure-ftpd on this node "
                "or set YAKPANEL_SITE_PURE_PW",
            ) from None
        try:
            _, stderr = await asyncio.wait_for(proc.communicate(stdin), PURE_PW_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise EngineError(
                "ftp_failed", f"pure-pw {args[0]} did not finish in time", retryable=True
            ) from None
        if proc.returncode != 0:
            detail = " / ".join(
                line.strip() for line in stderr.decode(errors="replace").splitlines()[:3]
            )
            if password is not None:
                detail = detail.replace(password, "***")
            raise EngineError(
                "ftp_failed",
                f"pure-pw {args[0]} failed with exit code {proc.returncode}: {detail}",
                retryable=True,
            )


def _prepare_home(home: Path, document_root: Path, uid: int, gid: int) -> None:
    """Make the home exist and let the FTP system account write into it and its web root.

    Only these two directories change owner (never recursively, never through a
    symlink), so existing files keep theirs, with one exception: the placeholder page
    the engine itself wrote (`site.apply`, as the agent's user). The page tells the user
    to replace it by uploading their own, and an upload over a file the account cannot
    write fails with "Permission denied", so it is handed over when it is still a plain,
    singly linked file owned by the agent.
    """
    home.mkdir(mode=0o755, parents=True, exist_ok=True)
    for directory in (home, document_root):
        if directory.is_symlink():
            raise EngineError(
                "ftp_home_invalid",
                f"{directory} is a symlink; a site's home and web root must be real directories",
            )
        if directory.is_dir():
            os.chown(directory, uid, gid, follow_symlinks=False)
    placeholder = document_root / PLACEHOLDER_PAGE
    with contextlib.suppress(FileNotFoundError):
        st = placeholder.lstat()
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid():
            os.chown(placeholder, uid, gid, follow_symlinks=False)
