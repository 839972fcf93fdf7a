"""The outbox relay: publishes committed outbox rows to their topics (domain events to
`yak.events.v1`, command envelopes, alert transitions).

One relay is active at a time (a PostgreSQL advisory lock held on its connection), so
events leave in outbox order and per-aggregate order holds. An event is marked
published only after the broker acknowledged it; when the broker is away the relay
backs off and retries, and nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from dataclasses import dataclass
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from psycopg.rows import dict_row

from yakpanel.topics import ALERTS, COMMANDS, EVENTS, ensure_topics

log = logging.getLogger(__name__)

RELAY_LOCK_KEY = 0x59414B52454C4159
RELAYED_TOPICS = (EVENTS, COMMANDS, ALERTS)


@dataclass
class RelayStats:
    published: int = 0
    failures: int = 0
    lost_acks: int = 0
    last_error: str | None = None


class OutboxRelay:
    def __init__(
        self,
        dsn: str,
        bootstrap: str,
        topic_prefix: str = "",
        batch_size: int = 500,
        poll_interval_s: float = 0.2,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self.bootstrap = bootstrap
        self.topic_prefix = topic_prefix
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self.max_backoff_s = max_backoff_s
        self.stats = RelayStats()
        self._producer: AIOKafkaProducer | None = None
        self._offsets: AIOKafkaConsumer | None = None
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, row_factory=dict_row
                ) as conn:
                    await self._lead(conn)
                    backoff = 0.2
            except (OSError, psycopg.Error) as exc:
                self._note_failure(exc)
            except (KafkaError, TimeoutError) as exc:
                self._note_failure(exc)
                await self._close_producer()
            if not self._stop.is_set():
                await self._sleep(backoff * (1 + random.random() / 2))  # noqa: S311
                backoff = min(backoff * 2, self.max_backoff_s)
        await self._close_producer()

    def _note_failure(self, exc: BaseException) -> None:
        self.stats.failures += 1
        self.stats.last_error = f"{type(exc).__name__}: {exc}"
        log.warning("outbox relay retrying: %s", self.stats.last_error)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _lead(self, conn: psycopg.AsyncConnection[dict[str, Any]]) -> None:
        while not self._stop.is_set():
            row = await (
                await conn.execute("SELECT pg_try_advisory_lock(%s) AS ok", (RELAY_LOCK_KEY,))
            ).fetchone()
            if row and row["ok"]:
                break
            await self._sleep(1.0)
        while not self._stop.is_set():
            sent = await self.publish_batch(conn)
            if sent < self.batch_size:
                await self._sleep(self.poll_interval_s)

    async def _ensure_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            await ensure_topics(self.bootstrap, self.topic_prefix, RELAYED_TOPICS)
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                acks="all",
                request_timeout_ms=5000,
                linger_ms=2,
            )
            try:
                await producer.start()
            except BaseException:
                await producer.stop()
                raise
            self._producer = producer
        return self._producer

    async def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        probe, self._offsets = self._offsets, None
        for client in (producer, probe):
            if client is not None:
                with contextlib.suppress(KafkaError, OSError, TimeoutError):
                    await client.stop()

    async def _durable(self, metadata: list[Any]) -> bool:
        """True when each partition written to holds the round's first acknowledged record.

        (The embedded broker reports a high watermark of the last batch's base offset + 1,
        so the round's first offset, not its last, is what can be checked.)"""
        if self._offsets is None:
            self._offsets = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap, request_timeout_ms=5000
            )
            await self._offsets.start()
        first: dict[TopicPartition, int] = {}
        for md in metadata:
            tp = TopicPartition(md.topic, md.partition)
            first[tp] = min(first.get(tp, md.offset), md.offset)
        try:
            # A topic the broker lost is absent from fresh metadata even though its
            # produce requests were acknowledged; one recreated since is empty.
            if not {tp.topic for tp in first} <= set(await self._offsets.topics()):
                return False
            ends = await self._offsets.end_offsets(list(first))
        except KafkaError:
            return False
        return all(ends.get(tp, 0) > offset for tp, offset in first.items())

    async def publish_batch(self, conn: psycopg.AsyncConnection[dict[str, Any]]) -> int:
        rows = await (
            await conn.execute(
                """SELECT id, topic, message_key, aggregate_id, event_type, tenant_id, payload,
                       body FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT %s""",
                (self.batch_size,),
            )
        ).fetchall()
        if not rows:
            return 0
        producer = await self._ensure_producer()
        futures = []
        for r in rows:
            headers = [("event_type", r["event_type"].encode())]
            if r["tenant_id"] is not None:
                headers.append(("tenant_id", str(r["tenant_id"]).encode()))
            value = (
                bytes(r["body"])
                if r["body"] is not None
                else json.dumps(r["payload"], sort_keys=True).encode()
            )
            key = r["message_key"] or r["aggregate_id"]
            futures.append(
                await producer.send(
                    f"{self.topic_prefix}{r['topic']}", value, key=key.encode(), headers=headers
                )
            )
        acked: list[int] = []
        metadata: list[Any] = []
        error: BaseException | None = None
        # Only the acknowledged prefix counts: whatever follows a failure is sent again,
        # after the failed one, so per-aggregate order holds for consumers.
        for row, future in zip(rows, futures, strict=True):
            try:
                metadata.append(await future)
            except (KafkaError, TimeoutError) as exc:
                error = exc
                break
            acked.append(row["id"])
        if acked and not await self._durable(metadata):
            # A broker that restarted empty acknowledges writes to topics it no longer
            # has (the embedded broker does); such acks are worthless: send again.
            self.stats.lost_acks += len(acked)
            await self._close_producer()
            raise KafkaError("the broker acknowledged events it does not hold; resending")
        if acked:
            await conn.execute(
                "UPDATE outbox SET published_at = now() WHERE id = ANY(%s)", (acked,)
            )
            self.stats.published += len(acked)
        if error is not None:
            raise error
        return len(rows)
