"""Secrets at rest for the control plane (the box itself is in the shared kernel)."""

from __future__ import annotations

from yakpanel.secretbox import SecretBox
from yakpanel.service_secrets import load_internal_token, load_master_key

__all__ = ["SecretBox", "load_internal_token", "load_master_key"]
