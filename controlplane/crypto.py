"""Secrets at rest: AES-256-GCM under the master key, bound to what they belong to."""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from yakpanel.settings import Settings

_VERSION = b"\x01"


class SecretBox:
    """Seals small secrets. `context` (e.g. "user:<id>:totp") is authenticated, so a
    sealed value copied to another row does not open there."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the master key must be 32 bytes")
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, context: str) -> bytes:
        nonce = os.urandom(12)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, context.encode())

    def open(self, sealed: bytes, context: str) -> bytes:
        if not sealed.startswith(_VERSION) or len(sealed) < 29:
            raise ValueError("not a sealed value")
        try:
            return self._aead.decrypt(sealed[1:13], sealed[13:], context.encode())
        except InvalidTag:
            raise ValueError("sealed value does not open under this key and context") from None


def _dev_secret(settings: Settings, name: str, make: Callable[[], str]) -> str:
    """A secret generated once into the state dir (development only, mode 0600)."""
    if settings.env == "production":
        raise ValueError(f"YAKPANEL_{name.upper()} is required in production")
    path = settings.state_dir.expanduser() / "secrets" / f"{name}"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = make()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(value)
    return value


def load_master_key(settings: Settings) -> bytes:
    """The configured key; in development, a key generated once into the state dir."""
    if settings.master_key is not None:
        return base64.b64decode(settings.master_key.get_secret_value())
    value = _dev_secret(
        settings, "master_key", lambda: base64.b64encode(secrets.token_bytes(32)).decode()
    )
    return base64.b64decode(value)


def load_internal_token(settings: Settings) -> str:
    """Authenticates YakPanel services to each other's internal endpoints."""
    if settings.internal_token is not None:
        return settings.internal_token.get_secret_value()
    return _dev_secret(settings, "internal_token", lambda: secrets.token_urlsafe(32))
