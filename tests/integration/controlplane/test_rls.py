"""Row-level security, checked in PostgreSQL itself through the application role.

Raw SQL as `yakpanel_app` without the tenant setting sees zero tenant rows; with
`app.tenant_id` = A it sees A's rows and only those, and cannot write rows of B. The
tables are discovered from the catalogue, so a migration that adds a table with a
`tenant_id` column but forgets row-level security fails here.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from controlplane.access.permissions import TENANT_PERMISSIONS
from controlplane.api.internal import INTERNAL_HEADER
from controlplane.db import APP_ROLE
from yakpanel.pki import new_csr, new_private_key
from yakpanel.service_secrets import load_internal_token
from yakpanel.services import Stack

from .conftest import Api, Tenant

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]

# Tenant-scoped tables the setup puts rows of both tenants in, so that "zero rows" is a
# result of the policy, not of empty tables. (Other tenant-scoped tables found in the
# catalogue get the same checks, with whatever rows they have.)
SEEDED = frozenset(
    {
        "memberships",
        "api_tokens",
        "servers",
        "roles",
        "audit_log",
        "enrollment_tokens",
        "agent_certificates",
        "commands",
    }
)

# Tables with a tenant_id column but without row-level security, and why that is safe.
WITHOUT_RLS: dict[str, str] = {
    "outbox": "the API only appends (no SELECT/UPDATE/DELETE for the app role, checked); "
    "the relay reads it as the owner",
}

# Rows every tenant may see: they have tenant_id NULL.
SHARED_ROWS: dict[str, str] = {"roles": "built-in roles are shared by every tenant"}

# SECURITY DEFINER functions run as their owner and so pass over row-level security.
# Each must return only what its caller is entitled to.
DEFINER_FUNCTIONS: dict[str, str] = {
    "find_api_token": "the one token row whose hash the caller presented",
    "touch_api_token": "sets last_used_at of a token the caller authenticated with",
    "user_memberships": "the memberships of one user, for login and resolve_access",
    "redeem_enrollment_token": "the one enrollment token whose hash the agent presented",
    "agent_certificate_status": "tenant, server and validity of one presented certificate",
    "prune_api_request_counts": "deletes rate-limit minutes older than the cutoff; returns a count",
}

# (Used in queries with parameters, hence `%%`.)
_SYSTEM_SCHEMAS = """n.nspname NOT IN ('pg_catalog', 'information_schema')
    AND n.nspname NOT LIKE 'pg\\_%%' AND n.nspname NOT LIKE '\\_timescaledb%%'
    AND n.nspname NOT LIKE 'timescaledb%%'"""

# Relations with the given column, and what the app role may do with them.
_RELATIONS = f"""
SELECT n.nspname AS schema, c.relname AS name, c.relkind AS kind,
       c.relrowsecurity AS rls, coalesce(c.reloptions, '{{}}') AS options,
       has_table_privilege(%(role)s, c.oid, 'SELECT') AS can_select,
       has_table_privilege(%(role)s, c.oid, 'INSERT') AS can_insert,
       has_table_privilege(%(role)s, c.oid, 'UPDATE') AS can_update,
       has_table_privilege(%(role)s, c.oid, 'DELETE') AS can_delete
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = %(column)s AND NOT a.attisdropped
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND {_SYSTEM_SCHEMAS}
ORDER BY n.nspname, c.relname"""


def _table(row: dict[str, Any]) -> sql.Composable:
    return sql.Identifier(row["schema"], row["name"])


async def _populate(api: Api, t: Tenant) -> None:
    """A row of the tenant in every tenant-scoped table (audit entries come with them)."""
    c, base = t.owner, f"/v1/tenants/{t.id}"
    created: dict[str, Any] = {}
    for path, body in (
        ("servers", {"name": "web-1"}),
        ("roles", {"name": "auditor", "permissions": ["servers:read"]}),
        (
            "members",
            {"email": f"ops@{t.slug}.test", "password": "ops-password-123", "role": "viewer"},
        ),
    ):
        r = await c.post(f"{base}/{path}", json=body)
        assert r.status_code == 201, r.text
        created[path] = r.json()
    await api.token(t, sorted(TENANT_PERMISSIONS))
    # An agent enrolled on the server (as the gateway does it), and a command for it.
    server = f"{base}/servers/{created['servers']['id']}"
    r = await c.post(f"{server}/enrollment-tokens", json={})
    assert r.status_code == 201, r.text
    internal = api.client(headers={INTERNAL_HEADER: load_internal_token(api.stack.settings)})
    r = await internal.post(
        "/internal/v1/enroll",
        json={"token": r.json()["token"], "csr_pem": new_csr(new_private_key(), "n").decode()},
    )
    assert r.status_code == 200, r.text
    r = await c.post(f"{server}/commands", json={"type": "system.ping"})
    assert r.status_code == 202, r.text


def _tenant_column(rel: dict[str, Any]) -> str:
    return "id" if rel["name"] == "tenants" else "tenant_id"


async def _tenant_rows(
    conn: psycopg.AsyncConnection[dict[str, Any]], rel: dict[str, Any]
) -> list[uuid.UUID | None]:
    query = sql.SQL("SELECT {} AS t FROM {}").format(
        sql.Identifier(_tenant_column(rel)), _table(rel)
    )
    return [r["t"] for r in await (await conn.execute(query)).fetchall()]


async def _cannot_write_other_tenant(
    conn: psycopg.AsyncConnection[dict[str, Any]],
    rel: dict[str, Any],
    mine: str,
    other: str,
    has_mine: bool,
) -> None:
    """With app.tenant_id = mine: no row of `other` can be inserted, changed or deleted,
    and no row of mine can be handed over to `other`. Everything is rolled back."""
    table, column = _table(rel), sql.Identifier(_tenant_column(rel))
    name, refused = rel["name"], psycopg.errors.InsufficientPrivilege
    if rel["can_insert"] and has_mine:
        # A copy of one of my rows, relabelled: the policy's WITH CHECK must refuse it
        # (PostgreSQL checks it before constraints, so the duplicate keys do not matter).
        async with conn.transaction(force_rollback=True):
            await conn.execute(
                sql.SQL(
                    "CREATE TEMP TABLE probe ON COMMIT DROP AS SELECT * FROM {} WHERE {} = %s"
                    " LIMIT 1"
                ).format(table, column),
                (mine,),
            )
            await conn.execute(sql.SQL("UPDATE probe SET {} = %s").format(column), (other,))
            with pytest.raises(refused, match="row-level security"):
                async with conn.transaction():
                    await conn.execute(
                        sql.SQL(
                            "INSERT INTO {} OVERRIDING SYSTEM VALUE SELECT * FROM probe"
                        ).format(table)
                    )
    if rel["can_update"]:
        async with conn.transaction(force_rollback=True):
            cur = await conn.execute(
                sql.SQL("UPDATE {} SET {} = {} WHERE {} = %s").format(
                    table, column, column, column
                ),
                (other,),
            )
            assert cur.rowcount == 0, f"{name}: the app role in one tenant updated another's rows"
        if has_mine:
            # No WHERE clause: only the UPDATE policy applies, not the SELECT one.
            with pytest.raises(refused, match="row-level security"):
                async with conn.transaction():
                    await conn.execute(
                        sql.SQL("UPDATE {} SET {} = %s").format(table, column), (other,)
                    )
    if rel["can_delete"]:
        async with conn.transaction(force_rollback=True):
            cur = await conn.execute(
                sql.SQL("DELETE FROM {} WHERE {} = %s").format(table, column), (other,)
            )
            assert cur.rowcount == 0, f"{name}: the app role in one tenant deleted another's rows"


async def test_app_role_sees_no_tenant_rows_without_the_tenant_setting(
    api: Api, stack: Stack
) -> None:
    a = await api.create_tenant()
    b = await api.create_tenant()
    for t in (a, b):
        await _populate(api, t)
    tid_a, tid_b = uuid.UUID(a.id), uuid.UUID(b.id)

    async with await psycopg.AsyncConnection.connect(
        stack.postgres_dsn, autocommit=True, row_factory=dict_row
    ) as owner:
        relations = await (
            await owner.execute(_RELATIONS, {"role": APP_ROLE, "column": "tenant_id"})
        ).fetchall()
        tenants = next(
            (
                r
                for r in await (
                    await owner.execute(_RELATIONS, {"role": APP_ROLE, "column": "id"})
                ).fetchall()
                if (r["schema"], r["name"]) == ("public", "tenants")
            ),
            None,
        )
        assert tenants is not None
        assert tenants["rls"], "the tenants table has no row-level security"

        # --- the catalogue: every tenant-scoped table has row-level security ----------
        tables = [r for r in relations if r["kind"] in ("r", "p")]
        names = {r["name"] for r in tables}
        assert names >= SEEDED | set(WITHOUT_RLS), f"tenant-scoped tables found: {names}"
        unprotected = [
            f"{r['schema']}.{r['name']}"
            for r in tables
            if not r["rls"] and not (r["schema"] == "public" and r["name"] in WITHOUT_RLS)
        ]
        assert not unprotected, (
            f"tables with a tenant_id column but no row-level security: {unprotected}; "
            "enable it (with a policy on app_tenant()) in the migration that creates them"
        )
        # Views and materialized views run as their owner and would pass over the
        # policies: the app role may read one only if it is a security_invoker view.
        views = [
            f"{r['schema']}.{r['name']}"
            for r in relations
            if r["kind"] not in ("r", "p")
            and r["can_select"]
            and not (r["kind"] == "v" and "security_invoker=true" in r["options"])
        ]
        assert not views, f"the app role reads tenant rows past row-level security in {views}"

        by_name = {r["name"]: r for r in tables if r["schema"] == "public"}
        outbox = by_name["outbox"]
        assert not (outbox["can_select"] or outbox["can_update"] or outbox["can_delete"]), (
            "the app role may read or change the outbox, which has no row-level security"
        )

        # --- the role: not superuser, no BYPASSRLS, owns nothing, inherits nothing ----
        role = await (
            await owner.execute(
                """SELECT r.rolsuper, r.rolbypassrls,
                       (SELECT count(*) FROM pg_class WHERE relowner = r.oid) AS tables,
                       (SELECT count(*) FROM pg_proc WHERE proowner = r.oid) AS functions,
                       (SELECT count(*) FROM pg_namespace WHERE nspowner = r.oid) AS schemas,
                       (SELECT count(*) FROM pg_auth_members WHERE member = r.oid) AS member_of
                   FROM pg_roles r WHERE r.rolname = %s""",
                (APP_ROLE,),
            )
        ).fetchone()
        assert role == {  # a role that owns a table or bypasses RLS is not subject to policies
            "rolsuper": False,
            "rolbypassrls": False,
            "tables": 0,
            "functions": 0,
            "schemas": 0,
            "member_of": 0,
        }

        definers = await (
            await owner.execute(
                f"""SELECT p.proname AS name, coalesce(p.proconfig, '{{}}') AS config
                    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                    WHERE p.prosecdef AND {_SYSTEM_SCHEMAS}
                    AND has_function_privilege(%s, p.oid, 'EXECUTE')
                    AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid
                                    AND d.classid = 'pg_proc'::regclass AND d.deptype = 'e')""",
                (APP_ROLE,),
            )
        ).fetchall()
        unreviewed = sorted({d["name"] for d in definers} - set(DEFINER_FUNCTIONS))
        assert not unreviewed, (
            f"SECURITY DEFINER functions {unreviewed} pass over row-level security for the app "
            "role; make sure each returns only what its caller is entitled to, and list it in "
            "DEFINER_FUNCTIONS"
        )
        unpinned = [
            d["name"]
            for d in definers
            if not any(c.startswith("search_path=") for c in d["config"])
        ]
        assert not unpinned, f"SECURITY DEFINER functions without SET search_path: {unpinned}"

        # --- what is really there (the owner is not subject to the policies) ---------
        readable = [r for r in tables if r["rls"] and r["can_select"]] + [tenants]
        assert {r["name"] for r in readable} >= SEEDED | {"tenants"}
        stored: dict[str, list[uuid.UUID | None]] = {}
        for rel in readable:
            stored[rel["name"]] = await _tenant_rows(owner, rel)
        for name in SEEDED | {"tenants"}:
            for tid in (tid_a, tid_b):
                assert tid in stored[name], f"the setup left no row of {tid} in {name}"

    # --- through the application role ------------------------------------------------
    async with await psycopg.AsyncConnection.connect(
        stack.postgres_dsn, autocommit=True, row_factory=dict_row
    ) as conn:
        await conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(APP_ROLE)))
        who = await (
            await conn.execute(
                "SELECT current_user AS role, current_setting('app.tenant_id', true) AS tenant"
            )
        ).fetchone()
        assert who is not None
        assert who["role"] == APP_ROLE
        assert not who["tenant"]

        # No tenant setting (unset, then empty as a unit of work sets it): no tenant rows.
        for setting in (None, ""):
            if setting is not None:
                await conn.execute("SELECT set_config('app.tenant_id', %s, false)", (setting,))
            for rel in readable:
                rows = await _tenant_rows(conn, rel)
                assert [t for t in rows if t is not None] == [], (
                    f"{rel['name']}: the app role sees tenant rows without app.tenant_id"
                )
                shared = stored[rel["name"]].count(None) if rel["name"] in SHARED_ROWS else 0
                assert len(rows) == shared, rel["name"]

        # Tenant A set: all of A's rows, and nothing of B.
        await conn.execute("SELECT set_config('app.tenant_id', %s, false)", (a.id,))
        for rel in readable:
            rows = await _tenant_rows(conn, rel)
            name = rel["name"]
            allowed = {tid_a, None} if name in SHARED_ROWS else {tid_a}
            assert set(rows) <= allowed, f"{name}: the app role in A sees rows of {set(rows)}"
            assert rows.count(tid_a) == stored[name].count(tid_a), f"{name}: A's rows are hidden"

        # Tenant A set: B's rows cannot be written, and A's rows cannot be moved to B.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO servers (id, tenant_id, name) VALUES (%s, %s, 'intruder')",
                    (uuid.uuid4(), b.id),
                )
        for rel in readable:
            await _cannot_write_other_tenant(conn, rel, a.id, b.id, tid_a in stored[rel["name"]])

    # Nothing above changed B: its owner still sees the server.
    r = await b.owner.get(f"/v1/tenants/{b.id}/servers")
    assert [s["name"] for s in r.json()["items"]] == ["web-1"]
