-- Workflows: ordered steps, each run on a server as one signed command, retried with
-- backoff when the failure is retryable, and undone (compensated) in reverse order when a
-- later step fails for good. The driver in the control-plane worker advances them; the
-- rows are the whole state, so a restarted worker carries on where the last one stopped.
-- Tenant-scoped under row-level security, like 0006/0007.
--
-- Step payloads never hold a plaintext secret: `{"$secret": …}` values are stored sealed
-- under the master key (`{"$boxed": …}`) and opened only to seal them to the agent when a
-- command is issued.

CREATE TABLE workflows (
    tenant_id uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id uuid NOT NULL,
    kind text NOT NULL,
    subject_type text NOT NULL,
    subject_id uuid NOT NULL,
    state text NOT NULL CHECK (state IN
        ('running', 'compensating', 'succeeded', 'failed', 'compensated')),
    step_count integer NOT NULL CHECK (step_count >= 1),
    error text,
    -- The command the driver waits for (NULL while it waits for a backoff to pass).
    awaiting_command uuid,
    -- When the driver must look again without a finished command (backoff, first step).
    wake_at timestamptz,
    created_by jsonb NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    finished_at timestamptz,
    PRIMARY KEY (tenant_id, id),
    CHECK ((state IN ('running', 'compensating')) = (finished_at IS NULL))
);
CREATE INDEX workflows_tenant_list ON workflows (tenant_id, id DESC);
CREATE INDEX workflows_subject ON workflows (tenant_id, subject_type, subject_id);
-- The driver's scan: only unfinished workflows.
CREATE INDEX workflows_active ON workflows (wake_at)
    WHERE state IN ('running', 'compensating');

CREATE TABLE workflow_steps (
    tenant_id uuid NOT NULL,
    workflow_id uuid NOT NULL,
    index integer NOT NULL CHECK (index >= 0),
    name text NOT NULL,
    server_id uuid NOT NULL,
    command_type text NOT NULL,
    payload jsonb NOT NULL,
    compensation_type text,
    compensation_payload jsonb,
    max_attempts integer NOT NULL CHECK (max_attempts >= 1),
    base_delay_s double precision NOT NULL CHECK (base_delay_s >= 0),
    max_delay_s double precision NOT NULL CHECK (max_delay_s >= 0),
    timeout_s integer NOT NULL CHECK (timeout_s >= 1),
    state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'running', 'succeeded',
        'failed', 'compensating', 'compensated', 'compensation_failed')),
    attempts integer NOT NULL DEFAULT 0,
    compensation_attempts integer NOT NULL DEFAULT 0,
    command_id uuid,                        -- the latest command of this step
    command_ids uuid[] NOT NULL DEFAULT '{}',  -- every attempt, compensations included
    next_attempt_at timestamptz,
    output jsonb,
    error_code text,
    last_error text,
    started_at timestamptz,
    finished_at timestamptz,
    compensated_at timestamptz,
    PRIMARY KEY (tenant_id, workflow_id, index),
    CHECK ((compensation_type IS NULL) = (compensation_payload IS NULL)),
    FOREIGN KEY (tenant_id, workflow_id) REFERENCES workflows (tenant_id, id) ON DELETE CASCADE
);

ALTER TABLE workflows ENABLE ROW LEVEL SECURITY;
CREATE POLICY workflows_isolation ON workflows
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());
ALTER TABLE workflow_steps ENABLE ROW LEVEL SECURITY;
CREATE POLICY workflow_steps_isolation ON workflow_steps
    USING (tenant_id = app_tenant() OR app_staff_read())
    WITH CHECK (tenant_id = app_tenant());

GRANT SELECT, INSERT, UPDATE ON workflows, workflow_steps TO yakpanel_app;
