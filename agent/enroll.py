"""Enrollment: trade a one-time token and a CSR for a client certificate.

The private key is generated here and never leaves the node; the gateway is
authenticated with the CA file the operator brought, the agent with its token.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import grpc
import grpc.aio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from agent.state import (
    AgentStateError,
    is_enrolled,
    key_matches_certificate,
    load_state,
    write_enrollment,
)
from proto import agent_pb2
from yakpanel import __version__
from yakpanel.pki import (
    IdentityError,
    NodeIdentity,
    identity_of,
    load_certificate,
    new_csr,
    new_private_key,
    private_key_pem,
)

ENROLL_METHOD = "/yakpanel.agent.v1.AgentService/Enroll"

_STATUS_MEANING = {
    grpc.StatusCode.UNAUTHENTICATED: "the enrollment token was refused",
    grpc.StatusCode.PERMISSION_DENIED: "enrollment is not allowed",
    grpc.StatusCode.INVALID_ARGUMENT: "the gateway refused the enrollment request",
    grpc.StatusCode.UNAVAILABLE: "the gateway is unreachable or its TLS certificate is not "
    "trusted by the CA file",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the gateway did not answer in time",
}


class EnrollmentError(Exception):
    """Enrollment failed; the message says why and what to do."""


async def enroll(
    gateway: str,
    token: str,
    ca_pem: bytes,
    state_dir: Path,
    hostname: str | None = None,
    *,
    connect_gateway: str | None = None,
    force: bool = False,
    agent_version: str = __version__,
    timeout_s: float = 30.0,
) -> NodeIdentity:
    """Enroll this node with the gateway at `gateway` (HOST:PORT) and write the state dir.

    `connect_gateway` is where the agent later opens its mTLS `Connect` stream (default:
    the address the gateway names in its answer, else `gateway`). Refuses an
    already-enrolled `state_dir` unless `force`. Raises `EnrollmentError`.
    """
    if not gateway or not token:
        raise EnrollmentError("both a gateway address (HOST:PORT) and a token are required")
    if is_enrolled(state_dir) and not force:
        try:
            current = load_state(state_dir).identity.uri
        except AgentStateError as exc:
            current = f"an unreadable enrollment ({exc})"
        raise EnrollmentError(
            f"{state_dir} is already enrolled as {current}; pass --force to replace it"
        )
    _check_ca(ca_pem)
    hostname = hostname or socket.gethostname()
    key = new_private_key()
    request = agent_pb2.EnrollRequest(
        token=token,
        csr_pem=new_csr(key, hostname),
        hostname=hostname,
        agent_version=agent_version,
    )
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    async with grpc.aio.secure_channel(gateway, credentials) as channel:
        call = channel.unary_unary(
            ENROLL_METHOD,
            request_serializer=agent_pb2.EnrollRequest.SerializeToString,
            response_deserializer=agent_pb2.EnrollResponse.FromString,
        )
        try:
            response: agent_pb2.EnrollResponse = await call(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            meaning = _STATUS_MEANING.get(exc.code(), "enrollment failed")
            raise EnrollmentError(
                f"{meaning} ({exc.code().name}): {exc.details() or 'no details'}"
            ) from None

    identity = _verify(response, key)
    write_enrollment(
        state_dir,
        identity=identity,
        gateway=connect_gateway or response.connect_address or gateway,
        key_pem=private_key_pem(key),
        cert_pem=response.certificate_pem,
        ca_pem=ca_pem,
        signing_public_key=response.command_signing_public_key,
    )
    return identity


def _check_ca(ca_pem: bytes) -> None:
    try:
        x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise EnrollmentError("the CA file holds no PEM certificate") from None


def _verify(response: agent_pb2.EnrollResponse, key: ec.EllipticCurvePrivateKey) -> NodeIdentity:
    try:
        cert = load_certificate(response.certificate_pem)
        named = identity_of(cert)
        claimed = NodeIdentity(uuid.UUID(response.tenant_id), uuid.UUID(response.server_id))
    except (IdentityError, ValueError) as exc:
        raise EnrollmentError(f"the gateway returned an unusable certificate: {exc}") from None
    if named != claimed:
        raise EnrollmentError(
            f"the gateway says tenant {response.tenant_id} server {response.server_id} but the "
            f"certificate names {named.uri}"
        )
    if not key_matches_certificate(key, cert):
        raise EnrollmentError("the certificate the gateway returned is not for this node's key")
    if response.ca_chain_pem:
        try:
            chain = x509.load_pem_x509_certificates(response.ca_chain_pem)
        except ValueError:
            raise EnrollmentError("the gateway returned an unreadable CA chain") from None
        if not any(_issued_by(cert, ca) for ca in chain):
            raise EnrollmentError("the certificate is not issued by the CA chain returned with it")
    if len(response.command_signing_public_key) != 32:
        raise EnrollmentError(
            "the gateway returned no usable command-signing key (expected 32 raw ed25519 bytes)"
        )
    return named


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
