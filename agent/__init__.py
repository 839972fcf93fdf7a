"""The node agent: enrollment, mTLS channel, capability allowlist, engine dispatch, metrics."""
