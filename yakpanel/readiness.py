"""Readiness probes: is each backing service reachable right now?

Each probe opens a fresh connection, so `/readyz` reports the state of the dependency
and not of a pooled connection that may have died quietly.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import psycopg

from yakpanel.clickhouse import ClickHouseTarget


class Probe(Protocol):
    name: str

    async def check(self) -> None:
        """Return when the dependency answers; raise with a reason when it does not."""
        ...


@dataclass(frozen=True)
class ProbeResult:
    name: str
    status: Literal["ok", "down"]
    latency_ms: float
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self.status, "latency_ms": round(self.latency_ms, 2)}
        if self.error is not None:
            body["error"] = self.error
        return body


@dataclass(frozen=True)
class ReadinessReport:
    results: list[ProbeResult]

    @property
    def ready(self) -> bool:
        return all(r.status == "ok" for r in self.results)

    def as_json(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ready else "unavailable",
            "checks": {r.name: r.as_json() for r in self.results},
        }


async def run_probe(probe: Probe, timeout_s: float) -> ProbeResult:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(probe.check(), timeout_s)
    except TimeoutError:
        elapsed = (time.perf_counter() - started) * 1000
        return ProbeResult(probe.name, "down", elapsed, f"no answer within {timeout_s}s")
    except Exception as exc:  # noqa: BLE001 - any failure means "down", with its reason
        elapsed = (time.perf_counter() - started) * 1000
        return ProbeResult(probe.name, "down", elapsed, f"{type(exc).__name__}: {exc}"[:300])
    return ProbeResult(probe.name, "ok", (time.perf_counter() - started) * 1000)


async def check_all(probes: list[Probe], timeout_s: float) -> ReadinessReport:
    results = await asyncio.gather(*(run_probe(p, timeout_s) for p in probes))
    return ReadinessReport(list(results))


class PostgresProbe:
    name = "postgres"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def check(self) -> None:
        conn = await psycopg.AsyncConnection.connect(self.dsn, connect_timeout=5)
        try:
            await conn.execute("SELECT 1")
        finally:
            await conn.close()


class KafkaProbe:
    name = "kafka"

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap

    async def check(self) -> None:
        from aiokafka import AIOKafkaClient

        client = AIOKafkaClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        try:
            await client.bootstrap()
            await client.fetch_all_metadata()
        finally:
            await client.close()


class ClickHouseProbe:
    name = "clickhouse"

    def __init__(self, target: ClickHouseTarget) -> None:
        self.target = target
        self._client: Any = None

    def _select_one(self) -> None:
        if self._client is None:
            self._client = self.target.client()
        try:
            self._client.command("SELECT 1")
        except Exception:
            self._client = None
            raise

    async def check(self) -> None:
        await asyncio.to_thread(self._select_one)
