"""The engine protocol, the registry, engine loading and the `system` engine."""

from __future__ import annotations

import os
import platform
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from engines.base import (
    CommandContext,
    CommandSpec,
    EngineError,
    EngineLoadError,
    EngineRegistry,
    load_engine,
)
from engines.system import SystemEngine
from tests.support.engines import CountingEngine
from yakpanel.clock import ManualClock


class Reports:
    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []

    async def __call__(self, percent: int, message: str) -> None:
        self.seen.append((percent, message))


def context(clock: ManualClock, reports: Reports, key: str = "key-1") -> CommandContext:
    return CommandContext(
        command_id="cmd-1",
        idempotency_key=key,
        deadline=clock.now() + timedelta(minutes=5),
        clock=clock,
        report=reports,
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def reports() -> Reports:
    return Reports()


async def test_ping_answers_with_the_agent_clock(clock: ManualClock, reports: Reports) -> None:
    out = await SystemEngine().ping(context(clock, reports), {})
    assert out == {"pong": True, "agent_time": "2026-01-01T00:00:00+00:00"}


async def test_info_reads_memory_and_uptime_from_proc(
    tmp_path: Path, clock: ManualClock, reports: Reports
) -> None:
    (tmp_path / "meminfo").write_text("MemTotal:       16318480 kB\nMemFree:  1 kB\n")
    (tmp_path / "uptime").write_text("3600.50 7000.00\n")
    out = await SystemEngine(proc_root=tmp_path).info(context(clock, reports), {})
    assert out["memory_total_bytes"] == 16318480 * 1024
    assert out["uptime_seconds"] == 3600.5
    assert out["boot_time"] == "2025-12-31T22:59:59.500000+00:00"
    assert out["cpu_count"] == os.cpu_count()
    assert out["python_version"] == platform.python_version()
    assert out["kernel"] == platform.release()
    assert out["os"] == platform.system()
    assert out["hostname"]


async def test_info_without_proc_reports_unknowns_instead_of_failing(
    tmp_path: Path, clock: ManualClock, reports: Reports
) -> None:
    out = await SystemEngine(proc_root=tmp_path / "absent").info(context(clock, reports), {})
    assert out["memory_total_bytes"] is None
    assert out["uptime_seconds"] is None
    assert out["boot_time"] is None


async def test_info_on_this_host_reads_the_real_proc(clock: ManualClock, reports: Reports) -> None:
    out = await SystemEngine().info(context(clock, reports), {})
    assert out["memory_total_bytes"] > 0
    assert out["uptime_seconds"] > 0


async def test_sleep_reports_progress_about_once_a_second(
    clock: ManualClock, reports: Reports
) -> None:
    started = time.monotonic()
    out = await SystemEngine().sleep(context(clock, reports), {"seconds": 1.5})
    elapsed = time.monotonic() - started
    assert out == {"slept_seconds": 1.5}
    assert 1.4 < elapsed < 3.0
    assert [p for p, _ in reports.seen] == [67, 100]
    assert reports.seen[-1][1] == "slept 1.5 s of 1.5 s"


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"seconds": 0},
        {"seconds": -1},
        {"seconds": 300.5},
        {"seconds": "5"},
        {"seconds": True},
        {"seconds": None},
        {"seconds": float("nan")},
        {"seconds": float("inf")},
        {"seconds": 1, "extra": 1},
    ],
)
async def test_sleep_refuses_payloads_outside_its_grammar(
    payload: dict[str, Any], clock: ManualClock, reports: Reports
) -> None:
    with pytest.raises(EngineError) as refused:
        await SystemEngine().sleep(context(clock, reports), payload)
    assert refused.value.code == "invalid_payload"
    assert "seconds" in refused.value.message or "extra" in refused.value.message
    assert reports.seen == []


async def test_sleep_accepts_an_integer_number_of_seconds(
    clock: ManualClock, reports: Reports
) -> None:
    assert await SystemEngine().sleep(context(clock, reports), {"seconds": 1}) == {
        "slept_seconds": 1.0
    }


@pytest.mark.parametrize("command", ["ping", "info"])
async def test_commands_without_parameters_refuse_unknown_fields(
    command: str, clock: ManualClock, reports: Reports
) -> None:
    handler = getattr(SystemEngine(), command)
    with pytest.raises(EngineError) as refused:
        await handler(context(clock, reports), {"password": "hunter2-secret"})
    assert refused.value.code == "invalid_payload"
    assert "password" in refused.value.message
    # Validation messages name fields, never their values (they may be opened secrets).
    assert "hunter2-secret" not in refused.value.message


def test_system_engine_declares_its_commands() -> None:
    specs = SystemEngine().commands()
    assert set(specs) == {"system.ping", "system.info", "system.sleep"}
    assert all(spec.idempotent for spec in specs.values())
    assert all(spec.description for spec in specs.values())


class _Named:
    def __init__(self, name: str, types: list[str]) -> None:
        self.name = name
        self._types = types

    def commands(self) -> dict[str, CommandSpec]:
        async def handler(ctx: CommandContext, payload: dict[str, Any]) -> dict[str, Any]:
            return {}

        return {t: CommandSpec(handler, idempotent=False, description=t) for t in self._types}


def test_the_registry_maps_types_to_specs() -> None:
    registry = EngineRegistry([SystemEngine(), CountingEngine()])
    assert registry.types() == [
        "system.info",
        "system.ping",
        "system.sleep",
        "test.effect",
        "test.secret_digest",
    ]
    assert "system.ping" in registry
    assert "system.reboot" not in registry
    assert registry.get("system.reboot") is None
    spec = registry.get("test.effect")
    assert spec is not None and spec.idempotent


def test_the_registry_refuses_two_engines_offering_one_type() -> None:
    with pytest.raises(EngineLoadError, match=r"system\.ping.*'system'.*'system'"):
        EngineRegistry([SystemEngine(), _Named("system", ["system.ping"])])


def test_the_registry_refuses_types_outside_the_engine_namespace() -> None:
    with pytest.raises(EngineLoadError, match=r"must start with 'site\.'"):
        EngineRegistry([_Named("site", ["system.reboot"])])


def test_load_engine_imports_by_string() -> None:
    assert isinstance(load_engine("engines.system:SystemEngine"), SystemEngine)
    assert isinstance(load_engine("tests.support.engines:CountingEngine"), CountingEngine)


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("engines.system.SystemEngine", "must look like"),
        (":SystemEngine", "must look like"),
        ("engines.system:", "must look like"),
        ("engines.no_such_engine:Engine", "cannot import"),
        ("engines.system:NoSuchEngine", "has no 'NoSuchEngine'"),
        ("engines.system:MAX_SLEEP_SECONDS", "is not a class"),
        ("pathlib:PurePath", "is not an engine"),
    ],
)
def test_load_engine_explains_bad_targets(target: str, reason: str) -> None:
    with pytest.raises(EngineLoadError, match=reason):
        load_engine(target)


async def test_progress_is_clamped_to_a_percentage(clock: ManualClock, reports: Reports) -> None:
    ctx = context(clock, reports)
    await ctx.progress(-5, "before")
    await ctx.progress(250, "after")
    assert reports.seen == [(0, "before"), (100, "after")]


async def test_counting_engine_records_one_effect_per_key(
    tmp_path: Path, clock: ManualClock, reports: Reports
) -> None:
    engine = CountingEngine()
    payload = {"dir": str(tmp_path), "hold_seconds": 0.6}
    assert await engine.effect(context(clock, reports, "k1"), payload) == {"effects": 1}
    assert await engine.effect(context(clock, reports, "k1"), payload) == {"effects": 1}
    assert await engine.effect(context(clock, reports, "k2"), payload) == {"effects": 2}
    assert sorted(os.listdir(tmp_path)) == ["k1", "k2"]
    assert [p for p, _ in reports.seen[:2]] == [50, 100]


async def test_counting_engine_refuses_keys_that_escape_its_directory(
    tmp_path: Path, clock: ManualClock, reports: Reports
) -> None:
    with pytest.raises(EngineError, match="cannot name a file"):
        await CountingEngine().effect(context(clock, reports, "../x"), {"dir": str(tmp_path)})
