"""ACME certificates for sites: HTTP-01 through the site's webroot, stored for nginx.

Issuance runs the blocking `acme` client in a worker thread. Nothing on disk that nginx
reads changes until a complete, verified certificate and its key are in hand, so a
failed issuance or renewal leaves the old certificate serving; the command fails with a
reason and the control plane turns that into an event.

Storage under `<certs_dir>/<site_id>/` (0700)::

    fullchain.pem -> live/fullchain.pem      (0644)
    privkey.pem   -> live/privkey.pem        (0600)
    live          -> v-<serial>/             (one symlink, swapped by rename)
    v-<serial>/{fullchain,privkey}.pem

nginx opens `fullchain.pem` and `privkey.pem` as two paths. Replacing two files can
never be atomic, so both paths resolve through the single `live` symlink, and a new
pair becomes current with one `rename()` of that symlink: any reload, ours or an
operator's, sees either the old pair or the new pair, never a certificate with the
other one's key. The previous version directory stays until nginx has loaded the new
pair, so a failed reload can swap back to it; then it is pruned. Plain files left by
an earlier layout are adopted into a version directory first, unchanged byte for byte.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy.jwk import JWK, JWKRSA
from pydantic import BaseModel, ConfigDict, Field, field_validator

from engines.base import CommandContext, CommandSpec, EngineError, parse_payload
from engines.site.config import SiteSettings
from yakpanel.hostnames import InvalidName, normalize_domain

log = logging.getLogger(__name__)

ACCOUNTS_DIR = "_accounts"
ORDER_TIMEOUT = dt.timedelta(seconds=90)
USER_AGENT = "yakpanel-site-engine"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,253}")


def _site_id(value: str) -> str:
    try:
        canonical = str(uuid.UUID(value))
    except ValueError:
        raise ValueError("site_id must be a UUID such as 0b6f…-…") from None
    if canonical != value:
        raise ValueError("site_id must be a lowercase, hyphenated UUID")
    return value


class _IssuePayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    site_id: str
    domains: list[str] = Field(min_length=1, max_length=50)
    directory_url: str = Field(max_length=2048)
    email: str | None = Field(default=None, max_length=320)
    ca_bundle: str | None = Field(default=None, max_length=1_000_000)
    force: bool = False
    renew_before_days: int = Field(default=30, ge=0, le=365)

    _check_site = field_validator("site_id")(_site_id)

    @field_validator("domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        names: list[str] = []
        for raw in value:
            try:
                name = normalize_domain(raw)
            except InvalidName as exc:
                raise ValueError(str(exc)) from None
            if name not in names:
                names.append(name)
        return names

    @field_validator("directory_url")
    @classmethod
    def _directory(cls, value: str) -> str:
        if not re.fullmatch(r"https://[A-Za-z0-9.\[\]:-]+(/[A-Za-z0-9._~/%-]*)?", value):
            raise ValueError("must be the https:// URL of an ACME directory, without credentials")
        return value

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        if value is not None and not _EMAIL.fullmatch(value):
            raise ValueError("must be a plain address like ops@example.com")
        return value

    @field_validator("ca_bundle")
    @classmethod
    def _bundle(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            x509.load_pem_x509_certificates(value.encode())
        except ValueError:
            raise ValueError("must hold one or more PEM certificates") from None
        return value


class _StatusPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    site_id: str
    _check_site = field_validator("site_id")(_site_id)


@dataclass(frozen=True)
class _Issued:
    fullchain_pem: bytes
    key_pem: bytes


def _describe(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "serial": format(cert.serial_number, "x"),
        "issuer": cert.issuer.rfc4514_string(),
        "domains": _sans(cert),
    }


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(name) for name in ext.value.get_values_for_type(x509.DNSName)]


class CertificateManager:
    """`site.certificate.issue` and `site.certificate.status`.

    `reload` is the site engine's nginx test-and-reload; it is awaited after a new pair
    is in place and must raise `EngineError` when nginx refuses it.
    """

    def __init__(self, settings: SiteSettings, reload: Callable[[], Awaitable[None]]) -> None:
        self._settings = settings
        self._reload = reload
        self._lock = asyncio.Lock()

    def commands(self) -> dict[str, CommandSpec]:
        return {
            "site.certificate.issue": CommandSpec(
                self.issue,
                idempotent=True,
                description=(
                    "Get or renew the site's certificate from an ACME CA over HTTP-01 and "
                    "reload nginx; a valid certificate is kept unless it is due or forced."
                ),
            ),
            "site.certificate.status": CommandSpec(
                self.status,
                idempotent=True,
                description="Whether the site has a certificate, its expiry and names.",
            ),
        }

    async def status(self, ctx: CommandContext, payload: dict[str, Any]) -> dict[str, Any]:
        site_id = parse_payload(_StatusPayload, payload).site_id
        cert = self._current(site_id)
        if cert is None:
            return {"present": False, "not_after": None, "days_left": None, "domains": []}
        left = cert.not_valid_after_utc - ctx.clock.now()
        return {
            "present": True,
            "not_after": cert.not_valid_after_utc.isoformat(),
            "days_left": round(left.total_seconds() / 86400, 2),
            "domains": _sans(cert),
        }

    async def issue(self, ctx: CommandContext, payload: dict[str, Any]) -> dict[str, Any]:
        req = parse_payload(_IssuePayload, payload)
        async with self._lock:
            current = self._current(req.site_id)
            if current is not None and not req.force:
                remaining = current.not_valid_after_utc - ctx.clock.now()
                same_names = sorted(_sans(current)) == sorted(req.domains)
                if same_names and remaining > dt.timedelta(days=req.renew_before_days):
                    return {"issued": False, **_describe(current)}
            await ctx.progress(10, f"ordering a certificate for {', '.join(req.domains)}")
            issued = await asyncio.to_thread(self._obtain, req)
            await ctx.progress(70, "certificate issued; installing it")
            try:
                before = self._adopt(req.site_id)
                try:
                    cert = self._install(req.site_id, issued)
                except OSError:
                    self._roll_back(req.site_id, before)
                    raise
            except OSError as exc:
                raise EngineError(
                    "certificate_install_failed",
                    f"could not store the new certificate ({exc.strerror or type(exc).__name__}"
                    f": {exc.filename}); the previous certificate keeps serving. Check space "
                    "and permissions under certs_dir.",
                    retryable=True,
                ) from None
            await ctx.progress(90, "reloading nginx")
            try:
                await self._reload()
            except Exception as exc:  # noqa: BLE001 - whatever failed, the old pair returns
                self._roll_back(req.site_id, before)
                self._prune(req.site_id)
                try:
                    await self._reload()
                except Exception:
                    log.exception("nginx reload after restoring the old certificate failed")
                reason = exc.message if isinstance(exc, EngineError) else type(exc).__name__
                raise EngineError(
                    "certificate_install_failed",
                    f"nginx refused the new certificate ({reason}); the previous certificate "
                    "was restored. Check the site's nginx configuration and issue again.",
                    retryable=True,
                ) from None
            self._prune(req.site_id)
            log.info(
                "certificate installed for site %s: serial %x, names %s, expires %s",
                req.site_id,
                cert.serial_number,
                ",".join(req.domains),
                cert.not_valid_after_utc.isoformat(),
            )
            return {"issued": True, **_describe(cert)}

    # --- reading ----------------------------------------------------------------------

    def _current(self, site_id: str) -> x509.Certificate | None:
        path = self._settings.fullchain_path(site_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return x509.load_pem_x509_certificates(data)[0]
        except ValueError:
            log.warning("unreadable certificate at %s; a new one will be issued", path)
            return None

    # --- ACME (worker thread) ---------------------------------------------------------

    def _obtain(self, req: _IssuePayload) -> _Issued:
        with tempfile.TemporaryDirectory(prefix="yak-acme-") as tmp:
            verify: Any = True
            if req.ca_bundle is not None:
                verify = str(Path(tmp) / "ca.pem")
                Path(verify).write_text(req.ca_bundle)
            try:
                return self._order(req, verify)
            except EngineError:
                raise
            except requests.exceptions.RequestException as exc:
                raise EngineError(
                    "acme_failed",
                    f"could not talk to the ACME server at {req.directory_url}: "
                    f"{type(exc).__name__}. The old certificate keeps serving; retry later.",
                    retryable=True,
                ) from None
            except OSError as exc:
                raise EngineError(
                    "acme_failed",
                    f"could not write files for the HTTP-01 answer or the ACME account "
                    f"({exc.strerror or type(exc).__name__}: {exc.filename}); check the "
                    "permissions of acme_webroot and certs_dir.",
                    retryable=False,
                ) from None
            except errors.ValidationError as exc:
                raise EngineError(
                    "acme_failed",
                    "the ACME server could not validate the site over HTTP-01 "
                    f"({_first_lines(str(exc))}). Make sure every domain resolves to this "
                    "server and port 80 reaches nginx; the old certificate keeps serving.",
                    retryable=False,
                ) from None
            except errors.TimeoutError:
                raise EngineError(
                    "acme_failed",
                    "the ACME server did not finish the order in time; the old certificate "
                    "keeps serving. Retry later.",
                    retryable=True,
                ) from None
            except (messages.Error, errors.Error) as exc:
                raise EngineError(
                    "acme_failed",
                    f"the ACME server refused the order ({_first_lines(str(exc))}); the old "
                    "certificate keeps serving.",
                    retryable=isinstance(exc, messages.Error)
                    and exc.code in {"badNonce", "rateLimited", "serverInternal"},
                ) from None

    def _order(self, req: _IssuePayload, verify: Any) -> _Issued:
        account_key = self._account_key(req.directory_url)
        # `verify_ssl` is handed to requests as `verify`, which also takes a CA bundle path.
        net = client.ClientNetwork(account_key, verify_ssl=verify, user_agent=USER_AGENT)
        directory = client.ClientV2.get_directory(req.directory_url, net)
        acme = client.ClientV2(directory, net)
        registration = messages.NewRegistration.from_data(
            email=req.email, terms_of_service_agreed=True
        )
        try:
            acme.new_account(registration)
        except errors.ConflictError as exc:
            # The key is already registered: use that account.
            net.account = messages.RegistrationResource(
                uri=exc.location, body=messages.Registration()
            )

        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        order = acme.new_order(crypto_util.make_csr(key_pem, req.domains))
        written: list[Path] = []
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue
                challb = self._http01(authz)
                written.append(self._publish(req.site_id, challb, account_key))
                acme.answer_challenge(challb, challb.response(account_key))
            deadline = dt.datetime.now() + ORDER_TIMEOUT
            order = acme.poll_and_finalize(order, deadline)
        finally:
            for path in written:
                path.unlink(missing_ok=True)
        return self._check_chain(order.fullchain_pem.encode(), key_pem, key, req.domains)

    @staticmethod
    def _http01(authz: messages.AuthorizationResource) -> messages.ChallengeBody:
        for challb in authz.body.challenges:
            if isinstance(challb.chall, challenges.HTTP01):
                return challb
        raise EngineError(
            "acme_failed",
            f"the ACME server offers no HTTP-01 challenge for {authz.body.identifier.value}; "
            "only HTTP-01 is supported.",
        )

    def _publish(self, site_id: str, challb: messages.ChallengeBody, account_key: JWK) -> Path:
        token: str = challb.chall.encode("token")
        if not _TOKEN.fullmatch(token):
            raise EngineError("acme_failed", "the ACME server sent a malformed challenge token")
        root = self._settings.challenge_root(site_id)
        directory = self._settings.challenge_dir(site_id)
        # nginx workers (an unprivileged user) must read these whatever our umask is.
        for part in (root, root / ".well-known", directory):
            part.mkdir(parents=True, exist_ok=True)
            part.chmod(0o755)
        path = directory / token
        tmp = directory / f".{token}.tmp"
        tmp.write_text(challb.chall.validation(account_key))
        tmp.chmod(0o644)
        os.replace(tmp, path)
        return path

    def _account_key(self, directory_url: str) -> JWKRSA:
        accounts = self._settings.certs_dir / ACCOUNTS_DIR
        accounts.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = accounts / (hashlib.sha256(directory_url.encode()).hexdigest()[:32] + ".json")
        try:
            return JWKRSA.json_loads(path.read_text())
        except FileNotFoundError:
            pass
        key = JWKRSA(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
        _write_private(path, json.dumps(key.to_json()).encode())
        return key

    @staticmethod
    def _check_chain(
        fullchain: bytes, key_pem: bytes, key: ec.EllipticCurvePrivateKey, domains: list[str]
    ) -> _Issued:
        certs = x509.load_pem_x509_certificates(fullchain)
        leaf = certs[0]
        if leaf.public_key() != key.public_key() or sorted(_sans(leaf)) != sorted(domains):
            raise EngineError(
                "acme_failed",
                "the ACME server returned a certificate that does not match the order; "
                "the old certificate keeps serving.",
            )
        try:
            for child, parent in itertools.pairwise(certs):
                child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise EngineError(
                "acme_failed",
                "the ACME server returned a chain whose certificates do not sign each other; "
                "the old certificate keeps serving.",
            ) from None
        return _Issued(fullchain, key_pem)

    # --- storage ----------------------------------------------------------------------

    def _adopt(self, site_id: str) -> str | None:
        """Make sure the served pair goes through `live`; return what `live` points at.

        Plain files from an earlier layout are copied, unchanged, into a version
        directory first, so the pair nginx serves stays byte for byte the same.
        """
        site_dir = self._settings.cert_dir(site_id)
        site_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        site_dir.chmod(0o700)
        chain, key = site_dir / "fullchain.pem", site_dir / "privkey.pem"
        if not chain.is_symlink() and chain.is_file() and key.is_file():
            version = site_dir / "v-adopted"
            version.mkdir(mode=0o700, exist_ok=True)
            _write_private(version / "privkey.pem", key.read_bytes())
            _write_file(version / "fullchain.pem", chain.read_bytes(), 0o644)
            _symlink(site_dir / "live", version.name)
            for name in ("privkey.pem", "fullchain.pem"):
                _symlink(site_dir / name, f"live/{name}")
            _fsync_dir(site_dir)
        live = site_dir / "live"
        return os.readlink(live) if live.is_symlink() else None

    def _install(self, site_id: str, issued: _Issued) -> x509.Certificate:
        cert = x509.load_pem_x509_certificates(issued.fullchain_pem)[0]
        site_dir = self._settings.cert_dir(site_id)
        version = site_dir / f"v-{cert.serial_number:x}"
        staging = Path(tempfile.mkdtemp(prefix=".new-", dir=site_dir))
        _write_private(staging / "privkey.pem", issued.key_pem)
        _write_file(staging / "fullchain.pem", issued.fullchain_pem, 0o644)
        if version.exists():
            shutil.rmtree(version)
        os.replace(staging, version)
        _fsync_dir(site_dir)
        _symlink(site_dir / "live", version.name)
        for name in ("fullchain.pem", "privkey.pem"):
            _symlink(site_dir / name, f"live/{name}")
        _fsync_dir(site_dir)
        return cert

    def _roll_back(self, site_id: str, before: str | None) -> None:
        """Serve exactly what was served before this command (nothing, if nothing was)."""
        site_dir = self._settings.cert_dir(site_id)
        if before is not None:
            _symlink(site_dir / "live", before)
        else:
            for name in ("fullchain.pem", "privkey.pem", "live"):
                if (site_dir / name).is_symlink():
                    (site_dir / name).unlink()
        _fsync_dir(site_dir)

    def _prune(self, site_id: str) -> None:
        """Drop versions nginx no longer serves, once it has loaded the new one."""
        site_dir = self._settings.cert_dir(site_id)
        live = site_dir / "live"
        keep = os.readlink(live) if live.is_symlink() else None
        for entry in site_dir.iterdir():
            if entry.name.startswith(("v-", ".new-")) and entry.name != keep:
                shutil.rmtree(entry, ignore_errors=True)


def _first_lines(text: str, limit: int = 3) -> str:
    return " / ".join(line.strip() for line in text.splitlines()[:limit] if line.strip())


def _write_file(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    _write_file(tmp, data, 0o600)
    os.replace(tmp, path)


def _symlink(link: Path, target: str) -> None:
    """Point `link` at `target` atomically, whatever `link` was before."""
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}.lnk")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
