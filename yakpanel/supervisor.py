"""`yakpanel up`: the embedded stack and every service in one supervisor process.

chDB opens a data path from one process only, so in embedded mode every service that
touches ClickHouse runs here. The supervisor starts PostgreSQL and the broker, applies
migrations, creates the Kafka topics, runs the first-start hooks, starts the services,
and on SIGINT/SIGTERM stops them all in reverse order, leaving no process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

from yakpanel.clickhouse import ClickHouseTarget, embedded_dsn
from yakpanel.embedded import EmbeddedBroker, EmbeddedPostgres
from yakpanel.migrations import migrate_all
from yakpanel.services import SERVICE_FACTORIES, Service, Stack, load_factory
from yakpanel.settings import Settings
from yakpanel.topics import ensure_topics

log = logging.getLogger(__name__)

# Run once the schema exists, before services start; each returns lines to show the user.
FIRST_START_HOOKS: tuple[str, ...] = ("controlplane.bootstrap:ensure_first_admin",)

FirstStartHook = Callable[[Stack], list[str]]

# `up` only: the demo tenant's server, and the local agent enrolled for it.
DEMO_ENROLLMENT = "controlplane.demo:ensure_demo_enrollment"
LOCAL_AGENT = "agent.local:build_local_agent"


def _resolve(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


class StateDirBusy(RuntimeError):
    pass


class StateDirLock:
    """One `up` per state dir: chDB and the embedded PostgreSQL are single-owner."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "run" / "up.lock"
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise StateDirBusy(
                f"state dir {self.path.parent.parent} is in use by pid {holder}; "
                "stop that `yakpanel up` first or pass another --state-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def run_hooks(stack: Stack, hooks: tuple[str, ...] = FIRST_START_HOOKS) -> list[str]:
    lines: list[str] = []
    for target in hooks:
        module_name, _, attr = target.partition(":")
        hook = cast(FirstStartHook, getattr(importlib.import_module(module_name), attr))
        lines.extend(hook(stack))
    return lines


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        services: list[str] | None = None,
        out: Callable[[str], None] = print,
        local_agent: bool = True,
    ) -> None:
        self.settings = settings
        self.service_names = list(SERVICE_FACTORIES) if services is None else services
        self.local_agent = local_agent
        self.out = out
        self.state_dir = settings.state_dir.expanduser().resolve()
        self.postgres: EmbeddedPostgres | None = None
        self.broker: EmbeddedBroker | None = None
        self.services: list[Service] = []
        self.stack: Stack | None = None
        self._lock = StateDirLock(self.state_dir)
        self._stop = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None

    async def start(self) -> Stack:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> Stack:
        s = self.settings
        if s.embedded_postgres:
            self.postgres = EmbeddedPostgres(self.state_dir / "postgres")
            pg_dsn = await asyncio.to_thread(self.postgres.start)
        else:
            pg_dsn = cast(str, s.postgres_dsn)
        if s.embedded_kafka:
            self.broker = EmbeddedBroker(
                s.embedded_kafka_port, log_path=self.state_dir / "run" / "broker.log"
            )
            bootstrap = await asyncio.to_thread(self.broker.start)
        else:
            bootstrap = cast(str, s.kafka_bootstrap)
        ch_dsn = s.clickhouse_dsn or embedded_dsn(self.state_dir)
        stack = Stack(s, pg_dsn, bootstrap, ClickHouseTarget(ch_dsn, s.clickhouse_database))
        self.stack = stack

        ch_client = await asyncio.to_thread(stack.clickhouse.client)
        try:
            report = await asyncio.to_thread(migrate_all, pg_dsn, ch_client, s.clickhouse_database)
        finally:
            ch_client.close()
        for m in report.postgres + report.clickhouse:
            self.out(f"migrated {m.label}")
        await ensure_topics(
            bootstrap, s.kafka_topic_prefix, replication_factor=s.kafka_replication_factor
        )
        for line in await asyncio.to_thread(run_hooks, stack):
            self.out(line)

        for name in self.service_names:
            service = load_factory(name)(stack)
            await service.start()
            self.services.append(service)
            for label, url in service.endpoints().items():
                self.out(f"{label}: {url}")
        if self.local_agent and "gateway" in self.service_names:
            enrollment = await asyncio.to_thread(_resolve(DEMO_ENROLLMENT), stack)
            lines, agent = await _resolve(LOCAL_AGENT)(stack, enrollment)
            for line in [*enrollment["lines"], *lines]:
                self.out(line)
            await agent.start()
            self.services.append(agent)
        if self.broker is not None:
            self._watch_task = asyncio.create_task(self._watch_broker())
        return stack

    async def _watch_broker(self) -> None:
        # The embedded broker keeps nothing across a restart; if it dies, bring it
        # back and recreate the topics. Producers retry; consumers rejoin.
        assert self.broker is not None
        while not self._stop.is_set():
            await asyncio.sleep(1.0)
            if self._stop.is_set() or self.broker.running():
                continue
            log.warning("embedded broker exited; restarting it")
            try:
                await asyncio.to_thread(self.broker.start)
                await ensure_topics(self.broker.bootstrap, self.settings.kafka_topic_prefix)
            except Exception:
                log.exception("could not restart the embedded broker; retrying")

    def request_stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        self._stop.set()
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        while self.services:
            service = self.services.pop()
            try:
                await service.stop()
            except Exception:
                log.exception("service %s did not stop cleanly", service.name)
        if self.broker is not None:
            await asyncio.to_thread(self.broker.stop)
            self.broker = None
        if self.postgres is not None:
            await asyncio.to_thread(self.postgres.stop)
            self.postgres = None
        self._lock.release()


async def run_until_signalled(supervisor: Supervisor) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, supervisor.request_stop)
    try:
        await supervisor.start()
        supervisor.out("YakPanel is up. Press Ctrl-C to stop.")
        await supervisor.wait()
    finally:
        supervisor.out("stopping…")
        await supervisor.stop()
        supervisor.out("stopped.")


def serve_one(settings: Settings, name: str, out: Callable[[str], None] = print) -> None:
    """`yakpanel serve NAME`: one service against external DSNs (the production shape)."""

    async def main() -> None:
        # A DSN the service does not need (SERVICE_NEEDS) may be unset: it stays empty.
        stack = Stack(
            settings,
            settings.postgres_dsn or "",
            settings.kafka_bootstrap or "",
            ClickHouseTarget(settings.clickhouse_dsn or "", settings.clickhouse_database),
        )
        service = load_factory(name)(stack)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await service.start()
        for label, url in service.endpoints().items():
            out(f"{label}: {url}")
        try:
            await stop.wait()
        finally:
            await service.stop()

    asyncio.run(main())
