"""The `[telemetry]` table of `agent.toml`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_EXPORT_INTERVAL_S = 10.0
MIN_EXPORT_INTERVAL_S = 0.1
MAX_EXPORT_INTERVAL_S = 3600.0
DEFAULT_QUEUE_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_QUEUE_MAX_ENTRIES = 100_000
MIN_QUEUE_MAX_BYTES = 1024
DEFAULT_PROBES_FILE = "probes.json"

KEYS = ("enabled", "export_interval_s", "queue_max_bytes", "queue_max_entries", "probes_file")


@dataclass(frozen=True)
class TelemetryConfig:
    """Whether the agent collects metrics, how often, how much backlog it keeps on disk
    while the gateway is unreachable, and where its site-probe targets are
    (`probes_file`, relative to the state dir unless absolute)."""

    enabled: bool = True
    export_interval_s: float = DEFAULT_EXPORT_INTERVAL_S
    queue_max_bytes: int = DEFAULT_QUEUE_MAX_BYTES
    queue_max_entries: int = DEFAULT_QUEUE_MAX_ENTRIES
    probes_file: str = DEFAULT_PROBES_FILE


def parse_telemetry(raw: Any) -> TelemetryConfig:
    """The `[telemetry]` table as read by tomllib; raises ValueError saying what is wrong."""
    if not isinstance(raw, dict):
        raise ValueError("telemetry must be a table ([telemetry])")
    unknown = set(raw) - set(KEYS)
    if unknown:
        raise ValueError(
            f"unknown telemetry setting(s) {', '.join(sorted(unknown))}; known: {', '.join(KEYS)}"
        )
    defaults = TelemetryConfig()
    enabled = raw.get("enabled", defaults.enabled)
    if not isinstance(enabled, bool):
        raise ValueError("telemetry.enabled must be true or false")
    interval = raw.get("export_interval_s", defaults.export_interval_s)
    if (
        isinstance(interval, bool)
        or not isinstance(interval, int | float)
        or not MIN_EXPORT_INTERVAL_S <= interval <= MAX_EXPORT_INTERVAL_S
    ):
        raise ValueError(
            f"telemetry.export_interval_s must be a number of seconds from "
            f"{MIN_EXPORT_INTERVAL_S} to {MAX_EXPORT_INTERVAL_S:.0f}"
        )
    max_bytes = raw.get("queue_max_bytes", defaults.queue_max_bytes)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
        raise ValueError("telemetry.queue_max_bytes must be an integer")
    if max_bytes < MIN_QUEUE_MAX_BYTES:
        raise ValueError(f"telemetry.queue_max_bytes must be at least {MIN_QUEUE_MAX_BYTES}")
    max_entries = raw.get("queue_max_entries", defaults.queue_max_entries)
    if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
        raise ValueError("telemetry.queue_max_entries must be a positive integer")
    probes_file = raw.get("probes_file", defaults.probes_file)
    if not isinstance(probes_file, str) or not probes_file:
        raise ValueError("telemetry.probes_file must be a non-empty path")
    return TelemetryConfig(enabled, float(interval), max_bytes, max_entries, probes_file)
