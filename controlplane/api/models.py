"""Request and response bodies of the public API."""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from controlplane.access.permissions import TENANT_PERMISSIONS
from controlplane.problems import Problem

T = TypeVar("T")

Slug = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$")]
RoleName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True)]
Email = Annotated[
    str,
    StringConstraints(
        pattern=r"^[^@\s\x00-\x1f]{1,64}@[A-Za-z0-9.-]{1,190}\.[A-Za-z]{2,63}$", max_length=254
    ),
]
Password = Annotated[str, StringConstraints(min_length=12, max_length=256)]
ServerName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9.-]{0,62}$")]
LabelKey = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z_][a-zA-Z0-9_]{0,62}$")]
LabelValue = Annotated[str, StringConstraints(max_length=200)]
Permission = Annotated[str, StringConstraints(pattern=r"^[a-z]+:[a-z]+$")]


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        # PostgreSQL text and jsonb cannot hold NUL: refuse it here (422), not in SQL (500).
        if _has_nul(value):
            raise ValueError("text must not contain NUL (U+0000) characters")
        return value


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(
        description="pass as `cursor` for the next page; null on the last page"
    )


def encode_cursor(last_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(last_id.bytes).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> uuid.UUID | None:
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return uuid.UUID(bytes=raw)
    except (binascii.Error, ValueError):
        raise Problem(400, "bad_cursor", "the cursor is not one this API returned") from None


def page_of(items: list[T], limit: int, key: Any) -> Page[T]:
    if len(items) > limit:
        items = items[:limit]
        return Page(items=items, next_cursor=encode_cursor(key(items[-1])))
    return Page(items=items, next_cursor=None)


def _known_permissions(values: list[str]) -> list[str]:
    unknown = sorted(set(values) - set(TENANT_PERMISSIONS))
    if unknown:
        raise ValueError(f"unknown permissions: {', '.join(unknown)}")
    return sorted(set(values))


# --- plans ----------------------------------------------------------------------------


class PlanLimits(Strict):
    max_servers: int = Field(ge=0, le=100_000)
    max_sites: int = Field(ge=0, le=1_000_000)
    max_databases: int = Field(ge=0, le=1_000_000)
    max_alert_rules: int = Field(ge=0, le=100_000)
    metric_retention_days: int = Field(ge=1, le=3650)
    api_requests_per_minute: int = Field(ge=1, le=1_000_000)
    max_database_users: int = Field(default=50, ge=0, le=1_000_000)
    max_ftp_accounts: int = Field(default=50, ge=0, le=1_000_000)
    max_redis_users: int = Field(default=20, ge=0, le=1_000_000)


class PlanCreate(PlanLimits):
    code: Slug
    name: Name


class PlanUpdate(Strict):
    name: Name | None = None
    max_servers: int | None = Field(default=None, ge=0, le=100_000)
    max_sites: int | None = Field(default=None, ge=0, le=1_000_000)
    max_databases: int | None = Field(default=None, ge=0, le=1_000_000)
    max_alert_rules: int | None = Field(default=None, ge=0, le=100_000)
    metric_retention_days: int | None = Field(default=None, ge=1, le=3650)
    api_requests_per_minute: int | None = Field(default=None, ge=1, le=1_000_000)
    max_database_users: int | None = Field(default=None, ge=0, le=1_000_000)
    max_ftp_accounts: int | None = Field(default=None, ge=0, le=1_000_000)
    max_redis_users: int | None = Field(default=None, ge=0, le=1_000_000)


class PlanOut(BaseModel):
    id: uuid.UUID
    code: str
    name: str
    max_servers: int
    max_sites: int
    max_databases: int
    max_alert_rules: int
    metric_retention_days: int
    api_requests_per_minute: int
    max_database_users: int
    max_ftp_accounts: int
    max_redis_users: int


# --- tenants --------------------------------------------------------------------------

TenantState = Literal["active", "suspended", "scheduled_for_deletion", "deleted"]


class TenantCreate(Strict):
    slug: Slug
    name: Name
    plan: Slug = Field(description="plan code")
    owner_email: Email
    owner_password: Password | None = Field(
        default=None, description="required when the owner has no account yet"
    )


class TenantUpdate(Strict):
    name: Name | None = None


class TenantOut(BaseModel):
    id: uuid.UUID
    slug: str
    name: str
    plan: str
    state: TenantState
    state_reason: str | None
    deletion_due_at: datetime | None
    created_at: datetime


class Usage(BaseModel):
    """What counts against each plan limit (the `QUOTAS` of the access policy)."""

    servers: int
    sites: int = 0
    databases: int = 0
    database_users: int = 0
    ftp_accounts: int = 0
    redis_users: int = 0
    alert_rules: int = 0


class TenantDetail(TenantOut):
    limits: PlanLimits
    usage: Usage


class SuspendBody(Strict):
    reason: Name


class ScheduleDeletionBody(Strict):
    after_days: int = Field(default=30, ge=0, le=365)


class PlanChange(Strict):
    plan: Slug


# --- members and roles ----------------------------------------------------------------


class MemberAdd(Strict):
    email: Email
    role: RoleName
    display_name: Annotated[str, StringConstraints(max_length=200)] = ""
    password: Password | None = Field(
        default=None, description="required when the user has no account yet"
    )

    @field_validator("email")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.lower()


class MemberUpdate(Strict):
    role: RoleName


class MemberOut(BaseModel):
    user_id: uuid.UUID
    email: str
    display_name: str
    role: str
    joined_at: datetime


class RoleCreate(Strict):
    name: RoleName
    description: Annotated[str, StringConstraints(max_length=500)] = ""
    permissions: list[Permission] = Field(max_length=100)

    _check = field_validator("permissions")(_known_permissions)


class RoleUpdate(Strict):
    description: Annotated[str, StringConstraints(max_length=500)] | None = None
    permissions: list[Permission] | None = Field(default=None, max_length=100)

    @field_validator("permissions")
    @classmethod
    def _check(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else _known_permissions(v)


class RoleOut(BaseModel):
    id: uuid.UUID
    name: str
    description: str
    permissions: list[str]
    built_in: bool


class PermissionOut(BaseModel):
    name: str
    description: str


# --- tokens ---------------------------------------------------------------------------


class TokenCreate(Strict):
    name: Name
    scopes: list[Permission] = Field(min_length=1, max_length=100)
    expires_in_days: int = Field(default=90, ge=1, le=365)

    _check = field_validator("scopes")(_known_permissions)


class TokenOut(BaseModel):
    id: uuid.UUID
    name: str
    prefix: str = Field(description="the first characters of the token, to recognise it")
    scopes: list[str]
    expires_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None
    created_at: datetime


class TokenCreated(TokenOut):
    token: str = Field(description="shown once; store it now")


# --- audit ----------------------------------------------------------------------------


class AuditEntry(BaseModel):
    id: uuid.UUID
    at: datetime
    tenant_id: uuid.UUID | None
    actor_kind: str
    actor_id: uuid.UUID | None
    action: str
    resource_type: str
    resource_id: str | None
    source_ip: str | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None


# --- servers --------------------------------------------------------------------------


class ServerCreate(Strict):
    name: ServerName
    region: Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]{0,63}$")] = ""
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=64)


class ServerUpdate(Strict):
    region: Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]{0,63}$")] | None = None
    labels: dict[LabelKey, LabelValue] | None = Field(default=None, max_length=64)


class ServerOut(BaseModel):
    id: uuid.UUID
    name: str
    region: str
    labels: dict[str, str]
    presence: Literal["never_connected", "online", "offline"]
    presence_changed_at: datetime | None
    last_seen_at: datetime | None
    hostname: str | None
    agent_version: str | None
    created_at: datetime
    updated_at: datetime


# --- agents, certificates, commands ---------------------------------------------------


class EnrollmentTokenCreate(Strict):
    ttl_minutes: int = Field(default=60, ge=5, le=7 * 24 * 60)


class EnrollmentTokenCreated(BaseModel):
    token: str = Field(description="one-time; shown once")
    expires_at: datetime
    gateway: str
    ca_certificate_pem: str
    command: str = Field(description="what to run on the node")


class CertificateOut(BaseModel):
    serial: str
    fingerprint: str
    not_after: datetime
    issued_at: datetime
    revoked_at: datetime | None
    revoked_reason: str | None


class RevokeBody(Strict):
    reason: Name


CommandType = Annotated[
    str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,30}\.[a-z][a-z0-9_]{0,62}$")
]
IdempotencyKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]
CommandState = Literal["pending", "dispatched", "acknowledged", "succeeded", "failed", "expired"]


class CommandCreate(Strict):
    type: CommandType
    payload: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: IdempotencyKey | None = Field(
        default=None, description="the same key returns the same command instead of a new one"
    )
    timeout_s: int = Field(default=300, ge=1, le=86_400)


class CommandOut(BaseModel):
    id: uuid.UUID
    server_id: uuid.UUID
    idempotency_key: str
    type: str
    payload: dict[str, Any] = Field(description="secrets appear only in sealed form")
    state: CommandState
    issued_at: datetime
    deadline: datetime
    dispatched_at: datetime | None
    acknowledged_at: datetime | None
    finished_at: datetime | None
    progress: int
    message: str
    output: Any | None
    error_code: str | None


# --- internal (gateway ↔ control plane) -----------------------------------------------


class InternalEnroll(Strict):
    token: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    csr_pem: Annotated[str, StringConstraints(max_length=16_384)]
    hostname: Annotated[str, StringConstraints(max_length=253)] = ""
    agent_version: Annotated[str, StringConstraints(max_length=64)] = ""


class InternalEnrolled(BaseModel):
    certificate_pem: str
    ca_chain_pem: str
    command_signing_public_key: str = Field(description="base64, raw ed25519")
    tenant_id: uuid.UUID
    server_id: uuid.UUID


class InternalCertificateStatus(BaseModel):
    status: Literal["valid", "revoked", "expired", "unknown"]
    tenant_id: uuid.UUID | None = None
    server_id: uuid.UUID | None = None


class InternalGatewayCertificate(Strict):
    public_key_pem: Annotated[str, StringConstraints(max_length=4096)]
    hostnames: list[Annotated[str, StringConstraints(max_length=253)]] = Field(
        min_length=1, max_length=20
    )


class InternalGatewayCertificateOut(BaseModel):
    certificate_pem: str
    ca_chain_pem: str


class InternalMetricLimits(BaseModel):
    metric_retention_days: int


# --- auth -----------------------------------------------------------------------------


class LoginBody(Strict):
    email: Annotated[str, StringConstraints(min_length=3, max_length=254)]
    password: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    totp_code: Annotated[str, StringConstraints(pattern=r"^[0-9]{6}$")] | None = None


class MembershipOut(BaseModel):
    tenant_id: uuid.UUID
    permissions: list[str]
    tenant_state: str


class MeOut(BaseModel):
    kind: Literal["user", "staff", "token"]
    id: uuid.UUID
    email: str | None
    totp_enabled: bool
    staff_permissions: list[str]
    memberships: list[MembershipOut]


class LoginOut(MeOut):
    csrf_token: str = Field(description="send as X-CSRF-Token on every non-GET request")


class PasswordChange(Strict):
    current_password: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    new_password: Password


class TotpEnrollment(BaseModel):
    secret: str
    otpauth_uri: str


class TotpCode(Strict):
    code: Annotated[str, StringConstraints(pattern=r"^[0-9]{6}$")]


EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+$")
