"""The internal CA, node identities and sealed secrets."""

from __future__ import annotations

import uuid

import pytest
from cryptography.exceptions import InvalidSignature

from yakpanel.pki import (
    CertificateAuthority,
    IdentityError,
    NodeIdentity,
    identity_of,
    new_csr,
    new_private_key,
    public_key_of,
)
from yakpanel.sealing import SealError, has_plain_secrets, open_secrets, seal_secrets


def test_agent_certificates_name_only_the_identity_the_ca_chose() -> None:
    ca = CertificateAuthority.create()
    key = new_private_key()
    wanted = NodeIdentity(uuid.uuid4(), uuid.uuid4())
    csr = new_csr(key, "yakpanel://tenants/evil/servers/evil")
    cert = ca.issue_agent(csr, wanted)
    assert identity_of(cert) == wanted
    cert.verify_directly_issued_by(ca.cert)
    other = CertificateAuthority.create()
    with pytest.raises((ValueError, TypeError, InvalidSignature)):
        cert.verify_directly_issued_by(other.cert)


def test_garbage_csrs_are_refused() -> None:
    ca = CertificateAuthority.create()
    with pytest.raises(IdentityError):
        ca.issue_agent(
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", NodeIdentity(uuid.uuid4(), uuid.uuid4())
        )


def test_a_server_certificate_carries_no_node_identity() -> None:
    ca = CertificateAuthority.create()
    cert = ca.issue_server(new_private_key().public_key(), ["localhost", "127.0.0.1"])
    with pytest.raises(IdentityError):
        identity_of(cert)


def test_secrets_open_only_with_the_agent_key_and_context() -> None:
    ca = CertificateAuthority.create()
    key = new_private_key()
    cert = ca.issue_agent(new_csr(key, "n"), NodeIdentity(uuid.uuid4(), uuid.uuid4()))
    payload = {"user": "app", "password": {"$secret": "hunter2-long"}, "list": [{"$secret": "x"}]}
    sealed = seal_secrets(payload, public_key_of(cert), "cmd-1")
    assert "hunter2-long" not in str(sealed)
    assert not has_plain_secrets(sealed)
    assert has_plain_secrets(payload)
    assert open_secrets(sealed, key, "cmd-1") == {
        "user": "app",
        "password": "hunter2-long",
        "list": ["x"],
    }
    with pytest.raises(SealError):
        open_secrets(sealed, new_private_key(), "cmd-1")
    with pytest.raises(SealError):
        open_secrets(sealed, key, "cmd-2")
