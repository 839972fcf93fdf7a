from __future__ import annotations

import pytest

from .conftest import Api

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse]


async def test_tenant_owner_can_manage_servers(api: Api) -> None:
    t = await api.create_tenant()
    r = await t.owner.get(f"/v1/tenants/{t.id}")
    assert r.status_code == 200, r.text
    assert r.json()["usage"] == {
        "servers": 0,
        "sites": 0,
        "databases": 0,
        "database_users": 0,
        "ftp_accounts": 0,
        "redis_users": 0,
        "alert_rules": 0,
    }
    r = await t.owner.post(
        f"/v1/tenants/{t.id}/servers", json={"name": "web-1", "labels": {"env": "prod"}}
    )
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    r = await t.owner.get(f"/v1/tenants/{t.id}/servers")
    assert [s["id"] for s in r.json()["items"]] == [sid]
    r = await t.owner.get(f"/v1/tenants/{t.id}/audit")
    assert r.status_code == 200, r.text
    actions = [e["action"] for e in r.json()["items"]]
    assert "server.created" in actions
