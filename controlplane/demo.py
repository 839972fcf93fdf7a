"""The demo tenant `yakpanel up` creates so a fresh install shows a live server at once:
tenant `demo`, its owner `demo@yakpanel.local` (password shown once), and the server
`local` with a one-time enrollment token for the agent `up` runs in-process."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from controlplane.access.credentials import digest
from controlplane.crypto import SecretBox, load_master_key
from controlplane.keys import load_platform_keys
from controlplane.passwords import generate_password, hash_password
from controlplane.registry.agents import ENROLLMENT_PREFIX
from yakpanel.ids import new_id
from yakpanel.services import Stack

DEMO_SLUG = "demo"
DEMO_EMAIL = "demo@yakpanel.local"
DEMO_SERVER = "local"


def ensure_demo_enrollment(stack: Stack) -> dict[str, Any]:
    """Returns {"lines": [...], "token": str | None, "ca_pem": bytes, "enroll_address": str}.

    `token` is None when the demo server already has a valid certificate.
    """
    lines: list[str] = []
    keys = load_platform_keys(stack.postgres_dsn, SecretBox(load_master_key(stack.settings)))
    now = datetime.now(UTC)
    with psycopg.connect(stack.postgres_dsn) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (0x59414B44454D4F,))
        tenant = conn.execute("SELECT id FROM tenants WHERE slug = %s", (DEMO_SLUG,)).fetchone()
        if tenant is None:
            plan = conn.execute("SELECT id FROM plans WHERE code = 'starter'").fetchone()
            assert plan is not None, "the built-in plans are seeded at API start"
            tenant_id = new_id()
            conn.execute(
                "INSERT INTO tenants (id, slug, name, plan_id) VALUES (%s, %s, %s, %s)",
                (tenant_id, DEMO_SLUG, "Demo", plan[0]),
            )
            user = conn.execute("SELECT id FROM users WHERE email = %s", (DEMO_EMAIL,)).fetchone()
            if user is None:
                password = generate_password()
                user_id = new_id()
                conn.execute(
                    "INSERT INTO users (id, email, display_name, password_hash)"
                    " VALUES (%s, %s, %s, %s)",
                    (user_id, DEMO_EMAIL, "Demo owner", hash_password(password)),
                )
                lines += [
                    "demo tenant created — its owner's password is shown once:",
                    f"  demo email:     {DEMO_EMAIL}",
                    f"  demo password:  {password}",
                ]
            else:
                user_id = user[0]
            owner = conn.execute(
                "SELECT id FROM roles WHERE tenant_id IS NULL AND name = 'owner'"
            ).fetchone()
            assert owner is not None
            conn.execute(
                "INSERT INTO memberships (id, tenant_id, user_id, role_id) VALUES (%s, %s, %s, %s)",
                (new_id(), tenant_id, user_id, owner[0]),
            )
        else:
            tenant_id = tenant[0]
        server = conn.execute(
            "SELECT id FROM servers WHERE tenant_id = %s AND name = %s", (tenant_id, DEMO_SERVER)
        ).fetchone()
        if server is None:
            server_id = new_id()
            conn.execute(
                "INSERT INTO servers (id, tenant_id, name, labels) VALUES (%s, %s, %s, %s)",
                (server_id, tenant_id, DEMO_SERVER, '{"role": "demo"}'),
            )
        else:
            server_id = server[0]
        enrolled = conn.execute(
            "SELECT 1 FROM agent_certificates WHERE server_id = %s AND revoked_at IS NULL"
            " AND not_after > %s",
            (server_id, now),
        ).fetchone()
        token = None
        if enrolled is None:
            token = ENROLLMENT_PREFIX + secrets.token_urlsafe(32)
            conn.execute(
                """INSERT INTO enrollment_tokens (id, tenant_id, server_id, token_hash, expires_at)
                   VALUES (%s, %s, %s, %s, %s)""",
                (new_id(), tenant_id, server_id, digest(token), now + timedelta(minutes=10)),
            )
    return {
        "lines": lines,
        "token": token,
        "ca_pem": keys.ca.cert_pem,
        "enroll_address": stack.settings.gateway_enroll_address,
    }
