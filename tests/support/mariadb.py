"""A private, real MariaDB server for integration tests: own datadir, socket and port.

`mariadb-install-db` seeds a datadir the way a fresh package install does, including
the anonymous accounts and the `test%` grants every user inherits; `start()` removes
them as `mysql_secure_installation` would, so a tenant account sees exactly what the
engine granted it and nothing a stock install leaks.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pymysql

from yakpanel.embedded import free_port

INSTALL_DB = "mariadb-install-db"
SERVER = "mariadbd"


class MariaDBUnavailable(RuntimeError):
    """The server binaries are missing or the server did not come up."""


def _binary(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        raise MariaDBUnavailable(
            f"{name} is not installed; install the Debian package mariadb-server "
            "(apt-get install -y mariadb-server)"
        )
    return path


class MariaDBServer:
    """Root connects over the unix socket without a password, like Debian's admin."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.datadir = base / "data"
        self.socket = base / "mysqld.sock"
        self.pid_file = base / "mysqld.pid"
        self.log_file = base / "mysqld.err"
        self.host = "127.0.0.1"
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        install_db, server = _binary(INSTALL_DB), _binary(SERVER)
        self.base.mkdir(parents=True, exist_ok=True)
        installed = subprocess.run(
            [
                install_db,
                "--no-defaults",
                f"--datadir={self.datadir}",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            capture_output=True,
            check=False,
            timeout=timeout_s,
        )
        if installed.returncode != 0:
            raise MariaDBUnavailable(
                f"{INSTALL_DB} failed ({installed.returncode}): "
                f"{installed.stderr.decode(errors='replace')[-2000:]}"
            )
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    server,
                    "--no-defaults",
                    f"--datadir={self.datadir}",
                    f"--socket={self.socket}",
                    f"--port={self.port}",
                    f"--bind-address={self.host}",
                    "--user=root",
                    "--skip-log-bin",
                    f"--pid-file={self.pid_file}",
                    f"--log-error={self.log_file}",
                    "--innodb-buffer-pool-size=32M",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                raise MariaDBUnavailable(
                    f"{SERVER} exited with code {self._proc.returncode}; see {self.log_file}"
                )
            try:
                conn = self.admin_connect()
            except pymysql.err.OperationalError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise MariaDBUnavailable(
                        f"{SERVER} did not accept connections in {timeout_s}s; see {self.log_file}"
                    ) from None
                time.sleep(0.1)
                continue
            with conn:
                self._secure(conn)
            return

    @staticmethod
    def _secure(conn: pymysql.connections.Connection[pymysql.cursors.Cursor]) -> None:
        with conn.cursor() as cur:
            cur.execute("SELECT User, Host FROM mysql.user WHERE User = ''")
            for user, host in cur.fetchall():
                cur.execute("DROP USER %s@%s", (user, host))
            cur.execute("DELETE FROM mysql.db WHERE Db = 'test' OR Db LIKE 'test\\\\_%%'")
            cur.execute("DROP DATABASE IF EXISTS test")
            cur.execute("FLUSH PRIVILEGES")

    def admin_connect(self) -> pymysql.connections.Connection[pymysql.cursors.Cursor]:
        return pymysql.connect(
            unix_socket=str(self.socket), user="root", password="", autocommit=True
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)
