"""Prometheus durations (`5m`, `1h30m`, `0`) as rule and test files write them."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = (
    ("y", 365 * 86_400_000),
    ("w", 7 * 86_400_000),
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1000),
    ("ms", 1),
)
_DURATION = re.compile(
    r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$"
)


class DurationError(ValueError):
    pass


def parse_duration(value: object) -> timedelta:
    """`1h30m` → 90 minutes. Units y, w, d, h, m, s, ms, largest first, each at most once;
    `0` alone is zero. Anything else (negative, fractional, bare numbers) is refused."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DurationError(f"expected a duration such as 5m or 1h30m, got {value!r}")
    text = str(value).strip()
    if text == "0":
        return timedelta(0)
    found = _DURATION.match(text)
    if not text or found is None:
        raise DurationError(
            f"invalid duration {text!r}: use units y, w, d, h, m, s, ms such as 30s, 5m, 1h30m"
        )
    ms = sum(int(g) * unit for g, (_, unit) in zip(found.groups(), _UNITS, strict=True) if g)
    return timedelta(milliseconds=ms)


def format_duration(value: timedelta) -> str:
    """The shortest Prometheus spelling: 90 minutes → `1h30m`, zero → `0s`."""
    ms = value // timedelta(milliseconds=1)
    if ms == 0:
        return "0s"
    sign = "-" if ms < 0 else ""
    ms = abs(ms)
    parts = []
    for name, unit in _UNITS:
        if ms >= unit:
            parts.append(f"{ms // unit}{name}")
            ms %= unit
    return sign + "".join(parts)
