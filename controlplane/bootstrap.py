"""Setup that runs with the owner's connection: the catalogue of built-in roles and
default plans (at every API start), and the first administrator (first `up`)."""

from __future__ import annotations

from typing import Any

import psycopg

from controlplane.access.permissions import BUILTIN_ROLES, STAFF_PERMISSIONS
from controlplane.passwords import generate_password, hash_password
from yakpanel.ids import new_id
from yakpanel.services import Stack

FIRST_ADMIN_EMAIL = "admin@yakpanel.local"

DEFAULT_PLANS: tuple[dict[str, Any], ...] = (
    {
        "code": "starter",
        "name": "Starter",
        "max_servers": 3,
        "max_sites": 20,
        "max_databases": 20,
        "max_alert_rules": 50,
        "metric_retention_days": 15,
        "api_requests_per_minute": 600,
        "max_database_users": 40,
        "max_ftp_accounts": 20,
        "max_redis_users": 10,
    },
    {
        "code": "business",
        "name": "Business",
        "max_servers": 50,
        "max_sites": 500,
        "max_databases": 500,
        "max_alert_rules": 1000,
        "metric_retention_days": 90,
        "api_requests_per_minute": 6000,
        "max_database_users": 1000,
        "max_ftp_accounts": 500,
        "max_redis_users": 200,
    },
)


def sync_catalogue(dsn: str) -> None:
    """Make the built-in roles match `permissions.py`; seed plans into an empty table."""
    with psycopg.connect(dsn) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (0x59414B524F4C45,))
        for name, (description, permissions) in BUILTIN_ROLES.items():
            updated = conn.execute(
                "UPDATE roles SET description = %s, permissions = %s, updated_at = now()"
                " WHERE tenant_id IS NULL AND name = %s",
                (description, sorted(permissions), name),
            )
            if updated.rowcount == 0:
                conn.execute(
                    "INSERT INTO roles (id, tenant_id, name, description, permissions)"
                    " VALUES (%s, NULL, %s, %s, %s)",
                    (new_id(), name, description, sorted(permissions)),
                )
        has_plans = conn.execute("SELECT 1 FROM plans LIMIT 1").fetchone()
        if has_plans is None:
            for plan in DEFAULT_PLANS:
                columns = ", ".join(plan)
                values = ", ".join(["%s"] * len(plan))
                conn.execute(
                    f"INSERT INTO plans (id, {columns}) VALUES (%s, {values})",
                    (new_id(), *plan.values()),
                )


def ensure_first_admin(stack: Stack) -> list[str]:
    """Create the first admin once; its password is returned to show and never stored clear."""
    password = generate_password()
    with psycopg.connect(stack.postgres_dsn) as conn, conn.transaction():
        conn.execute("LOCK TABLE platform_staff IN EXCLUSIVE MODE")
        row = conn.execute("SELECT count(*) FROM platform_staff").fetchone()
        if row is not None and row[0] > 0:
            return [f"admin: {row[0]} existing account(s) kept; password shown at first start"]
        conn.execute(
            "INSERT INTO platform_staff (id, email, password_hash, permissions)"
            " VALUES (%s, %s, %s, %s)",
            (new_id(), FIRST_ADMIN_EMAIL, hash_password(password), sorted(STAFF_PERMISSIONS)),
        )
    return [
        "first admin created — this password is shown once, store it now:",
        f"  admin email:    {FIRST_ADMIN_EMAIL}",
        f"  admin password: {password}",
    ]
