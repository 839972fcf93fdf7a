"""A `MetricExporter` that encodes each collection as an OTLP `ExportMetricsServiceRequest`
and appends the bytes to the disk queue; the sender delivers them.

It runs on the metric reader's thread and never touches the network, so an unreachable
gateway never slows a collection down. Every instrument kind is exported CUMULATIVE: sums
stay counters and rates come from consecutive values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    MetricExportResult,
    MetricsData,
)

from agent.telemetry.queue import QueueClosedError, TelemetryQueue

log = logging.getLogger(__name__)

CUMULATIVE: dict[type, AggregationTemporality] = dict.fromkeys(
    (
        Counter,
        UpDownCounter,
        Histogram,
        ObservableCounter,
        ObservableUpDownCounter,
        ObservableGauge,
    ),
    AggregationTemporality.CUMULATIVE,
)


class QueueMetricExporter(MetricExporter):
    """Appends each batch to `queue`, then calls `on_append` (from the reader's thread)."""

    def __init__(self, queue: TelemetryQueue, on_append: Callable[[], None] | None = None) -> None:
        super().__init__(preferred_temporality=CUMULATIVE)
        self.queue = queue
        self.on_append = on_append
        self.exported = 0
        self._dropping = False

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        try:
            request = encode_metrics(metrics_data)
            if not request.resource_metrics:
                return MetricExportResult.SUCCESS
            dropped = self.queue.append(request.SerializeToString())
        except QueueClosedError:
            log.debug("telemetry queue closed; a final collection was not kept")
            return MetricExportResult.FAILURE
        except Exception:
            log.exception("could not queue a metrics collection")
            return MetricExportResult.FAILURE
        self.exported += 1
        if dropped and not self._dropping:
            # Once per episode: an outage fills the queue and then drops at every tick.
            log.warning(
                "telemetry queue full (at most %d bytes, %d entries): dropping the oldest "
                "collections until the gateway takes them again",
                self.queue.max_bytes,
                self.queue.max_entries,
            )
        self._dropping = bool(dropped)
        if self.on_append is not None:
            self.on_append()
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """The queue belongs to the caller, which closes it after the provider."""
