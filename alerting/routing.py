"""The notification config, shaped like Alertmanager's: a route tree, receivers, inhibition.

    route:
      receiver: default
      group_by: [alertname, instance]     # or ['...'] for every label
      group_wait: 30s
      group_interval: 5m
      repeat_interval: 4h
      routes:
        - matchers: ['severity="critical"']
          receiver: pager
          continue: true
    receivers:
      - name: default
        urls: ['jsons://hooks.example.com/alerts']
        send_resolved: true
    inhibit_rules:
      - source_matchers: ['severity="critical"']
        target_matchers: ['severity="warning"']
        equal: [alertname, instance]

Matching is Alertmanager's: depth first; the first matching child wins unless it has
`continue: true`; a node none of whose children match is itself the match. Children
inherit receiver, group_by and the three intervals from their parent.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from alerting.inhibition import InhibitRule
from alerting.matchers import (
    Matcher,
    MatcherError,
    MatchType,
    parse_matcher_list,
    render_matchers,
)
from alerting.receivers import SecretURL, redact, validate_url

DEFAULT_GROUP_WAIT = timedelta(seconds=30)
DEFAULT_GROUP_INTERVAL = timedelta(minutes=5)
DEFAULT_REPEAT_INTERVAL = timedelta(hours=4)
GROUP_BY_ALL = "..."


class ConfigError(ValueError):
    """An invalid notification config; the message names the field (e.g. route.routes[1])."""


@dataclass(frozen=True)
class ReceiverConfig:
    name: str
    urls: tuple[SecretURL, ...] = ()
    send_resolved: bool = True

    def to_dict(self, *, reveal: bool = False) -> dict[str, Any]:
        urls = [u.reveal() if reveal else str(u) for u in self.urls]
        return {"name": self.name, "urls": urls, "send_resolved": self.send_resolved}


@dataclass(frozen=True)
class Route:
    receiver: str
    group_by: tuple[str, ...] = ()
    group_by_all: bool = False
    group_wait: timedelta = DEFAULT_GROUP_WAIT
    group_interval: timedelta = DEFAULT_GROUP_INTERVAL
    repeat_interval: timedelta = DEFAULT_REPEAT_INTERVAL
    matchers: tuple[Matcher, ...] = ()
    continue_matching: bool = False
    routes: tuple[Route, ...] = ()
    # The matcher path from the root; part of every group key, so it must stay stable
    # across config reloads for the notification log to keep deduplicating.
    key: str = field(default="{}", compare=False)

    def match(self, labels: Mapping[str, str]) -> list[Route]:
        if not all(m.matches(labels) for m in self.matchers):
            return []
        found: list[Route] = []
        for child in self.routes:
            matched = child.match(labels)
            found.extend(matched)
            if matched and not child.continue_matching:
                break
        return found or [self]

    def group_labels(self, labels: Mapping[str, str]) -> dict[str, str]:
        if self.group_by_all:
            return dict(labels)
        return {name: labels[name] for name in self.group_by if name in labels}

    def walk(self) -> Iterator[Route]:
        yield self
        for child in self.routes:
            yield from child.walk()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "receiver": self.receiver,
            "group_by": [GROUP_BY_ALL] if self.group_by_all else list(self.group_by),
            "group_wait": format_duration(self.group_wait),
            "group_interval": format_duration(self.group_interval),
            "repeat_interval": format_duration(self.repeat_interval),
        }
        if self.matchers:
            out["matchers"] = [str(m) for m in self.matchers]
        if self.continue_matching:
            out["continue"] = True
        if self.routes:
            out["routes"] = [r.to_dict() for r in self.routes]
        return out


@dataclass(frozen=True)
class NotificationConfig:
    route: Route
    receivers: Mapping[str, ReceiverConfig]
    inhibit_rules: tuple[InhibitRule, ...] = ()

    def receiver(self, name: str) -> ReceiverConfig:
        return self.receivers[name]

    def to_dict(self, *, reveal: bool = False) -> dict[str, Any]:
        """The config as data; URLs redacted unless `reveal` (for sealing, never display)."""
        return {
            "route": self.route.to_dict(),
            "receivers": [r.to_dict(reveal=reveal) for r in self.receivers.values()],
            "inhibit_rules": [r.to_dict() for r in self.inhibit_rules],
        }


_DURATION = re.compile(
    r"(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?"
)
_UNITS = (
    ("y", 365 * 86400_000),
    ("w", 7 * 86400_000),
    ("d", 86400_000),
    ("h", 3600_000),
    ("m", 60_000),
    ("s", 1000),
    ("ms", 1),
)


def parse_duration(value: object) -> timedelta:
    """Alertmanager durations (`30s`, `5m`, `1h30m`, `500ms`, `1d`) or seconds as a number."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"invalid duration {value!r}: must not be negative")
        return timedelta(seconds=value)
    text = str(value).strip()
    found = _DURATION.fullmatch(text)
    if not text or found is None or not any(found.groups()):
        raise ValueError(f"invalid duration {value!r} (use e.g. 500ms, 30s, 5m, 4h, 1h30m)")
    millis = sum(int(n) * unit for n, (_, unit) in zip(found.groups(), _UNITS, strict=True) if n)
    return timedelta(milliseconds=millis)


def format_duration(value: timedelta) -> str:
    millis = round(value.total_seconds() * 1000)
    if millis == 0:
        return "0s"
    parts = []
    for suffix, unit in _UNITS[2:]:
        count, millis = divmod(millis, unit)
        if count:
            parts.append(f"{count}{suffix}")
    return "".join(parts)


def load_config(text: str) -> NotificationConfig:
    """Parse YAML (or JSON, a subset of it) into a validated config."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML/JSON: {exc}") from None
    return parse_config(raw)


def load_config_file(path: Path) -> NotificationConfig:
    try:
        return load_config(path.read_text())
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_config(raw: object) -> NotificationConfig:
    data = _mapping(raw, "config")
    _known(data, "config", {"route", "receivers", "inhibit_rules"})
    receivers: dict[str, ReceiverConfig] = {}
    for i, item in enumerate(_list(data.get("receivers"), "receivers")):
        receiver = _parse_receiver(item, f"receivers[{i}]")
        if receiver.name in receivers:
            raise ConfigError(f"receivers[{i}]: receiver {receiver.name!r} is defined twice")
        receivers[receiver.name] = receiver
    if "route" not in data:
        raise ConfigError("config: a top-level 'route' is required")
    root_raw = _mapping(data["route"], "route")
    for banned in ("matchers", "match", "match_re", "continue"):
        if banned in root_raw:
            raise ConfigError(f"route: the root route cannot have '{banned}'")
    if not root_raw.get("receiver"):
        raise ConfigError("route: the root route needs a receiver")
    root = _parse_route(root_raw, "route", None, "{}", receivers)
    rules = []
    for i, item in enumerate(_list(data.get("inhibit_rules"), "inhibit_rules")):
        try:
            rules.append(InhibitRule.from_dict(_mapping(item, f"inhibit_rules[{i}]")))
        except ValueError as exc:
            raise ConfigError(f"inhibit_rules[{i}]: {exc}") from None
    return NotificationConfig(root, receivers, tuple(rules))


_ROUTE_FIELDS = {
    "receiver",
    "group_by",
    "group_wait",
    "group_interval",
    "repeat_interval",
    "matchers",
    "match",
    "match_re",
    "continue",
    "routes",
}


def _parse_route(
    raw: Mapping[str, Any],
    path: str,
    parent: Route | None,
    key: str,
    receivers: Mapping[str, ReceiverConfig],
) -> Route:
    _known(raw, path, _ROUTE_FIELDS)
    receiver = raw.get("receiver", parent.receiver if parent else None)
    if not isinstance(receiver, str) or receiver not in receivers:
        raise ConfigError(f"{path}.receiver: {receiver!r} is not a defined receiver")
    group_by, group_by_all = (parent.group_by, parent.group_by_all) if parent else ((), False)
    if "group_by" in raw:
        names = [str(n) for n in _list(raw["group_by"], f"{path}.group_by")]
        group_by_all = GROUP_BY_ALL in names
        if group_by_all and len(names) > 1:
            raise ConfigError(f"{path}.group_by: '...' groups by every label; list it alone")
        bad = [n for n in names if n != GROUP_BY_ALL and not re.fullmatch(r"[^\s{},=\"]+", n)]
        if bad or len(set(names)) != len(names):
            raise ConfigError(f"{path}.group_by: invalid or repeated label names {names}")
        group_by = () if group_by_all else tuple(names)
    timings: dict[str, timedelta] = {}
    for name, default in (
        ("group_wait", DEFAULT_GROUP_WAIT),
        ("group_interval", DEFAULT_GROUP_INTERVAL),
        ("repeat_interval", DEFAULT_REPEAT_INTERVAL),
    ):
        inherited = getattr(parent, name) if parent else default
        try:
            timings[name] = parse_duration(raw[name]) if name in raw else inherited
        except ValueError as exc:
            raise ConfigError(f"{path}.{name}: {exc}") from None
    for name in ("group_interval", "repeat_interval"):
        if timings[name] <= timedelta(0):
            raise ConfigError(f"{path}.{name}: must be greater than zero")
    matchers = _route_matchers(raw, path)
    cont = raw.get("continue", False)
    if not isinstance(cont, bool):
        raise ConfigError(f"{path}.continue: must be true or false")
    node = Route(
        receiver=receiver,
        group_by=group_by,
        group_by_all=group_by_all,
        matchers=tuple(matchers),
        continue_matching=cont,
        key=key,
        group_wait=timings["group_wait"],
        group_interval=timings["group_interval"],
        repeat_interval=timings["repeat_interval"],
    )
    children: list[Route] = []
    seen: dict[str, int] = {}
    for i, child in enumerate(_list(raw.get("routes"), f"{path}.routes")):
        child_path = f"{path}.routes[{i}]"
        child_raw = _mapping(child, child_path)
        child_key = f"{key}/{render_matchers(_route_matchers(child_raw, child_path))}"
        seen[child_key] = seen.get(child_key, 0) + 1
        if seen[child_key] > 1:  # siblings with the same matchers still need distinct keys
            child_key += f"#{seen[child_key]}"
        children.append(_parse_route(child_raw, child_path, node, child_key, receivers))
    return replace(node, routes=tuple(children))


def _route_matchers(raw: Mapping[str, Any], path: str) -> list[Matcher]:
    try:
        return [
            *parse_matcher_list(_list(raw.get("matchers"), f"{path}.matchers")),
            *_legacy_matchers(raw.get("match"), MatchType.EQUAL, f"{path}.match"),
            *_legacy_matchers(raw.get("match_re"), MatchType.REGEX, f"{path}.match_re"),
        ]
    except MatcherError as exc:
        raise ConfigError(f"{path}.matchers: {exc}") from None


def _parse_receiver(raw: object, path: str) -> ReceiverConfig:
    data = _mapping(raw, path)
    _known(data, path, {"name", "urls", "send_resolved"})
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{path}.name: a receiver needs a name")
    urls = []
    for i, url in enumerate(_list(data.get("urls"), f"{path}.urls")):
        if not isinstance(url, str):
            raise ConfigError(f"{path}.urls[{i}]: must be a string (an apprise URL)")
        try:
            validate_url(url)
        except ValueError as exc:
            raise ConfigError(f"{path}.urls[{i}]: {exc}") from None
        urls.append(SecretURL(url.strip()))
    send_resolved = data.get("send_resolved", True)
    if not isinstance(send_resolved, bool):
        raise ConfigError(f"{path}.send_resolved: must be true or false")
    return ReceiverConfig(name, tuple(urls), send_resolved)


def _legacy_matchers(value: object, kind: MatchType, path: str) -> list[Matcher]:
    if value is None:
        return []
    return [Matcher(str(k), kind, str(v)) for k, v in _mapping(value, path).items()]


def _mapping(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
    return value


def _list(value: object, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
    return value


def _known(data: Mapping[str, Any], path: str, allowed: set[str]) -> None:
    unknown = sorted(str(k) for k in set(data) - allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")


__all__ = [
    "ConfigError",
    "NotificationConfig",
    "ReceiverConfig",
    "Route",
    "format_duration",
    "load_config",
    "parse_config",
    "parse_duration",
    "redact",
]
