"""How numbers, rates, ages and times read on the pages (one place, so they agree)."""

from __future__ import annotations

from datetime import UTC, datetime

DASH = "—"  # no value


def percent(fraction: float | None) -> str:
    """A 0-1 fraction as a whole percentage: 0.734 → "73 %"."""
    if fraction is None:
        return DASH
    return f"{fraction * 100:.0f} %"


def number(value: float | None, digits: int = 2) -> str:
    if value is None:
        return DASH
    return f"{value:.{digits}f}"


_BINARY_UNITS = ("KiB", "MiB", "GiB", "TiB")


def bytes_per_second(value: float | None) -> str:
    if value is None:
        return DASH
    if abs(value) < 1024:
        return f"{value:.0f} B/s"
    for unit in _BINARY_UNITS:
        value /= 1024
        if abs(value) < 1024 or unit == _BINARY_UNITS[-1]:
            return f"{value:.1f} {unit}/s"
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    """A coarse duration: "12 s", "5 min", "3 h", "2 d"."""
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h"
    return f"{s // 86400} d"


def age(at: datetime | None, now: datetime) -> str:
    if at is None:
        return DASH
    return duration((now - at).total_seconds()) + " ago"


def timestamp(at: datetime | None) -> str:
    if at is None:
        return DASH
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def clock_time(unix_seconds: int, with_date: bool = False, seconds: bool = False) -> str:
    at = datetime.fromtimestamp(unix_seconds, tz=UTC)
    return at.strftime(("%m-%d " if with_date else "") + ("%H:%M:%S" if seconds else "%H:%M"))
