"""Platform keys: the internal CA and the command-signing key.

Created once (under an advisory lock, so concurrent first starts agree) and stored
with their private halves sealed under the master key.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controlplane.crypto import SecretBox
from yakpanel.pki import CertificateAuthority, load_certificate, load_private_key, private_key_pem

CA = "agent-ca"
SIGNING = "command-signing"
_LOCK = 0x59414B4B455953


@dataclass(frozen=True)
class PlatformKeys:
    ca: CertificateAuthority
    signing_key: Ed25519PrivateKey

    @property
    def signing_public_key(self) -> bytes:
        return self.signing_key.public_key().public_bytes_raw()


def load_platform_keys(dsn: str, box: SecretBox) -> PlatformKeys:
    with psycopg.connect(dsn) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        rows = {
            r[0]: r
            for r in conn.execute(
                "SELECT name, public_key, private_sealed, certificate_pem FROM platform_keys"
            ).fetchall()
        }
        if CA not in rows:
            ca = CertificateAuthority.create()
            conn.execute(
                "INSERT INTO platform_keys (name, public_key, private_sealed, certificate_pem)"
                " VALUES (%s, %s, %s, %s)",
                (
                    CA,
                    ca.cert.public_key().public_bytes(
                        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                    ),
                    box.seal(private_key_pem(ca.key), f"platform-key:{CA}"),
                    ca.cert_pem.decode(),
                ),
            )
        else:
            _, _, sealed, cert_pem = rows[CA]
            key = load_private_key(box.open(bytes(sealed), f"platform-key:{CA}"))
            ca = CertificateAuthority(key, load_certificate(cert_pem.encode()))
        if SIGNING not in rows:
            signing = Ed25519PrivateKey.generate()
            conn.execute(
                "INSERT INTO platform_keys (name, public_key, private_sealed) VALUES (%s, %s, %s)",
                (
                    SIGNING,
                    signing.public_key().public_bytes_raw(),
                    box.seal(signing.private_bytes_raw(), f"platform-key:{SIGNING}"),
                ),
            )
        else:
            raw = box.open(bytes(rows[SIGNING][2]), f"platform-key:{SIGNING}")
            signing = Ed25519PrivateKey.from_private_bytes(raw)
    return PlatformKeys(ca, signing)
