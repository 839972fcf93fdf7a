"""The aggregator service: `yak.metrics.v1` → polars rollups → ClickHouse, live partials to
`yak.rollups.v1`.

Steps, each in its own module: fetch (aiokafka, consumer group `<prefix>aggregator`) →
decode and batch per partition (`batching`) → aggregate (`rollup`, pure) → write
(`writer`, in one ClickHouse thread) → publish the 10 s partials → commit the batch's
offsets. Offsets are committed only after the inserts returned; a replay after a crash
rewrites the same offset ranges with the same deduplication tokens, so nothing doubles.

Undecodable records go to `yak.metrics.dlq.v1` (the original key, value and headers, plus
`source_topic`, `source_partition`, `source_offset`, `error`) and are committed past with
their batch.

Back-pressure: decoded rows waiting to be written (open and sealed batches) are bounded by
`max_pending_rows`; at the bound every open batch is sealed and fetching pauses until the
writer has drained half of them.

The 10 s partials go to `yak.rollups.v1` for live views; `live` describes the records.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

import polars as pl
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from clickhouse_connect.driver.exceptions import ClickHouseError

from ingest.aggregator.batching import BatchAssembler, PartitionKey, SealedBatch
from ingest.aggregator.config import AggregatorConfig, AggregatorStats
from ingest.aggregator.decode import UndecodableMessage
from ingest.aggregator.live import encode_partials, origin_of
from ingest.aggregator.rollup import FINEST, AggregateBatch, LatePolicy, aggregate
from ingest.aggregator.writer import BatchSource, ClickHouseWriter, WriteReport
from yakpanel.clock import Clock, SystemClock
from yakpanel.services import Service, Stack
from yakpanel.settings import Settings
from yakpanel.topics import METRICS, METRICS_DLQ, ROLLUPS, ensure_topics

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

_DLQ_HEADERS = ("source_topic", "source_partition", "source_offset", "error")
HEARTBEAT_EVERY_S = 5.0


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, aggregator: Aggregator) -> None:
        self.aggregator = aggregator

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.aggregator._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.aggregator.stats.partitions = len(assigned)
        log.info("aggregator assigned %s", sorted((tp.topic, tp.partition) for tp in assigned))


class Aggregator:
    name = "aggregator"

    def __init__(
        self,
        bootstrap: str,
        topic_prefix: str,
        client_factory: Callable[[], Any],
        database: str,
        config: AggregatorConfig | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.prefix = topic_prefix
        self.client_factory = client_factory
        self.database = database
        self.config = config or AggregatorConfig()
        self.clock = clock or SystemClock()
        self.topic = METRICS.full_name(topic_prefix)
        self.dlq_topic = METRICS_DLQ.full_name(topic_prefix)
        self.rollups_topic = ROLLUPS.full_name(topic_prefix)
        self.group_id = f"{topic_prefix}aggregator"
        self.stats = AggregatorStats()
        self._assembler = BatchAssembler(
            self.config.max_records, self.config.max_wait_s, self.clock
        )
        # Sealed batches to write, each with the assignment epoch it was read in.
        self._queue: deque[tuple[int, SealedBatch]] = deque()
        self._queued_rows = 0
        # Bumped when partitions are revoked: records and batches read before belong to
        # an assignment that is gone, and are read again from the committed offsets.
        self._epoch = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._stop = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._client: Any = None
        self._writer: ClickHouseWriter | None = None
        self._task: asyncio.Task[None] | None = None
        # The partition of each live-rollup key (series ids repeat batch after batch).
        self._partitioner = DefaultPartitioner()
        self._partition_of: dict[bytes, int] = {}
        self._partition_count = 0

    # --- Service ---------------------------------------------------------------------

    async def start(self) -> None:
        # clickhouse-connect and chDB are synchronous: every ClickHouse call runs, in
        # order, on this one thread.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="aggregator-clickhouse")
        self._client = await self._ch(self.client_factory)
        self._writer = ClickHouseWriter(self._client, self.database)
        self._stop.clear()
        self._task = asyncio.create_task(self._run(), name="aggregator")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self.config.drain_timeout_s + 5)
            except TimeoutError:
                log.warning("aggregator did not drain in time; its batches will be replayed")
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        if self._executor is not None:
            if self._client is not None:
                with contextlib.suppress(ClickHouseError, OSError):
                    await self._ch(self._client.close)
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
            self._client = None

    def endpoints(self) -> dict[str, str]:
        return {}

    @property
    def pending_rows(self) -> int:
        return self._assembler.open_rows + self._queued_rows

    # --- consumer session ------------------------------------------------------------

    async def _ch(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def _run(self) -> None:
        backoff = self.config.retry_backoff_s
        while not self._stop.is_set():
            consumer: AIOKafkaConsumer | None = None
            producer: AIOKafkaProducer | None = None
            try:
                await ensure_topics(self.bootstrap, self.prefix, (METRICS, METRICS_DLQ, ROLLUPS))
                producer = AIOKafkaProducer(
                    bootstrap_servers=self.bootstrap,
                    acks="all",
                    linger_ms=5,
                    # Live partials go out in batches of this size (`_send_keyed`).
                    max_batch_size=256 * 1024,
                )
                await producer.start()
                consumer = AIOKafkaConsumer(
                    bootstrap_servers=self.bootstrap,
                    group_id=self.group_id,
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",
                    session_timeout_ms=self.config.session_timeout_ms,
                    heartbeat_interval_ms=self.config.heartbeat_interval_ms,
                    # The embedded broker answers a waiting fetch only when this runs out.
                    fetch_max_wait_ms=20,
                )
                await consumer.start()
                consumer.subscribe([self.topic], listener=_Rebalance(self))
                await self._consume(consumer, producer)
                backoff = self.config.retry_backoff_s
            except (KafkaError, ClickHouseError, OSError, TimeoutError) as exc:
                self.stats.consumer_restarts += 1
                log.warning("aggregator consumer restarting: %s", exc)
            except Exception:
                # A bug must not end the service silently; uncommitted input is replayed.
                self.stats.consumer_restarts += 1
                log.exception("aggregator session failed; restarting")
            finally:
                # Whatever was not committed is read again by the next session.
                self._reset_session()
                for client in (consumer, producer):
                    if client is not None:
                        with contextlib.suppress(KafkaError, OSError, TimeoutError):
                            await client.stop()
            if not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    jitter = 1 + random.random() / 2  # noqa: S311
                    await asyncio.wait_for(self._stop.wait(), backoff * jitter)
                backoff = min(backoff * 2, self.config.max_backoff_s)

    def _reset_session(self) -> None:
        self._epoch += 1
        self._assembler.drop_all()
        self._queue.clear()
        self._queued_rows = 0
        self._idle.set()
        self._closing = False

    def _beat(self) -> None:
        path = self.config.heartbeat_file
        if path is not None:
            with contextlib.suppress(OSError):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()

    async def _consume(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> None:
        writer = asyncio.create_task(self._write_loop(consumer, producer), name="aggregator-writer")
        poll_ms = int(min(self.config.max_wait_s, 0.2) * 1000)
        beat_at = 0.0
        try:
            while not self._stop.is_set():
                if time.monotonic() >= beat_at:
                    self._beat()
                    beat_at = time.monotonic() + HEARTBEAT_EVERY_S
                if writer.done():
                    writer.result()
                    raise RuntimeError("the aggregator writer stopped")
                fetched = await consumer.getmany(
                    timeout_ms=poll_ms, max_records=self.config.fetch_max_records
                )
                epoch = self._epoch
                for tp, messages in fetched.items():
                    for msg in messages:
                        if self._epoch != epoch or not await self._accept(tp, msg, producer, epoch):
                            break
                self._enqueue(self._assembler.due())
                self._apply_backpressure(consumer)
            # Stopping: write what was read, then leave.
            self._enqueue(self._assembler.seal_all())
            self._closing = True
            self._wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(writer), self.config.drain_timeout_s)
        finally:
            if not writer.done():
                writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def _accept(
        self, tp: TopicPartition, msg: Any, producer: AIOKafkaProducer, epoch: int
    ) -> bool:
        """Batch one record; False if the partitions were revoked meanwhile (drop the rest)."""
        assert self._writer is not None
        key: PartitionKey = (tp.topic, tp.partition)
        if self._assembler.needs_recorded(key):
            ranges = await self._ch(
                self._writer.recorded_batches, tp.topic, tp.partition, msg.offset
            )
            if self._epoch != epoch:
                return False
            if ranges:
                log.info("%s[%s]: %d written ranges from %s on", *key, len(ranges), msg.offset)
            self._assembler.set_recorded(key, ranges)
        accepted = self._assembler.add(
            key, msg.offset, msg.timestamp, msg.value or b"", list(msg.headers or ())
        )
        self.stats.records += 1
        if accepted.error is not None:
            # Dead-lettered before its batch can be committed past it.
            await self._dead_letter(producer, msg, accepted.error)
            if self._epoch != epoch:
                return False
        self._enqueue(accepted.sealed)
        return True

    async def _dead_letter(
        self, producer: AIOKafkaProducer, msg: Any, error: UndecodableMessage
    ) -> None:
        headers = [(k, v) for k, v in (msg.headers or ()) if k not in _DLQ_HEADERS]
        headers += [
            ("source_topic", msg.topic.encode()),
            ("source_partition", str(msg.partition).encode()),
            ("source_offset", str(msg.offset).encode()),
            ("error", str(error)[:1000].encode()),
        ]
        await producer.send_and_wait(self.dlq_topic, value=msg.value, key=msg.key, headers=headers)
        self.stats.dlq += 1
        log.warning("dead-lettered %s[%s]@%s: %s", msg.topic, msg.partition, msg.offset, error)

    def _enqueue(self, sealed: list[SealedBatch]) -> None:
        for batch in sealed:
            self._queue.append((self._epoch, batch))
            self._queued_rows += batch.rows
        if sealed:
            self._idle.clear()
            self._wake.set()

    def _apply_backpressure(self, consumer: AIOKafkaConsumer) -> None:
        limit = self.config.max_pending_rows
        paused = consumer.paused()
        if self.pending_rows >= limit:
            self._enqueue(self._assembler.seal_all())
            # A partition still growing its replayed range to the boundary keeps fetching:
            # that range is bounded by the batch it replays.
            held = {TopicPartition(*k) for k in self._assembler.holding()}
            to_pause = consumer.assignment() - held - paused
            if to_pause:
                consumer.pause(*to_pause)
                self.stats.pauses += 1
                log.info("aggregator paused fetching: %s rows pending", self.pending_rows)
        elif paused and self.pending_rows <= limit // 2:
            consumer.resume(*paused)

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        # Write and commit what was sealed while the partitions are still ours; whatever
        # is left after the timeout (ClickHouse down) is dropped and read again later.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.config.drain_timeout_s)
        self._epoch += 1
        self._assembler.drop((tp.topic, tp.partition) for tp in revoked)
        self.stats.partitions = 0

    # --- writing ---------------------------------------------------------------------

    async def _write_loop(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            epoch, batch = self._queue[0]
            if epoch == self._epoch:
                await self._write(batch, epoch, consumer, producer)
            self._queue.popleft()
            self._queued_rows -= batch.rows

    def _aggregate_and_write(self, batch: SealedBatch) -> tuple[AggregateBatch, WriteReport]:
        assert self._writer is not None
        builder = batch.builder
        # Samples without their series columns; the series once each, on the side.
        aggregated = aggregate(builder.samples(), self.config.late, series=builder.series_frame())
        return aggregated, self._writer.write(aggregated, batch.source)

    async def _write(
        self,
        batch: SealedBatch,
        epoch: int,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
    ) -> None:
        backoff = self.config.retry_backoff_s
        while True:
            if epoch != self._epoch:
                return  # revoked while ClickHouse was failing: the next owner re-reads it
            try:
                aggregated, report = await self._ch(self._aggregate_and_write, batch)
                break
            except (ClickHouseError, OSError) as exc:
                # Same batch, same tokens: retrying cannot double anything.
                self.stats.write_retries += 1
                log.warning("writing %s failed, retrying: %s", batch.source.token("batch"), exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.config.max_backoff_s)
        s = self.stats
        s.batches += 1
        s.samples += report.raw_rows
        s.series += report.series_rows
        s.late_dropped += aggregated.late_dropped
        s.future_dropped += aggregated.future_dropped
        s.skipped_points += batch.builder.skipped_points
        s.insert_seconds += report.seconds
        if self.config.publish_rollups:
            await self._publish(producer, aggregated.rollups.get(FINEST.name), batch.source)
        source = batch.source
        try:
            await consumer.commit(
                {TopicPartition(source.topic, source.partition): source.last_offset + 1}
            )
        except KafkaError as exc:
            # Written but not committed: the next owner replays the range, deduplicated.
            s.commit_failures += 1
            log.warning("commit of %s failed: %s", source.token("batch"), exc)
        else:
            s.committed[(source.topic, source.partition)] = source.last_offset + 1

    async def _publish(
        self, producer: AIOKafkaProducer, rows: pl.DataFrame | None, source: BatchSource
    ) -> None:
        if rows is None or rows.is_empty():
            return
        try:
            futures = await self._send_keyed(
                producer, self.rollups_topic, encode_partials(rows, FINEST.name, source)
            )
            await asyncio.gather(*futures)
        except KafkaError as exc:
            # The rows are in ClickHouse; live views catch up from the next partials.
            self.stats.publish_failures += 1
            log.warning("publishing live rollups of %s failed: %s", origin_of(source), exc)
        else:
            self.stats.rollups_published += rows.height

    async def _send_keyed(
        self, producer: AIOKafkaProducer, topic: str, records: list[tuple[bytes, bytes]]
    ) -> list[asyncio.Future[Any]]:
        """Sends keyed records as `producer.send` would (the default partitioner on the
        key), appended to one batch per partition instead of one call per record."""
        partitions = sorted(await producer.partitions_for(topic))
        if len(partitions) != self._partition_count:
            self._partition_of.clear()
            self._partition_count = len(partitions)
        if len(self._partition_of) > 1_000_000:
            self._partition_of.clear()
        partition_of = self._partition_of
        batches: dict[int, Any] = {}
        futures: list[asyncio.Future[Any]] = []
        for key, value in records:
            partition = partition_of.get(key)
            if partition is None:
                partition = partition_of[key] = self._partitioner(key, partitions, partitions)
            batch = batches.get(partition)
            if batch is None:
                batch = batches[partition] = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = batches[partition] = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        for partition, batch in batches.items():
            futures.append(await producer.send_batch(batch, topic, partition=partition))
        return futures


def config_from_settings(settings: Settings) -> AggregatorConfig:
    return AggregatorConfig(
        heartbeat_file=settings.aggregator_heartbeat_file,
        max_records=settings.aggregator_max_records,
        max_wait_s=settings.aggregator_max_wait_s,
        max_pending_rows=settings.aggregator_max_pending_rows,
        late=LatePolicy(
            late_window_ms=settings.aggregator_late_window_s * 1000,
            future_window_ms=settings.aggregator_future_window_s * 1000,
        ),
    )


def build_aggregator_service(stack: Stack) -> Service:
    return Aggregator(
        stack.kafka_bootstrap,
        stack.topic_prefix,
        stack.clickhouse.client,
        stack.clickhouse.database,
        config=config_from_settings(stack.settings),
        clock=stack.clock,
    )
