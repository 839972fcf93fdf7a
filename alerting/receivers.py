"""Receivers: apprise URLs as secret values, redaction, payloads and the senders.

A receiver URL carries tokens and passwords, so it lives in a `SecretURL` whose `str()`
and `repr()` are redacted; only `reveal()` (used by the senders) yields the real URL.

Delivery (the retry loop is `alerting.runner.Notifier`): `json://` and `jsons://` URLs
receive exactly Alertmanager's webhook JSON (version 4), POSTed by us with httpx, because
apprise's JSON plugin would wrap our body as a string in its own
`{"version","title","message","attachments","type"}` envelope. Apprise's URL syntax still
applies: `user:pass@` (basic auth), `+Header=v`, `-param=v`, `method=`, `verify=no`, and
`:key=v` payload overrides (add a key, `:key=` drops one, `:key=name` renames one). Every
other scheme goes through apprise with a plain-text title and body.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, cast
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import apprise
import httpx
from apprise.plugins.custom_json import NotifyJSON

if TYPE_CHECKING:
    from alerting.dispatch import Notification

WEBHOOK_SCHEMES = frozenset({"json", "jsons"})
# Schemes whose host is a network address; elsewhere apprise puts tokens in host and path.
_ADDRESS_SCHEMES = WEBHOOK_SCHEMES | {"form", "forms", "xml", "xmls", "mailto", "mailtos"}
# Query parameters that carry settings, not secrets; every other value is masked.
_VISIBLE_PARAMS = frozenset(
    {"from", "to", "cc", "bcc", "smtp", "mode", "method", "verify", "format", "name"}
    | {"overflow", "retry", "wait", "optional", "cto", "rto", "priority", "image", "tz"}
)
_MASK = "****"


class Sealer(Protocol):
    """What encrypts secrets at rest (`yakpanel.secretbox.SecretBox` fits)."""

    def seal(self, plaintext: bytes, context: str) -> bytes: ...
    def open(self, sealed: bytes, context: str) -> bytes: ...


class SecretURL:
    """A receiver URL that prints redacted; `reveal()` is the only way to the secret."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    @property
    def scheme(self) -> str:
        return self._value.partition("://")[0].lower()

    def seal(self, sealer: Sealer, context: str) -> bytes:
        return sealer.seal(self._value.encode(), context)

    @classmethod
    def unseal(cls, sealer: Sealer, sealed: bytes, context: str) -> SecretURL:
        return cls(sealer.open(sealed, context).decode())

    def __str__(self) -> str:
        return redact(self._value)

    def __repr__(self) -> str:
        return f"SecretURL({redact(self._value)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretURL) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def redact(url: str) -> str:
    """The URL for logs and display: passwords, tokens and parameter values masked."""
    return _analyse(url)[0]


def redact_text(text: str, url: str) -> str:
    """`text` (an error message, say) with every secret piece of `url` masked."""
    for piece in sorted(_analyse(url)[1], key=len, reverse=True):
        for form in {piece, unquote(piece), quote(piece, safe="")}:
            if len(form) >= 3:
                text = text.replace(form, _MASK)
    return re.sub(r"(://[^/\s:@]*:)[^@\s/]+@", rf"\1{_MASK}@", text)


def _analyse(url: str) -> tuple[str, set[str]]:
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return "<unparseable URL>", {url}
    scheme = parts.scheme.lower()
    if not scheme or (not parts.netloc and not parts.path):
        return "<unparseable URL>", {url}
    # Split by hand: apprise hosts are often tokens that are no valid host or port.
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    secrets = {password} if password else set()
    segments = parts.path.split("/")
    if scheme in _ADDRESS_SCHEMES:
        # Webhook paths often carry the token (Slack: /services/<team>/<bot>/<token>): mask
        # what looks like one.
        hidden = [s for s in segments if _looks_like_token(unquote(s))]
    else:
        hidden = [s for s in segments if s]
        secrets.update(s for s in (user, hostport) if s)
        user = _mask_token(user) if user else ""
        hostport = _mask_token(hostport) if hostport else ""
    secrets.update(hidden)
    path = "/".join(_mask_token(s) if s in hidden else s for s in segments)
    netloc = f"{user}{':' + _MASK if password else ''}{at}{hostport}"
    query: list[str] = []
    for pair in filter(None, parts.query.split("&")):
        key, sep, value = pair.partition("=")
        if value and unquote(key).lower() not in _VISIBLE_PARAMS:
            secrets.add(value)
            value = _MASK
        query.append(f"{key}{sep}{value}")
    return urlunsplit((scheme, netloc, path, "&".join(query), parts.fragment)), secrets


def _looks_like_token(segment: str) -> bool:
    mixed = any(c.isdigit() for c in segment) and any(c.isalpha() for c in segment)
    return len(segment) >= 24 or (len(segment) >= 12 and mixed)


def _mask_token(token: str) -> str:
    return f"{token[0]}...{token[-1]}" if len(token) >= 8 else _MASK


def validate_url(url: str) -> None:
    """Raise ValueError (naming the URL redacted) if no sender can use it."""
    scheme = url.partition("://")[0].lower()
    if scheme in WEBHOOK_SCHEMES:
        if not _webhook_target(url)[0].startswith(("http://", "https://")):
            raise ValueError(f"{redact(url)}: a webhook URL needs a host")
        return
    capture = apprise.LogCapture(level=logging.WARNING, fmt="%(message)s")  # type: ignore[no-untyped-call]
    with capture as captured:
        plugin = apprise.Apprise.instantiate(url)
    if plugin is None:
        reasons = "; ".join(line for line in captured.getvalue().splitlines() if line.strip())
        reason = redact_text(reasons, url) or "apprise does not support this URL"
        raise ValueError(f"{redact(url)}: {reason}")


class DeliveryError(Exception):
    """A receiver refused or could not take a notification; the text is safe to show."""


def webhook_payload(n: Notification, external_url: str = "") -> dict[str, Any]:
    """Alertmanager's webhook body (version 4) for one notification."""
    alerts = [*n.firing_alerts, *n.resolved_alerts]
    resolved = {a.fingerprint for a in n.resolved_alerts}
    return {
        "version": "4",
        "groupKey": n.group_key,
        "truncatedAlerts": 0,
        "status": n.status,
        "receiver": n.receiver,
        "groupLabels": dict(n.group_labels),
        "commonLabels": _common([a.labels for a in alerts]),
        "commonAnnotations": _common([a.annotations for a in alerts]),
        "externalURL": external_url,
        "alerts": [
            {
                "status": "resolved" if a.fingerprint in resolved else "firing",
                "labels": dict(a.labels),
                "annotations": dict(a.annotations),
                "startsAt": _rfc3339(a.starts_at),
                "endsAt": _rfc3339(a.ends_at) if a.fingerprint in resolved else _ZERO_TIME,
                "generatorURL": a.generator_url,
                "fingerprint": a.fingerprint,
            }
            for a in alerts
        ],
    }


def text_message(n: Notification) -> tuple[str, str]:
    """A plain-text title and body for email and chat receivers."""
    names = " ".join(v for _, v in sorted(n.group_labels.items()))
    count = f":{len(n.firing_alerts)}" if n.status == "firing" else ""
    title = f"[{n.status.upper()}{count}] {names or n.receiver}".rstrip()
    lines: list[str] = []
    for heading, alerts in (("Firing", n.firing_alerts), ("Resolved", n.resolved_alerts)):
        if not alerts:
            continue
        lines.append(f"Alerts {heading}:")
        for a in alerts:
            labels = ", ".join(f"{k}={v}" for k, v in sorted(a.labels.items()))
            lines.append(f"- {labels}")
            lines.extend(f"  {k}: {v}" for k, v in sorted(a.annotations.items()))
            lines.append(f"  started: {_rfc3339(a.starts_at)}")
            if heading == "Resolved" and a.ends_at is not None:
                lines.append(f"  ended: {_rfc3339(a.ends_at)}")
            if a.generator_url:
                lines.append(f"  source: {a.generator_url}")
        lines.append("")
    lines.append(f"Group: {n.group_key}")
    return title, "\n".join(lines)


_ZERO_TIME = "0001-01-01T00:00:00Z"


def _rfc3339(moment: Any) -> str:
    if moment is None:
        return _ZERO_TIME
    return str(moment.isoformat().replace("+00:00", "Z"))


def _common(maps: list[Mapping[str, str]]) -> dict[str, str]:
    if not maps:
        return {}
    common = dict(maps[0])
    for other in maps[1:]:
        common = {k: v for k, v in common.items() if other.get(k) == v}
    return common


class Sender(Protocol):
    """Hands one notification to one receiver URL; raises on any failure."""

    async def send(self, notification: Notification) -> None: ...


def _webhook_target(url: str) -> tuple[str, dict[str, Any]]:
    parsed = cast("dict[str, Any] | None", NotifyJSON.parse_url(url))  # type: ignore[no-untyped-call]
    if not parsed or not parsed.get("host"):
        return "", {}
    port = f":{parsed['port']}" if parsed.get("port") else ""
    scheme = "https" if parsed.get("secure") else "http"
    return f"{scheme}://{parsed['host']}{port}{parsed.get('fullpath') or '/'}", parsed


class WebhookSender:
    """POSTs Alertmanager's webhook JSON to `json://` / `jsons://` URLs."""

    def __init__(self, *, timeout: float = 10.0, external_url: str = "") -> None:
        self._timeout = timeout
        self._external_url = external_url
        self._clients: dict[bool, httpx.AsyncClient] = {}

    async def send(self, notification: Notification) -> None:
        url = notification.url.reveal()
        target, parsed = _webhook_target(url)
        if not target:
            raise DeliveryError("not a usable json:// or jsons:// URL")
        payload = webhook_payload(notification, self._external_url)
        for key, value in (parsed.get("payload") or {}).items():
            if key in payload:
                moved = payload.pop(key)
                if value:
                    payload[value] = moved
            else:
                payload[key] = value
        user, password = parsed.get("user"), parsed.get("password")
        auth = (unquote(user), unquote(password or "")) if user else None
        verify = bool(parsed.get("verify", True))
        client = self._clients.get(verify)
        if client is None:
            client = self._clients[verify] = httpx.AsyncClient(verify=verify)
        response = await client.request(
            str(parsed.get("method") or "POST").upper(),
            target,
            content=json.dumps(payload).encode(),
            params=parsed.get("params") or None,
            headers={"Content-Type": "application/json", **(parsed.get("headers") or {})},
            auth=auth,
            timeout=self._timeout,
        )
        if not response.is_success:
            detail = response.text[:200].strip()
            raise DeliveryError(f"HTTP {response.status_code}" + (f": {detail}" if detail else ""))

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


class AppriseSender:
    """Everything apprise supports (email, Slack, Telegram, ...), as plain text."""

    def __init__(self, *, timeout: float = 10.0) -> None:
        self._timeout = timeout

    async def send(self, notification: Notification) -> None:
        notifier = apprise.Apprise()
        if not notifier.add(notification.url.reveal()):
            raise DeliveryError("apprise cannot load this URL")
        title, body = text_message(notification)
        kind = apprise.NotifyType.FAILURE if notification.status == "firing" else "success"
        result = await notifier.async_notify(
            body=body,
            title=title,
            notify_type=kind,
            body_format=apprise.NotifyFormat.TEXT,
            timeout=self._timeout,
        )
        if not result:
            messages = [e.message for service in result for e in service.logs()]
            raise DeliveryError("; ".join(messages) or f"apprise reported {result.status.name}")
