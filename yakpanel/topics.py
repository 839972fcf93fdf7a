"""The Kafka topic catalogue: the contracts between services (ARCHITECTURE §3).

Every topic a YakPanel service produces to or consumes from is declared here, with
its partitioning key, value type and retention. `ensure_topics` creates the missing
ones idempotently at start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

log = logging.getLogger(__name__)

_HOUR_MS = 3_600_000
_DAY_MS = 24 * _HOUR_MS
# Kafka's error code when a topic already exists; a race between two creators is fine.
_TOPIC_ALREADY_EXISTS = 36


@dataclass(frozen=True)
class TopicSpec:
    """One topic of the catalogue. `name` is the base name; a deployment prefix may precede it."""

    name: str
    partitions: int
    retention_ms: int
    key: str
    value: str
    producers: tuple[str, ...]
    consumers: tuple[str, ...]

    def full_name(self, prefix: str = "") -> str:
        return f"{prefix}{self.name}"

    def configs(self) -> dict[str, str]:
        return {"retention.ms": str(self.retention_ms), "cleanup.policy": "delete"}


METRICS = TopicSpec(
    "yak.metrics.v1",
    12,
    1 * _DAY_MS,
    "server_id",
    "OTLP ExportMetricsServiceRequest bytes; headers tenant_id, server_id, received_at,"
    " retention_days",
    ("gateway",),
    ("aggregator", "alerting"),
)
METRICS_DLQ = TopicSpec(
    "yak.metrics.dlq.v1",
    1,
    7 * _DAY_MS,
    "server_id",
    "undecodable yak.metrics.v1 message; headers source_partition, source_offset, error",
    ("aggregator",),
    ("operators",),
)
COMMANDS = TopicSpec(
    "yak.commands.v1",
    6,
    7 * _DAY_MS,
    "server_id",
    "signed CommandEnvelope",
    ("controlplane",),
    ("gateway",),
)
COMMAND_RESULTS = TopicSpec(
    "yak.command-results.v1",
    6,
    7 * _DAY_MS,
    "server_id",
    "CommandResult (progress or final)",
    ("gateway",),
    ("controlplane",),
)
PRESENCE = TopicSpec(
    "yak.presence.v1",
    6,
    1 * _DAY_MS,
    "server_id",
    "online/offline with session id and time",
    ("gateway",),
    ("controlplane", "dashboards"),
)
EVENTS = TopicSpec(
    "yak.events.v1",
    6,
    7 * _DAY_MS,
    "aggregate id",
    "domain event (every control-plane write)",
    ("controlplane",),
    ("webhooks", "dashboards", "billing"),
)
ALERTS = TopicSpec(
    "yak.alerts.v1",
    3,
    7 * _DAY_MS,
    "alert fingerprint",
    "alert state transition",
    ("alerting",),
    ("dashboards", "integrations"),
)
ROLLUPS = TopicSpec(
    "yak.rollups.v1",
    6,
    6 * _HOUR_MS,
    "series id",
    "finest rollup rows, for live views",
    ("aggregator",),
    ("dashboards", "alerting"),
)

CATALOGUE: tuple[TopicSpec, ...] = (
    METRICS,
    METRICS_DLQ,
    COMMANDS,
    COMMAND_RESULTS,
    PRESENCE,
    EVENTS,
    ALERTS,
    ROLLUPS,
)


async def ensure_topics(
    bootstrap: str,
    prefix: str = "",
    catalogue: tuple[TopicSpec, ...] = CATALOGUE,
    replication_factor: int = 1,
    request_timeout_ms: int = 10_000,
) -> list[str]:
    """Create the catalogue's missing topics; returns the names it created.

    Safe to call at every start and from several processes at once.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=request_timeout_ms)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [spec for spec in catalogue if spec.full_name(prefix) not in existing]
        if not wanted:
            return []
        response = await admin.create_topics(
            [
                NewTopic(
                    spec.full_name(prefix),
                    spec.partitions,
                    replication_factor,
                    topic_configs=spec.configs(),
                )
                for spec in wanted
            ]
        )
        created = []
        for topic, code, message in _topic_errors(response):
            if code == 0:
                created.append(topic)
            elif code != _TOPIC_ALREADY_EXISTS:
                raise RuntimeError(f"could not create topic {topic}: error {code} {message}")
        if created:
            log.info("created kafka topics", extra={"topics": created})
        return created
    finally:
        await admin.close()


def _topic_errors(response: object) -> list[tuple[str, int, str | None]]:
    rows = getattr(response, "topic_errors", [])
    out: list[tuple[str, int, str | None]] = []
    for row in rows:
        topic, code = row[0], row[1]
        message = row[2] if len(row) > 2 else None
        out.append((str(topic), int(code), message))
    return out
