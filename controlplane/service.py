"""The API as a `Service`: uvicorn inside the caller's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Generator

import uvicorn
from fastapi import FastAPI

from controlplane.app import create_app
from yakpanel.services import Service, Stack


class _EmbeddedServer(uvicorn.Server):
    # The supervisor owns SIGINT/SIGTERM; uvicorn must not install its own handlers.
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class ApiService:
    name = "api"

    def __init__(self, app: FastAPI, host: str, port: int, public_url: str | None = None) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.public_url = public_url
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            log_config=None,
            access_log=False,
            lifespan="on",
        )
        server = _EmbeddedServer(config)
        self._server = server
        self._task = asyncio.create_task(server.serve())
        while not server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError(f"the API could not listen on {self.host}:{self.port}")
            await asyncio.sleep(0.02)
        if self.port == 0:
            sockets = server.servers[0].sockets
            self.port = int(sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._server = None
        self._task = None

    @property
    def url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"

    def endpoints(self) -> dict[str, str]:
        return {
            "api": self.url,
            "readiness": f"{self.url}/readyz",
            "api docs": f"{self.url}/docs",
            "NOC dashboards": f"{self.url}/noc/",
            "Prometheus-compatible API (Grafana)": f"{self.url}/prometheus",
        }


def build_api_service(stack: Stack) -> Service:
    s = stack.settings
    return ApiService(create_app(stack), s.api_host, s.api_port, s.public_url)
