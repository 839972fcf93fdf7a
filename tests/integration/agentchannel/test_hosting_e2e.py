"""Sites end to end (issue #7): API → PostgreSQL desired state → workflow → signed command
via the outbox → Kafka → gateway → a real agent running the `site` engine → a real
nginx on loopback → result → workflow → the site's status in the API.

The agent is configured like a node: agent.toml approves the hosting command types and
loads `engines.site:SiteEngine` / `engines.db:DbEngine`, whose settings come from the
`YAKPANEL_SITE_*` variables describing this module's private nginx. What a user relies
on is checked where the user sees it: HTTP answers from that nginx for the site's names,
and the site's and workflow's states through the API.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.runtime import AgentRuntime
from tests.integration.engines.test_site_tls import request
from tests.support.hosting_node import hosting_agent, site_env
from tests.support.nginx import NO_SITE_BODY, NginxUnavailable, PrivateNginx
from tests.support.pebble import Pebble
from yakpanel.embedded import free_port

from .conftest import Channel, eventually
from .test_agent_metrics import Store
from .test_agent_metrics import store as store  # the fixture: aggregator on ClickHouse

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.nginx]

SETTLED = ("active", "failed")
FINISHED = ("succeeded", "failed", "compensated")
UPSTREAM_MARKER = "upstream-e2e-marker-7f3a"


class _Upstream(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"{UPSTREAM_MARKER} path={self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateNginx]:
    server = PrivateNginx(tmp_path_factory.mktemp("e2e-nginx"))
    try:
        server.start()
    except NginxUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """A small HTTP application on loopback that a proxy site forwards to."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
async def node(
    channel: Channel, nginx: PrivateNginx, tmp_path: Path
) -> AsyncIterator[tuple[str, AgentRuntime]]:
    async with hosting_agent(
        channel, channel.tenant, "web-node", tmp_path / "agent", site_env(nginx.settings())
    ) as running:
        yield running


async def get(channel: Channel, path: str) -> dict[str, Any]:
    r = await channel.tenant.owner.get(f"/v1/tenants/{channel.tenant.id}{path}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def settled_site(channel: Channel, site_id: str, timeout_s: float = 60) -> dict[str, Any]:
    """The site once its last change has been carried out (or has failed) on the node."""
    site: dict[str, Any] = await eventually(
        lambda: get(channel, f"/sites/{site_id}"), lambda s: s["status"] in SETTLED, timeout_s
    )
    return site


async def finished_workflow(channel: Channel, workflow_id: str) -> dict[str, Any]:
    workflow: dict[str, Any] = await eventually(
        lambda: get(channel, f"/workflows/{workflow_id}"), lambda w: w["state"] in FINISHED, 30
    )
    return workflow


async def page(nginx: PrivateNginx, host: str) -> tuple[int, str]:
    async with httpx.AsyncClient(timeout=5) as client:
        r = await client.get(f"http://127.0.0.1:{nginx.http_port}/", headers={"Host": host})
    return r.status_code, r.text


async def serves(nginx: PrivateNginx, host: str, status: int, text: str) -> str:
    """Wait until nginx answers `host` with `status` and a body containing `text`
    (a reload returns before the new workers take over)."""
    answer = await eventually(
        lambda: page(nginx, host), lambda a: a[0] == status and text in a[1], timeout_s=15
    )
    body: str = answer[1]
    return body


async def test_a_site_is_served_updated_kept_on_a_failed_change_and_removed(
    channel: Channel, node: tuple[str, AgentRuntime], nginx: PrivateNginx, upstream: str
) -> None:
    server_id, runtime = node
    owner, base = channel.tenant.owner, f"/v1/tenants/{channel.tenant.id}"
    r = await owner.post(
        f"{base}/sites",
        json={
            "server_id": server_id,
            "kind": "static",
            "domains": ["shop.example.test", "www.shop.example.test"],
        },
    )
    assert r.status_code == 202, r.text
    created = r.json()
    site_id = created["id"]
    assert created["status"] == "provisioning"

    # Static: the node's nginx serves the default page for both names, nothing else.
    site = await settled_site(channel, site_id)
    assert site["status"] == "active", site
    assert site["last_error"] is None
    assert site["document_root"] == str(nginx.settings().document_root(site_id))
    workflow = await finished_workflow(channel, created["workflow_id"])
    assert workflow["state"] == "succeeded", workflow
    assert [s["state"] for s in workflow["steps"]] == ["succeeded"]
    body = await serves(nginx, "shop.example.test", 200, "served by YakPanel")
    assert "<h1>shop.example.test</h1>" in body
    await serves(nginx, "www.shop.example.test", 200, "<h1>shop.example.test</h1>")
    assert await page(nginx, "other.example.test") == (404, NO_SITE_BODY + "\n")

    # Proxy: the same names now answer with the upstream application.
    r = await owner.patch(f"{base}/sites/{site_id}", json={"kind": "proxy", "upstream": upstream})
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "provisioning"
    proxy_workflow = r.json()["workflow_id"]
    assert proxy_workflow != created["workflow_id"]
    site = await settled_site(channel, site_id)
    assert site["status"] == "active", site
    assert (site["kind"], site["upstream"]) == ("proxy", upstream)
    assert (await finished_workflow(channel, proxy_workflow))["state"] == "succeeded"
    await serves(nginx, "shop.example.test", 200, UPSTREAM_MARKER)
    await serves(nginx, "www.shop.example.test", 200, UPSTREAM_MARKER)

    # A change the API accepts but the node's nginx refuses: an upstream whose name does
    # not resolve (".invalid" never does) fails `nginx -t`. The site turns failed with
    # nginx's reason, and the previous proxy configuration keeps serving.
    conf = nginx.settings().conf_path(site_id)
    before = conf.read_bytes()
    broken = "http://backend.yakpanel-e2e.invalid:8080"
    r = await owner.patch(f"{base}/sites/{site_id}", json={"upstream": broken})
    assert r.status_code == 202, r.text
    failed_workflow = r.json()["workflow_id"]
    site = await settled_site(channel, site_id)
    assert site["status"] == "failed", site
    assert "nginx rejected the new configuration" in site["last_error"], site
    assert "backend.yakpanel-e2e.invalid" in site["last_error"], site
    workflow = await finished_workflow(channel, failed_workflow)
    assert workflow["state"] in ("failed", "compensated"), workflow
    assert workflow["steps"][0]["error_code"] == "nginx_test_failed", workflow
    assert workflow["steps"][0]["attempts"] == 1, "a config nginx refuses is not retried"
    assert conf.read_bytes() == before, "the refused config must not stay on the node"
    assert await page(nginx, "shop.example.test") == (200, f"{UPSTREAM_MARKER} path=/\n")

    # Delete: the row goes once the node removed the site, and the names stop answering.
    r = await owner.delete(f"{base}/sites/{site_id}")
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "deleting"

    async def status() -> int:
        return (await owner.get(f"{base}/sites/{site_id}")).status_code

    await eventually(status, lambda code: code == 404, 60)
    await serves(nginx, "shop.example.test", 404, NO_SITE_BODY)
    await serves(nginx, "www.shop.example.test", 404, NO_SITE_BODY)
    assert not conf.exists()
    assert runtime.counters.commands_run >= 4


@pytest.fixture(scope="module")
def pebble(nginx: PrivateNginx, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    """Pebble validates HTTP-01 on the node's nginx port (its DNS answers 127.0.0.1)."""
    ca = Pebble(tmp_path_factory.mktemp("e2e-pebble"), http_port=nginx.http_port)
    try:
        ca.start()
    except Exception as exc:
        ca.stop()
        pytest.fail(f"Pebble did not start: {exc}", pytrace=False)
    yield ca
    ca.stop()


@pytest.mark.pebble
async def test_a_certificate_from_the_acme_ca_serves_https_and_force_https_redirects(
    channel: Channel, node: tuple[str, AgentRuntime], nginx: PrivateNginx, pebble: Pebble
) -> None:
    server_id, _ = node
    channel.stack.settings.acme_directory_url = pebble.directory_url
    channel.stack.settings.acme_ca_bundle = pebble.ca_file
    owner, base = channel.tenant.owner, f"/v1/tenants/{channel.tenant.id}"
    domain = "secure.example.test"
    r = await owner.post(
        f"{base}/sites", json={"server_id": server_id, "kind": "static", "domains": [domain]}
    )
    assert r.status_code == 202, r.text
    site_id = r.json()["id"]
    assert (await settled_site(channel, site_id))["status"] == "active"

    r = await owner.post(f"{base}/sites/{site_id}/certificate", json={})
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "requested"
    certificate = await eventually(
        lambda: get(channel, f"/sites/{site_id}/certificate"),
        lambda c: c["state"] in ("valid", "failed"),
        120,
    )
    assert certificate["state"] == "valid", certificate
    assert certificate["not_after"] and certificate["days_left"] > 0
    assert certificate["domains"] == [domain]
    site = await get(channel, f"/sites/{site_id}")
    assert site["tls"] is True
    assert site["certificate"]["state"] == "valid"

    # HTTPS on the node's nginx, with a chain that verifies against Pebble's root.
    roots = pebble.root_pem()
    answer = await eventually(
        lambda: asyncio.to_thread(request, nginx.https_port, domain, "/", roots),
        lambda a: a.status == 200,
        15,
    )
    assert f"<h1>{domain}</h1>".encode() in answer.body
    assert f"{answer.peer_serial:x}" in certificate["serial"].replace(":", "").lower()
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.to_thread(request, nginx.https_port, domain, "/", certifi_roots())
    plain = await asyncio.to_thread(request, nginx.http_port, domain, "/")
    assert plain.status == 200, "without force_https HTTP still serves the site"

    # force_https: plain HTTP now redirects to the HTTPS address of the same name.
    r = await owner.patch(f"{base}/sites/{site_id}", json={"force_https": True})
    assert r.status_code == 202, r.text
    site = await settled_site(channel, site_id)
    assert site["status"] == "active", site
    redirect = await eventually(
        lambda: asyncio.to_thread(request, nginx.http_port, domain, "/page?x=1"),
        lambda a: a.status in (301, 308),
        15,
    )
    assert redirect.headers["location"] == f"https://{domain}:{nginx.https_port}/page?x=1"
    answer = await asyncio.to_thread(request, nginx.https_port, domain, "/", roots)
    assert answer.status == 200


async def test_site_health_probes_reach_the_metrics_api(
    channel: Channel, nginx: PrivateNginx, store: Store, tmp_path: Path
) -> None:
    """The site engine keeps the agent's probes.json in sync; the agent probes the site on
    its nginx and the result is queryable as `yakpanel_site_up` through the Prometheus API."""
    state = tmp_path / "agent"
    env = site_env(nginx.settings(probes_file=state / "probes.json"))
    telemetry = {"export_interval_s": 0.5}
    async with hosting_agent(channel, channel.tenant, "probed", state, env, telemetry) as node:
        server_id, _ = node
        owner, base = channel.tenant.owner, f"/v1/tenants/{channel.tenant.id}"
        r = await owner.post(
            f"{base}/sites",
            json={"server_id": server_id, "kind": "static", "domains": ["probed.example.test"]},
        )
        assert r.status_code == 202, r.text
        site_id = r.json()["id"]
        assert (await settled_site(channel, site_id))["status"] == "active"
        client = channel.api.token_client(await channel.api.token(channel.tenant, ["metrics:read"]))

        async def site_up() -> dict[str, float]:
            r = await client.get(
                "/prometheus/api/v1/query",
                params={"query": f'yakpanel_site_up{{site="{site_id}"}}'},
            )
            assert r.status_code == 200, r.text
            result = r.json()["data"]["result"]
            return {s["metric"]["server_id"]: float(s["value"][1]) for s in result}

        assert await eventually(site_up, lambda v: v == {server_id: 1.0}, 45) == {server_id: 1.0}

        # A proxy to an upstream that is not listening answers 502: the site is down.
        r = await owner.patch(
            f"{base}/sites/{site_id}",
            json={"kind": "proxy", "upstream": f"http://127.0.0.1:{free_port()}"},
        )
        assert r.status_code == 202, r.text
        assert (await settled_site(channel, site_id))["status"] == "active"
        await eventually(site_up, lambda v: v == {server_id: 0.0}, 45)


def certifi_roots() -> bytes:
    """The public web PKI: Pebble's certificates must not verify against it."""
    import certifi

    return Path(certifi.where()).read_bytes()
