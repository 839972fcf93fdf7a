"""The telemetry unit as the runtime starts it, with no gateway reachable: collections land
in the disk queue, stopping is quick and keeps them, a damaged queue file is set aside."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from agent.telemetry.config import TelemetryConfig
from agent.telemetry.queue import TelemetryQueue
from agent.telemetry.service import QUEUE_FILE, AgentTelemetry


def identity() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def telemetry(state_dir: Path, **config: object) -> AgentTelemetry:
    key_pem, cert_pem = identity()
    return AgentTelemetry(
        TelemetryConfig(**config),  # type: ignore[arg-type]
        state_dir=state_dir,
        server_id="5f0c6f4e-0000-4000-8000-000000000001",
        hostname="web-1",
        gateway="127.0.0.1:1",  # nothing listens: every send fails
        ca_pem=cert_pem,
        key_pem=key_pem,
        cert_pem=cert_pem,
        max_backoff_s=0.2,
    )


def queued(path: Path) -> list[ExportMetricsServiceRequest]:
    with TelemetryQueue(path, max_bytes=10**8, max_entries=10**6) as queue:
        out = []
        while (entry := queue.oldest()) is not None:
            out.append(ExportMetricsServiceRequest.FromString(entry.payload))
            queue.remove(entry.id)
        return out


async def test_collections_wait_on_disk_while_the_gateway_is_unreachable(tmp_path: Path) -> None:
    unit = telemetry(tmp_path, export_interval_s=0.2)
    await unit.start()
    try:
        deadline = time.monotonic() + 10
        while unit.queue is not None and unit.queue.depth < 3:
            assert time.monotonic() < deadline, "no collections queued"
            await asyncio.sleep(0.05)
        assert unit.sender is not None and unit.sender.stats.sent == 0
    finally:
        started = time.monotonic()
        await unit.stop()
        assert time.monotonic() - started < 3, "stopping is quick"
    requests = queued(tmp_path / QUEUE_FILE)
    assert len(requests) >= 4, "the final collection was queued too"
    attributes = {
        kv.key: kv.value.string_value for kv in requests[-1].resource_metrics[0].resource.attributes
    }
    assert attributes["host.name"] == "web-1"
    assert attributes["service.name"] == "yakpanel-agent"
    assert attributes["service.instance.id"] == "5f0c6f4e-0000-4000-8000-000000000001"
    names = {m.name for sm in requests[-1].resource_metrics[0].scope_metrics for m in sm.metrics}
    assert {"system.cpu.utilization", "yakpanel.agent.telemetry.queue.depth"} <= names


async def test_a_damaged_queue_file_is_set_aside(tmp_path: Path) -> None:
    (tmp_path / QUEUE_FILE).write_bytes(b"this is not a database" * 100)
    unit = telemetry(tmp_path, export_interval_s=60)
    await unit.start()
    await unit.stop()
    assert len(queued(tmp_path / QUEUE_FILE)) == 1  # the final collection
    [aside] = await asyncio.to_thread(lambda: list(tmp_path.glob(f"{QUEUE_FILE}.damaged-*")))
    assert aside.read_bytes().startswith(b"this is not a database")
