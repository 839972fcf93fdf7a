"""A private, real redis-server for integration tests on a free loopback port.

It runs with an (initially empty) aclfile so that `ACL SAVE` works as on a production
server configured with one, and `restart()` shows what survives a Redis restart.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from yakpanel.embedded import free_port

SERVER = "redis-server"


class RedisUnavailable(RuntimeError):
    """redis-server is missing or did not come up."""


class RedisServer:
    """The `default` user keeps full rights without a password: it is the admin here."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.host = "127.0.0.1"
        self.port = free_port()
        self.aclfile = base / "users.acl"
        self.log_file = base / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> None:
        binary = shutil.which(SERVER) or shutil.which(SERVER, path="/usr/bin:/usr/sbin:/bin")
        if binary is None:
            raise RedisUnavailable(
                f"{SERVER} is not installed; install the Debian package redis-server "
                "(apt-get install -y redis-server)"
            )
        self.base.mkdir(parents=True, exist_ok=True)
        self.aclfile.touch(exist_ok=True)
        self._proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                self.host,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.base),
                "--aclfile",
                str(self.aclfile),
                "--logfile",
                str(self.log_file),
                "--daemonize",
                "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while not self._answers_ping():
            if self._proc.poll() is not None:
                raise RedisUnavailable(
                    f"{SERVER} exited with code {self._proc.returncode}; see {self.log_file}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RedisUnavailable(f"{SERVER} did not answer in {timeout_s}s")
            time.sleep(0.05)

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)
