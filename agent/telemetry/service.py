"""The agent's telemetry as one unit: meter provider, host metrics, site probes, disk queue
and sender, started and stopped by the agent runtime."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import ssl
import time
from collections.abc import Iterable
from pathlib import Path

import grpc
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from agent.telemetry.config import TelemetryConfig
from agent.telemetry.exporter import QueueMetricExporter
from agent.telemetry.host import HostMetrics
from agent.telemetry.probes import ProbeTargetsFile, SiteProber
from agent.telemetry.queue import DROP_REASONS, TelemetryQueue
from agent.telemetry.sender import DEFAULT_MAX_BACKOFF_S, MetricsSender
from yakpanel import __version__
from yakpanel.clock import Clock

log = logging.getLogger(__name__)

QUEUE_FILE = "telemetry.sqlite3"
SERVICE_NAME = "yakpanel-agent"
METER_NAME = "yakpanel.agent"
# Stopping waits this long for the final collection to reach the disk queue.
SHUTDOWN_TIMEOUT_S = 5.0


class AgentTelemetry:
    """Collects every `config.export_interval_s` into the queue in `state_dir` and sends
    the queue to `gateway` with the node's mTLS identity."""

    def __init__(
        self,
        config: TelemetryConfig,
        *,
        state_dir: Path,
        server_id: str,
        hostname: str,
        gateway: str,
        ca_pem: bytes,
        key_pem: bytes,
        cert_pem: bytes,
        max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
        probe_tls: ssl.SSLContext | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.state_dir = state_dir
        self.resource = Resource.create(
            {
                "host.name": hostname,
                "service.name": SERVICE_NAME,
                "service.instance.id": server_id,
                "service.version": __version__,
            }
        )
        self.gateway = gateway
        self._credentials = grpc.ssl_channel_credentials(
            root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
        )
        self._max_backoff_s = max_backoff_s
        self._probe_tls = probe_tls
        self._clock = clock
        self.queue: TelemetryQueue | None = None
        self.sender: MetricsSender | None = None
        self.prober: SiteProber | None = None
        self.exporter: QueueMetricExporter | None = None
        self._provider: MeterProvider | None = None
        self._sender_task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None

    @property
    def queue_path(self) -> Path:
        return self.state_dir / QUEUE_FILE

    @property
    def probes_path(self) -> Path:
        return self.state_dir / self.config.probes_file

    async def start(self) -> None:
        config = self.config
        queue = await asyncio.to_thread(self._open_queue)
        self.queue = queue
        self.sender = MetricsSender(
            queue, self.gateway, self._credentials, max_backoff_s=self._max_backoff_s
        )
        self.exporter = QueueMetricExporter(queue, on_append=self.sender.notify)
        self.prober = SiteProber(
            ProbeTargetsFile(self.probes_path), verify=self._probe_tls, clock=self._clock
        )
        interval_ms = config.export_interval_s * 1000
        reader = PeriodicExportingMetricReader(
            self.exporter,
            export_interval_millis=interval_ms,
            # A slow collection (a busy node) must not pile up behind the next one.
            export_timeout_millis=max(interval_ms, 1000),
        )
        meter_provider = MeterProvider(
            metric_readers=[reader], resource=self.resource, shutdown_on_exit=False
        )
        self._provider = meter_provider
        meter = meter_provider.get_meter(METER_NAME, __version__)
        HostMetrics(meter)
        self.prober.register(meter)
        self._register_queue(meter, queue)
        self._sender_task = asyncio.create_task(self.sender.run(), name="telemetry sender")
        self._probe_task = asyncio.create_task(
            self.prober.run(config.export_interval_s), name="telemetry site probes"
        )
        for task in (self._sender_task, self._probe_task):
            task.add_done_callback(_report_crash)
        log.info(
            "telemetry: collecting every %.1f s into %s (%d queued), sending to %s",
            config.export_interval_s,
            self.queue_path,
            queue.depth,
            self.gateway,
        )

    async def stop(self) -> None:
        """Final collection into the queue (bounded wait), then stop sending; what was
        not sent stays on disk for the next start."""
        await _cancel(self._probe_task)
        self._probe_task = None
        if self._provider is not None:
            provider, self._provider = self._provider, None
            try:
                async with asyncio.timeout(SHUTDOWN_TIMEOUT_S + 1):
                    await asyncio.to_thread(
                        provider.shutdown, timeout_millis=SHUTDOWN_TIMEOUT_S * 1000
                    )
            except TimeoutError:
                log.warning("telemetry: the final collection did not finish in time")
            except Exception:
                log.exception("telemetry: the meter provider did not shut down cleanly")
        await _cancel(self._sender_task)
        self._sender_task = None
        if self.queue is not None:
            queue, self.queue = self.queue, None
            await asyncio.to_thread(queue.close)

    def _open_queue(self) -> TelemetryQueue:
        config = self.config

        def open_queue() -> TelemetryQueue:
            return TelemetryQueue(
                self.queue_path,
                max_bytes=config.queue_max_bytes,
                max_entries=config.queue_max_entries,
            )

        try:
            return open_queue()
        except sqlite3.DatabaseError as exc:
            # A damaged backlog must not cost the node its metrics from now on.
            aside = self.queue_path.with_name(f"{QUEUE_FILE}.damaged-{int(time.time())}")
            log.error("telemetry: %s is unusable (%s); moved to %s", self.queue_path, exc, aside)
            self.queue_path.rename(aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{self.queue_path}{suffix}").unlink(missing_ok=True)
            return open_queue()

    @staticmethod
    def _register_queue(meter: Meter, queue: TelemetryQueue) -> None:
        def dropped(_: CallbackOptions) -> Iterable[Observation]:
            counts = queue.dropped()
            return [Observation(counts[reason], {"reason": reason}) for reason in DROP_REASONS]

        def depth(_: CallbackOptions) -> Iterable[Observation]:
            return [Observation(queue.depth)]

        meter.create_observable_counter(
            "yakpanel.agent.telemetry.queue.dropped",
            [dropped],
            "{request}",
            "Queued metric requests dropped: queue_full (oldest, for room) or rejected "
            "(refused by the gateway)",
        )
        meter.create_observable_gauge(
            "yakpanel.agent.telemetry.queue.depth",
            [depth],
            "{request}",
            "Metric requests waiting on disk for the gateway",
        )


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("telemetry: %s stopped", task.get_name(), exc_info=task.exception())


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
