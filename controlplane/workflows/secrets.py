"""Secrets in step payloads, kept sealed under the master key between start and dispatch.

A workflow's payloads live in PostgreSQL for as long as the workflow runs (retries,
compensations), but the agent key a secret must finally be sealed to is only chosen per
command. So `{"$secret": v}` is stored as `{"$boxed": …}` (AES-GCM under the master key,
bound to the workflow and step) and turned back into `{"$secret": v}` only in memory,
right before the command issuer seals it to the agent.
"""

from __future__ import annotations

import base64
from typing import Any

from yakpanel.sealing import SECRET_KEY
from yakpanel.secretbox import SecretBox

BOXED_KEY = "$boxed"

_box: SecretBox | None = None


def use_secret_box(box: SecretBox) -> None:
    """Called by each process's composition root (API lifespan, worker start)."""
    global _box
    _box = box


def current_box(box: SecretBox | None) -> SecretBox:
    if box is not None:
        return box
    if _box is None:
        raise RuntimeError(
            "workflow payloads hold secrets but no secret box is configured: pass box= "
            "or call controlplane.workflows.use_secret_box() at start"
        )
    return _box


def box_secrets(value: Any, box: SecretBox, context: str) -> Any:
    """Every `{"$secret": str}` becomes `{"$boxed": base64}`."""
    if isinstance(value, dict):
        if set(value) == {SECRET_KEY}:
            secret = value[SECRET_KEY]
            if not isinstance(secret, str):
                raise ValueError("a $secret in a step payload must be a string")
            sealed = box.seal(secret.encode(), context)
            return {BOXED_KEY: base64.b64encode(sealed).decode()}
        return {k: box_secrets(v, box, context) for k, v in value.items()}
    if isinstance(value, list):
        return [box_secrets(v, box, context) for v in value]
    return value


def unbox_secrets(value: Any, box: SecretBox, context: str) -> Any:
    """The inverse of `box_secrets`, for the command issuer only."""
    if isinstance(value, dict):
        if set(value) == {BOXED_KEY}:
            raw = base64.b64decode(value[BOXED_KEY])
            return {SECRET_KEY: box.open(raw, context).decode()}
        return {k: unbox_secrets(v, box, context) for k, v in value.items()}
    if isinstance(value, list):
        return [unbox_secrets(v, box, context) for v in value]
    return value


def has_boxed_secrets(value: Any) -> bool:
    if isinstance(value, dict):
        return BOXED_KEY in value or any(has_boxed_secrets(v) for v in value.values())
    if isinstance(value, list):
        return any(has_boxed_secrets(v) for v in value)
    return False
