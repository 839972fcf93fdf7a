"""Server-rendered NOC and tenant dashboards."""
