"""Secrets every service of one deployment shares: the master key and the internal
token. Configured in production; in development generated once into the state dir."""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Callable

from yakpanel.settings import Settings


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
