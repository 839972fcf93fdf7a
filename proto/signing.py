"""Command envelope signatures: ed25519 over the deterministic serialization of the
envelope with an empty signature field."""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from proto import agent_pb2


def signing_bytes(envelope: agent_pb2.CommandEnvelope) -> bytes:
    unsigned = agent_pb2.CommandEnvelope()
    unsigned.CopyFrom(envelope)
    unsigned.signature = b""
    data: bytes = unsigned.SerializeToString(deterministic=True)
    return data


def sign(envelope: agent_pb2.CommandEnvelope, key: Ed25519PrivateKey) -> None:
    envelope.signature = key.sign(signing_bytes(envelope))


def verify(envelope: agent_pb2.CommandEnvelope, public_key: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(
            envelope.signature, signing_bytes(envelope)
        )
    except (InvalidSignature, ValueError):
        return False
    return True
