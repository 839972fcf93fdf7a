"""The control plane: FastAPI on PostgreSQL. Tenants, identity, registry, hosting, workflows."""
