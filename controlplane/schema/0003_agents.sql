-- The agent channel: platform keys, enrollment, certificates, presence, commands.

-- The outbox carries more than domain events: command envelopes go to
-- yak.commands.v1 as protobuf bytes, keyed by server.
ALTER TABLE outbox ADD COLUMN topic text NOT NULL DEFAULT 'yak.events.v1';
ALTER TABLE outbox ADD COLUMN message_key text;
ALTER TABLE outbox ADD COLUMN body bytea;
ALTER TABLE outbox ALTER COLUMN payload DROP NOT NULL;
ALTER TABLE outbox ADD CONSTRAINT outbox_has_value CHECK (payload IS NOT NULL OR body IS NOT NULL);

-- The internal CA and the command-signing key; private halves sealed under the master key.
CREATE TABLE platform_keys (
    name text PRIMARY KEY,
    public_key bytea NOT NULL,
    private_sealed bytea NOT NULL,
    certificate_pem text,
    created_at timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE servers
    ADD COLUMN presence text NOT NULL DEFAULT 'never_connected'
        CHECK (presence IN ('never_connected', 'online', 'offline')),
    ADD COLUMN presence_session text,
    ADD COLUMN presence_changed_at timestamptz,
    ADD COLUMN last_seen_at timestamptz,
    ADD COLUMN agent_version text,
    ADD COLUMN hostname text,
    ADD COLUMN capabilities text[] NOT NULL DEFAULT '{}';

CREATE TABLE enrollment_tokens (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    server_id uuid NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    token_hash bytea NOT NULL UNIQUE,
    expires_at timestamptz NOT NULL,
    used_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE enrollment_tokens ENABLE ROW LEVEL SECURITY;
CREATE POLICY enrollment_tokens_isolation ON enrollment_tokens
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());

CREATE TABLE agent_certificates (
    serial text PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    server_id uuid NOT NULL,
    fingerprint text NOT NULL,
    public_key_pem text NOT NULL,
    not_after timestamptz NOT NULL,
    issued_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz,
    revoked_reason text
);
CREATE INDEX agent_certificates_server ON agent_certificates (server_id);
ALTER TABLE agent_certificates ENABLE ROW LEVEL SECURITY;
CREATE POLICY agent_certificates_isolation ON agent_certificates
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());

CREATE TABLE commands (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    server_id uuid NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    idempotency_key text NOT NULL,
    type text NOT NULL,
    payload jsonb NOT NULL,
    request_sha256 text NOT NULL,
    state text NOT NULL DEFAULT 'pending' CHECK (state IN
        ('pending', 'dispatched', 'acknowledged', 'succeeded', 'failed', 'expired')),
    issued_at timestamptz NOT NULL,
    deadline timestamptz NOT NULL,
    envelope bytea NOT NULL,
    dispatched_at timestamptz,
    acknowledged_at timestamptz,
    finished_at timestamptz,
    progress integer NOT NULL DEFAULT 0,
    message text NOT NULL DEFAULT '',
    output jsonb,
    error_code text,
    replayed boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, idempotency_key)
);
CREATE INDEX commands_server_state ON commands (server_id, state);
CREATE INDEX commands_open_deadline ON commands (deadline)
    WHERE state IN ('pending', 'dispatched', 'acknowledged');
ALTER TABLE commands ENABLE ROW LEVEL SECURITY;
CREATE POLICY commands_isolation ON commands
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());

CREATE TABLE presence_history (
    id bigserial,
    tenant_id uuid NOT NULL,
    server_id uuid NOT NULL,
    online boolean NOT NULL,
    session_id text NOT NULL,
    gateway_id text NOT NULL,
    reason text NOT NULL DEFAULT '',
    at timestamptz NOT NULL,
    PRIMARY KEY (id, at)
);
CREATE INDEX presence_history_server_at ON presence_history (server_id, at DESC);
ALTER TABLE presence_history ENABLE ROW LEVEL SECURITY;
CREATE POLICY presence_history_isolation ON presence_history
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        PERFORM create_hypertable('presence_history', 'at', chunk_time_interval => interval '7 days');
        PERFORM add_retention_policy('presence_history', interval '90 days');
    END IF;
END
$$;

-- Redeeming happens before the tenant is known: one row, by hash, once.
CREATE FUNCTION redeem_enrollment_token(p_hash bytea, p_now timestamptz)
RETURNS TABLE (outcome text, tenant_id uuid, server_id uuid)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS
$$
DECLARE
    row enrollment_tokens%ROWTYPE;
BEGIN
    SELECT * INTO row FROM enrollment_tokens WHERE token_hash = p_hash FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown'::text, NULL::uuid, NULL::uuid;
    ELSIF row.used_at IS NOT NULL THEN
        RETURN QUERY SELECT 'used'::text, row.tenant_id, row.server_id;
    ELSIF row.expires_at <= p_now THEN
        RETURN QUERY SELECT 'expired'::text, row.tenant_id, row.server_id;
    ELSE
        UPDATE enrollment_tokens SET used_at = p_now WHERE id = row.id;
        RETURN QUERY SELECT 'ok'::text, row.tenant_id, row.server_id;
    END IF;
END
$$;

CREATE FUNCTION agent_certificate_status(p_serial text)
RETURNS TABLE (tenant_id uuid, server_id uuid, revoked_at timestamptz, not_after timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS
$$ SELECT tenant_id, server_id, revoked_at, not_after FROM agent_certificates
   WHERE serial = p_serial $$;

GRANT SELECT ON platform_keys TO yakpanel_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON enrollment_tokens, agent_certificates, commands
    TO yakpanel_app;
GRANT SELECT, INSERT ON presence_history TO yakpanel_app;
GRANT USAGE ON SEQUENCE presence_history_id_seq TO yakpanel_app;
GRANT EXECUTE ON FUNCTION redeem_enrollment_token(bytea, timestamptz),
    agent_certificate_status(text) TO yakpanel_app;
