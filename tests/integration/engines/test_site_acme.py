"""ACME issuance against a real Pebble CA, validated over real HTTP-01.

Pebble resolves every name to 127.0.0.1 through pebble-challtestsrv and fetches
`http://<domain>:<port>/.well-known/acme-challenge/<token>`; a small HTTP server on
that port plays the part of nginx's ACME location, serving each site's
`<acme_webroot>/<site_id>` by Host header exactly as the rendered server blocks do.
The nginx reload is a recorder here (test_site_tls.py covers the real nginx).
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from engines.base import CommandContext, EngineError
from engines.site.acme import CertificateManager
from engines.site.config import SiteSettings
from tests.support.pebble import Pebble, self_signed_localhost
from yakpanel.clock import Clock, ManualClock, SystemClock
from yakpanel.embedded import free_port

pytestmark = pytest.mark.pebble

ACME_PREFIX = "/.well-known/acme-challenge/"


class ChallengeServer:
    """Serves `<acme_webroot>/<site_id>/.well-known/acme-challenge/*` for mapped hosts."""

    def __init__(self, acme_webroot: Path) -> None:
        self.sites: dict[str, str] = {}
        self.port = free_port()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host = (self.headers.get("Host") or "").rsplit(":", 1)[0].lower()
                site_id = server.sites.get(host)
                token = self.path.removeprefix(ACME_PREFIX)
                path = acme_webroot / str(site_id) / ".well-known" / "acme-challenge" / token
                if site_id is None or not self.path.startswith(ACME_PREFIX) or "/" in token:
                    self.send_error(404)
                    return
                try:
                    body = path.read_bytes()
                except OSError:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@dataclass
class Env:
    settings: SiteSettings
    pebble: Pebble
    web: ChallengeServer
    reloads: list[str] = field(default_factory=list)
    fail_reloads: int = 0

    async def reload(self) -> None:
        self.reloads.append("reload")
        if self.fail_reloads:
            self.fail_reloads -= 1
            raise EngineError("nginx_reload_failed", "nginx said no", retryable=True)

    def manager(self) -> CertificateManager:
        return CertificateManager(self.settings, self.reload)

    def new_site(self, *names: str) -> tuple[str, list[str]]:
        site_id = str(uuid.uuid4())
        domains = [f"{n}.{site_id[:8]}.yak.test" for n in names]
        for domain in domains:
            self.web.sites[domain] = site_id
        return site_id, domains

    def payload(self, site_id: str, domains: list[str], **extra: Any) -> dict[str, Any]:
        return {
            "site_id": site_id,
            "domains": domains,
            "directory_url": self.pebble.directory_url,
            "email": "ops@example.com",
            "ca_bundle": self.pebble.ca_pem.decode(),
            **extra,
        }


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("acme")
    settings = SiteSettings(
        sites_root=root / "www",
        conf_dir=root / "conf",
        certs_dir=root / "certs",
        acme_webroot=root / "acme",
    )
    web = ChallengeServer(settings.acme_webroot)
    pebble = Pebble(root / "pebble", http_port=web.port)
    try:
        pebble.start()
    except Exception as exc:
        web.close()
        pytest.fail(f"Pebble did not start: {exc}", pytrace=False)
    yield Env(settings, pebble, web)
    pebble.stop()
    web.close()


def ctx(clock: Clock | None = None) -> CommandContext:
    async def report(percent: int, message: str) -> None:
        pass

    return CommandContext(
        command_id=str(uuid.uuid4()),
        idempotency_key=str(uuid.uuid4()),
        deadline=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5),
        clock=clock or SystemClock(),
        report=report,
    )


def snapshot(settings: SiteSettings, site_id: str) -> tuple[bytes, bytes]:
    return (
        settings.fullchain_path(site_id).read_bytes(),
        settings.privkey_path(site_id).read_bytes(),
    )


async def issue(env: Env, site_id: str, domains: list[str], **extra: Any) -> dict[str, Any]:
    return await env.manager().issue(
        ctx(extra.pop("clock", None)), env.payload(site_id, domains, **extra)
    )


def verify_chain(fullchain: bytes, root_pem: bytes) -> list[x509.Certificate]:
    """Each certificate is signed by the next, and the last by Pebble's root."""
    chain = x509.load_pem_x509_certificates(fullchain)
    root = x509.load_pem_x509_certificate(root_pem)
    for child, parent in zip(chain, [*chain[1:], root], strict=True):
        child.verify_directly_issued_by(parent)
    return chain


def sans(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return set(ext.value.get_values_for_type(x509.DNSName))


async def test_issue_installs_a_chain_that_verifies_against_pebbles_root(env: Env) -> None:
    site_id, domains = env.new_site("www", "shop")
    before = len(env.reloads)

    out = await issue(env, site_id, domains)

    assert out["issued"] is True
    assert set(out["domains"]) == set(domains)
    chain = verify_chain(env.settings.fullchain_path(site_id).read_bytes(), env.pebble.root_pem())
    leaf = chain[0]
    assert sans(leaf) == set(domains)
    assert format(leaf.serial_number, "x") == out["serial"]
    assert out["not_after"] == leaf.not_valid_after_utc.isoformat()
    key = serialization.load_pem_private_key(
        env.settings.privkey_path(site_id).read_bytes(), password=None
    )
    assert key.public_key() == leaf.public_key()
    # nginx must be able to read the chain; only root may read the key.
    assert env.settings.privkey_path(site_id).stat().st_mode & 0o777 == 0o600
    assert env.settings.fullchain_path(site_id).stat().st_mode & 0o777 == 0o644
    assert env.settings.cert_dir(site_id).stat().st_mode & 0o777 == 0o700
    accounts = list((env.settings.certs_dir / "_accounts").iterdir())
    assert len(accounts) == 1
    assert accounts[0].stat().st_mode & 0o777 == 0o600
    # The challenge answers are gone once the order is done.
    assert list(env.settings.challenge_dir(site_id).iterdir()) == []
    assert len(env.reloads) == before + 1

    status = await env.manager().status(ctx(), {"site_id": site_id})
    assert status["present"] is True
    assert set(status["domains"]) == set(domains)
    assert status["days_left"] > 30


async def test_a_valid_certificate_is_kept_until_it_is_due_then_renewed(env: Env) -> None:
    site_id, domains = env.new_site("www")
    first = await issue(env, site_id, domains)
    files = snapshot(env.settings, site_id)
    reloads = len(env.reloads)

    again = await issue(env, site_id, domains)
    assert again["issued"] is False
    assert again["serial"] == first["serial"]
    assert snapshot(env.settings, site_id) == files
    assert len(env.reloads) == reloads

    # Ten days before expiry the same command renews (renew_before_days defaults to 30).
    not_after = dt.datetime.fromisoformat(first["not_after"])
    due = ManualClock(not_after - dt.timedelta(days=10))
    renewed = await issue(env, site_id, domains, clock=due)
    assert renewed["issued"] is True
    assert renewed["serial"] != first["serial"]
    assert snapshot(env.settings, site_id) != files
    verify_chain(env.settings.fullchain_path(site_id).read_bytes(), env.pebble.root_pem())

    # Adding a name is not a renewal question: it always reissues.
    site_names = [*domains, f"alias.{site_id[:8]}.yak.test"]
    env.web.sites[site_names[-1]] = site_id
    grown = await issue(env, site_id, site_names)
    assert grown["issued"] is True
    assert set(grown["domains"]) == set(site_names)


async def test_failed_validation_keeps_the_old_certificate(env: Env) -> None:
    site_id, domains = env.new_site("www")
    await issue(env, site_id, domains)
    files = snapshot(env.settings, site_id)
    reloads = len(env.reloads)

    # This name does not reach the site's webroot, so HTTP-01 fails.
    stray = f"stray.{site_id[:8]}.yak.test"
    with pytest.raises(EngineError) as failure:
        await issue(env, site_id, [*domains, stray], force=True)

    assert failure.value.code == "acme_failed"
    assert "HTTP-01" in failure.value.message
    assert snapshot(env.settings, site_id) == files
    assert len(env.reloads) == reloads
    assert list(env.settings.challenge_dir(site_id).iterdir()) == []


async def test_unreachable_acme_server_is_retryable_and_harmless(env: Env) -> None:
    site_id, domains = env.new_site("www")
    await issue(env, site_id, domains)
    files = snapshot(env.settings, site_id)

    with pytest.raises(EngineError) as failure:
        await issue(
            env,
            site_id,
            domains,
            force=True,
            directory_url=f"https://127.0.0.1:{free_port()}/dir",
        )

    assert failure.value.code == "acme_failed"
    assert failure.value.retryable is True
    assert snapshot(env.settings, site_id) == files


async def test_untrusted_acme_server_is_refused(env: Env) -> None:
    site_id, domains = env.new_site("www")
    payload = env.payload(site_id, domains)
    del payload["ca_bundle"]  # Pebble's listener is self-signed: not in the system store

    with pytest.raises(EngineError) as failure:
        await env.manager().issue(ctx(), payload)

    assert failure.value.code == "acme_failed"
    assert not env.settings.fullchain_path(site_id).exists()


async def test_reload_failure_puts_the_previous_pair_back(env: Env) -> None:
    site_id, domains = env.new_site("www")
    await issue(env, site_id, domains)
    files = snapshot(env.settings, site_id)
    reloads = len(env.reloads)
    env.fail_reloads = 1

    with pytest.raises(EngineError) as failure:
        await issue(env, site_id, domains, force=True)

    assert failure.value.code == "certificate_install_failed"
    assert snapshot(env.settings, site_id) == files
    # One reload refused the new pair, a second one loaded the restored pair.
    assert len(env.reloads) == reloads + 2
    status = await env.manager().status(ctx(), {"site_id": site_id})
    assert status["present"] is True


async def test_reload_failure_on_first_issue_leaves_no_certificate(env: Env) -> None:
    site_id, domains = env.new_site("www")
    env.fail_reloads = 1

    with pytest.raises(EngineError) as failure:
        await issue(env, site_id, domains)

    assert failure.value.code == "certificate_install_failed"
    assert not env.settings.fullchain_path(site_id).exists()
    assert not env.settings.privkey_path(site_id).exists()
    status = await env.manager().status(ctx(), {"site_id": site_id})
    assert status == {"present": False, "not_after": None, "days_left": None, "domains": []}


async def test_plain_files_from_an_earlier_layout_are_adopted_and_restored(env: Env) -> None:
    site_id, domains = env.new_site("www")
    cert_dir = env.settings.cert_dir(site_id)
    cert_dir.mkdir(parents=True)
    chain_pem, key_pem = self_signed_localhost()
    env.settings.fullchain_path(site_id).write_bytes(chain_pem)
    env.settings.privkey_path(site_id).write_bytes(key_pem)
    env.fail_reloads = 1

    # The old certificate names other hosts, so it is replaced; nginx refuses the new
    # pair and the old one must come back exactly as it was.
    with pytest.raises(EngineError) as failure:
        await issue(env, site_id, domains)

    assert failure.value.code == "certificate_install_failed"
    assert snapshot(env.settings, site_id) == (chain_pem, key_pem)

    out = await issue(env, site_id, domains)
    assert out["issued"] is True
    verify_chain(env.settings.fullchain_path(site_id).read_bytes(), env.pebble.root_pem())


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"domains": ["exa;mple.com"]}, "domains"),
        ({"domains": ["*.example.com"]}, "domains"),
        ({"domains": []}, "domains"),
        ({"directory_url": "http://127.0.0.1/dir"}, "directory_url"),
        ({"site_id": "../../etc"}, "site_id"),
        ({"email": "ops@example.com\nBcc: x"}, "email"),
        ({"ca_bundle": "not a certificate"}, "ca_bundle"),
        ({"renew_before_days": -1}, "renew_before_days"),
        ({"surprise": True}, "surprise"),
    ],
)
async def test_bad_payloads_are_refused_before_any_acme_traffic(
    env: Env, change: dict[str, Any], problem: str
) -> None:
    site_id, domains = env.new_site("www")
    payload = {**env.payload(site_id, domains), **change}

    with pytest.raises(EngineError) as failure:
        await env.manager().issue(ctx(), payload)

    assert failure.value.code == "invalid_payload"
    assert problem in failure.value.message
    assert not env.settings.cert_dir(site_id).exists()
    assert not env.settings.challenge_root(site_id).exists()
