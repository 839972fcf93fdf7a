-- Incidents: one per episode of a firing alert (fingerprint), opened and resolved by
-- the alerting service in the transaction that records the alert's transitions, and
-- worked on through the API (acknowledge, assign, notes, resolve). `incident_events`
-- is the timeline. Tenant-scoped under row-level security, like 0006.

CREATE TABLE incidents (
    tenant_id uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id uuid NOT NULL,
    fingerprint text NOT NULL,
    alertname text NOT NULL,
    labels jsonb NOT NULL,
    severity text,
    state text NOT NULL CHECK (state IN ('open', 'acknowledged', 'resolved')),
    opened_at timestamptz NOT NULL,
    acknowledged_at timestamptz,
    acknowledged_by uuid,
    assignee uuid,
    resolved_at timestamptz,
    resolved_by uuid,
    resolution text,
    PRIMARY KEY (tenant_id, id),
    CHECK ((state = 'resolved') = (resolved_at IS NOT NULL))
);
-- At most one unresolved incident per alert.
CREATE UNIQUE INDEX incidents_one_open ON incidents (tenant_id, fingerprint)
    WHERE state <> 'resolved';
CREATE INDEX incidents_tenant_state ON incidents (tenant_id, state, id DESC);

CREATE TABLE incident_events (
    tenant_id uuid NOT NULL,
    id uuid NOT NULL,
    seq bigint GENERATED ALWAYS AS IDENTITY,  -- the timeline's order
    incident_id uuid NOT NULL,
    kind text NOT NULL CHECK (kind IN ('opened', 'acknowledged', 'assigned', 'note',
                                       'alert_resolved', 'resolved', 'reopened')),
    author uuid,
    text text,
    at timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, incident_id) REFERENCES incidents (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX incident_events_incident ON incident_events (tenant_id, incident_id, seq);

ALTER TABLE incidents ENABLE ROW LEVEL SECURITY;
CREATE POLICY incidents_isolation ON incidents
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());
ALTER TABLE incident_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY incident_events_isolation ON incident_events
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());

GRANT SELECT, INSERT, UPDATE ON incidents TO yakpanel_app;
GRANT SELECT, INSERT ON incident_events TO yakpanel_app;
