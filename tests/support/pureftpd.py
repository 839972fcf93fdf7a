"""A private pure-ftpd on loopback with a puredb of virtual users, for tests.

The passwd file and its puredb live in a temp dir; `FtpAccounts` edits them with
`pure-pw` and pure-ftpd re-reads the puredb on every login, so accounts created by a
test are usable at once. `-A` chroots every user into their home, `-E` refuses
anonymous logins, `-j` creates a missing home, and passive mode is pinned to loopback
and a small free port range.
"""

from __future__ import annotations

import contextlib
import ftplib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from yakpanel.embedded import free_port

PURE_FTPD = "/usr/sbin/pure-ftpd"
PURE_PW = "pure-pw"


class PureFtpdUnavailable(RuntimeError):
    """pure-ftpd or pure-pw is missing or the server did not come up."""


def _free_port_range(size: int) -> tuple[int, int]:
    """A run of `size` consecutive free ports, for passive data connections."""
    for _ in range(50):
        low = free_port()
        if low + size > 65535:
            continue
        ok = True
        for port in range(low, low + size):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return low, low + size - 1
    raise PureFtpdUnavailable("no run of free loopback ports for passive FTP")


class PureFtpd:
    """`start()` launches pure-ftpd in the foreground; `stop()` ends it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.passwd_file = root / "pureftpd.passwd"
        self.db_file = root / "pureftpd.pdb"
        self.log_file = root / "pure-ftpd.log"
        self.host = "127.0.0.1"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        binary = shutil.which(PURE_FTPD) or shutil.which("pure-ftpd")
        if binary is None or shutil.which(PURE_PW) is None:
            raise PureFtpdUnavailable(
                "pure-ftpd and pure-pw are required: apt-get install pure-ftpd"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self.passwd_file.touch(mode=0o600)
        # An empty puredb so the server starts before the first account exists.
        subprocess.run(
            [PURE_PW, "mkdb", str(self.db_file), "-f", str(self.passwd_file)],
            check=True,
            capture_output=True,
        )
        self.port = free_port()
        low, high = _free_port_range(10)
        argv = [
            binary,
            "-l",
            f"puredb:{self.db_file}",
            "-S",
            f"{self.host},{self.port}",
            "-E",
            "-A",
            "-j",
            "-p",
            f"{low}:{high}",
            "-P",
            self.host,
        ]
        log = self.log_file.open("ab")
        self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PureFtpdUnavailable(
                    f"pure-ftpd exited with {self._proc.returncode}: "
                    f"{self.log_file.read_text(errors='replace')[-2000:]}"
                )
            try:
                with ftplib.FTP() as ftp:  # noqa: S321 - the server under test speaks FTP
                    ftp.connect(self.host, self.port, timeout=1)
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise PureFtpdUnavailable(f"pure-ftpd did not answer on {self.host}:{self.port}")

    def connect(self) -> ftplib.FTP:
        """A connected, not yet logged-in client (passive mode on loopback)."""
        ftp = ftplib.FTP()  # noqa: S321 - the server under test speaks FTP
        # Logins are slow by design (argon2 hashes, a delay after a failure), more so on a
        # busy machine: allow a minute before calling the server stuck.
        ftp.connect(self.host, self.port, timeout=60)
        ftp.set_pasv(True)
        return ftp

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
