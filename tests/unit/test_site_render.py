"""Rendering of a site's nginx config from a validated spec, and payload validation."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from engines.base import CommandContext, EngineError
from engines.site import SiteEngine, SiteSettings
from engines.site.nginx import Redirect, SiteSpec, render_site
from yakpanel.clock import SystemClock

SITE = "6f1c2e0a-3b4d-4c5e-8f70-1a2b3c4d5e6f"


def _settings(tmp_path: Path, **overrides: Any) -> SiteSettings:
    values: dict[str, Any] = {
        "sites_root": tmp_path / "www",
        "conf_dir": tmp_path / "conf",
        "certs_dir": tmp_path / "certs",
        "acme_webroot": tmp_path / "acme",
        # Never reached in these tests: a payload that fails validation runs nothing.
        "nginx_test_argv": ("/nonexistent/nginx-test",),
        "nginx_reload_argv": ("/nonexistent/nginx-reload",),
    }
    values.update(overrides)
    return SiteSettings(**values)


def _server_blocks(text: str) -> list[str]:
    return re.findall(r"^server \{\n.*?^\}", text, flags=re.S | re.M)


def test_static_site_serves_its_root_for_all_its_names(tmp_path: Path) -> None:
    settings = _settings(tmp_path, http_port=8080)
    text = render_site(SiteSpec(SITE, "static", ("example.com", "www.example.com")), settings)
    (block,) = _server_blocks(text)
    assert "listen 8080;" in block
    assert "server_name example.com www.example.com;" in block
    assert f"root {tmp_path}/www/{SITE}/public;" in block
    assert "ssl_certificate" not in text
    assert "proxy_pass" not in text and "fastcgi_pass" not in text
    # ACME HTTP-01 files are served from the site's challenge root.
    assert re.search(
        rf"location \^~ /\.well-known/acme-challenge/ \{{\s*root {tmp_path}/acme/{SITE};",
        block,
    )


def test_listen_address_pins_the_socket(tmp_path: Path) -> None:
    settings = _settings(tmp_path, listen_address="127.0.0.1", http_port=8081)
    text = render_site(SiteSpec(SITE, "static", ("example.com",)), settings)
    assert "listen 127.0.0.1:8081;" in text


def test_proxy_site_forwards_host_and_client_headers(tmp_path: Path) -> None:
    text = render_site(
        SiteSpec(SITE, "proxy", ("app.example.com",), upstream="http://127.0.0.1:3000"),
        _settings(tmp_path),
    )
    assert "proxy_pass http://127.0.0.1:3000;" in text
    for header in ("Host $host", "X-Forwarded-For", "X-Forwarded-Proto $scheme", "X-Real-IP"):
        assert f"proxy_set_header {header}" in text
    assert "root " not in text.split("acme-challenge/", 1)[1].split("location /", 1)[1]


def test_proxy_path_and_unix_socket_upstreams(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    with_path = render_site(
        SiteSpec(SITE, "proxy", ("a.example.com",), upstream="http://127.0.0.1:3000/app"),
        settings,
    )
    assert "proxy_pass http://127.0.0.1:3000/app/;" in with_path
    unix = render_site(
        SiteSpec(SITE, "proxy", ("a.example.com",), upstream="unix:/run/app.sock"), settings
    )
    assert "proxy_pass http://unix:/run/app.sock:;" in unix


def test_php_site_passes_scripts_to_fpm(tmp_path: Path) -> None:
    text = render_site(
        SiteSpec(SITE, "php", ("blog.example.com",), upstream="unix:/run/php/fpm.sock"),
        _settings(tmp_path),
    )
    assert "fastcgi_pass unix:/run/php/fpm.sock;" in text
    assert "index index.php index.html;" in text
    assert "try_files $uri $uri/ /index.php?$query_string;" in text
    assert "fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;" in text


def test_redirects_are_exact_locations(tmp_path: Path) -> None:
    text = render_site(
        SiteSpec(
            SITE,
            "static",
            ("example.com",),
            redirects=(
                Redirect("/old", "/new", 301),
                Redirect("/shop", "https://shop.example.com/", 302),
            ),
        ),
        _settings(tmp_path),
    )
    assert re.search(r"location = /old \{\s*return 301 /new;\s*\}", text)
    assert re.search(r"location = /shop \{\s*return 302 https://shop.example.com/;\s*\}", text)


def test_tls_with_force_https_redirects_http_but_keeps_acme(tmp_path: Path) -> None:
    settings = _settings(tmp_path, https_port=8443)
    text = render_site(
        SiteSpec(
            SITE,
            "static",
            ("example.com",),
            redirects=(Redirect("/old", "/new", 308),),
            force_https=True,
            tls=True,
        ),
        settings,
    )
    http, https = _server_blocks(text)
    assert "acme-challenge" in http
    assert "return 301 https://$host:8443$request_uri;" in http
    assert "location = /old" not in http  # everything but ACME goes to https first
    assert "root " + str(settings.document_root(SITE)) not in http
    assert "listen 8443 ssl http2;" in https
    assert f"ssl_certificate {tmp_path}/certs/{SITE}/fullchain.pem;" in https
    assert f"ssl_certificate_key {tmp_path}/certs/{SITE}/privkey.pem;" in https
    assert "Strict-Transport-Security" in https
    assert "acme-challenge" in https and "location = /old" in https


def test_tls_without_force_https_serves_both_and_sends_no_hsts(tmp_path: Path) -> None:
    text = render_site(
        SiteSpec(SITE, "static", ("example.com",), tls=True), _settings(tmp_path, https_port=443)
    )
    http, https = _server_blocks(text)
    assert "return 301" not in http and "root " in http
    assert "listen 443 ssl http2;" in https
    assert "Strict-Transport-Security" not in text


def test_unsafe_settings_paths_are_refused(tmp_path: Path) -> None:
    settings = _settings(tmp_path, sites_root=Path("/srv/my sites;"))
    with pytest.raises(EngineError) as caught:
        render_site(SiteSpec(SITE, "static", ("example.com",)), settings)
    assert caught.value.code == "invalid_settings"


async def _noop(percent: int, message: str) -> None:
    return None


def _ctx() -> CommandContext:
    return CommandContext("c1", "k1", datetime.now(UTC), SystemClock(), _noop)


def _apply(**overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "site_id": SITE,
        "kind": "static",
        "domains": ["example.com"],
        "upstream": None,
        "redirects": [],
        "force_https": False,
        "tls": False,
    }
    payload.update(overrides)
    return payload


BAD_PAYLOADS = [
    (_apply(domains=["example.com;"]), "domains"),
    (_apply(domains=[]), "domains"),
    (_apply(domains=["a.example.com"] * 51), "domains"),
    (_apply(domains=["example.com", "Example.com"]), "repeats"),
    (_apply(site_id="../../etc"), "site_id"),
    (_apply(site_id=SITE.upper().replace("-", "")), "site_id"),
    (_apply(kind="cgi"), "kind"),
    (_apply(kind="proxy"), "upstream"),
    (_apply(kind="proxy", upstream="http://127.0.0.1:80; include /etc/passwd"), "upstream"),
    (_apply(kind="php", upstream="127.0.0.1"), "upstream"),
    (_apply(upstream="http://127.0.0.1:80"), "static site has no upstream"),
    (_apply(redirects=[{"source": "/a", "target": "/b", "code": 303}]), "code"),
    (_apply(redirects=[{"source": "/a\n}", "target": "/b", "code": 301}]), "source"),
    (_apply(redirects=[{"source": "/a", "target": "/b;", "code": 301}]), "target"),
    (_apply(redirects=[{"source": "/.well-known/acme-challenge/x", "target": "/"}]), "source"),
    (
        _apply(redirects=[{"source": "/a", "target": "/b"}, {"source": "/a", "target": "/c"}]),
        "repeats",
    ),
    (_apply(force_https=True), "force_https"),
    (_apply(tls="yes"), "tls"),
    (_apply(extra="x"), "extra"),
]


@pytest.mark.parametrize(("payload", "where"), BAD_PAYLOADS)
async def test_bad_payload_fails_before_anything_is_written(
    tmp_path: Path, payload: dict[str, Any], where: str
) -> None:
    settings = _settings(tmp_path)
    engine = SiteEngine(settings)
    with pytest.raises(EngineError) as caught:
        await engine.commands()["site.apply"].handler(_ctx(), payload)
    assert caught.value.code == "invalid_payload"
    assert where in caught.value.message
    assert not caught.value.retryable
    assert not settings.conf_dir.exists() and not settings.sites_root.exists()


def test_engine_offers_site_commands(tmp_path: Path) -> None:
    commands = SiteEngine(_settings(tmp_path)).commands()
    assert set(commands) == {
        "site.apply",
        "site.remove",
        "site.certificate.issue",
        "site.certificate.status",
        "site.ftp.create",
        "site.ftp.password",
        "site.ftp.delete",
    }
    assert all(spec.idempotent and spec.description for spec in commands.values())


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = SiteSettings.from_env(
        {
            "YAKPANEL_SITE_CONF_DIR": "/etc/nginx/custom",
            "YAKPANEL_SITE_NGINX_TEST_ARGV": '["/usr/sbin/nginx", "-t"]',
            "YAKPANEL_SITE_HTTP_PORT": "8080",
            "YAKPANEL_SITE_PROBES_FILE": "/var/lib/yakpanel/agent/probes.json",
        }
    )
    assert settings.conf_dir == Path("/etc/nginx/custom")
    assert settings.nginx_test_argv == ("/usr/sbin/nginx", "-t")
    assert settings.http_port == 8080
    assert settings.probes_file == Path("/var/lib/yakpanel/agent/probes.json")
    assert settings.sites_root.is_absolute()
    for bad in (
        {"YAKPANEL_SITE_CONF_DIR": "relative/dir"},
        {"YAKPANEL_SITE_NGINX_TEST_ARGV": "nginx -t"},
        {"YAKPANEL_SITE_HTTPS_PORT": "70000"},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SiteSettings.from_env(bad)
