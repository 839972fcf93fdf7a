"""The gateway's standard OTLP/gRPC metrics endpoint (`MetricsService/Export`).

Any OpenTelemetry SDK or collector holding an enrolled agent's client certificate can
export here. Identity is the certificate's: the request goes to `yak.metrics.v1` keyed by
its server and stamped with the tenant, server, arrival time and the plan's retention
(docs/metrics.md); resource attributes claiming another server or tenant are overwritten.
Success is returned only once the broker acknowledged the record (acks=all).

Limits, each per tenant (settings `otlp_max_request_bytes`, `otlp_max_datapoints`,
`otlp_max_new_series_per_hour`): request size, data points per request and new series per
rolling hour. The series budget is kept in this gateway process, so with N gateways a
tenant may mint up to N times the limit.

Agents send the same series request after request, so the series keys of a gauge or sum
are cached per (server, metric name, exact attribute bytes of its points): counting and
keying its points then costs no Python work per point.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
import httpx
from aiokafka.errors import KafkaError
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric

from ingest.gateway.controlplane import ControlPlaneRefused
from yakpanel.topics import METRICS

if TYPE_CHECKING:
    from ingest.gateway.service import GatewayService

log = logging.getLogger(__name__)

SERVER_ATTRIBUTES = frozenset({"server_id", "yakpanel.server_id"})
TENANT_ATTRIBUTES = frozenset({"tenant_id", "yakpanel.tenant_id"})
SERIES_WINDOW_S = 3600.0


def data_points(metric: Metric) -> Iterator[Iterable[KeyValue]]:
    """The attributes of each of a metric's data points, whatever its type."""
    kind = metric.WhichOneof("data")
    if kind is None:
        return
    for point in getattr(metric, kind).data_points:
        yield point.attributes


def _points_attributes_type() -> Any:
    """A view of a Gauge's or Sum's bytes keeping only each data point's attributes (field
    7 of NumberDataPoint), as raw bytes: with unknown fields discarded it serialises to
    the same bytes exactly when the points carry the same attributes in the same order."""
    name = "yakpanel/ingest/gateway/lite.proto"
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(name)
    except KeyError:
        f = descriptor_pb2.FileDescriptorProto(
            name=name, package="yakpanel.gateway.lite", syntax="proto3"
        )
        point = f.message_type.add(name="PointAttributes")
        point.field.add(
            name="attributes",
            number=7,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
        )
        points = f.message_type.add(name="PointsAttributes")
        points.field.add(
            name="data_points",
            number=1,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
            type_name=".yakpanel.gateway.lite.PointAttributes",
        )
        pool.Add(f)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("yakpanel.gateway.lite.PointsAttributes")
    )


_PointsAttributes = _points_attributes_type()


class MetricSeries:
    """(data points, series keys) of a metric, cached for gauges and sums."""

    def __init__(self, max_points: int = 2_000_000) -> None:
        self.max_points = max_points
        self._cache: dict[tuple[uuid.UUID, str, bytes], tuple[int, frozenset[bytes]]] = {}
        self._points = 0

    def of(self, server_id: uuid.UUID, metric: Metric) -> tuple[int, frozenset[bytes]]:
        kind = metric.WhichOneof("data")
        if kind not in ("gauge", "sum"):
            return self._compute(server_id, metric)
        view = _PointsAttributes.FromString(getattr(metric, kind).SerializeToString())
        view.DiscardUnknownFields()
        key = (server_id, metric.name, view.SerializeToString())
        found = self._cache.get(key)
        if found is None:
            found = self._compute(server_id, metric)
            if self._points + found[0] > self.max_points:
                self._cache.clear()
                self._points = 0
            self._cache[key] = found
            self._points += found[0]
        return found

    @staticmethod
    def _compute(server_id: uuid.UUID, metric: Metric) -> tuple[int, frozenset[bytes]]:
        points = 0
        keys = set()
        for attributes in data_points(metric):
            points += 1
            keys.add(series_key(server_id, metric.name, attributes))
        return points, frozenset(keys)


def series_key(server_id: uuid.UUID, name: str, attributes: Iterable[KeyValue]) -> bytes:
    """A short digest of metric name + sorted data-point attributes + server."""
    h = hashlib.blake2b(digest_size=16)
    h.update(server_id.bytes)
    h.update(name.encode())
    for kv in sorted(attributes, key=lambda kv: kv.key):
        h.update(b"\x00")
        h.update(kv.key.encode())
        h.update(b"\x01")
        h.update(kv.value.SerializeToString(deterministic=True))
    return h.digest()


class SeriesBudget:
    """New series per tenant per rolling hour, kept in this process.

    A series is "new" when it was not seen in the last hour; refusing a request records
    none of its series, so a tenant at the limit can still send the series it has.
    """

    def __init__(self, limit: int, window_s: float = SERIES_WINDOW_S) -> None:
        self.limit = limit
        self.window_s = window_s
        self._seen: dict[uuid.UUID, OrderedDict[bytes, float]] = {}

    def admit(self, tenant_id: uuid.UUID, keys: set[bytes], now: float) -> int | None:
        """Records `keys` and returns None, or returns the tenant's new-series count
        (this request's included) when it would exceed the limit."""
        seen = self._seen.setdefault(tenant_id, OrderedDict())
        horizon = now - self.window_s
        while seen:
            oldest, first_seen = next(iter(seen.items()))
            if first_seen >= horizon:
                break
            del seen[oldest]
        new = [k for k in keys if k not in seen]
        if len(seen) + len(new) > self.limit:
            return len(seen) + len(new)
        for k in new:
            seen[k] = now
        return None


class MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, service: GatewayService) -> None:
        s = service.stack.settings
        self.svc = service
        self.max_request_bytes = s.otlp_max_request_bytes
        self.max_datapoints = s.otlp_max_datapoints
        self.series = SeriesBudget(s.otlp_max_new_series_per_hour)
        self.metric_series = MetricSeries()

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        code: grpc.StatusCode,
        reason: str,
        detail: str,
    ) -> None:
        self.svc.stats.refuse(f"otlp:{reason}")
        await context.abort(code, detail)

    async def Export(
        self,
        request: ExportMetricsServiceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ExportMetricsServiceResponse:
        identity, _serial = await self.svc.authenticate(context, "Export")
        tenant_id, server_id = identity.tenant_id, identity.server_id
        size = request.ByteSize()
        if size > self.max_request_bytes:
            await self._refuse(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "request_bytes",
                f"request is {size} bytes; the limit is {self.max_request_bytes}",
            )
        if not request.resource_metrics:
            await self._refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "empty",
                "the request holds no resource metrics",
            )
        points = 0
        keys: set[bytes] = set()
        for rm in request.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if not metric.name:
                        await self._refuse(
                            context,
                            grpc.StatusCode.INVALID_ARGUMENT,
                            "unnamed_metric",
                            "every metric needs a name",
                        )
                    count, metric_keys = self.metric_series.of(server_id, metric)
                    points += count
                    keys.update(metric_keys)
        if points > self.max_datapoints:
            await self._refuse(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "datapoints",
                f"request has {points} data points; the limit is {self.max_datapoints}"
                " per request (otlp_max_datapoints)",
            )
        over = self.series.admit(tenant_id, keys, time.monotonic())
        if over is not None:
            await self._refuse(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "cardinality",
                f"cardinality limit: this request would bring the tenant's new series in"
                f" the last hour to {over}; the limit is {self.series.limit}"
                " (otlp_max_new_series_per_hour)",
            )
        self.svc.stats.identity_overwrites += stamp_identity(request, tenant_id, server_id)
        try:
            retention = await self.svc.controlplane.metric_retention_days(tenant_id)
        except (httpx.HTTPError, ControlPlaneRefused) as exc:
            log.warning("no metric retention for tenant %s: %s", tenant_id, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the control plane is unavailable")
        received_at = time.time_ns() // 1_000_000
        headers = [
            ("tenant_id", str(tenant_id).encode()),
            ("server_id", str(server_id).encode()),
            ("received_at", str(received_at).encode()),
            ("retention_days", str(min(max(retention, 1), 65535)).encode()),
        ]
        try:
            await self.svc.produce(
                METRICS.full_name(self.svc.stack.topic_prefix),
                request.SerializeToString(),
                key=str(server_id).encode(),
                headers=headers,
            )
        except KafkaError as exc:
            # Nothing was acknowledged that was not stored: the client retries.
            log.warning("could not store metrics: %s", exc)
            self.svc.stats.refuse("otlp:unavailable")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "metrics could not be stored")
        self.svc.stats.metrics_requests += 1
        self.svc.stats.metrics_points += points
        return ExportMetricsServiceResponse()


def stamp_identity(
    request: ExportMetricsServiceRequest, tenant_id: uuid.UUID, server_id: uuid.UUID
) -> int:
    """Overwrites resource attributes claiming another server or tenant; returns how many."""
    overwritten = 0
    for rm in request.resource_metrics:
        for kv in rm.resource.attributes:
            if kv.key in SERVER_ATTRIBUTES:
                want = str(server_id)
            elif kv.key in TENANT_ATTRIBUTES:
                want = str(tenant_id)
            else:
                continue
            if kv.value.WhichOneof("value") != "string_value" or kv.value.string_value != want:
                kv.value.Clear()
                kv.value.string_value = want
                overwritten += 1
    return overwritten
