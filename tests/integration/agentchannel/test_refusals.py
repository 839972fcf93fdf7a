"""What the gateway refuses, each with a reason, before anything runs."""

from __future__ import annotations

import grpc
import pytest

from proto import agent_pb2
from yakpanel.pki import (
    CertificateAuthority,
    NodeIdentity,
    new_csr,
    new_private_key,
    private_key_pem,
)

from .conftest import Channel

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]


async def test_enrollment_token_is_one_time(channel: Channel) -> None:
    server_id = await channel.new_server("web-1")
    token = await channel.enrollment_token(server_id)
    key = new_private_key()
    first = await channel.raw_enroll(token, new_csr(key, "node"))
    assert first.server_id == server_id
    assert first.tenant_id == channel.tenant.id
    assert len(first.command_signing_public_key) == 32
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await channel.raw_enroll(token, new_csr(new_private_key(), "node"))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "already used" in (refused.value.details() or "")


async def test_garbage_and_expired_tokens_are_refused(channel: Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await channel.raw_enroll("yke_not-a-token", new_csr(new_private_key(), "node"))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not valid" in (refused.value.details() or "")

    server_id = await channel.new_server("web-2")
    token = await channel.enrollment_token(server_id)
    import psycopg

    with psycopg.connect(channel.stack.postgres_dsn) as conn:
        conn.execute("UPDATE enrollment_tokens SET expires_at = now() - interval '1 second'")
    with pytest.raises(grpc.aio.AioRpcError) as expired:
        await channel.raw_enroll(token, new_csr(new_private_key(), "node"))
    assert expired.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in (expired.value.details() or "")


async def _connect_once(
    channel: Channel, key_pem: bytes, cert_pem: bytes
) -> grpc.aio.AioRpcError | None:
    creds = grpc.ssl_channel_credentials(
        root_certificates=channel.ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )
    ch, stub = channel.raw_stub(creds)
    try:
        call = stub.Connect()
        await call.write(agent_pb2.AgentMessage(hello=agent_pb2.Hello(agent_version="t")))
        first = await call.read()
        assert first.HasField("welcome")
        call.cancel()
        return None
    except grpc.aio.AioRpcError as exc:
        return exc
    finally:
        await ch.close()


async def test_a_revoked_certificate_is_refused_at_connect(channel: Channel) -> None:
    server_id = await channel.new_server("web-3")
    key = new_private_key()
    enrolled = await channel.raw_enroll(
        await channel.enrollment_token(server_id), new_csr(key, "n")
    )
    assert await _connect_once(channel, private_key_pem(key), enrolled.certificate_pem) is None

    certs = (
        await channel.tenant.owner.get(
            f"/v1/tenants/{channel.tenant.id}/servers/{server_id}/certificates"
        )
    ).json()
    serial = certs[0]["serial"]
    r = await channel.tenant.owner.post(
        f"/v1/tenants/{channel.tenant.id}/servers/{server_id}/certificates/{serial}/revoke",
        json={"reason": "laptop stolen"},
    )
    assert r.status_code == 200, r.text
    channel.gateway.controlplane._status_cache.clear()
    refused = await _connect_once(channel, private_key_pem(key), enrolled.certificate_pem)
    assert refused is not None
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "revoked" in (refused.details() or "")


async def test_a_certificate_from_another_ca_is_refused(channel: Channel) -> None:
    server_id = await channel.new_server("web-4")
    rogue = CertificateAuthority.create("rogue CA")
    key = new_private_key()
    import uuid

    cert = rogue.issue_agent(
        new_csr(key, "n"), NodeIdentity(uuid.UUID(channel.tenant.id), uuid.UUID(server_id))
    )
    from yakpanel.pki import cert_pem

    refused = await _connect_once(channel, private_key_pem(key), cert_pem(cert))
    assert refused is not None
    assert refused.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
    assert channel.gateway.stats.sessions_opened == 0


async def test_connect_without_a_client_certificate_is_refused(channel: Channel) -> None:
    ch, stub = channel.raw_stub(
        grpc.ssl_channel_credentials(root_certificates=channel.ca_pem), enroll=True
    )
    try:
        call = stub.Connect()
        await call.write(agent_pb2.AgentMessage(hello=agent_pb2.Hello()))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
    finally:
        await ch.close()
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "client certificate" in (refused.value.details() or "")
