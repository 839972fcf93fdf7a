"""The agent's metrics: host metrics and site probes through the OpenTelemetry SDK, kept in
a bounded disk queue and sent to the gateway's OTLP `MetricsService/Export` over mTLS.

    psutil / probes ──▶ MeterProvider ──▶ PeriodicExportingMetricReader (its own thread)
                                              │ QueueMetricExporter: OTLP request bytes
                                              ▼
                                     TelemetryQueue (SQLite, bounded, drop-oldest)
                                              │ MetricsSender (agent event loop)
                                              ▼
                                     gateway MetricsService/Export (mTLS)

`service.AgentTelemetry` wires the parts; docs/agents.md ("Metrics from the node")
describes the metric names, `probes.json` and the settings.
"""
