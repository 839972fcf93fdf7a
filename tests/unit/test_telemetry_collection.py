"""Host metrics of this machine through the real SDK and the queue exporter: the names,
units and attributes dashboards rely on, cumulative sums, and the `[telemetry]` config."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.metrics.v1.metrics_pb2 import AGGREGATION_TEMPORALITY_CUMULATIVE
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from agent.state import AgentConfigError, load_config
from agent.telemetry.config import TelemetryConfig, parse_telemetry
from agent.telemetry.exporter import QueueMetricExporter
from agent.telemetry.host import MAX_FILESYSTEMS, HostMetrics
from agent.telemetry.queue import TelemetryQueue

# name → (kind, unit, attribute keys)
CONTRACT: dict[str, tuple[str, str, set[str]]] = {
    "system.cpu.utilization": ("gauge", "1", {"cpu.mode"}),
    "system.cpu.time": ("sum", "s", {"cpu.mode"}),
    "system.cpu.load_average.1m": ("gauge", "1", set()),
    "system.cpu.load_average.5m": ("gauge", "1", set()),
    "system.cpu.load_average.15m": ("gauge", "1", set()),
    "system.memory.usage": ("gauge", "By", {"system.memory.state"}),
    "system.memory.utilization": ("gauge", "1", {"system.memory.state"}),
    "system.paging.usage": ("gauge", "By", {"system.paging.state"}),
    "system.filesystem.usage": (
        "gauge",
        "By",
        {"system.device", "system.filesystem.mountpoint", "system.filesystem.state"},
    ),
    "system.filesystem.utilization": (
        "gauge",
        "1",
        {"system.device", "system.filesystem.mountpoint"},
    ),
    "system.disk.io": ("sum", "By", {"system.device", "disk.io.direction"}),
    "system.disk.operations": ("sum", "{operation}", {"system.device", "disk.io.direction"}),
    "system.network.io": ("sum", "By", {"network.interface.name", "network.io.direction"}),
    "system.network.errors": (
        "sum",
        "{packet}",
        {"network.interface.name", "network.io.direction"},
    ),
    "system.network.dropped": (
        "sum",
        "{packet}",
        {"network.interface.name", "network.io.direction"},
    ),
    "system.process.count": ("gauge", "{process}", {"process.status"}),
    "system.uptime": ("gauge", "s", set()),
}


def collect(tmp_path: Path, rounds: int = 2) -> list[ExportMetricsServiceRequest]:
    queue = TelemetryQueue(tmp_path / "q.sqlite3", max_bytes=10**7, max_entries=100)
    reader = PeriodicExportingMetricReader(
        QueueMetricExporter(queue), export_interval_millis=math.inf
    )
    provider = MeterProvider(
        metric_readers=[reader],
        resource=Resource.create({"host.name": "web-1", "service.name": "yakpanel-agent"}),
        shutdown_on_exit=False,
    )
    HostMetrics(provider.get_meter("test"))
    try:
        for _ in range(rounds):
            sum(i * i for i in range(200_000))  # some CPU time between collections
            provider.force_flush()
    finally:
        provider.shutdown()
    out = []
    while (entry := queue.oldest()) is not None:
        out.append(ExportMetricsServiceRequest.FromString(entry.payload))
        queue.remove(entry.id)
    queue.close()
    return out


def metrics_of(request: ExportMetricsServiceRequest) -> dict[str, Any]:
    [rm] = request.resource_metrics
    return {m.name: m for sm in rm.scope_metrics for m in sm.metrics}


def attributes(point: Any) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in point.attributes}


def test_host_metrics_follow_the_contract(tmp_path: Path) -> None:
    requests = collect(tmp_path)
    assert len(requests) == 2
    metrics = metrics_of(requests[-1])
    assert set(CONTRACT) <= set(metrics)
    for name, (kind, unit, keys) in CONTRACT.items():
        metric = metrics[name]
        assert metric.WhichOneof("data") == kind, name
        assert metric.unit == unit, name
        data_points = getattr(metric, kind).data_points
        assert data_points, name
        for point in data_points:
            assert set(attributes(point)) == keys, name
        if kind == "sum":
            assert metric.sum.is_monotonic, name
            assert metric.sum.aggregation_temporality == AGGREGATION_TEMPORALITY_CUMULATIVE

    shares = {
        attributes(p)["cpu.mode"]: p.as_double
        for p in metrics["system.cpu.utilization"].gauge.data_points
    }
    assert {"user", "system", "idle"} <= set(shares)
    assert set(shares) <= {"user", "system", "idle", "iowait", "nice", "irq", "softirq", "steal"}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert all(0.0 <= v <= 1.0 for v in shares.values())

    memory = {
        attributes(p)["system.memory.state"]: p.as_double
        for p in metrics["system.memory.utilization"].gauge.data_points
    }
    assert set(memory) == {"used", "free", "cached", "buffers"}
    assert 0 < memory["used"] < 1

    filesystems = metrics["system.filesystem.utilization"].gauge.data_points
    assert 1 <= len(filesystems) <= MAX_FILESYSTEMS
    mountpoints = {attributes(p)["system.filesystem.mountpoint"] for p in filesystems}
    assert "/" in mountpoints
    assert not any(m.startswith(("/proc", "/sys", "/dev")) for m in mountpoints)
    states = defaultdict(set)
    for p in metrics["system.filesystem.usage"].gauge.data_points:
        states[attributes(p)["system.filesystem.mountpoint"]].add(
            attributes(p)["system.filesystem.state"]
        )
    assert all(s == {"used", "free"} for s in states.values())

    statuses = {
        attributes(p)["process.status"]: p.as_int
        for p in metrics["system.process.count"].gauge.data_points
    }
    assert sum(statuses.values()) >= 1
    assert {"running", "sleeping", "zombie"} <= set(statuses)
    [uptime] = metrics["system.uptime"].gauge.data_points
    assert uptime.as_double > 0
    directions = {
        attributes(p)["network.io.direction"] for p in metrics["system.network.io"].sum.data_points
    }
    assert directions == {"receive", "transmit"}


def test_telemetry_config_in_agent_toml(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    assert load_config(path).telemetry == TelemetryConfig()
    path.write_text(
        'capabilities = ["system.ping"]\n'
        "[telemetry]\n"
        "enabled = false\n"
        "export_interval_s = 0.5\n"
        "queue_max_bytes = 2048\n"
        'probes_file = "/etc/yakpanel/probes.json"\n'
    )
    assert load_config(path).telemetry == TelemetryConfig(
        enabled=False,
        export_interval_s=0.5,
        queue_max_bytes=2048,
        probes_file="/etc/yakpanel/probes.json",
    )
    for bad in (
        "export_interval_s = 0",
        "export_interval_s = true",
        "queue_max_bytes = 10",
        "queue_max_entries = 0",
        'enabled = "yes"',
        "interval = 5",
    ):
        path.write_text(f"[telemetry]\n{bad}\n")
        with pytest.raises(AgentConfigError, match="telemetry"):
            load_config(path)
    with pytest.raises(ValueError, match="table"):
        parse_telemetry(5)
