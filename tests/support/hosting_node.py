"""A hosting node for end-to-end tests: an enrolled agent that loads the real `site` and
`db` engines, configured the way an operator configures a node.

The engines read their settings from `YAKPANEL_SITE_*` / `YAKPANEL_DB_*` when the agent
builds them, so `site_env` and `db_env` turn the settings a test built for its private
nginx, pure-ftpd, MariaDB and Redis into exactly those variables: the path from the
environment to the engine is the production one, not a constructor shortcut.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.db.config import DbSettings
from engines.site.config import SiteSettings

if TYPE_CHECKING:
    from collections.abc import Iterator

    from agent.runtime import AgentRuntime
    from tests.integration.agentchannel.conftest import Channel
    from tests.integration.controlplane.conftest import Tenant

HOSTING_ENGINES = ("engines.site:SiteEngine", "engines.db:DbEngine")
HOSTING_CAPABILITIES = (
    "site.apply",
    "site.remove",
    "site.certificate.issue",
    "site.certificate.status",
    "site.ftp.create",
    "site.ftp.password",
    "site.ftp.delete",
    "db.mariadb.database.create",
    "db.mariadb.database.drop",
    "db.mariadb.user.create",
    "db.mariadb.user.password",
    "db.mariadb.user.drop",
    "db.redis.user.create",
    "db.redis.user.password",
    "db.redis.user.drop",
)


def _env_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return json.dumps(list(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def site_env(settings: SiteSettings) -> dict[str, str]:
    """`YAKPANEL_SITE_<FIELD>` for every set field (an unset probes_file is left out)."""
    env: dict[str, str] = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        if value is None:
            continue
        env[f"YAKPANEL_SITE_{f.name.upper()}"] = _env_value(value)
    assert SiteSettings.from_env(env) == settings, "site_env must round-trip"
    return env


def db_env(settings: DbSettings) -> dict[str, str]:
    """`YAKPANEL_DB_<FIELD>` for every field (None as the empty string, JSON lists)."""
    env = {
        f"YAKPANEL_DB_{f.name.upper()}": _env_value(getattr(settings, f.name))
        for f in fields(settings)
    }
    assert DbSettings.from_env(env) == settings, "db_env must round-trip"
    return env


def write_hosting_agent_config(
    state_dir: Path,
    capabilities: tuple[str, ...] = HOSTING_CAPABILITIES,
    telemetry: Mapping[str, Any] | None = None,
) -> None:
    """agent.toml as the node operator writes it: the hosting command types approved, the
    site and db engines loaded, telemetry off unless a `[telemetry]` table is given."""
    state_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "capabilities = [" + ", ".join(f'"{c}"' for c in capabilities) + "]",
        "engines = [" + ", ".join(f'"{e}"' for e in HOSTING_ENGINES) + "]",
        "[telemetry]",
    ]
    table = dict(telemetry) if telemetry is not None else {"enabled": False}
    for key, value in table.items():
        lines.append(f"{key} = {json.dumps(value)}")
    (state_dir / "agent.toml").write_text("\n".join(lines) + "\n")


@contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    """Set variables while the agent builds its engines, then put the old values back."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


async def enroll_node(channel: Channel, tenant: Tenant, name: str, state_dir: Path) -> str:
    """A new server of `tenant` whose agent enrolled through the gateway; its id."""
    from agent.enroll import enroll

    base = f"/v1/tenants/{tenant.id}/servers"
    r = await tenant.owner.post(base, json={"name": name})
    assert r.status_code == 201, r.text
    server_id = str(r.json()["id"])
    r = await tenant.owner.post(f"{base}/{server_id}/enrollment-tokens", json={})
    assert r.status_code == 201, r.text
    identity = await enroll(channel.enroll_address, r.json()["token"], channel.ca_pem, state_dir)
    assert str(identity.server_id) == server_id
    return server_id


@asynccontextmanager
async def hosting_agent(
    channel: Channel,
    tenant: Tenant,
    name: str,
    state_dir: Path,
    env: Mapping[str, str],
    telemetry: Mapping[str, Any] | None = None,
) -> AsyncIterator[tuple[str, AgentRuntime]]:
    """Enroll a node for `tenant`, configure it for hosting and run its agent in this
    process (so caplog sees its logs); yields (server id, runtime) once it is connected."""
    from agent.runtime import AgentRuntime

    write_hosting_agent_config(state_dir, telemetry=telemetry)
    server_id = await enroll_node(channel, tenant, name, state_dir)
    runtime = AgentRuntime(state_dir, max_backoff_s=1.0)
    with environment(env):
        await runtime.start()
    try:
        await asyncio.wait_for(runtime.wait_connected(), 20)
        missing = set(HOSTING_CAPABILITIES) - set(runtime.capabilities)
        assert not missing, f"the agent did not load the hosting engines: {sorted(missing)}"
        yield server_id, runtime
    finally:
        await runtime.stop()


async def read_topic(bootstrap: str, topic: str, timeout_s: float = 2.0) -> list[bytes]:
    """Every message value on `topic`, read from the start until `timeout_s` passes."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    got: list[bytes] = []
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=300)).values():
                got.extend(m.value for m in messages if m.value is not None)
    finally:
        await consumer.stop()
    return got


def open_to_service_users(path: Path) -> None:
    """Let daemons that drop root (pure-ftpd, nginx workers) traverse down to `path`."""
    if os.geteuid() != 0:
        return
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if not mode & 0o001:
            p.chmod(mode | 0o001)
