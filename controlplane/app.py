"""The FastAPI application factory (composition root of the HTTP API)."""

from __future__ import annotations

from fastapi import FastAPI

from controlplane.api import health
from controlplane.problems import install_problem_handlers
from yakpanel import __version__
from yakpanel.readiness import ClickHouseProbe, KafkaProbe, PostgresProbe, Probe
from yakpanel.services import Stack


def create_app(stack: Stack, probes: list[Probe] | None = None) -> FastAPI:
    app = FastAPI(
        title="YakPanel API",
        version=__version__,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.stack = stack
    app.state.readiness_timeout_s = stack.settings.readiness_timeout_s
    app.state.probes = probes or [
        PostgresProbe(stack.postgres_dsn),
        KafkaProbe(stack.kafka_bootstrap),
        ClickHouseProbe(stack.clickhouse),
    ]
    install_problem_handlers(app)
    app.include_router(health.router)
    return app
