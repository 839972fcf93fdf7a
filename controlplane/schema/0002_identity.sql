-- Identity, tenancy, plans, audit, outbox.
--
-- The application connects as (or SET ROLE to) `yakpanel_app`, which owns no table.
-- Tenant-scoped tables carry `tenant_id` and a row-level-security policy keyed on the
-- per-transaction setting `app.tenant_id`; without it a query sees no tenant rows.
-- Platform staff reads across tenants only through `app.staff_read = 'on'`, set by the
-- API after an explicit, audited permission check.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'yakpanel_app') THEN
        CREATE ROLE yakpanel_app NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
END
$$;
GRANT yakpanel_app TO CURRENT_USER;

CREATE FUNCTION app_tenant() RETURNS uuid LANGUAGE sql STABLE AS
$$ SELECT NULLIF(current_setting('app.tenant_id', true), '')::uuid $$;

CREATE FUNCTION app_staff_read() RETURNS boolean LANGUAGE sql STABLE AS
$$ SELECT coalesce(current_setting('app.staff_read', true), '') = 'on' $$;

CREATE TABLE plans (
    id uuid PRIMARY KEY,
    code text NOT NULL UNIQUE CHECK (code ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    name text NOT NULL,
    max_servers integer NOT NULL CHECK (max_servers >= 0),
    max_sites integer NOT NULL CHECK (max_sites >= 0),
    max_databases integer NOT NULL CHECK (max_databases >= 0),
    max_alert_rules integer NOT NULL CHECK (max_alert_rules >= 0),
    metric_retention_days integer NOT NULL CHECK (metric_retention_days BETWEEN 1 AND 3650),
    api_requests_per_minute integer NOT NULL CHECK (api_requests_per_minute >= 1),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tenants (
    id uuid PRIMARY KEY,
    slug text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]{1,62}$'),
    name text NOT NULL,
    plan_id uuid NOT NULL REFERENCES plans (id),
    state text NOT NULL DEFAULT 'active'
        CHECK (state IN ('active', 'suspended', 'scheduled_for_deletion', 'deleted')),
    state_reason text,
    deletion_due_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    version integer NOT NULL DEFAULT 1
);
ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenants_isolation ON tenants
    USING (id = app_tenant() OR app_staff_read())
    WITH CHECK (id = app_tenant());

-- Users are global identities; what a user may see of a tenant comes from memberships.
CREATE TABLE users (
    id uuid PRIMARY KEY,
    email text NOT NULL UNIQUE CHECK (email = lower(email)),
    display_name text NOT NULL DEFAULT '',
    password_hash text NOT NULL,
    totp_secret bytea,
    totp_pending_secret bytea,
    created_at timestamptz NOT NULL DEFAULT now(),
    disabled_at timestamptz
);

ALTER TABLE platform_staff ADD COLUMN permissions text[] NOT NULL DEFAULT '{}';
ALTER TABLE platform_staff ADD COLUMN totp_secret bytea;

CREATE TABLE roles (
    id uuid PRIMARY KEY,
    tenant_id uuid REFERENCES tenants (id),
    name text NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    description text NOT NULL DEFAULT '',
    permissions text[] NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- Built-in roles have no tenant and are shared; custom role names are unique per tenant.
CREATE UNIQUE INDEX roles_name ON roles (coalesce(tenant_id, '00000000-0000-0000-0000-000000000000'::uuid), name);
ALTER TABLE roles ENABLE ROW LEVEL SECURITY;
CREATE POLICY roles_read ON roles FOR SELECT
    USING (tenant_id IS NULL OR tenant_id = app_tenant() OR app_staff_read());
CREATE POLICY roles_write ON roles FOR ALL
    USING (tenant_id = app_tenant()) WITH CHECK (tenant_id = app_tenant());

CREATE TABLE memberships (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    user_id uuid NOT NULL REFERENCES users (id),
    role_id uuid NOT NULL REFERENCES roles (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, user_id)
);
CREATE INDEX memberships_user ON memberships (user_id);
ALTER TABLE memberships ENABLE ROW LEVEL SECURITY;
CREATE POLICY memberships_isolation ON memberships
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());

CREATE TABLE api_tokens (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    user_id uuid NOT NULL REFERENCES users (id),
    name text NOT NULL,
    prefix text NOT NULL,
    token_hash bytea NOT NULL UNIQUE,
    scopes text[] NOT NULL,
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz,
    last_used_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE api_tokens ENABLE ROW LEVEL SECURITY;
CREATE POLICY api_tokens_isolation ON api_tokens
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());

-- Token lookup happens before the tenant is known: a narrow definer function returns
-- the one row whose hash matches, and nothing else.
CREATE FUNCTION find_api_token(p_hash bytea)
RETURNS TABLE (id uuid, tenant_id uuid, user_id uuid, scopes text[], expires_at timestamptz,
               revoked_at timestamptz, last_used_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS
$$ SELECT id, tenant_id, user_id, scopes, expires_at, revoked_at, last_used_at
   FROM api_tokens WHERE token_hash = p_hash $$;

CREATE FUNCTION touch_api_token(p_id uuid, p_at timestamptz) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = public AS
$$ UPDATE api_tokens SET last_used_at = p_at WHERE id = p_id $$;

-- The tenants a user belongs to, for login and "my tenants", before a tenant is chosen.
CREATE FUNCTION user_memberships(p_user uuid)
RETURNS TABLE (tenant_id uuid, role_id uuid, permissions text[], tenant_state text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS
$$ SELECT m.tenant_id, m.role_id, r.permissions, t.state
   FROM memberships m JOIN roles r ON r.id = m.role_id JOIN tenants t ON t.id = m.tenant_id
   WHERE m.user_id = p_user $$;

CREATE TABLE login_sessions (
    id uuid PRIMARY KEY,
    token_hash bytea NOT NULL UNIQUE,
    csrf_hash bytea NOT NULL,
    principal_kind text NOT NULL CHECK (principal_kind IN ('user', 'staff')),
    principal_id uuid NOT NULL,
    source_ip text,
    user_agent text,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz
);

CREATE TABLE login_failures (
    id bigserial PRIMARY KEY,
    throttle_key text NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX login_failures_key_at ON login_failures (throttle_key, at);

CREATE TABLE api_request_counts (
    tenant_id uuid NOT NULL,
    minute timestamptz NOT NULL,
    count integer NOT NULL,
    PRIMARY KEY (tenant_id, minute)
);

CREATE TABLE audit_log (
    id uuid NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    tenant_id uuid,
    actor_kind text NOT NULL,
    actor_id uuid,
    action text NOT NULL,
    resource_type text NOT NULL,
    resource_id text,
    source_ip text,
    user_agent text,
    before jsonb,
    after jsonb,
    PRIMARY KEY (id, at)
);
CREATE INDEX audit_log_tenant_at ON audit_log (tenant_id, at DESC);
ALTER TABLE audit_log ENABLE ROW LEVEL SECURITY;
CREATE POLICY audit_read ON audit_log FOR SELECT
    USING (tenant_id = app_tenant() OR app_staff_read());
-- Platform-level entries (tenant_id NULL) are written by staff actions outside a tenant.
CREATE POLICY audit_append ON audit_log FOR INSERT
    WITH CHECK (tenant_id IS NULL OR tenant_id = app_tenant());

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        PERFORM create_hypertable('audit_log', 'at', chunk_time_interval => interval '7 days');
        PERFORM add_retention_policy('audit_log', interval '400 days');
    END IF;
END
$$;

-- Transactional outbox: written in the same transaction as the change it describes,
-- published to yak.events.v1 by the relay in id order, removed only after the
-- broker acknowledged it.
CREATE TABLE outbox (
    id bigserial PRIMARY KEY,
    event_id uuid NOT NULL UNIQUE,
    tenant_id uuid,
    aggregate_type text NOT NULL,
    aggregate_id text NOT NULL,
    event_type text NOT NULL,
    payload jsonb NOT NULL,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

CREATE TABLE servers (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    name text NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9.-]{0,62}$'),
    region text NOT NULL DEFAULT '',
    labels jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);
ALTER TABLE servers ENABLE ROW LEVEL SECURITY;
CREATE POLICY servers_isolation ON servers
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());

GRANT SELECT ON plans TO yakpanel_app;
GRANT INSERT, UPDATE ON plans TO yakpanel_app;
GRANT SELECT, INSERT, UPDATE ON tenants TO yakpanel_app;
GRANT SELECT, INSERT, UPDATE ON users TO yakpanel_app;
GRANT SELECT, UPDATE ON platform_staff TO yakpanel_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON roles, memberships, servers TO yakpanel_app;
GRANT SELECT, INSERT, UPDATE ON api_tokens TO yakpanel_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON login_sessions, login_failures, api_request_counts
    TO yakpanel_app;
GRANT USAGE ON SEQUENCE login_failures_id_seq TO yakpanel_app;
-- Append-only for the application: the audit trail cannot be edited by the API.
GRANT SELECT, INSERT ON audit_log TO yakpanel_app;
GRANT INSERT ON outbox TO yakpanel_app;
GRANT USAGE ON SEQUENCE outbox_id_seq TO yakpanel_app;
GRANT EXECUTE ON FUNCTION find_api_token(bytea), touch_api_token(uuid, timestamptz),
    user_memberships(uuid), app_tenant(), app_staff_read() TO yakpanel_app;
