"""A private Pebble ACME CA with pebble-challtestsrv as its DNS, for tests.

pebble-challtestsrv answers every A query with 127.0.0.1, so Pebble's validation
authority resolves any test domain to loopback and fetches HTTP-01 answers from
`http://<domain>:<http_port>/.well-known/acme-challenge/<token>`: the caller picks
`http_port` and runs its web server (nginx, or a tiny http.server) there.

Pebble's own HTTPS listener uses a self-signed certificate made here; clients trust
it through `ca_pem`. Pebble makes a fresh issuing hierarchy on every start; its root
is served at `root_url` and only valid while this instance runs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from yakpanel.embedded import free_port

PEBBLE = "pebble"
CHALLTESTSRV = "pebble-challtestsrv"


class PebbleUnavailable(RuntimeError):
    """Pebble or pebble-challtestsrv is missing or did not come up."""


def self_signed_localhost() -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for `localhost` and `127.0.0.1`, valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble test listener")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class Pebble:
    """`start()` runs pebble-challtestsrv then Pebble on free loopback ports."""

    def __init__(self, root: Path, http_port: int) -> None:
        self.root = root
        self.http_port = http_port
        self.listen_port = 0
        self.management_port = 0
        self.dns_port = 0
        self.ca_pem = b""
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.listen_port}/dir"

    @property
    def root_url(self) -> str:
        return f"https://127.0.0.1:{self.management_port}/roots/0"

    @property
    def ca_file(self) -> Path:
        return self.root / "listener.pem"

    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def start(self, timeout_s: float = 20.0) -> None:
        for binary in (PEBBLE, CHALLTESTSRV):
            if shutil.which(binary) is None:
                raise PebbleUnavailable(f"{binary} is required: apt-get install pebble")
        self.root.mkdir(parents=True, exist_ok=True)
        self.ca_pem, key_pem = self_signed_localhost()
        self.ca_file.write_bytes(self.ca_pem)
        key_file = self.root / "listener.key"
        key_file.write_bytes(key_pem)
        key_file.chmod(0o600)
        self.listen_port = free_port()
        self.management_port = free_port()
        self.dns_port = free_port()
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.listen_port}",
                "managementListenAddress": f"127.0.0.1:{self.management_port}",
                "certificate": str(self.ca_file),
                "privateKey": str(key_file),
                "httpPort": self.http_port,
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        config_file = self.root / "pebble-config.json"
        config_file.write_text(json.dumps(config))
        self._spawn(
            [
                CHALLTESTSRV,
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
                "-dns01",
                f"127.0.0.1:{self.dns_port}",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                f"127.0.0.1:{free_port()}",
            ],
            "challtestsrv.log",
            {},
        )
        self._spawn(
            [PEBBLE, "-config", str(config_file), "-dnsserver", f"127.0.0.1:{self.dns_port}"],
            "pebble.log",
            {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"},
        )
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    self.stop()
                    raise PebbleUnavailable(
                        f"{proc.args!r} exited with {proc.returncode}; logs in {self.root}"
                    )
            try:
                with urllib.request.urlopen(  # noqa: S310 - fixed https URL on loopback
                    self.directory_url, context=self._ssl_context(), timeout=2
                ) as resp:
                    if resp.status == 200:
                        return
            except OSError as exc:
                last_error = exc
            time.sleep(0.1)
        self.stop()
        raise PebbleUnavailable(f"Pebble did not serve its directory: {last_error}")

    def root_pem(self) -> bytes:
        """Pebble's current root certificate (the top of every chain it issues)."""
        with urllib.request.urlopen(  # noqa: S310 - fixed https URL on loopback
            self.root_url, context=self._ssl_context(), timeout=5
        ) as resp:
            data: bytes = resp.read()
            return data

    def _spawn(self, argv: list[str], log_name: str, env: dict[str, str]) -> None:
        log = (self.root / log_name).open("ab")
        try:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}
            )
        finally:
            log.close()
        self._procs.append(proc)

    def stop(self) -> None:
        procs, self._procs = self._procs, []
        for proc in reversed(procs):
            if proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
