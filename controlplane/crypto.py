"""Secrets at rest: AES-256-GCM under the master key, bound to what they belong to."""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

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


def load_master_key(settings: Settings) -> bytes:
    """The configured key; in development, a key generated once into the state dir."""
    if settings.master_key is not None:
        return base64.b64decode(settings.master_key.get_secret_value())
    if settings.env == "production":
        raise ValueError("YAKPANEL_MASTER_KEY is required in production")
    path = settings.state_dir.expanduser() / "secrets" / "master.key"
    if path.exists():
        return base64.b64decode(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(base64.b64encode(key).decode())
    return key


def master_key_path(settings: Settings) -> Path:
    return settings.state_dir.expanduser() / "secrets" / "master.key"
