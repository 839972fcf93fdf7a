"""The generated protobuf modules match the .proto files; envelope signatures hold."""

from __future__ import annotations

import tempfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from proto import agent_pb2, signing
from proto.generate import HERE, generate


def test_generated_modules_are_in_sync_with_the_proto_files() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        assert fresh, "nothing was generated"
        for path in fresh:
            committed = HERE / path.name
            assert committed.exists(), f"proto/{path.name} is not committed"
            assert committed.read_text() == path.read_text(), (
                f"proto/{path.name} drifted from the .proto: run `python -m proto.generate`"
            )


def _envelope() -> agent_pb2.CommandEnvelope:
    env = agent_pb2.CommandEnvelope(
        command_id="c1",
        idempotency_key="k1",
        tenant_id="t",
        server_id="s",
        type="system.ping",
        payload=b'{"x": 1}',
    )
    env.issued_at.FromSeconds(1_700_000_000)
    env.deadline.FromSeconds(1_700_000_060)
    return env


def test_a_signed_envelope_verifies_and_any_change_breaks_it() -> None:
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes_raw()
    env = _envelope()
    signing.sign(env, key)
    assert signing.verify(env, public)
    for field, value in [
        ("type", "system.info"),
        ("payload", b'{"x": 2}'),
        ("server_id", "other"),
        ("idempotency_key", "k2"),
    ]:
        tampered = agent_pb2.CommandEnvelope()
        tampered.CopyFrom(env)
        setattr(tampered, field, value)
        assert not signing.verify(tampered, public), field
    late = agent_pb2.CommandEnvelope()
    late.CopyFrom(env)
    late.deadline.FromSeconds(1_900_000_000)
    assert not signing.verify(late, public)
    assert not signing.verify(env, Ed25519PrivateKey.generate().public_key().public_bytes_raw())
