-- Alerting: rule groups, evaluator state, the alert state history, notification config
-- and what the notification pipeline must remember across restarts (silences, the
-- notification log, delivery attempts). Every table is tenant-scoped under row-level
-- security; the alerting service works through `yakpanel_app` with `app.tenant_id` set.

-- One rule group in the rule-file shape (`rules_to_dict`); interval and delay are
-- copied out of the spec for listing (NULL interval: the evaluator's default).
CREATE TABLE alert_rule_groups (
    tenant_id uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name text NOT NULL CHECK (name <> ''),
    spec jsonb NOT NULL,
    eval_interval interval,
    evaluation_delay interval NOT NULL DEFAULT interval '0',
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, name)
);

-- The evaluator's `GroupState.to_dict()` of one group, replaced at every evaluation.
CREATE TABLE alert_group_state (
    tenant_id uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    group_name text NOT NULL,
    state jsonb NOT NULL,
    evaluated_at timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, group_name)
);

-- The alert state history: one row per `Transition`, keyed by `Transition.key`
-- (fingerprint, target state, time) so that a re-run cannot record one twice.
CREATE TABLE alert_transitions (
    tenant_id uuid NOT NULL,
    key text NOT NULL,
    fingerprint text NOT NULL,
    rule_id text NOT NULL,
    group_name text NOT NULL,
    alertname text NOT NULL,
    labels jsonb NOT NULL,
    annotations jsonb NOT NULL,
    from_state text NOT NULL
        CHECK (from_state IN ('inactive', 'pending', 'firing', 'resolved')),
    to_state text NOT NULL CHECK (to_state IN ('inactive', 'pending', 'firing', 'resolved')),
    at timestamptz NOT NULL,
    value double precision NOT NULL,
    active_since timestamptz NOT NULL,
    fired_at timestamptz,
    resolved_at timestamptz,
    PRIMARY KEY (key, at)
);
CREATE INDEX alert_transitions_tenant_at ON alert_transitions (tenant_id, at DESC);
CREATE INDEX alert_transitions_fingerprint ON alert_transitions (fingerprint, at DESC);

-- Routing tree, receivers and inhibition (`NotificationConfig.to_dict`), every receiver
-- URL replaced by {"$sealed": base64} sealed under the master key with the context
-- `alerting:receiver:<tenant_id>:<receiver>:<index>`.
CREATE TABLE alert_notification_config (
    tenant_id uuid PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    config jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- `Silence.to_dict()` (Alertmanager's v2 shape), upserted on add and expire.
CREATE TABLE alert_silences (
    tenant_id uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id text NOT NULL,
    silence jsonb NOT NULL,
    ends_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, id)
);

-- The notification log (Alertmanager's nflog): what each receiver integration of each
-- aggregation group was last told, and when.
CREATE TABLE alert_notification_log (
    tenant_id uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    group_key text NOT NULL,
    receiver text NOT NULL,
    integration integer NOT NULL,
    firing jsonb NOT NULL,
    resolved jsonb NOT NULL,
    sent_at timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, group_key, receiver, integration)
);

-- Every delivery attempt (success or failure, error text redacted).
CREATE TABLE alert_delivery_attempts (
    tenant_id uuid NOT NULL,
    notification_id text NOT NULL,
    attempt integer NOT NULL CHECK (attempt >= 1),
    at timestamptz NOT NULL,
    group_key text NOT NULL,
    receiver text NOT NULL,
    integration integer NOT NULL,
    target text NOT NULL,
    duration_seconds double precision NOT NULL,
    outcome text NOT NULL CHECK (outcome IN ('success', 'failure')),
    error text,
    final boolean NOT NULL,
    PRIMARY KEY (notification_id, attempt, at)
);
CREATE INDEX alert_delivery_attempts_tenant_at ON alert_delivery_attempts (tenant_id, at DESC);

ALTER TABLE alert_rule_groups ENABLE ROW LEVEL SECURITY;
CREATE POLICY alert_rule_groups_isolation ON alert_rule_groups
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());
ALTER TABLE alert_group_state ENABLE ROW LEVEL SECURITY;
CREATE POLICY alert_group_state_isolation ON alert_group_state
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());
ALTER TABLE alert_transitions ENABLE ROW LEVEL SECURITY;
CREATE POLICY alert_transitions_isolation ON alert_transitions
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());
ALTER TABLE alert_notification_config ENABLE ROW LEVEL SECURITY;
CREATE POLICY alert_notification_config_isolation ON alert_notification_config
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());
ALTER TABLE alert_silences ENABLE ROW LEVEL SECURITY;
CREATE POLICY alert_silences_isolation ON alert_silences
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());
ALTER TABLE alert_notification_log ENABLE ROW LEVEL SECURITY;
CREATE POLICY alert_notification_log_isolation ON alert_notification_log
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());
ALTER TABLE alert_delivery_attempts ENABLE ROW LEVEL SECURITY;
CREATE POLICY alert_delivery_attempts_isolation ON alert_delivery_attempts
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        PERFORM create_hypertable('alert_transitions', 'at', chunk_time_interval => interval '7 days');
        PERFORM add_retention_policy('alert_transitions', interval '400 days');
        PERFORM create_hypertable('alert_delivery_attempts', 'at',
                                  chunk_time_interval => interval '7 days');
        PERFORM add_retention_policy('alert_delivery_attempts', interval '90 days');
    END IF;
END
$$;

GRANT SELECT, INSERT, UPDATE, DELETE ON alert_rule_groups, alert_group_state,
    alert_notification_config, alert_silences, alert_notification_log TO yakpanel_app;
GRANT SELECT, INSERT ON alert_transitions, alert_delivery_attempts TO yakpanel_app;
