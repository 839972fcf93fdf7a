"""A private real nginx on loopback for tests of the site engine.

Everything lives in one temp dir: `nginx.conf` (with `include <conf_dir>/*.conf;`), the
pid file, logs and temp paths. The server is started in the foreground
(`nginx -p PREFIX -c CONF -g "daemon off;"`) so the test owns the process, and
`settings()` gives a `SiteSettings` whose test/reload commands point at this instance.

A catch-all `default_server` answers 404 "no site here" on the HTTP port, so a request
for a name no site claims gets a recognisable answer and readiness can be checked
before any site exists.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from engines.site.config import SiteSettings
from yakpanel.embedded import free_port

NO_SITE_BODY = "no site here"
T = TypeVar("T")


class NginxUnavailable(RuntimeError):
    """nginx is missing or did not come up; the message says which and why."""


class PrivateNginx:
    """One nginx master with its own prefix, conf dir and loopback ports."""

    def __init__(self, root: Path, http_port: int | None = None, https_port: int | None = None):
        self.root = root
        self.prefix = root / "nginx"
        self.conf = self.prefix / "nginx.conf"
        self.conf_dir = root / "sites-conf"
        self.sites_root = root / "www"
        self.certs_dir = root / "certs"
        self.acme_webroot = root / "acme"
        self.http_port = http_port or free_port()
        self.https_port = https_port or free_port()
        self.binary = shutil.which("nginx") or ""
        self._process: subprocess.Popen[bytes] | None = None

    def settings(self, probes_file: Path | None = None) -> SiteSettings:
        base = ("-p", str(self.prefix), "-c", str(self.conf))
        return SiteSettings(
            sites_root=self.sites_root,
            conf_dir=self.conf_dir,
            certs_dir=self.certs_dir,
            acme_webroot=self.acme_webroot,
            nginx_test_argv=(self.binary, "-t", "-q", *base),
            nginx_reload_argv=(self.binary, "-s", "reload", *base),
            http_port=self.http_port,
            https_port=self.https_port,
            probes_file=probes_file,
            listen_address="127.0.0.1",
        )

    def start(self, timeout_s: float = 15.0) -> None:
        if not self.binary:
            raise NginxUnavailable(
                "nginx is not installed (no `nginx` on PATH); install Debian's nginx-light"
            )
        for directory in (self.prefix / "tmp", self.prefix / "logs", self.conf_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._main_config())
        log = (self.prefix / "logs" / "stderr.log").open("ab")
        self._process = subprocess.Popen(
            [self.binary, "-p", str(self.prefix), "-c", str(self.conf), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise NginxUnavailable(f"nginx exited at start: {self.stderr_tail()}")
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.2)
                if sock.connect_ex(("127.0.0.1", self.http_port)) == 0:
                    return
            time.sleep(0.05)
        self.stop()
        raise NginxUnavailable(f"nginx did not listen within {timeout_s:g} s: {self.stderr_tail()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGQUIT)  # graceful: finish requests, remove the pid file
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout_s)

    def stderr_tail(self, lines: int = 10) -> str:
        text = ""
        for name in ("stderr.log", "error.log"):
            with contextlib.suppress(OSError):
                text += (self.prefix / "logs" / name).read_text(errors="replace")
        return " | ".join(text.strip().splitlines()[-lines:])

    def _main_config(self) -> str:
        p = self.prefix
        user = "user root root;\n" if os.geteuid() == 0 else ""
        return f"""{user}worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/logs/error.log warn;
events {{
    worker_connections 256;
}}
http {{
    access_log {p}/logs/access.log;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    types {{
        text/html html htm;
        text/plain txt;
    }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{self.http_port} default_server;
        server_name _;
        default_type text/plain;
        return 404 "{NO_SITE_BODY}\\n";
    }}
    include {self.conf_dir}/*.conf;
}}
"""


def eventually(check: Callable[[], T | None], timeout_s: float = 10.0) -> T:
    """Poll `check` until it returns a value: `nginx -s reload` returns before the new
    workers serve, so a test waits for the answer it expects rather than sleeping."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            result = check()
        except Exception as exc:  # remembered and reported on timeout
            last_error, result = exc, None
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(
                f"condition not met within {timeout_s:g} s (last error: {last_error})"
            )
        time.sleep(0.05)
