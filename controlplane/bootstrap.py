"""First-start setup run by `yakpanel up`: the first platform administrator."""

from __future__ import annotations

import psycopg

from controlplane.passwords import generate_password, hash_password
from yakpanel.ids import new_id
from yakpanel.services import Stack

FIRST_ADMIN_EMAIL = "admin@yakpanel.local"


def ensure_first_admin(stack: Stack) -> list[str]:
    """Create the first admin once; its password is returned to show and never stored clear."""
    password = generate_password()
    with psycopg.connect(stack.postgres_dsn) as conn, conn.transaction():
        conn.execute("LOCK TABLE platform_staff IN EXCLUSIVE MODE")
        row = conn.execute("SELECT count(*) FROM platform_staff").fetchone()
        if row is not None and row[0] > 0:
            return [f"admin: {row[0]} existing account(s) kept; password shown at first start"]
        conn.execute(
            "INSERT INTO platform_staff (id, email, password_hash) VALUES (%s, %s, %s)",
            (new_id(), FIRST_ADMIN_EMAIL, hash_password(password)),
        )
    return [
        "first admin created — this password is shown once, store it now:",
        f"  admin email:    {FIRST_ADMIN_EMAIL}",
        f"  admin password: {password}",
    ]
