"""nginx server blocks for one site: render from a validated spec, swap in, test, reload.

Rendering is a pure function of a `SiteSpec` whose every field already passed the strict
grammars in `yakpanel.hostnames`, so the templates never need quoting or escaping.

Installing a config follows one rule: a config that nginx rejects is never left active.
The new text is written beside the live file under a name nginx's `*.conf` include does
not match, moved over it with `os.replace`, and checked with `nginx -t`; on failure the
previous bytes (or the previous absence) come back before the error is raised, and a
failed reload is undone the same way. The previous bytes are also kept on disk while a
swap is in flight, so a swap interrupted by a crash is finished or rolled back by the
next run instead of leaving an unchecked file that later runs would consider current.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jinja2

from engines.base import EngineError
from engines.site.config import SiteSettings

log = logging.getLogger(__name__)

SiteKind = Literal["static", "php", "proxy"]
COMMAND_TIMEOUT_S = 60.0
STDERR_LINES = 5


@dataclass(frozen=True)
class Redirect:
    source: str
    target: str
    code: int


@dataclass(frozen=True)
class SiteSpec:
    """A site as nginx should serve it; build it only from validated values."""

    site_id: str
    kind: SiteKind
    domains: tuple[str, ...]
    upstream: str | None = None
    redirects: tuple[Redirect, ...] = ()
    force_https: bool = False
    tls: bool = False

    @property
    def primary_domain(self) -> str:
        return self.domains[0]


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("engines.site", "templates"),
        undefined=jinja2.StrictUndefined,
        # nginx config, not HTML: every value is validated before rendering.
        autoescape=False,  # noqa: S701
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _listen(address: str, port: int) -> str:
    if not address:
        return str(port)
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _proxy_pass(upstream: str) -> str:
    if upstream.startswith("unix:"):
        return f"http://{upstream}:"
    authority_and_path = upstream.partition("://")[2]
    has_path = "/" in authority_and_path
    # With a URI part nginx replaces the matched `/` by it, so it must end in `/` or
    # `/x` would reach the upstream as `<path>x`.
    if has_path and not upstream.endswith("/"):
        return upstream + "/"
    return upstream


_SAFE_PATH = re.compile(r"/[A-Za-z0-9._/+-]*\Z")


def render_site(spec: SiteSpec, settings: SiteSettings) -> str:
    """The site's nginx config text (HTTP server, plus an HTTPS one when `tls`)."""
    if spec.kind in ("php", "proxy") and spec.upstream is None:
        raise ValueError(f"a {spec.kind} site needs an upstream")
    for name in ("sites_root", "certs_dir", "acme_webroot"):
        if not _SAFE_PATH.match(str(getattr(settings, name))):
            raise EngineError(
                "invalid_settings",
                f"the site engine's {name} must be an absolute path of letters, digits and "
                "'._/+-' only, because it is written into nginx configuration",
            )
    https_suffix = "" if settings.https_port == 443 else f":{settings.https_port}"
    template = _environment().get_template("site.conf.j2")
    return template.render(
        site=spec,
        listen_http=_listen(settings.listen_address, settings.http_port),
        listen_https=_listen(settings.listen_address, settings.https_port),
        https_port_suffix=https_suffix,
        challenge_root=str(settings.challenge_root(spec.site_id)),
        document_root=str(settings.document_root(spec.site_id)),
        fullchain=str(settings.fullchain_path(spec.site_id)),
        privkey=str(settings.privkey_path(spec.site_id)),
        proxy_pass=_proxy_pass(spec.upstream) if spec.kind == "proxy" and spec.upstream else "",
    )


class NginxSites:
    """Installs and removes per-site config files in `conf_dir`, one swap at a time.

    `lock` serialises every change to nginx's configuration on this node (site configs
    and certificate files alike): nginx -t checks the whole configuration, so two
    concurrent swaps could each see the other's half-written state.
    """

    def __init__(self, settings: SiteSettings) -> None:
        self.settings = settings
        self.lock = asyncio.Lock()

    async def install(self, site_id: str, text: str | None) -> bool:
        """Make `<site_id>.conf` hold `text` (None: not exist), checked and reloaded.

        Returns whether anything changed. Raises `EngineError` (`nginx_test_failed`,
        `nginx_reload_failed`, `nginx_unavailable`) after restoring the previous file.
        """
        async with self.lock:
            return await self._install_locked(site_id, text)

    async def reload(self) -> None:
        """Check and reload nginx (e.g. after new certificate files were written)."""
        async with self.lock:
            await self._check()
            await self._reload()

    async def _install_locked(self, site_id: str, text: str | None) -> bool:
        conf_dir = self.settings.conf_dir
        conf_dir.mkdir(parents=True, exist_ok=True)
        path = self.settings.conf_path(site_id)
        new = None if text is None else text.encode("utf-8")
        keep = conf_dir / f".{site_id}.conf.previous"
        keep_absent = conf_dir / f".{site_id}.conf.previous-absent"
        interrupted = keep.exists() or keep_absent.exists()
        if interrupted:
            old = keep.read_bytes() if keep.exists() else None
            log.warning("site %s: finishing a config swap that was interrupted", site_id)
        else:
            old = _read_or_none(path)
            if old == new:
                return False
            if old is None:
                _write_atomic(keep_absent, b"", 0o600)
            else:
                _write_atomic(keep, old, 0o600)
        _put(path, new)
        try:
            await self._check()
        except EngineError:
            _put(path, old)
            _forget(keep, keep_absent)
            raise
        try:
            await self._reload()
        except EngineError:
            _put(path, old)
            _forget(keep, keep_absent)
            try:
                await self._reload()
            except EngineError as again:
                log.error("site %s: reload after restoring the old config failed too", site_id)
                log.debug("second reload failure: %s", again.message)
            raise
        _forget(keep, keep_absent)
        return interrupted or old != new

    async def _check(self) -> None:
        code, stderr = await _run(self.settings.nginx_test_argv)
        if code != 0:
            raise EngineError(
                "nginx_test_failed",
                "nginx rejected the new configuration, so the previous one was kept: "
                f"{stderr or f'nginx -t exited with {code}'}",
            )

    async def _reload(self) -> None:
        code, stderr = await _run(self.settings.nginx_reload_argv)
        if code != 0:
            raise EngineError(
                "nginx_reload_failed",
                "nginx could not reload, so the previous configuration was restored; "
                "check that nginx is running and try again: "
                f"{stderr or f'reload exited with {code}'}",
                retryable=True,
            )


async def _run(argv: Sequence[str]) -> tuple[int, str]:
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise EngineError(
            "nginx_unavailable",
            f"cannot run {argv[0]!r} ({exc.strerror or exc}); install nginx or set "
            "YAKPANEL_SITE_NGINX_TEST_ARGV / YAKPANEL_SITE_NGINX_RELOAD_ARGV",
            retryable=True,
        ) from None
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise EngineError(
            "nginx_unavailable",
            f"{argv[0]!r} did not finish within {COMMAND_TIMEOUT_S:g} s",
            retryable=True,
        ) from None
    text = (stderr or stdout).decode("utf-8", "replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return process.returncode or 0, " | ".join(lines[:STDERR_LINES])


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _put(path: Path, content: bytes | None) -> None:
    if content is None:
        path.unlink(missing_ok=True)
    else:
        _write_atomic(path, content, 0o644)


def _forget(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _write_atomic(path: Path, content: bytes, mode: int) -> None:
    """Write beside `path` under a name no `*.conf` include matches, then rename over it."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
