"""End to end: a site on real nginx gets a Pebble certificate, serves HTTPS, and keeps
its redirects and force-HTTPS through a forced renewal.

nginx's HTTP port is Pebble's `httpPort`, so Pebble validates HTTP-01 against the
site's real server block (the ACME location stays reachable over HTTP even with
force_https on). Requests go to 127.0.0.1 with the site's name as Host and SNI.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography import x509

from engines.base import CommandContext, Handler
from engines.site import SiteEngine
from tests.support.nginx import NginxUnavailable, PrivateNginx, eventually
from tests.support.pebble import Pebble
from yakpanel.clock import SystemClock
from yakpanel.embedded import free_port

pytestmark = [pytest.mark.nginx, pytest.mark.pebble]


@dataclass
class Env:
    nginx: PrivateNginx
    pebble: Pebble
    engine: SiteEngine
    root_pem: bytes

    def handler(self, command_type: str) -> Handler:
        spec = self.engine.commands().get(command_type)
        if spec is None:
            pytest.fail(
                f"SiteEngine does not offer {command_type!r}: CertificateManager "
                "(engines/site/acme.py) is not wired into SiteEngine.commands()",
                pytrace=False,
            )
        return spec.handler

    async def run(self, command_type: str, payload: dict[str, Any]) -> dict[str, Any]:
        return await self.handler(command_type)(ctx(), payload)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("tls")
    nginx = PrivateNginx(root, http_port=free_port())
    try:
        nginx.start()
    except NginxUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    pebble = Pebble(root / "pebble", http_port=nginx.http_port)
    try:
        pebble.start()
        root_pem = pebble.root_pem()
    except Exception as exc:
        nginx.stop()
        pebble.stop()
        pytest.fail(f"Pebble did not start: {exc}", pytrace=False)
    yield Env(nginx, pebble, SiteEngine(nginx.settings()), root_pem)
    pebble.stop()
    nginx.stop()


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


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    peer_serial: int | None = None


def request(
    port: int, host: str, path: str, tls_roots: bytes | None = None, timeout: float = 5.0
) -> Answer:
    """GET over a fresh connection to 127.0.0.1, with `host` as Host header and SNI."""
    sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    serial = None
    try:
        if tls_roots is not None:
            context = ssl.create_default_context(cadata=tls_roots.decode())
            sock = context.wrap_socket(sock, server_hostname=host)
            der = sock.getpeercert(binary_form=True)
            assert der is not None
            serial = x509.load_der_x509_certificate(der).serial_number
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(lines[0].split()[1]), headers, body, serial)


def answer_with(status: int, port: int, host: str, path: str) -> Answer | None:
    answer = request(port, host, path)
    return answer if answer.status == status else None


def serves_serial(env: Env, host: str, serial: str) -> Answer | None:
    answer = request(env.nginx.https_port, host, "/", env.root_pem)
    return answer if answer.peer_serial == int(serial, 16) else None


def assert_site_behaviour(env: Env, domain: str, serial: str) -> None:
    """What a visitor relies on: a trusted certificate, HTTPS pages, redirects."""
    https, http = env.nginx.https_port, env.nginx.http_port
    page = eventually(lambda: serves_serial(env, domain, serial))
    assert page.status == 200
    assert domain.encode() in page.body  # the default index names the site

    # nginx's old workers may take a moment to hand the HTTP port to the new ones.
    plain = eventually(lambda: answer_with(301, http, domain, "/any/page?x=1"))
    assert plain.headers["location"] == f"https://{domain}:{https}/any/page?x=1"

    moved = request(https, domain, "/old", env.root_pem)
    assert moved.status == 301
    assert moved.headers["location"].endswith("/new")

    alias = request(https, f"www.{domain}", "/", env.root_pem)
    assert alias.status == 200


async def test_certificate_is_served_and_survives_forced_renewal(env: Env) -> None:
    site_id = str(uuid.uuid4())
    domain = f"shop-{site_id[:8]}.yak.test"
    domains = [domain, f"www.{domain}"]
    site = {
        "site_id": site_id,
        "kind": "static",
        "domains": domains,
        "upstream": None,
        "redirects": [{"source": "/old", "target": "/new", "code": 301}],
        "force_https": False,
        "tls": False,
    }
    issue = {
        "site_id": site_id,
        "domains": domains,
        "directory_url": env.pebble.directory_url,
        "email": None,
        "ca_bundle": env.pebble.ca_pem.decode(),
    }

    await env.run("site.apply", site)
    eventually(lambda: answer_with(200, env.nginx.http_port, domain, "/"))

    first = await env.run("site.certificate.issue", issue)
    assert first["issued"] is True
    assert sorted(first["domains"]) == sorted(domains)

    await env.run("site.apply", {**site, "tls": True, "force_https": True})
    assert_site_behaviour(env, domain, first["serial"])

    renewed = await env.run("site.certificate.issue", {**issue, "force": True})
    assert renewed["issued"] is True
    assert renewed["serial"] != first["serial"]
    assert_site_behaviour(env, domain, renewed["serial"])

    status = await env.run("site.certificate.status", {"site_id": site_id})
    assert status["present"] is True
    assert status["not_after"] == renewed["not_after"]

    # Applying the same site again changes nothing and keeps the renewed certificate.
    again = await env.run("site.apply", {**site, "tls": True, "force_https": True})
    assert again["changed"] is False
    assert_site_behaviour(env, domain, renewed["serial"])
