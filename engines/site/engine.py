"""The `site` engine: serve a site with nginx, remove it, keep its health probes in sync.

A payload is validated completely (pydantic shape, then the `yakpanel.hostnames`
grammars for every name, path and address) before anything is rendered, written or
run; a bad payload fails as `invalid_payload` and leaves the node untouched.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engines.base import CommandContext, CommandSpec, EngineError, parse_payload
from engines.site.acme import CertificateManager
from engines.site.config import SiteSettings
from engines.site.ftp import FtpAccounts
from engines.site.nginx import NginxSites, Redirect, SiteSpec, render_site
from yakpanel.hostnames import (
    normalize_domain,
    validate_fastcgi,
    validate_redirect_target,
    validate_upstream,
    validate_url_path,
)

log = logging.getLogger(__name__)

MAX_DOMAINS = 50
MAX_REDIRECTS = 100
ACME_PREFIX = "/.well-known/acme-challenge/"


def _site_id(value: str) -> str:
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise ValueError("site_id must be a UUID such as 3f2b…-…") from None
    canonical = str(parsed)
    if value.lower() != canonical:
        raise ValueError("site_id must be a UUID in its canonical 8-4-4-4-12 form")
    return canonical


class _RedirectPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str
    target: str
    code: Literal[301, 302, 307, 308] = 301

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        path = validate_url_path(value, field="source")
        if path.startswith(ACME_PREFIX):
            raise ValueError(f"source must not be under {ACME_PREFIX} (certificates need it)")
        return path

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        return validate_redirect_target(value, field="target")


class _ApplyPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    site_id: str
    kind: Literal["static", "php", "proxy"]
    domains: list[str] = Field(min_length=1, max_length=MAX_DOMAINS)
    upstream: str | None = None
    redirects: list[_RedirectPayload] = Field(default_factory=list, max_length=MAX_REDIRECTS)
    force_https: bool = False
    tls: bool = False

    @field_validator("site_id")
    @classmethod
    def _site(cls, value: str) -> str:
        return _site_id(value)

    @field_validator("domains")
    @classmethod
    def _domains(cls, values: list[str]) -> list[str]:
        names = [normalize_domain(v, field=f"domains[{i}]") for i, v in enumerate(values)]
        seen: set[str] = set()
        for i, name in enumerate(names):
            if name in seen:
                raise ValueError(f"domains[{i}] repeats {name}; list each name once")
            seen.add(name)
        return names

    @model_validator(mode="after")
    def _consistent(self) -> _ApplyPayload:
        if self.kind == "static":
            if self.upstream is not None:
                raise ValueError("upstream: a static site has no upstream; leave it null")
        elif self.upstream is None:
            raise ValueError(
                "upstream: a proxy site needs http(s)://host:port or unix:/path.sock"
                if self.kind == "proxy"
                else "upstream: a php site needs its PHP-FPM address, host:port or unix:/path.sock"
            )
        elif self.kind == "proxy":
            self.upstream = validate_upstream(self.upstream, field="upstream")
        else:
            self.upstream = validate_fastcgi(self.upstream, field="upstream")
        if self.force_https and not self.tls:
            raise ValueError(
                "force_https needs tls: true; issue a certificate first, then enable both"
            )
        sources = [r.source for r in self.redirects]
        for i, source in enumerate(sources):
            if source in sources[:i]:
                raise ValueError(f"redirects[{i}].source repeats {source}; one rule per path")
        return self

    def spec(self) -> SiteSpec:
        return SiteSpec(
            site_id=self.site_id,
            kind=self.kind,
            domains=tuple(self.domains),
            upstream=self.upstream,
            redirects=tuple(Redirect(r.source, r.target, r.code) for r in self.redirects),
            force_https=self.force_https,
            tls=self.tls,
        )


class _RemovePayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    site_id: str
    delete_files: bool = False

    @field_validator("site_id")
    @classmethod
    def _site(cls, value: str) -> str:
        return _site_id(value)


class SiteEngine:
    """Sites on this node's nginx, with their ACME certificates and FTP accounts.

    The certificate part reloads nginx through `reload`, so certificate swaps and site
    config swaps never interleave.
    """

    name = "site"

    def __init__(self, settings: SiteSettings | None = None) -> None:
        self.settings = settings if settings is not None else SiteSettings.from_env()
        self._nginx = NginxSites(self.settings)
        self._probes_lock = asyncio.Lock()
        self._certificates = CertificateManager(self.settings, self.reload)
        self._ftp = FtpAccounts(self.settings)

    async def reload(self) -> None:
        """Check (`nginx -t`) and reload nginx under the engine's config lock.

        For parts that change files nginx reads outside the site configs (new
        certificates); raises `EngineError` when the check or the reload fails.
        """
        await self._nginx.reload()

    def commands(self) -> dict[str, CommandSpec]:
        specs = {
            "site.apply": CommandSpec(
                self.apply,
                idempotent=True,
                description=(
                    "Serve a site (static, php or reverse proxy) for its domains with "
                    "redirects and optional HTTPS; the config is checked by nginx -t before "
                    "it replaces the previous one."
                ),
            ),
            "site.remove": CommandSpec(
                self.remove,
                idempotent=True,
                description=(
                    "Stop serving a site; its files are kept unless delete_files is true."
                ),
            ),
        }
        for part in (self._certificates.commands(), self._ftp.commands()):
            clash = specs.keys() & part.keys()
            if clash:
                raise RuntimeError(f"site engine parts both offer {sorted(clash)}")
            specs.update(part)
        return specs

    async def apply(self, ctx: CommandContext, payload: dict[str, Any]) -> dict[str, Any]:
        spec = parse_payload(_ApplyPayload, payload).spec()
        settings = self.settings
        if spec.tls:
            missing = [
                p
                for p in (
                    settings.fullchain_path(spec.site_id),
                    settings.privkey_path(spec.site_id),
                )
                if not p.is_file()
            ]
            if missing:
                raise EngineError(
                    "certificate_missing",
                    f"tls is on but {', '.join(str(p) for p in missing)} is missing; "
                    "issue a certificate (site.certificate.issue) first",
                )
        text = render_site(spec, settings)
        await ctx.progress(20, "configuration rendered")
        document_root = settings.document_root(spec.site_id)
        _prepare_document_root(document_root, spec.primary_domain)
        settings.challenge_dir(spec.site_id).mkdir(mode=0o755, parents=True, exist_ok=True)
        changed = await self._nginx.install(spec.site_id, text)
        await ctx.progress(80, "nginx reloaded" if changed else "configuration unchanged")
        await self._sync_probes(spec.site_id, _probe_target(spec, settings))
        return {
            "config_path": str(settings.conf_path(spec.site_id)),
            "changed": changed,
            "document_root": str(document_root),
        }

    async def remove(self, ctx: CommandContext, payload: dict[str, Any]) -> dict[str, Any]:
        request = parse_payload(_RemovePayload, payload)
        removed = await self._nginx.install(request.site_id, None)
        await self._sync_probes(request.site_id, None)
        if request.delete_files:
            for directory in (
                self.settings.site_dir(request.site_id),
                self.settings.challenge_root(request.site_id),
            ):
                if directory.is_symlink():
                    directory.unlink()
                elif directory.exists():
                    shutil.rmtree(directory)
        return {"removed": removed}

    async def _sync_probes(self, site_id: str, target: dict[str, Any] | None) -> None:
        path = self.settings.probes_file
        if path is None:
            return
        async with self._probes_lock:
            entries: list[Any] = []
            try:
                loaded = json.loads(path.read_bytes())
            except FileNotFoundError:
                loaded = []
            except (OSError, ValueError) as exc:
                log.warning("probes: %s is not valid JSON (%s); rewriting it", path, exc)
                loaded = []
            if isinstance(loaded, list):
                entries = [
                    e for e in loaded if not (isinstance(e, dict) and e.get("site") == site_id)
                ]
            if target is not None:
                entries.append(target)
            if entries == loaded:
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
            tmp.write_text(json.dumps(entries, indent=2) + "\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)


def _probe_target(spec: SiteSpec, settings: SiteSettings) -> dict[str, Any]:
    """Probe the vhost on the node's own address, so DNS and CDNs do not blur the result."""
    address = "127.0.0.1"
    if settings.listen_address:
        parsed = ipaddress.ip_address(settings.listen_address)
        if not parsed.is_unspecified:
            address = f"[{parsed}]" if parsed.version == 6 else str(parsed)
    scheme, port, default = (
        ("https", settings.https_port, 443) if spec.tls else ("http", settings.http_port, 80)
    )
    netloc = address if port == default else f"{address}:{port}"
    return {"site": spec.site_id, "url": f"{scheme}://{netloc}/", "host": spec.primary_domain}


def _prepare_document_root(root: Path, domain: str) -> None:
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    if any(root.iterdir()):
        return
    index = root / "index.html"
    index.write_text(
        '<!doctype html>\n<html><head><meta charset="utf-8">'
        f"<title>{domain}</title></head>\n"
        f"<body><h1>{domain}</h1><p>This site is served by YakPanel. "
        "Upload your files to replace this page.</p></body></html>\n"
    )
    os.chmod(index, 0o644)
