"""Request and response bodies of the hosting API.

Request models only bound sizes and shapes; the grammars (host names, paths, upstreams,
database and user names) are applied by the use cases, so that a refusal is one
`invalid_input` problem naming the field and the rule.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints

from controlplane.api.models import Strict

SiteKind = Literal["static", "php", "proxy"]
Status = Literal["provisioning", "active", "failed", "deleting"]
RedirectCode = Literal[301, 302, 307, 308]
Text = Annotated[str, StringConstraints(max_length=2048)]
PasswordIn = Annotated[
    str | None,
    Field(
        default=None,
        description="12 to 128 printable ASCII characters without spaces; left out, one is"
        " generated. Returned once in the response, stored only sealed.",
    ),
]


class RedirectIn(Strict):
    source: Text = Field(description="a path on the site, e.g. /old")
    target: Text = Field(description="a path on the site or an http(s) URL")
    code: RedirectCode = 301


class RedirectOut(BaseModel):
    source: str
    target: str
    code: int


class SiteCreate(Strict):
    server_id: uuid.UUID
    kind: SiteKind
    domains: list[Text] = Field(
        min_length=1, max_length=50, description="the primary name first, then aliases"
    )
    upstream: Text | None = Field(
        None,
        description="proxy: http(s)://host:port[/path] or unix:/path.sock;"
        " php: the FastCGI address, unix:/path.sock or host:port; static: none",
    )
    redirects: list[RedirectIn] = Field(default_factory=list, max_length=100)
    force_https: bool = False


class SiteUpdate(Strict):
    kind: SiteKind | None = None
    domains: list[Text] | None = Field(None, min_length=1, max_length=50)
    upstream: Text | None = None
    redirects: list[RedirectIn] | None = Field(None, max_length=100)
    force_https: bool | None = None


class CertificateSummary(BaseModel):
    state: Literal["requested", "valid", "renewing", "renewal_failed", "failed"]
    issuer: str | None
    not_after: datetime | None
    days_left: int | None
    last_error: str | None


class SiteOut(BaseModel):
    id: uuid.UUID
    server_id: uuid.UUID
    kind: SiteKind
    domains: list[str]
    primary_domain: str
    upstream: str | None
    redirects: list[RedirectOut]
    force_https: bool
    tls: bool
    status: Status
    workflow_id: uuid.UUID | None = Field(description="the workflow enforcing the last change")
    last_error: str | None
    document_root: str | None
    certificate: CertificateSummary | None
    created_at: datetime
    updated_at: datetime


class CertificateRequest(Strict):
    force: bool = Field(False, description="issue even if the current one is still valid")


class CertificateOut(BaseModel):
    site_id: uuid.UUID
    domains: list[str]
    state: Literal["requested", "valid", "renewing", "renewal_failed", "failed"]
    issuer: str | None
    serial: str | None
    not_before: datetime | None
    not_after: datetime | None
    days_left: int | None
    workflow_id: uuid.UUID | None
    last_error: str | None
    last_attempt_at: datetime | None
    requested_at: datetime
    updated_at: datetime


class PasswordRotate(Strict):
    password: PasswordIn


class FtpAccountCreate(Strict):
    username: Text
    password: PasswordIn


class FtpAccountOut(BaseModel):
    id: uuid.UUID
    site_id: uuid.UUID
    server_id: uuid.UUID
    username: str
    home: str | None = Field(description="the chroot on the node, once the node reported it")
    status: Status
    workflow_id: uuid.UUID | None
    last_error: str | None
    password_rotated_at: datetime | None
    created_at: datetime
    updated_at: datetime


class DatabaseCreate(Strict):
    server_id: uuid.UUID
    name: Text


class DatabaseOut(BaseModel):
    id: uuid.UUID
    server_id: uuid.UUID
    engine: Literal["mariadb"]
    name: str
    status: Status
    workflow_id: uuid.UUID | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime


class DatabaseDelete(Strict):
    confirm: Text = Field(description="the database's name, to confirm the deletion")


class DatabaseUserCreate(Strict):
    name: Text
    password: PasswordIn


class DatabaseUserOut(BaseModel):
    id: uuid.UUID
    database_id: uuid.UUID
    server_id: uuid.UUID
    name: str
    status: Status
    workflow_id: uuid.UUID | None
    last_error: str | None
    password_rotated_at: datetime | None
    created_at: datetime
    updated_at: datetime


class RedisUserCreate(Strict):
    server_id: uuid.UUID
    name: Text
    prefix: Text = Field(description="the key prefix the user is confined to, ending in ':'")
    password: PasswordIn


class RedisUserOut(BaseModel):
    id: uuid.UUID
    server_id: uuid.UUID
    name: str
    prefix: str
    status: Status
    workflow_id: uuid.UUID | None
    last_error: str | None
    password_rotated_at: datetime | None
    created_at: datetime
    updated_at: datetime


class Credential(BaseModel):
    """The password, shown in this response only."""

    password: str = Field(description="shown once: it is stored only sealed")


class FtpAccountCreated(FtpAccountOut, Credential):
    pass


class DatabaseUserCreated(DatabaseUserOut, Credential):
    pass


class RedisUserCreated(RedisUserOut, Credential):
    pass


class PasswordRotated(Credential):
    id: uuid.UUID
    workflow_id: uuid.UUID
