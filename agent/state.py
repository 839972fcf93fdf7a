"""The agent's state directory: its key, certificates, identity and configuration.

key.pem        EC P-256 private key (mode 0600), generated on the node at enrollment
cert.pem       client certificate naming tenant and server, issued by the internal CA
ca.pem         the CA that authenticates the gateway
signing.pub    raw 32-byte ed25519 key that verifies command envelopes
identity.json  {tenant_id, server_id, gateway}; its presence means "enrolled"
agent.toml     operator configuration: approved capabilities, extra engines, gateway,
               telemetry ([telemetry] table, see agent.telemetry.config)
ledger.sqlite3 executed commands (see agent.ledger)
telemetry.sqlite3  metrics waiting for the gateway (see agent.telemetry.queue)
probes.json    site probe targets, written by the site engine (see agent.telemetry.probes)
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.telemetry.config import TelemetryConfig, parse_telemetry
from yakpanel.pki import NodeIdentity, identity_of, load_certificate, load_private_key

log = logging.getLogger(__name__)

KEY_FILE = "key.pem"
CERT_FILE = "cert.pem"
CA_FILE = "ca.pem"
SIGNING_KEY_FILE = "signing.pub"
IDENTITY_FILE = "identity.json"
CONFIG_FILE = "agent.toml"
LEDGER_FILE = "ledger.sqlite3"

DEFAULT_CAPABILITIES = ("system.ping", "system.info")

DEFAULT_CONFIG = f"""\
# YakPanel agent configuration.

# Command types this node accepts. A signed command whose type is not listed here is
# refused as `not_capable`, whatever the control plane asks. Example: "system.sleep".
capabilities = {json.dumps(list(DEFAULT_CAPABILITIES))}

# Extra engines to load, as "package.module:ClassName" import strings.
engines = []

# Uncomment to override the gateway address recorded at enrollment (HOST:PORT).
# gateway = "gateway.example.com:7443"

# Host metrics and site probes, sent to the gateway (defaults shown).
# [telemetry]
# enabled = true
# export_interval_s = 10          # collect and queue this often
# queue_max_bytes = 67108864      # backlog kept on disk while the gateway is unreachable;
# queue_max_entries = 100000      #   the oldest collections go first when it is full
# probes_file = "probes.json"     # site probe targets, relative to the state dir
"""


class AgentStateError(Exception):
    """The state directory is missing, incomplete or inconsistent."""


class NotEnrolledError(AgentStateError):
    """The state directory holds no enrollment yet."""


class AgentConfigError(AgentStateError):
    """`agent.toml` is not valid."""


@dataclass(frozen=True)
class AgentConfig:
    """What the operator of the node decides, from `agent.toml`."""

    capabilities: frozenset[str]
    engines: tuple[str, ...]
    gateway: str | None
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)


@dataclass(frozen=True)
class AgentState:
    """Everything the agent needs to connect, loaded and cross-checked."""

    state_dir: Path
    identity: NodeIdentity
    gateway: str
    private_key: ec.EllipticCurvePrivateKey
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes
    signing_public_key: bytes
    config: AgentConfig

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / LEDGER_FILE


def is_enrolled(state_dir: Path) -> bool:
    return (state_dir / IDENTITY_FILE).is_file()


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_enrollment(
    state_dir: Path,
    *,
    identity: NodeIdentity,
    gateway: str,
    key_pem: bytes,
    cert_pem: bytes,
    ca_pem: bytes,
    signing_public_key: bytes,
) -> None:
    """Write a fresh enrollment; an existing `agent.toml` (operator choices) is kept."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(state_dir / KEY_FILE, key_pem, mode=0o600)
    atomic_write(state_dir / CERT_FILE, cert_pem)
    atomic_write(state_dir / CA_FILE, ca_pem)
    atomic_write(state_dir / SIGNING_KEY_FILE, signing_public_key)
    if not (state_dir / CONFIG_FILE).exists():
        atomic_write(state_dir / CONFIG_FILE, DEFAULT_CONFIG.encode())
    # Written last: its presence is what marks the directory as enrolled.
    record = {
        "tenant_id": str(identity.tenant_id),
        "server_id": str(identity.server_id),
        "gateway": gateway,
    }
    atomic_write(state_dir / IDENTITY_FILE, (json.dumps(record, indent=2) + "\n").encode())


def load_config(path: Path) -> AgentConfig:
    """Read `agent.toml`; a missing file means the defaults."""
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return AgentConfig(frozenset(DEFAULT_CAPABILITIES), (), None)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise AgentConfigError(f"{path}: {exc}") from None
    unknown = set(raw) - {"capabilities", "engines", "gateway", "telemetry"}
    if unknown:
        raise AgentConfigError(
            f"{path}: unknown setting(s) {', '.join(sorted(unknown))}; "
            "known: capabilities, engines, gateway, telemetry"
        )
    capabilities = raw.get("capabilities", list(DEFAULT_CAPABILITIES))
    engines = raw.get("engines", [])
    gateway = raw.get("gateway")
    for name, value in (("capabilities", capabilities), ("engines", engines)):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise AgentConfigError(f"{path}: {name} must be a list of non-empty strings")
    if gateway is not None and (not isinstance(gateway, str) or not gateway):
        raise AgentConfigError(f"{path}: gateway must be a non-empty string (HOST:PORT)")
    try:
        telemetry = parse_telemetry(raw.get("telemetry", {}))
    except ValueError as exc:
        raise AgentConfigError(f"{path}: {exc}") from None
    return AgentConfig(frozenset(capabilities), tuple(engines), gateway, telemetry)


def _read(state_dir: Path, name: str) -> bytes:
    try:
        return (state_dir / name).read_bytes()
    except FileNotFoundError:
        raise AgentStateError(
            f"{state_dir / name} is missing; re-enroll with `yakpanel agent enroll --force`"
        ) from None


def load_state(state_dir: Path) -> AgentState:
    """Load and cross-check the state directory of an enrolled agent."""
    if not is_enrolled(state_dir):
        raise NotEnrolledError(
            f"{state_dir} is not enrolled: run `yakpanel agent enroll --gateway HOST:PORT "
            f"--token TOKEN --ca-file CA.pem --state-dir {state_dir}` first"
        )
    try:
        record = json.loads(_read(state_dir, IDENTITY_FILE))
        identity = NodeIdentity(uuid.UUID(record["tenant_id"]), uuid.UUID(record["server_id"]))
        recorded_gateway = str(record["gateway"])
    except (ValueError, KeyError, TypeError) as exc:
        raise AgentStateError(f"{state_dir / IDENTITY_FILE} is not valid: {exc}") from None

    key_path = state_dir / KEY_FILE
    key_pem = _read(state_dir, KEY_FILE)
    if stat.S_IMODE(key_path.stat().st_mode) & 0o077:
        log.warning("%s is readable by other users; it should be mode 0600", key_path)
    cert_pem = _read(state_dir, CERT_FILE)
    ca_pem = _read(state_dir, CA_FILE)
    signing_public_key = _read(state_dir, SIGNING_KEY_FILE)
    try:
        private_key = load_private_key(key_pem)
        cert = load_certificate(cert_pem)
        cert_identity = identity_of(cert)
    except (ValueError, TypeError) as exc:
        raise AgentStateError(f"{state_dir}: {exc}") from None
    if cert_identity != identity:
        raise AgentStateError(
            f"{state_dir}: cert.pem names {cert_identity.uri} but identity.json names "
            f"{identity.uri}; re-enroll with --force"
        )
    if not key_matches_certificate(private_key, cert):
        raise AgentStateError(
            f"{state_dir}: key.pem does not match cert.pem; re-enroll with --force"
        )
    if len(signing_public_key) != 32:
        raise AgentStateError(
            f"{state_dir / SIGNING_KEY_FILE} must hold a raw 32-byte ed25519 public key"
        )
    config = load_config(state_dir / CONFIG_FILE)
    return AgentState(
        state_dir=state_dir,
        identity=identity,
        gateway=config.gateway or recorded_gateway,
        private_key=private_key,
        key_pem=key_pem,
        cert_pem=cert_pem,
        ca_pem=ca_pem,
        signing_public_key=signing_public_key,
        config=config,
    )


def key_matches_certificate(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bool:
    """True when the certificate was issued for this private key."""
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)
