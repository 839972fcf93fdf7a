"""Tenants, plans and quotas, tenant lifecycle."""
