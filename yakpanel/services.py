"""The service model shared by `yakpanel up` (all services in one process) and
`yakpanel serve` (one service per process).

Services are found by import string so that the kernel does not depend on the
packages that implement them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

from yakpanel.clickhouse import ClickHouseTarget
from yakpanel.clock import Clock, SystemClock
from yakpanel.settings import Settings


@dataclass
class Stack:
    """Where the backing services are, resolved from settings or the embedded stack."""

    settings: Settings
    postgres_dsn: str
    kafka_bootstrap: str
    clickhouse: ClickHouseTarget
    clock: Clock = field(default_factory=SystemClock)

    @property
    def topic_prefix(self) -> str:
        return self.settings.kafka_topic_prefix


class Service(Protocol):
    """A long-running part of YakPanel. `start` returns once it serves; `stop` drains."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def endpoints(self) -> dict[str, str]:
        """User-facing addresses to print at start (name → URL); may be empty."""
        ...


ServiceFactory = Callable[[Stack], Service]

# Order matters: `up` starts services in this order and stops them in reverse.
SERVICE_FACTORIES: dict[str, str] = {
    "api": "controlplane.service:build_api_service",
    "worker": "controlplane.worker:build_worker_service",
    "gateway": "ingest.gateway.service:build_gateway_service",
    "aggregator": "ingest.aggregator.service:build_aggregator_service",
    "alerting": "alerting.service:build_alerting_service",
}

# What each service talks to, so `serve NAME` asks only for the DSNs that one needs (the
# gateway reaches the control plane over HTTP; the aggregator never touches PostgreSQL).
SERVICE_NEEDS: dict[str, frozenset[str]] = {
    "api": frozenset({"postgres", "kafka", "clickhouse"}),
    "worker": frozenset({"postgres", "kafka"}),
    "gateway": frozenset({"kafka"}),
    "aggregator": frozenset({"kafka", "clickhouse"}),
    "alerting": frozenset({"postgres", "kafka", "clickhouse"}),
}


def load_factory(name: str) -> ServiceFactory:
    try:
        target = SERVICE_FACTORIES[name]
    except KeyError:
        known = ", ".join(SERVICE_FACTORIES)
        raise ValueError(f"unknown service {name!r}; known services: {known}") from None
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    return cast(ServiceFactory, getattr(module, attr))
