"""Site probes against real HTTP and HTTPS servers on loopback (self-signed certificate
made here, so the days left are known)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from agent.telemetry.probes import (
    MAX_TARGETS,
    ProbeConfigError,
    ProbeTarget,
    ProbeTargetsFile,
    SiteProber,
    parse_targets,
    probe,
)

CERT_DAYS = 30
SITE_NAME = "www.site.test"


@dataclass
class Server:
    url: str
    hosts: list[str | None] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)


class Handler(BaseHTTPRequestHandler):
    server: Any

    def do_GET(self) -> None:
        self.server.record.hosts.append(self.headers.get("Host"))
        if self.path == "/moved":
            self.send_response(301)
            self.send_header("Location", "/ok")
        elif self.path == "/broken":
            self.send_response(503)
        elif self.path == "/slow":
            time.sleep(3)
            self.send_response(200)
        elif self.path == "/ok":
            self.send_response(200)
        else:
            self.send_response(404)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base name
        pass


def serve(context: ssl.SSLContext | None) -> Iterator[Server]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    scheme = "http"
    record = Server("")
    if context is not None:
        context.sni_callback = lambda _obj, name, _ctx: record.sni.append(name)
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        scheme = "https"
    record.url = f"{scheme}://127.0.0.1:{httpd.server_address[1]}"
    httpd.record = record  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield record
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dt.datetime]:
    """A self-signed certificate for localhost, 127.0.0.1 and SITE_NAME, expiring in
    CERT_DAYS days (to the second)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    expires = now + dt.timedelta(days=CERT_DAYS)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(expires)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.DNSName(SITE_NAME),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    d = tmp_path_factory.mktemp("tls")
    cert_path, key_path = d / "cert.pem", d / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, expires


@pytest.fixture(scope="module")
def http_server() -> Iterator[Server]:
    yield from serve(None)


@pytest.fixture(scope="module")
def https_server(certificate: tuple[Path, Path, dt.datetime]) -> Iterator[Server]:
    cert_path, key_path, _ = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    yield from serve(context)


@pytest.fixture(scope="module")
def trusting(certificate: tuple[Path, Path, dt.datetime]) -> ssl.SSLContext:
    """A client context that trusts the self-signed certificate."""
    return ssl.create_default_context(cafile=str(certificate[0]))


def expected_days(expires: dt.datetime) -> float:
    return (expires - dt.datetime.now(dt.UTC)).total_seconds() / 86400


def refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_http_status_latency_and_up(http_server: Server, trusting: ssl.SSLContext) -> None:
    result = await probe(ProbeTarget("shop", f"{http_server.url}/ok"), trusting)
    assert result.up
    assert result.status_code == 200
    assert 0 < result.duration_s < 5
    assert result.tls_days_left is None
    assert result.error is None


async def test_redirects_are_reported_not_followed(
    http_server: Server, trusting: ssl.SSLContext
) -> None:
    before = len(http_server.hosts)
    result = await probe(ProbeTarget("shop", f"{http_server.url}/moved"), trusting)
    assert (result.up, result.status_code) == (True, 301)
    assert len(http_server.hosts) == before + 1, "the redirect was not followed"


async def test_a_5xx_answer_is_down(http_server: Server, trusting: ssl.SSLContext) -> None:
    result = await probe(ProbeTarget("shop", f"{http_server.url}/broken"), trusting)
    assert (result.up, result.status_code) == (False, 503)
    missing = await probe(ProbeTarget("shop", f"{http_server.url}/nope"), trusting)
    assert (missing.up, missing.status_code) == (True, 404)


async def test_the_host_header_is_sent(http_server: Server, trusting: ssl.SSLContext) -> None:
    result = await probe(ProbeTarget("shop", f"{http_server.url}/ok", host=SITE_NAME), trusting)
    assert result.up
    assert http_server.hosts[-1] == SITE_NAME


async def test_connection_refused_is_down(trusting: ssl.SSLContext) -> None:
    result = await probe(ProbeTarget("gone", f"http://127.0.0.1:{refused_port()}/"), trusting)
    assert (result.up, result.status_code) == (False, 0)
    assert result.error
    assert result.tls_days_left is None


async def test_a_hanging_site_is_down_within_its_timeout(
    http_server: Server, trusting: ssl.SSLContext
) -> None:
    started = time.monotonic()
    result = await probe(ProbeTarget("slow", f"{http_server.url}/slow", timeout_s=0.5), trusting)
    assert time.monotonic() - started < 2
    assert (result.up, result.status_code, result.error) == (False, 0, "timed out")
    assert result.duration_s >= 0.5


async def test_https_reports_the_days_left_of_the_presented_certificate(
    https_server: Server, trusting: ssl.SSLContext, certificate: tuple[Path, Path, dt.datetime]
) -> None:
    result = await probe(ProbeTarget("secure", f"{https_server.url}/ok"), trusting)
    assert (result.up, result.status_code) == (True, 200)
    assert result.duration_s > 0
    assert result.tls_days_left == pytest.approx(expected_days(certificate[2]), abs=0.01)
    assert result.tls_days_left == pytest.approx(CERT_DAYS, abs=0.01)


async def test_the_host_is_the_tls_server_name(
    https_server: Server, trusting: ssl.SSLContext
) -> None:
    result = await probe(ProbeTarget("secure", f"{https_server.url}/ok", host=SITE_NAME), trusting)
    assert result.up, result.error
    assert https_server.sni[-1] == SITE_NAME
    assert https_server.hosts[-1] == SITE_NAME


async def test_an_untrusted_certificate_is_down_but_still_reports_days_left(
    https_server: Server, certificate: tuple[Path, Path, dt.datetime]
) -> None:
    # The system trust store does not know the self-signed certificate.
    result = await probe(
        ProbeTarget("secure", f"{https_server.url}/ok"), ssl.create_default_context()
    )
    assert (result.up, result.status_code) == (False, 0)
    assert result.error and "certificate" in result.error.lower()
    assert result.tls_days_left == pytest.approx(expected_days(certificate[2]), abs=0.01)

    # A name the certificate does not cover fails verification the same way.
    wrong_name = await probe(
        ProbeTarget("secure", f"{https_server.url}/ok", host="other.test"),
        ssl.create_default_context(cafile=str(certificate[0])),
    )
    assert not wrong_name.up
    assert wrong_name.tls_days_left == pytest.approx(CERT_DAYS, abs=0.01)
    assert https_server.sni[-1] == "other.test"


def write_targets(path: Path, targets: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps(targets))
    # A rewrite within the same clock tick must still look changed.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def points(reader: InMemoryMetricReader) -> dict[str, dict[tuple[str, str], float]]:
    data = reader.get_metrics_data()
    out: dict[str, dict[tuple[str, str], float]] = {}
    if data is None:  # nothing observed at all
        return out
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out[metric.name] = {
                    (str(p.attributes["site"]), str(p.attributes["url"])): p.value  # type: ignore[index,union-attr]
                    for p in metric.data.data_points
                }
    return out


async def test_the_prober_reports_every_target_and_follows_the_file(
    tmp_path: Path, http_server: Server, https_server: Server, trusting: ssl.SSLContext
) -> None:
    path = tmp_path / "probes.json"
    ok, secure = f"{http_server.url}/ok", f"{https_server.url}/ok"
    gone = f"http://127.0.0.1:{refused_port()}/"
    write_targets(
        path,
        [
            {"site": "shop", "url": ok},
            {"site": "secure", "url": secure, "timeout_s": 2},
            {"site": "gone", "url": gone, "comment": "unknown keys are ignored"},
        ],
    )
    prober = SiteProber(ProbeTargetsFile(path), verify=trusting)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    prober.register(provider.get_meter("test"))
    try:
        await prober.run_once()
        got = points(reader)
        assert got["yakpanel.site.up"] == {
            ("shop", ok): 1.0,
            ("secure", secure): 1.0,
            ("gone", gone): 0.0,
        }
        assert got["yakpanel.site.http.status_code"] == {
            ("shop", ok): 200.0,
            ("secure", secure): 200.0,
            ("gone", gone): 0.0,
        }
        assert all(v > 0 for v in got["yakpanel.site.http.duration"].values())
        assert got["yakpanel.site.tls.days_left"].keys() == {("secure", secure)}

        # Rewritten: the removed targets stop being reported.
        write_targets(path, [{"site": "shop", "url": ok}])
        await prober.run_once()
        assert points(reader)["yakpanel.site.up"] == {("shop", ok): 1.0}

        # Broken: the last good targets are kept.
        path.write_text("[{not json")
        await prober.run_once()
        assert points(reader)["yakpanel.site.up"] == {("shop", ok): 1.0}

        # Removed: no probes.
        path.unlink()
        await prober.run_once()
        assert "yakpanel.site.up" not in points(reader)
    finally:
        provider.shutdown()


def test_target_validation() -> None:
    assert parse_targets([{"site": "a", "url": "https://a.test/", "host": "a.test"}]) == [
        ProbeTarget("a", "https://a.test/", "a.test", 5.0)
    ]
    # Duplicates collapse; the number of targets is capped.
    many = [{"site": f"s{i % (MAX_TARGETS + 5)}", "url": "http://x.test/"} for i in range(500)]
    assert len(parse_targets(many)) == MAX_TARGETS
    for bad, message in [
        ({"site": "a"}, "url"),
        ({"site": "", "url": "http://a.test/"}, "site"),
        ({"site": "a", "url": "ftp://a.test/"}, "http"),
        ({"site": "a", "url": "http://a.test/", "timeout_s": 0}, "timeout_s"),
        ({"site": "a", "url": "http://a.test/", "timeout_s": 31}, "timeout_s"),
        ({"site": "a", "url": "http://a.test/", "host": "a.test\r\nX: y"}, "host"),
    ]:
        with pytest.raises(ProbeConfigError, match=message):
            parse_targets([bad])
    with pytest.raises(ProbeConfigError, match="list"):
        parse_targets({"site": "a"})
