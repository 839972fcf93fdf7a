"""The FastAPI application factory (composition root of the HTTP API)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from controlplane.access.credentials import LoginThrottle
from controlplane.api import (
    agents,
    alerting,
    audit,
    auth,
    health,
    hosting_databases,
    hosting_sites,
    incidents,
    internal,
    members,
    metrics,
    noc,
    noc_alerts,
    noc_sites,
    plans,
    roles,
    servers,
    tenants,
    tokens,
    workflows,
)
from controlplane.bootstrap import sync_catalogue
from controlplane.context import ControlPlane
from controlplane.crypto import SecretBox, load_internal_token, load_master_key
from controlplane.db import Database
from controlplane.keys import load_platform_keys
from controlplane.problems import install_problem_handlers
from controlplane.workflows import use_secret_box
from yakpanel import __version__
from yakpanel.readiness import ClickHouseProbe, KafkaProbe, PostgresProbe, Probe
from yakpanel.services import Stack


def build_control_plane(stack: Stack) -> ControlPlane:
    return ControlPlane(
        settings=stack.settings,
        db=Database(stack.postgres_dsn, stack.clock),
        clock=stack.clock,
        secrets=SecretBox(load_master_key(stack.settings)),
        throttle=LoginThrottle(stack.clock),
        internal_token=load_internal_token(stack.settings),
    )


def create_app(stack: Stack, probes: list[Probe] | None = None) -> FastAPI:
    control_plane = build_control_plane(stack)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(sync_catalogue, stack.postgres_dsn)
        control_plane.keys = await asyncio.to_thread(
            load_platform_keys, stack.postgres_dsn, control_plane.secrets
        )
        use_secret_box(control_plane.secrets)  # workflows seal step secrets at rest
        await control_plane.db.open()
        try:
            yield
        finally:
            await control_plane.db.close()

    app = FastAPI(
        title="YakPanel API",
        version=__version__,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.stack = stack
    app.state.control_plane = control_plane
    app.state.readiness_timeout_s = stack.settings.readiness_timeout_s
    app.state.probes = probes or [
        PostgresProbe(stack.postgres_dsn),
        KafkaProbe(stack.kafka_bootstrap),
        ClickHouseProbe(stack.clickhouse),
    ]
    install_problem_handlers(app)
    for router in (
        health.router,
        auth.router,
        plans.router,
        tenants.router,
        members.router,
        roles.router,
        tokens.router,
        servers.router,
        agents.router,
        audit.router,
        internal.router,
        noc.router,
        noc_alerts.router,
        noc_sites.router,
        metrics.router,
        alerting.router,
        incidents.router,
        workflows.router,
        hosting_sites.router,
        hosting_databases.router,
    ):
        app.include_router(router)
    return app
