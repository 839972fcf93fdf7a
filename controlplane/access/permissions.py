"""The permission catalogue (`resource:action`), built-in roles and staff permissions.

Adding a resource means adding its permissions here; built-in roles are synced into
PostgreSQL from this module at start, so this file is their single source.
"""

from __future__ import annotations

TENANT_PERMISSIONS: dict[str, str] = {
    "tenants:read": "see the tenant, its plan and usage",
    "tenants:write": "rename the tenant",
    "members:read": "list members and their roles",
    "members:write": "add, change and remove members",
    "roles:read": "list roles and their permissions",
    "roles:write": "create, change and delete custom roles",
    "tokens:read": "list API tokens",
    "tokens:write": "create and revoke API tokens",
    "audit:read": "read the tenant's audit log",
    "billing:read": "see plan and billing state",
    "billing:write": "change plan, schedule or cancel deletion",
    "servers:read": "list servers and their state",
    "servers:write": "create, change and remove servers, enroll agents, revoke certificates",
    "commands:read": "see commands run on servers and their results",
    "commands:write": "run commands on servers",
    "metrics:read": "query metrics",
    "alerts:read": "see alert rules, alerts and incidents",
    "alerts:write": "manage alert rules, silences and incidents",
    "sites:read": "see sites, domains, certificates and FTP accounts",
    "sites:write": "manage sites, domains, certificates and FTP accounts",
    "databases:read": "see databases, database users and Redis users",
    "databases:write": "create and delete databases, database users and Redis users",
    "workflows:read": "follow workflows (multi-step changes on servers): steps, retries, undo",
}

STAFF_PERMISSIONS: dict[str, str] = {
    "platform:tenants:read": "read any tenant's data (each read is audited)",
    "platform:tenants:write": "create tenants, change their plan and lifecycle",
    "platform:plans:write": "create and change plans",
    "platform:audit:read": "read the platform audit log",
}

ALL_TENANT = frozenset(TENANT_PERMISSIONS)
READ_ONLY = frozenset(p for p in TENANT_PERMISSIONS if p.endswith(":read"))

BUILTIN_ROLES: dict[str, tuple[str, frozenset[str]]] = {
    "owner": ("everything in the tenant", ALL_TENANT),
    "admin": (
        "everything but billing",
        ALL_TENANT - {"billing:write"},
    ),
    "operator": (
        "runs servers, sites and alerts; cannot manage people",
        READ_ONLY - {"audit:read"}
        | {
            "servers:write",
            "commands:write",
            "sites:write",
            "databases:write",
            "alerts:write",
            "tokens:write",
        },
    ),
    "viewer": ("reads everything but the audit log", READ_ONLY - {"audit:read"}),
    "billing": (
        "plan and billing",
        frozenset({"tenants:read", "billing:read", "billing:write", "audit:read"}),
    ),
}


def unknown_permissions(permissions: set[str] | frozenset[str]) -> list[str]:
    return sorted(p for p in permissions if p not in TENANT_PERMISSIONS)
