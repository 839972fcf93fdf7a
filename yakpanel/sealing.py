"""Secrets sealed to one agent: ECIES over P-256 (ephemeral ECDH, HKDF-SHA256, AES-GCM).

The control plane seals with the public key of the agent's certificate; only that
agent's private key, which never leaves the node, opens it. Sealed values can cross
Kafka, logs and the database.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_INFO = b"yakpanel sealed secret v1"
SEALED_KEY = "$sealed"
SECRET_KEY = "$secret"  # noqa: S105 - a JSON marker, not a secret


class SealError(ValueError):
    pass


def _kdf(shared: bytes, ephemeral: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral, info=_INFO).derive(shared)


def seal(plaintext: bytes, recipient: ec.EllipticCurvePublicKey, context: str = "") -> bytes:
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    eph_pub = ephemeral.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    key = _kdf(ephemeral.exchange(ec.ECDH(), recipient), eph_pub)
    nonce = os.urandom(12)
    return eph_pub + nonce + AESGCM(key).encrypt(nonce, plaintext, context.encode())


def open_sealed(sealed: bytes, private_key: ec.EllipticCurvePrivateKey, context: str = "") -> bytes:
    if len(sealed) < 65 + 12 + 16:
        raise SealError("sealed value is too short")
    eph_pub, nonce, ciphertext = sealed[:65], sealed[65:77], sealed[77:]
    try:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), eph_pub)
        key = _kdf(private_key.exchange(ec.ECDH(), peer), eph_pub)
        return AESGCM(key).decrypt(nonce, ciphertext, context.encode())
    except (InvalidTag, ValueError):
        raise SealError("the sealed value does not open with this key") from None


def seal_secrets(value: Any, recipient: ec.EllipticCurvePublicKey, context: str) -> Any:
    """Replace every `{"$secret": "…"}` in a JSON value by `{"$sealed": "<base64>"}`."""
    if isinstance(value, dict):
        if set(value) == {SECRET_KEY}:
            secret = value[SECRET_KEY]
            if not isinstance(secret, str):
                raise SealError("a $secret must be a string")
            sealed = seal(secret.encode(), recipient, context)
            return {SEALED_KEY: base64.b64encode(sealed).decode()}
        return {k: seal_secrets(v, recipient, context) for k, v in value.items()}
    if isinstance(value, list):
        return [seal_secrets(v, recipient, context) for v in value]
    return value


def open_secrets(value: Any, private_key: ec.EllipticCurvePrivateKey, context: str) -> Any:
    """The agent's inverse of `seal_secrets`: sealed values become plain strings."""
    if isinstance(value, dict):
        if set(value) == {SEALED_KEY}:
            raw = base64.b64decode(value[SEALED_KEY])
            return open_sealed(raw, private_key, context).decode()
        return {k: open_secrets(v, private_key, context) for k, v in value.items()}
    if isinstance(value, list):
        return [open_secrets(v, private_key, context) for v in value]
    return value


def mask_secrets(value: Any) -> Any:
    """The value with every `{"$secret": …}` replaced by `{"$secret": "*"}`: what may be
    hashed or logged about a payload. (A hash of a short password is a guessable copy.)"""
    if isinstance(value, dict):
        if set(value) == {SECRET_KEY}:
            return {SECRET_KEY: "*"}
        return {k: mask_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    return value


def has_plain_secrets(value: Any) -> bool:
    if isinstance(value, dict):
        return SECRET_KEY in value or any(has_plain_secrets(v) for v in value.values())
    if isinstance(value, list):
        return any(has_plain_secrets(v) for v in value)
    return False
