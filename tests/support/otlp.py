"""Building `yak.metrics.v1` records the way the gateway produces them, and what they hold."""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


@dataclass(frozen=True)
class GaugePoint:
    metric: str  # OTLP name, e.g. "system.cpu.load"
    ts_ms: int
    value: float


def gauge_request(points: list[GaugePoint], host: str = "web-1") -> bytes:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.append(KeyValue(key="host.name", value=AnyValue(string_value=host)))
    scope = rm.scope_metrics.add()
    by_name: dict[str, list[GaugePoint]] = {}
    for p in points:
        by_name.setdefault(p.metric, []).append(p)
    for name, pts in by_name.items():
        metric = scope.metrics.add(name=name)
        for p in pts:
            metric.gauge.data_points.add(time_unix_nano=p.ts_ms * 1_000_000, as_double=p.value)
    return req.SerializeToString()


def metrics_headers(
    tenant_id: str, server_id: str, received_at_ms: int, retention_days: int = 30
) -> list[tuple[str, bytes]]:
    return [
        ("tenant_id", tenant_id.encode()),
        ("server_id", server_id.encode()),
        ("received_at", str(received_at_ms).encode()),
        ("retention_days", str(retention_days).encode()),
    ]
