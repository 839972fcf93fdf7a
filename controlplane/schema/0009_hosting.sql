-- Hosting resources: the desired state of sites (with their domains, certificates and
-- FTP accounts), MariaDB databases and users, and Redis users. Each row follows the
-- workflow that enforces it on the node (`workflow_id`, `status`, `last_error`).
-- Passwords are kept only sealed under the master key (`password_sealed`, with the
-- key version that sealed them); every table is tenant-scoped under row-level security.

ALTER TABLE plans
    ADD COLUMN IF NOT EXISTS max_sites integer NOT NULL DEFAULT 20 CHECK (max_sites >= 0),
    ADD COLUMN IF NOT EXISTS max_databases integer NOT NULL DEFAULT 20
        CHECK (max_databases >= 0),
    ADD COLUMN max_database_users integer NOT NULL DEFAULT 50 CHECK (max_database_users >= 0),
    ADD COLUMN max_ftp_accounts integer NOT NULL DEFAULT 50 CHECK (max_ftp_accounts >= 0),
    ADD COLUMN max_redis_users integer NOT NULL DEFAULT 20 CHECK (max_redis_users >= 0);

-- A site on one server. `domains` holds the primary name first, then the aliases, as
-- normalized by `yakpanel.hostnames.normalize_domain`; `site_domains` makes each name
-- globally unique. Resources of a server go with it when the server is deleted.
CREATE TABLE sites (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    server_id uuid NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    kind text NOT NULL CHECK (kind IN ('static', 'php', 'proxy')),
    domains text[] NOT NULL CHECK (cardinality(domains) BETWEEN 1 AND 50),
    upstream text,
    redirects jsonb NOT NULL DEFAULT '[]',
    force_https boolean NOT NULL DEFAULT false,
    tls boolean NOT NULL DEFAULT false,
    status text NOT NULL DEFAULT 'provisioning'
        CHECK (status IN ('provisioning', 'active', 'failed', 'deleting')),
    workflow_id uuid,
    last_error text,
    document_root text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sites_tenant ON sites (tenant_id, id);
CREATE INDEX sites_workflow ON sites (workflow_id);

-- One row per name a site answers to. The primary key spans every tenant: a name cannot
-- be claimed twice, whoever asks (row-level security hides the rows, not the index).
CREATE TABLE site_domains (
    domain text PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    site_id uuid NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    position integer NOT NULL CHECK (position >= 0)
);
CREATE INDEX site_domains_site ON site_domains (site_id);

-- The site's certificate as the last issuance reported it, and its renewal state.
CREATE TABLE site_certificates (
    site_id uuid PRIMARY KEY REFERENCES sites (id) ON DELETE CASCADE,
    tenant_id uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    domains text[] NOT NULL,
    state text NOT NULL DEFAULT 'requested'
        CHECK (state IN ('requested', 'valid', 'renewing', 'renewal_failed', 'failed')),
    issuer text,
    serial text,
    not_before timestamptz,
    not_after timestamptz,
    workflow_id uuid,
    last_error text,
    last_attempt_at timestamptz,
    requested_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX site_certificates_due ON site_certificates (not_after) WHERE state <> 'renewing';

CREATE TABLE ftp_accounts (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    site_id uuid NOT NULL REFERENCES sites (id) ON DELETE CASCADE,
    server_id uuid NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    username text NOT NULL,
    home text,
    password_sealed bytea NOT NULL,
    pending_password_sealed bytea,
    key_version integer NOT NULL DEFAULT 1,
    status text NOT NULL DEFAULT 'provisioning'
        CHECK (status IN ('provisioning', 'active', 'failed', 'deleting')),
    workflow_id uuid,
    last_error text,
    password_rotated_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (server_id, username)
);
CREATE INDEX ftp_accounts_site ON ftp_accounts (site_id);

CREATE TABLE hosted_databases (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    server_id uuid NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    engine text NOT NULL DEFAULT 'mariadb' CHECK (engine IN ('mariadb')),
    name text NOT NULL,
    status text NOT NULL DEFAULT 'provisioning'
        CHECK (status IN ('provisioning', 'active', 'failed', 'deleting')),
    workflow_id uuid,
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (server_id, name)
);
CREATE INDEX hosted_databases_tenant ON hosted_databases (tenant_id, id);

CREATE TABLE database_users (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    database_id uuid NOT NULL REFERENCES hosted_databases (id) ON DELETE CASCADE,
    server_id uuid NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    name text NOT NULL,
    password_sealed bytea NOT NULL,
    pending_password_sealed bytea,
    key_version integer NOT NULL DEFAULT 1,
    status text NOT NULL DEFAULT 'provisioning'
        CHECK (status IN ('provisioning', 'active', 'failed', 'deleting')),
    workflow_id uuid,
    last_error text,
    password_rotated_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (server_id, name)
);
CREATE INDEX database_users_database ON database_users (database_id);

CREATE TABLE redis_users (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    server_id uuid NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    name text NOT NULL,
    prefix text NOT NULL,
    password_sealed bytea NOT NULL,
    pending_password_sealed bytea,
    key_version integer NOT NULL DEFAULT 1,
    status text NOT NULL DEFAULT 'provisioning'
        CHECK (status IN ('provisioning', 'active', 'failed', 'deleting')),
    workflow_id uuid,
    last_error text,
    password_rotated_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (server_id, name),
    UNIQUE (server_id, prefix)
);
CREATE INDEX redis_users_tenant ON redis_users (tenant_id, id);

ALTER TABLE sites ENABLE ROW LEVEL SECURITY;
CREATE POLICY sites_isolation ON sites
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());
ALTER TABLE site_domains ENABLE ROW LEVEL SECURITY;
CREATE POLICY site_domains_isolation ON site_domains
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());
ALTER TABLE site_certificates ENABLE ROW LEVEL SECURITY;
CREATE POLICY site_certificates_isolation ON site_certificates
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());
ALTER TABLE ftp_accounts ENABLE ROW LEVEL SECURITY;
CREATE POLICY ftp_accounts_isolation ON ftp_accounts
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());
ALTER TABLE hosted_databases ENABLE ROW LEVEL SECURITY;
CREATE POLICY hosted_databases_isolation ON hosted_databases
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());
ALTER TABLE database_users ENABLE ROW LEVEL SECURITY;
CREATE POLICY database_users_isolation ON database_users
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());
ALTER TABLE redis_users ENABLE ROW LEVEL SECURITY;
CREATE POLICY redis_users_isolation ON redis_users
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());

GRANT SELECT, INSERT, UPDATE, DELETE ON sites, site_domains, site_certificates, ftp_accounts,
    hosted_databases, database_users, redis_users TO yakpanel_app;
