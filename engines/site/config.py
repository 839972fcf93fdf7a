"""Where the site engine keeps its files and how it drives nginx, pure-ftpd and the probes.

One frozen value object shared by the nginx, ACME and FTP parts of the engine, so that
every part agrees on the layout of a site on disk:

- `<sites_root>/<site_id>/public` is the document root (the FTP account's home is
  `<sites_root>/<site_id>`, one level up, so logs and private files can sit beside it);
- `<conf_dir>/<site_id>.conf` is the site's nginx server blocks (the operator's
  nginx.conf has `include <conf_dir>/*.conf;`);
- `<certs_dir>/<site_id>/{fullchain,privkey}.pem` is its certificate;
- `<acme_webroot>/<site_id>/.well-known/acme-challenge/<token>` serves HTTP-01.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "YAKPANEL_SITE_"
DEFAULT_ROOT = Path("/var/lib/yakpanel/sites")


class SiteSettingsError(ValueError):
    """A `YAKPANEL_SITE_*` variable does not hold a usable value; the message names it."""


@dataclass(frozen=True)
class SiteSettings:
    sites_root: Path
    conf_dir: Path
    certs_dir: Path
    acme_webroot: Path
    nginx_test_argv: tuple[str, ...] = ("nginx", "-t", "-q")
    nginx_reload_argv: tuple[str, ...] = ("nginx", "-s", "reload")
    http_port: int = 80
    https_port: int = 443
    probes_file: Path | None = None
    pure_pw: str = "pure-pw"
    ftp_passwd_file: Path = Path("/etc/pure-ftpd/pureftpd.passwd")
    ftp_db_file: Path = Path("/etc/pure-ftpd/pureftpd.pdb")
    ftp_system_user: str = "www-data"
    # "" listens on every address (production); tests pass "127.0.0.1" to stay on loopback.
    listen_address: str = ""

    def site_dir(self, site_id: str) -> Path:
        """The site's home: FTP chroot, parent of the document root."""
        return self.sites_root / site_id

    def document_root(self, site_id: str) -> Path:
        return self.sites_root / site_id / "public"

    def conf_path(self, site_id: str) -> Path:
        return self.conf_dir / f"{site_id}.conf"

    def cert_dir(self, site_id: str) -> Path:
        return self.certs_dir / site_id

    def fullchain_path(self, site_id: str) -> Path:
        return self.certs_dir / site_id / "fullchain.pem"

    def privkey_path(self, site_id: str) -> Path:
        return self.certs_dir / site_id / "privkey.pem"

    def challenge_root(self, site_id: str) -> Path:
        """nginx's `root` for the ACME location; tokens live under `.well-known/…` below."""
        return self.acme_webroot / site_id

    def challenge_dir(self, site_id: str) -> Path:
        return self.acme_webroot / site_id / ".well-known" / "acme-challenge"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SiteSettings:
        """Build from `YAKPANEL_SITE_<FIELD>` variables (argv fields as JSON lists).

        Unset paths default to the layout under /var/lib/yakpanel/sites and
        /etc/nginx/yakpanel-sites, so `load_engine("engines.site:SiteEngine")` works on a
        node without any configuration.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {
            "sites_root": DEFAULT_ROOT / "www",
            "conf_dir": Path("/etc/nginx/yakpanel-sites"),
            "certs_dir": DEFAULT_ROOT / "certs",
            "acme_webroot": DEFAULT_ROOT / "acme",
        }
        for field in fields(cls):
            name = ENV_PREFIX + field.name.upper()
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            values[field.name] = _convert(name, field.name, raw)
        return cls(**values)


_PATH_FIELDS = {
    "sites_root",
    "conf_dir",
    "certs_dir",
    "acme_webroot",
    "probes_file",
    "ftp_passwd_file",
    "ftp_db_file",
}
_ARGV_FIELDS = {"nginx_test_argv", "nginx_reload_argv"}
_PORT_FIELDS = {"http_port", "https_port"}


def _convert(env_name: str, field: str, raw: str) -> Any:
    if field in _PATH_FIELDS:
        path = Path(raw)
        if not path.is_absolute():
            raise SiteSettingsError(f"{env_name} must be an absolute path, got a relative one")
        return path
    if field in _ARGV_FIELDS:
        try:
            argv = json.loads(raw)
        except ValueError:
            raise SiteSettingsError(
                f'{env_name} must be a JSON list of strings, e.g. ["nginx", "-t"]'
            ) from None
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise SiteSettingsError(
                f'{env_name} must be a non-empty JSON list of strings, e.g. ["nginx", "-t"]'
            )
        return tuple(argv)
    if field in _PORT_FIELDS:
        try:
            port = int(raw)
        except ValueError:
            raise SiteSettingsError(f"{env_name} must be a port number (1-65535)") from None
        if not 1 <= port <= 65535:
            raise SiteSettingsError(f"{env_name} must be a port number (1-65535)")
        return port
    if field == "listen_address":
        try:
            return str(ipaddress.ip_address(raw))
        except ValueError:
            raise SiteSettingsError(f"{env_name} must be an IP address such as 127.0.0.1") from None
    return raw
