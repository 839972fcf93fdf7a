"""The gateway's client of the control plane's internal API."""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

INTERNAL_HEADER = "X-Yak-Internal-Token"


class ControlPlaneRefused(Exception):
    """The control plane answered with a problem; `status` and `detail` say why."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class CertificateStatus:
    status: str
    tenant_id: uuid.UUID | None
    server_id: uuid.UUID | None


class ControlPlaneClient:
    def __init__(
        self, base_url: str, token: str, cache_ttl_s: float = 5.0, limits_ttl_s: float = 60.0
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, headers={INTERNAL_HEADER: token}, timeout=10.0
        )
        self._cache_ttl_s = cache_ttl_s
        self._status_cache: dict[str, tuple[float, CertificateStatus]] = {}
        self._limits_ttl_s = limits_ttl_s
        self._retention_cache: dict[uuid.UUID, tuple[float, int]] = {}

    async def close(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {}
            raise ControlPlaneRefused(
                response.status_code,
                str(body.get("code", "error")),
                str(body.get("detail", response.text[:200])),
            )
        return response.json()

    async def enroll(self, token: str, csr_pem: bytes, hostname: str, version: str) -> Any:
        return await self._call(
            "POST",
            "/internal/v1/enroll",
            json={
                "token": token,
                "csr_pem": csr_pem.decode(errors="replace"),
                "hostname": hostname,
                "agent_version": version,
            },
        )

    async def certificate_status(self, serial: str) -> CertificateStatus:
        now = time.monotonic()
        cached = self._status_cache.get(serial)
        if cached is not None and now - cached[0] < self._cache_ttl_s:
            return cached[1]
        body = await self._call("GET", f"/internal/v1/certificates/{serial}")
        status = CertificateStatus(
            body["status"],
            uuid.UUID(body["tenant_id"]) if body.get("tenant_id") else None,
            uuid.UUID(body["server_id"]) if body.get("server_id") else None,
        )
        self._status_cache[serial] = (now, status)
        return status

    async def pending_commands(self, tenant_id: uuid.UUID, server_id: uuid.UUID) -> list[bytes]:
        body = await self._call(
            "GET", f"/internal/v1/tenants/{tenant_id}/servers/{server_id}/pending-commands"
        )
        return [base64.b64decode(item) for item in body]

    async def metric_retention_days(self, tenant_id: uuid.UUID) -> int:
        """The tenant plan's metric retention, cached for `limits_ttl_s`."""
        now = time.monotonic()
        cached = self._retention_cache.get(tenant_id)
        if cached is not None and now - cached[0] < self._limits_ttl_s:
            return cached[1]
        body = await self._call("GET", f"/internal/v1/tenants/{tenant_id}/metric-limits")
        days = int(body["metric_retention_days"])
        self._retention_cache[tenant_id] = (now, days)
        return days

    async def gateway_certificate(self, public_key_pem: bytes, hostnames: list[str]) -> Any:
        return await self._call(
            "POST",
            "/internal/v1/gateway-certificate",
            json={"public_key_pem": public_key_pem.decode(), "hostnames": hostnames},
        )
