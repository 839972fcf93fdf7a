from __future__ import annotations

import re
from pathlib import Path

import pytest

from yakpanel.clock import ManualClock
from yakpanel.ids import id_timestamp_ms, new_id
from yakpanel.topics import CATALOGUE

ARCHITECTURE = Path(__file__).resolve().parents[3] / "shared" / "ARCHITECTURE.md"


def test_ids_are_version_7_and_time_ordered() -> None:
    ids = [new_id(unix_ms=1_700_000_000_000 + i) for i in range(100)]
    assert all(i.version == 7 for i in ids)
    assert ids == sorted(ids)
    assert id_timestamp_ms(ids[5]) == 1_700_000_000_005
    assert len({new_id() for _ in range(1000)}) == 1000


def test_manual_clock_moves_only_forward() -> None:
    clock = ManualClock()
    start = clock.now()
    clock.advance(90)
    assert (clock.now() - start).total_seconds() == 90
    assert clock.monotonic() == 90
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(-1)


def test_catalogue_names_are_unique_and_valid_kafka_names() -> None:
    names = [t.name for t in CATALOGUE]
    assert len(names) == len(set(names))
    for spec in CATALOGUE:
        assert re.fullmatch(r"[a-zA-Z0-9._-]{1,249}", spec.full_name("t123.")), spec
        assert spec.partitions >= 1
        assert spec.retention_ms > 0
        assert spec.configs()["retention.ms"] == str(spec.retention_ms)


def test_catalogue_holds_every_topic_of_the_architecture() -> None:
    documented = {
        "yak.metrics.v1": "server_id",
        "yak.commands.v1": "server_id",
        "yak.command-results.v1": "server_id",
        "yak.presence.v1": "server_id",
        "yak.events.v1": "aggregate id",
        "yak.alerts.v1": "alert fingerprint",
        "yak.rollups.v1": "series id",
    }
    by_name = {t.name: t for t in CATALOGUE}
    for name, key in documented.items():
        assert name in by_name, f"{name} missing from the catalogue"
        assert by_name[name].key == key
    if ARCHITECTURE.exists():
        text = ARCHITECTURE.read_text()
        for name in re.findall(r"`(yak\.[a-z.-]+\.v\d)`", text):
            assert name in by_name, f"ARCHITECTURE names {name}, the catalogue does not"
