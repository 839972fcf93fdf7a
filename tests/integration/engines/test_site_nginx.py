"""The site engine against a private real nginx on loopback.

One nginx per module (tests/support/nginx.py); each test owns its site ids and domains.
nginx's reload returns before the new workers serve, so answers are polled for with
`eventually` instead of slept for.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import http.server
import json
import ssl
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.telemetry.probes import ProbeTargetsFile, SiteProber
from engines.base import CommandContext, EngineError
from engines.site import SiteEngine, SiteSettings
from engines.site.nginx import SiteSpec, render_site
from tests.support.nginx import NO_SITE_BODY, NginxUnavailable, PrivateNginx, eventually
from yakpanel.clock import SystemClock
from yakpanel.embedded import free_port

pytestmark = pytest.mark.nginx


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateNginx]:
    server = PrivateNginx(tmp_path_factory.mktemp("nginx"))
    try:
        server.start()
    except NginxUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def settings(nginx: PrivateNginx) -> SiteSettings:
    return nginx.settings(probes_file=nginx.root / "agent" / "probes.json")


@pytest.fixture(scope="module")
def engine(settings: SiteSettings) -> SiteEngine:
    return SiteEngine(settings)


class _Upstream(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps(
            {
                "from": "upstream",
                "path": self.path,
                "host": self.headers.get("Host"),
                "forwarded_for": self.headers.get("X-Forwarded-For"),
                "forwarded_proto": self.headers.get("X-Forwarded-Proto"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        return None


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def _no_progress(percent: int, message: str) -> None:
    return None


def _ctx() -> CommandContext:
    return CommandContext(
        str(uuid.uuid4()), str(uuid.uuid4()), dt.datetime.now(dt.UTC), SystemClock(), _no_progress
    )


async def _run(engine: SiteEngine, command: str, payload: dict[str, Any]) -> dict[str, Any]:
    return await engine.commands()[command].handler(_ctx(), payload)


def _site(domain: str, **overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "site_id": str(uuid.uuid4()),
        "kind": "static",
        "domains": [domain],
        "upstream": None,
        "redirects": [],
        "force_https": False,
        "tls": False,
    }
    payload.update(overrides)
    return payload


def _get(nginx: PrivateNginx, host: str, path: str = "/") -> httpx.Response:
    return httpx.get(
        f"http://127.0.0.1:{nginx.http_port}{path}",
        headers={"Host": host},
        follow_redirects=False,
        trust_env=False,
    )


def _serves(nginx: PrivateNginx, host: str, needle: str, path: str = "/") -> httpx.Response | None:
    response = _get(nginx, host, path)
    return response if needle in response.text else None


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _read(path: Path) -> str:
    return path.read_text()


def _conf_listing(settings: SiteSettings) -> list[str]:
    return sorted(p.name for p in settings.conf_dir.iterdir()) if settings.conf_dir.exists() else []


def _write_certificate(settings: SiteSettings, site_id: str, domain: str) -> bytes:
    """A private CA and a leaf for `domain`; returns the CA certificate (PEM) to trust."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "YakPanel test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=60))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory = settings.cert_dir(site_id)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = serialization.Encoding.PEM
    settings.fullchain_path(site_id).write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    settings.privkey_path(site_id).write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    settings.privkey_path(site_id).chmod(0o600)
    return ca.public_bytes(pem)


async def test_static_site_answers_for_its_host_only(
    nginx: PrivateNginx, settings: SiteSettings, engine: SiteEngine
) -> None:
    payload = _site(
        "static.example.test", domains=["static.example.test", "www.static.example.test"]
    )
    site_id = payload["site_id"]
    result = await _run(engine, "site.apply", payload)

    assert result["changed"] is True
    assert result["config_path"] == str(settings.conf_dir / f"{site_id}.conf")
    assert result["document_root"] == str(settings.sites_root / site_id / "public")
    response = eventually(lambda: _serves(nginx, "static.example.test", "static.example.test"))
    assert response.status_code == 200
    assert eventually(lambda: _serves(nginx, "www.static.example.test", "static.example.test"))
    other = _get(nginx, "unknown.example.test")
    assert other.status_code == 404 and NO_SITE_BODY in other.text

    # The tenant's own files are served and never overwritten by a later apply.
    index = Path(result["document_root"], "index.html")
    _write(index, "<h1>tenant page</h1>")
    assert eventually(lambda: _serves(nginx, "static.example.test", "tenant page"))
    again = await _run(engine, "site.apply", payload)
    assert again["changed"] is False
    assert _read(index) == "<h1>tenant page</h1>"


async def test_static_site_becomes_a_reverse_proxy(
    nginx: PrivateNginx, engine: SiteEngine, upstream: str
) -> None:
    payload = _site("proxy.example.test")
    await _run(engine, "site.apply", payload)
    eventually(lambda: _serves(nginx, "proxy.example.test", "proxy.example.test"))

    payload.update(kind="proxy", upstream=upstream)
    result = await _run(engine, "site.apply", payload)

    assert result["changed"] is True
    response = eventually(lambda: _serves(nginx, "proxy.example.test", '"upstream"', "/api/x?y=1"))
    seen = response.json()
    assert seen["path"] == "/api/x?y=1"
    assert seen["host"] == "proxy.example.test"
    assert seen["forwarded_for"] == "127.0.0.1"
    assert seen["forwarded_proto"] == "http"


async def test_config_failing_nginx_test_is_never_left_active(
    nginx: PrivateNginx, settings: SiteSettings, engine: SiteEngine
) -> None:
    payload = _site("keep.example.test")
    site_id = payload["site_id"]
    await _run(engine, "site.apply", payload)
    eventually(lambda: _serves(nginx, "keep.example.test", "keep.example.test"))
    conf = settings.conf_dir / f"{site_id}.conf"
    before = conf.read_bytes()
    listing = _conf_listing(settings)

    # A certificate nginx cannot load: `nginx -t` fails on it.
    settings.cert_dir(site_id).mkdir(parents=True, mode=0o700)
    settings.fullchain_path(site_id).write_text("-----BEGIN CERTIFICATE-----\nnot a cert\n")
    settings.privkey_path(site_id).write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n")
    with pytest.raises(EngineError) as caught:
        await _run(engine, "site.apply", {**payload, "tls": True})

    assert caught.value.code == "nginx_test_failed"
    assert "fullchain.pem" in caught.value.message  # nginx's own reason reaches the user
    assert conf.read_bytes() == before
    assert _conf_listing(settings) == listing  # no temp or rollback files left behind
    await engine.reload()  # the active configuration is valid as a whole
    response = eventually(lambda: _serves(nginx, "keep.example.test", "keep.example.test"))
    assert response.status_code == 200

    # A brand-new site that fails the check leaves no file at all.
    fresh = _site("fresh.example.test", tls=True)
    settings.cert_dir(fresh["site_id"]).mkdir(parents=True, mode=0o700)
    settings.fullchain_path(fresh["site_id"]).write_text("garbage")
    settings.privkey_path(fresh["site_id"]).write_text("garbage")
    with pytest.raises(EngineError) as caught:
        await _run(engine, "site.apply", fresh)
    assert caught.value.code == "nginx_test_failed"
    assert _conf_listing(settings) == listing


async def test_failed_reload_restores_the_previous_config(
    nginx: PrivateNginx, settings: SiteSettings
) -> None:
    good = SiteEngine(settings)
    payload = _site("reload.example.test")
    await _run(good, "site.apply", payload)
    conf = settings.conf_dir / f"{payload['site_id']}.conf"
    before = conf.read_bytes()
    # A reload nginx itself refuses: a second `pid` directive on the command line.
    broken = SiteEngine(
        dataclasses.replace(
            settings,
            nginx_reload_argv=(*settings.nginx_reload_argv, "-g", "pid /nonexistent/x.pid;"),
        )
    )
    with pytest.raises(EngineError) as caught:
        await _run(broken, "site.apply", {**payload, "domains": ["reload2.example.test"]})
    assert caught.value.code == "nginx_reload_failed"
    assert caught.value.retryable
    assert conf.read_bytes() == before
    eventually(lambda: _serves(nginx, "reload.example.test", "reload.example.test"))


async def test_missing_certificate_is_reported_before_touching_nginx(
    settings: SiteSettings, engine: SiteEngine
) -> None:
    listing = _conf_listing(settings)
    with pytest.raises(EngineError) as caught:
        await _run(engine, "site.apply", _site("nocert.example.test", tls=True))
    assert caught.value.code == "certificate_missing"
    assert "site.certificate.issue" in caught.value.message
    assert _conf_listing(settings) == listing


async def test_redirects_force_https_acme_and_tls_probe(
    nginx: PrivateNginx, settings: SiteSettings, engine: SiteEngine
) -> None:
    domain = "secure.example.test"
    payload = _site(
        domain,
        redirects=[
            {"source": "/old", "target": "/new", "code": 301},
            {"source": "/away", "target": "https://elsewhere.example.test/x", "code": 302},
        ],
    )
    site_id = payload["site_id"]
    await _run(engine, "site.apply", payload)
    # (One request per poll: during a reload an old worker may still answer the next.)
    moved = eventually(lambda: r if (r := _get(nginx, domain, "/old")).status_code == 301 else None)
    assert moved.headers["Location"] == f"http://{domain}:{nginx.http_port}/new"
    away = _get(nginx, domain, "/away")
    assert away.status_code == 302
    assert away.headers["Location"] == "https://elsewhere.example.test/x"

    ca_pem = _write_certificate(settings, site_id, domain)
    await _run(engine, "site.apply", {**payload, "tls": True, "force_https": True})

    to_https = eventually(
        lambda: r if (r := _get(nginx, domain, "/page?a=1")).status_code == 301 else None
    )
    assert to_https.headers["Location"] == f"https://{domain}:{nginx.https_port}/page?a=1"
    # ACME HTTP-01 stays on plain HTTP even with force_https.
    token_file = settings.challenge_dir(site_id) / "tok-123"
    token_file.write_text("tok-123.thumbprint")
    challenge = _get(nginx, domain, "/.well-known/acme-challenge/tok-123")
    assert challenge.status_code == 200 and challenge.text == "tok-123.thumbprint"
    assert _get(nginx, domain, "/.well-known/acme-challenge/missing").status_code == 404

    trust = ssl.create_default_context(cadata=ca_pem.decode())
    async with httpx.AsyncClient(verify=trust, trust_env=False, follow_redirects=False) as client:
        url = f"https://127.0.0.1:{nginx.https_port}"
        ext = {"sni_hostname": domain}
        page = await client.get(url + "/", headers={"Host": domain}, extensions=ext)
        assert page.status_code == 200 and domain in page.text
        assert page.headers["Strict-Transport-Security"].startswith("max-age=")
        old = await client.get(url + "/old", headers={"Host": domain}, extensions=ext)
        assert old.status_code == 301
        assert old.headers["Location"] == f"https://{domain}:{nginx.https_port}/new"

    # The agent's probe of this site reads the file the engine keeps in sync.
    assert settings.probes_file is not None
    prober = SiteProber(ProbeTargetsFile(settings.probes_file), verify=trust)
    results = {r.target.site: r for r in await prober.run_once()}
    result = results[site_id]
    assert result.target.url == f"https://127.0.0.1:{nginx.https_port}/"
    assert result.target.host == domain
    assert result.up and result.status_code == 200, result.error
    assert result.tls_days_left is not None and 58 < result.tls_days_left <= 60


async def test_remove_stops_serving_and_drops_the_probe(
    nginx: PrivateNginx, settings: SiteSettings, engine: SiteEngine
) -> None:
    payload = _site("gone.example.test")
    site_id = payload["site_id"]
    await _run(engine, "site.apply", payload)
    eventually(lambda: _serves(nginx, "gone.example.test", "gone.example.test"))
    assert settings.probes_file is not None
    targets = json.loads(settings.probes_file.read_text())
    assert {
        "site": site_id,
        "url": f"http://127.0.0.1:{nginx.http_port}/",
        "host": "gone.example.test",
    } in targets
    others = [t for t in targets if t["site"] != site_id]

    assert (await _run(engine, "site.remove", {"site_id": site_id})) == {"removed": True}
    eventually(lambda: _serves(nginx, "gone.example.test", NO_SITE_BODY))
    assert json.loads(settings.probes_file.read_text()) == others  # other sites kept
    assert settings.document_root(site_id).is_dir()  # files kept by default

    again = await _run(engine, "site.remove", {"site_id": site_id, "delete_files": True})
    assert again == {"removed": False}
    assert not settings.site_dir(site_id).exists()


INJECTIONS: list[dict[str, Any]] = [
    {"domains": ["evil.example.test; return 200 pwned"]},
    {"domains": ["evil.example.test{"]},
    {"domains": ["evil.example.test}"]},
    {"domains": ["evil.example.test\nserver_name x.example.test"]},
    {"domains": ['evil".example.test']},
    {"domains": ["evil'.example.test"]},
    {"domains": ["`reboot`.example.test"]},
    {"domains": ["$host.example.test"]},
    {"domains": ["evil..example.test"]},
    {"domains": ["ex\u0430mple.test"]},
    {"domains": ["\uff45xample.test"]},
    {"domains": ["a" * 64 + ".example.test"]},
    {"domains": [".".join(["a" * 60] * 5) + ".test"]},
    {"domains": ["*.example.test"]},
    {"site_id": "../../../etc/nginx/nginx"},
    {"kind": "proxy", "upstream": "http://127.0.0.1:80;\n}\nserver {"},
    {"kind": "php", "upstream": "unix:/run/../../etc/passwd"},
    {"redirects": [{"source": "/a;", "target": "/b", "code": 301}]},
    {"redirects": [{"source": "/../x", "target": "/b", "code": 301}]},
    {"redirects": [{"source": "/a", "target": "https://x.example.test/$request_uri", "code": 301}]},
]


@pytest.mark.parametrize("bad", INJECTIONS)
async def test_injection_corpus_is_rejected_before_anything_is_written(
    nginx: PrivateNginx, settings: SiteSettings, engine: SiteEngine, bad: dict[str, Any]
) -> None:
    settings.conf_dir.mkdir(parents=True, exist_ok=True)
    listing = _conf_listing(settings)
    roots = (
        sorted(p.name for p in settings.sites_root.iterdir())
        if settings.sites_root.exists()
        else []
    )
    payload = _site("ok.example.test", **bad)
    with pytest.raises(EngineError) as caught:
        await _run(engine, "site.apply", payload)
    assert caught.value.code == "invalid_payload"
    assert not caught.value.retryable
    assert caught.value.message  # says which field and rule
    assert "\n" not in caught.value.message
    assert _conf_listing(settings) == listing
    now = (
        sorted(p.name for p in settings.sites_root.iterdir())
        if settings.sites_root.exists()
        else []
    )
    assert now == roots


async def test_swap_interrupted_by_a_crash_is_rolled_back_by_the_next_run(
    nginx: PrivateNginx, settings: SiteSettings, engine: SiteEngine
) -> None:
    payload = _site("crash.example.test")
    site_id = payload["site_id"]
    await _run(engine, "site.apply", payload)
    conf = settings.conf_dir / f"{site_id}.conf"
    before = conf.read_bytes()
    listing = _conf_listing(settings)
    # The state a crash between "move the new file in" and "nginx -t" leaves: the old
    # bytes kept aside and an unchecked (here: failing) config in place.
    settings.cert_dir(site_id).mkdir(parents=True, mode=0o700)
    settings.fullchain_path(site_id).write_text("garbage")
    settings.privkey_path(site_id).write_text("garbage")
    (settings.conf_dir / f".{site_id}.conf.previous").write_bytes(before)
    conf.write_text(render_site(_spec(payload, tls=True), settings))

    # The agent re-runs the interrupted command with the same payload.
    with pytest.raises(EngineError) as caught:
        await _run(engine, "site.apply", {**payload, "tls": True})
    assert caught.value.code == "nginx_test_failed"
    assert conf.read_bytes() == before
    assert _conf_listing(settings) == listing
    eventually(lambda: _serves(nginx, "crash.example.test", "crash.example.test"))


def _spec(payload: dict[str, Any], **overrides: Any) -> SiteSpec:
    merged = {**payload, **overrides}
    return SiteSpec(
        site_id=merged["site_id"],
        kind=merged["kind"],
        domains=tuple(merged["domains"]),
        tls=merged["tls"],
        force_https=merged["force_https"],
    )
