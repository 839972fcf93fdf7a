"""Helpers shared by the benchmarks: JSON-line output and percentiles."""

from __future__ import annotations

import json
import platform
import sys
from datetime import UTC, datetime
from typing import Any


def emit(bench: str, **fields: Any) -> None:
    record = {
        "bench": bench,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        **fields,
    }
    print(json.dumps(record), flush=True)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def fail(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(1)
