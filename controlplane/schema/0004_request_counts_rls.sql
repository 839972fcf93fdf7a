-- Rate-limit counters are per tenant too: under row-level security like the rest, so
-- the application role cannot read or reset another tenant's counters. The worker
-- prunes old minutes across tenants through a narrow definer function.
ALTER TABLE api_request_counts ENABLE ROW LEVEL SECURITY;
CREATE POLICY api_request_counts_isolation ON api_request_counts
    USING (tenant_id = app_tenant())
    WITH CHECK (tenant_id = app_tenant());

CREATE FUNCTION prune_api_request_counts(p_before timestamptz) RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = public AS
$$ WITH gone AS (DELETE FROM api_request_counts WHERE minute < p_before RETURNING 1)
   SELECT count(*)::integer FROM gone $$;

GRANT EXECUTE ON FUNCTION prune_api_request_counts(timestamptz) TO yakpanel_app;
