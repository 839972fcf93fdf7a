"""Who is calling: a tenant user, platform staff, or an API token."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal

from controlplane.db import Actor

PrincipalKind = Literal["user", "staff", "token"]


@dataclass(frozen=True)
class Principal:
    kind: PrincipalKind
    id: uuid.UUID
    user_id: uuid.UUID | None = None
    staff_permissions: frozenset[str] = frozenset()
    token_tenant_id: uuid.UUID | None = None
    token_scopes: frozenset[str] | None = None
    session_id: uuid.UUID | None = None
    source_ip: str | None = None
    user_agent: str | None = None

    @property
    def is_staff(self) -> bool:
        return self.kind == "staff"

    def actor(self) -> Actor:
        return Actor(self.kind, self.id, self.source_ip, self.user_agent)


@dataclass(frozen=True)
class TenantAccess:
    """What a principal may do in one tenant, resolved before anything else runs."""

    principal: Principal
    tenant_id: uuid.UUID
    permissions: frozenset[str]
    tenant_state: str
    state_reason: str | None
    staff_read: bool = False

    def actor(self) -> Actor:
        return self.principal.actor()
