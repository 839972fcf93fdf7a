"""The control plane's composition root: everything a request handler may use."""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.access.credentials import LoginThrottle
from controlplane.crypto import SecretBox
from controlplane.db import Database
from controlplane.keys import PlatformKeys
from yakpanel.clock import Clock
from yakpanel.settings import Settings


@dataclass
class ControlPlane:
    settings: Settings
    db: Database
    clock: Clock
    secrets: SecretBox
    throttle: LoginThrottle
    internal_token: str
    keys: PlatformKeys | None = None

    @property
    def platform_keys(self) -> PlatformKeys:
        if self.keys is None:
            raise RuntimeError("platform keys are loaded at API start")
        return self.keys

    @property
    def cookie_secure(self) -> bool:
        return self.settings.env == "production"
