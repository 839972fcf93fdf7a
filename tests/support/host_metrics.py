"""Host metrics as the agent's OpenTelemetry SDK exports them, written the aggregator's way.

`host_request` builds an OTLP `ExportMetricsServiceRequest` with the metric names and
attributes of the host-metrics contract (dotted names, dotted attribute keys: the
aggregator normalises them); `write_samples` decodes it with the aggregator's decoder,
rolls it up with its pure transform and writes it with its ClickHouse writer — what the
aggregator does with a batch from `yak.metrics.v1`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AGGREGATION_TEMPORALITY_CUMULATIVE

from ingest.aggregator.decode import SampleBatchBuilder
from ingest.aggregator.rollup import aggregate
from ingest.aggregator.writer import BatchSource, ClickHouseWriter
from yakpanel.migrations import CLICKHOUSE_SOURCES, ClickHouseMigrator

from .otlp import metrics_headers

_offsets = itertools.count(1)


@dataclass(frozen=True)
class HostSample:
    """One scrape of a host at `ts_ms`: utilizations are fractions 0-1."""

    ts_ms: int
    cpu_busy: float
    memory_used: float
    disks: dict[str, float] = field(default_factory=lambda: {"/": 0.5})
    load_1m: float = 0.5
    # Cumulative byte counters per (interface, direction).
    network: dict[tuple[str, str], int] = field(default_factory=dict)
    cpus: int = 2


def _attrs(**attributes: str) -> list[KeyValue]:
    return [KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in attributes.items()]


def host_request(samples: list[HostSample], host: str) -> bytes:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.extend(_attrs(**{"host.name": host}))
    scope = rm.scope_metrics.add()
    cpu = scope.metrics.add(name="system.cpu.utilization")
    memory = scope.metrics.add(name="system.memory.utilization")
    disk = scope.metrics.add(name="system.filesystem.utilization")
    load = scope.metrics.add(name="system.cpu.load_average.1m")
    network = scope.metrics.add(name="system.network.io")
    network.sum.is_monotonic = True
    network.sum.aggregation_temporality = AGGREGATION_TEMPORALITY_CUMULATIVE
    for s in samples:
        ns = s.ts_ms * 1_000_000
        for n in range(s.cpus):
            for mode, value in (("idle", 1.0 - s.cpu_busy), ("user", s.cpu_busy)):
                p = cpu.gauge.data_points.add(time_unix_nano=ns, as_double=value)
                p.attributes.extend(_attrs(**{"cpu.mode": mode, "cpu.logical_number": str(n)}))
        for state, value in (("used", s.memory_used), ("free", 1.0 - s.memory_used)):
            p = memory.gauge.data_points.add(time_unix_nano=ns, as_double=value)
            p.attributes.extend(_attrs(**{"system.memory.state": state}))
        for i, (mountpoint, value) in enumerate(sorted(s.disks.items())):
            p = disk.gauge.data_points.add(time_unix_nano=ns, as_double=value)
            p.attributes.extend(
                _attrs(
                    **{
                        "system.device": f"/dev/vda{i + 1}",
                        "system.filesystem.mountpoint": mountpoint,
                    }
                )
            )
        load.gauge.data_points.add(time_unix_nano=ns, as_double=s.load_1m)
        for (interface, direction), total in sorted(s.network.items()):
            p = network.sum.data_points.add(time_unix_nano=ns, as_int=total)
            p.attributes.extend(
                _attrs(**{"network.interface.name": interface, "network.io.direction": direction})
            )
    return req.SerializeToString()


def migrate_clickhouse(client: Any, database: str) -> None:
    ClickHouseMigrator(client, database).apply([m for s in CLICKHOUSE_SOURCES for m in s.load()])


def write_samples(
    client: Any,
    database: str,
    tenant_id: str,
    server_id: str,
    host: str,
    samples: list[HostSample],
) -> None:
    """Decode, roll up and write the samples as `yak.metrics.v1` records would be: one
    record per 5 minutes of samples, so that none is older than the late window."""
    ordered = sorted(samples, key=lambda s: s.ts_ms)
    while ordered:
        first = ordered[0].ts_ms
        chunk = [s for s in ordered if s.ts_ms < first + 300_000]
        ordered = ordered[len(chunk) :]
        received = chunk[-1].ts_ms
        builder = SampleBatchBuilder()
        builder.add(host_request(chunk, host), metrics_headers(tenant_id, server_id, received))
        offset = next(_offsets)
        source = BatchSource(f"test.{server_id}", 0, offset, offset, received)
        batch = aggregate(builder.frame())
        assert batch.late_dropped == 0 and batch.future_dropped == 0
        ClickHouseWriter(client, database).write(batch, source)
