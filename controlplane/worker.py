"""The control-plane worker: the outbox relay, periodic housekeeping and the workflow
driver.

Housekeeping is idempotent, so running several workers is safe; the relay elects one
active instance through an advisory lock; workflow drivers share the work through
row locks (`FOR UPDATE SKIP LOCKED`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

from controlplane.consumers import TopicConsumer
from controlplane.crypto import SecretBox, load_master_key
from controlplane.db import Database
from controlplane.hosting import install_hooks as install_hosting_hooks
from controlplane.hosting.renewal import CertificateRenewal  # installs hosting hooks
from controlplane.keys import load_platform_keys
from controlplane.registry.commands import apply_result, expire_overdue
from controlplane.registry.presence import apply_presence
from controlplane.relay import OutboxRelay
from controlplane.tenancy.service import delete_due_tenants
from controlplane.workflows import WorkflowDriver, use_secret_box
from proto import agent_pb2
from yakpanel.services import Service, Stack
from yakpanel.topics import COMMAND_RESULTS, PRESENCE

log = logging.getLogger(__name__)


class ControlPlaneWorker:
    name = "worker"

    def __init__(
        self,
        stack: Stack,
        housekeeping_interval_s: float = 5.0,
        workflow_poll_interval_s: float = 0.25,
    ) -> None:
        self.stack = stack
        self.relay = OutboxRelay(stack.postgres_dsn, stack.kafka_bootstrap, stack.topic_prefix)
        self.db = Database(stack.postgres_dsn, stack.clock, min_size=1, max_size=4)
        self.housekeeping_interval_s = housekeeping_interval_s
        self.workflow_poll_interval_s = workflow_poll_interval_s
        # Built at start: it signs commands with the platform key loaded from PostgreSQL.
        self.workflows: WorkflowDriver | None = None
        self.presence = TopicConsumer(
            stack.kafka_bootstrap,
            PRESENCE,
            stack.topic_prefix,
            f"{stack.topic_prefix}controlplane-presence",
            self._on_presence,
        )
        self.results = TopicConsumer(
            stack.kafka_bootstrap,
            COMMAND_RESULTS,
            stack.topic_prefix,
            f"{stack.topic_prefix}controlplane-command-results",
            self._on_result,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    async def start(self) -> None:
        box = SecretBox(load_master_key(self.stack.settings))
        keys = await asyncio.to_thread(load_platform_keys, self.stack.postgres_dsn, box)
        use_secret_box(box)
        # Workflows end here: the resources they work on follow their outcome.
        install_hosting_hooks()
        self.workflows = WorkflowDriver(
            self.db, keys.signing_key, box, poll_interval_s=self.workflow_poll_interval_s
        )
        await self.db.open()
        self._tasks = [
            asyncio.create_task(self.relay.run(), name="outbox-relay"),
            asyncio.create_task(self._housekeeping(), name="housekeeping"),
            asyncio.create_task(self.presence.run(), name="presence-consumer"),
            asyncio.create_task(self.results.run(), name="results-consumer"),
            asyncio.create_task(self.workflows.run(), name="workflow-driver"),
            asyncio.create_task(
                CertificateRenewal(self.db, box, self.stack.settings).run(self._stop),
                name="certificate-renewal",
            ),
        ]

    async def _on_presence(self, value: bytes) -> None:
        await apply_presence(self.db, agent_pb2.PresenceEvent.FromString(value))

    async def _on_result(self, value: bytes) -> None:
        await apply_result(self.db, agent_pb2.CommandResult.FromString(value))

    async def _housekeeping(self) -> None:
        while not self._stop.is_set():
            try:
                await self.sweep()
            except Exception:
                log.exception("housekeeping failed; retrying next round")
            else:
                self._beat()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.housekeeping_interval_s)

    def _beat(self) -> None:
        # For container health checks: fresh while housekeeping runs and every other loop
        # (relay, consumers, workflow driver, certificate renewal) lives; a dead one would
        # leave events unpublished or hosting changes stuck with the container "healthy".
        path = self.stack.settings.worker_heartbeat_file
        loops_alive = bool(self._tasks) and not any(t.done() for t in self._tasks)
        if path is not None and loops_alive:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()

    async def sweep(self) -> None:
        for tenant_id in await delete_due_tenants(self.db):
            log.info("tenant deleted after its grace period", extra={"tenant_id": str(tenant_id)})
        now = self.stack.clock.now()
        await expire_overdue(self.db, now)
        async with self.db.connection() as conn:
            await conn.execute(
                "SELECT prune_api_request_counts(%s)", (now - timedelta(minutes=10),)
            )
            await conn.execute(
                "DELETE FROM login_sessions WHERE expires_at < %s", (now - timedelta(days=1),)
            )

    async def stop(self) -> None:
        self._stop.set()
        self.relay.stop()
        self.presence.stop()
        self.results.stop()
        if self.workflows is not None:
            self.workflows.stop()
        # Loops notice the stop within a poll; one stuck joining a consumer group or
        # waiting on the broker is cancelled (its offsets were not committed: nothing lost).
        _, pending = await asyncio.wait(self._tasks, timeout=1.0)
        for task in pending:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.db.close()

    def endpoints(self) -> dict[str, str]:
        return {}


def build_worker_service(stack: Stack) -> Service:
    return ControlPlaneWorker(stack)
