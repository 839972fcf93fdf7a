"""Kafka consumers of the control plane: presence and command results.

Each message is applied in its own transaction and the offset committed only after
that; applying a message twice is harmless (presence and results only move state
forward), so a crash between apply and commit loses nothing and doubles nothing.
Undecodable messages are counted and skipped: they can never succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import psycopg
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from google.protobuf.message import DecodeError

from yakpanel.topics import TopicSpec, ensure_topics

log = logging.getLogger(__name__)

Handler = Callable[[bytes], Awaitable[None]]


@dataclass
class ConsumerStats:
    applied: int = 0
    undecodable: int = 0
    retries: int = 0


class TopicConsumer:
    def __init__(
        self,
        bootstrap: str,
        topic: TopicSpec,
        prefix: str,
        group_id: str,
        handler: Handler,
        max_backoff_s: float = 5.0,
        fetch_max_wait_ms: int = 20,
    ) -> None:
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.bootstrap = bootstrap
        self.topic = topic
        self.prefix = prefix
        self.group_id = group_id
        self.handler = handler
        self.max_backoff_s = max_backoff_s
        self.stats = ConsumerStats()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            consumer: AIOKafkaConsumer | None = None
            try:
                await ensure_topics(self.bootstrap, self.prefix, (self.topic,))
                consumer = AIOKafkaConsumer(
                    self.topic.full_name(self.prefix),
                    bootstrap_servers=self.bootstrap,
                    group_id=self.group_id,
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",
                    session_timeout_ms=10_000,
                    heartbeat_interval_ms=1_000,
                    # The embedded broker answers a waiting fetch only when this runs
                    # out, not when data arrives: keep it short (Kafka answers early).
                    fetch_max_wait_ms=self.fetch_max_wait_ms,
                )
                await consumer.start()
                await self._consume(consumer)
                backoff = 0.2
            except (KafkaError, OSError, TimeoutError, psycopg.Error) as exc:
                self.stats.retries += 1
                log.warning("%s consumer retrying: %s", self.topic.name, exc)
            finally:
                if consumer is not None:
                    with contextlib.suppress(KafkaError, OSError, TimeoutError):
                        await consumer.stop()
            if not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._stop.wait(),
                        backoff * (1 + random.random() / 2),  # noqa: S311
                    )
                backoff = min(backoff * 2, self.max_backoff_s)

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        while not self._stop.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=500)
            for messages in batches.values():
                for msg in messages:
                    try:
                        await self.handler(msg.value)
                    except (DecodeError, ValueError) as exc:
                        self.stats.undecodable += 1
                        log.error(
                            "skipping undecodable message %s[%s]@%s: %s",
                            msg.topic,
                            msg.partition,
                            msg.offset,
                            exc,
                        )
                    else:
                        self.stats.applied += 1
            if batches:
                await consumer.commit()
