"""Identifiers: time-ordered UUIDv7 (RFC 9562), so primary keys stay index-friendly."""

from __future__ import annotations

import os
import time
import uuid


def new_id(unix_ms: int | None = None) -> uuid.UUID:
    ms = time.time_ns() // 1_000_000 if unix_ms is None else unix_ms
    if not 0 <= ms < 1 << 48:
        raise ValueError("timestamp out of UUIDv7 range")
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a = rand >> 68  # 12 bits
    rand_b = rand & ((1 << 62) - 1)
    value = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return uuid.UUID(int=value)


def id_timestamp_ms(value: uuid.UUID) -> int:
    if value.version != 7:
        raise ValueError("not a UUIDv7")
    return value.int >> 80
