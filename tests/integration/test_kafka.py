"""The real Kafka-protocol broker: topic catalogue, produce, consume in a group, commits."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from yakpanel.topics import CATALOGUE, EVENTS, ensure_topics

pytestmark = pytest.mark.kafka


async def _consume(consumer: AIOKafkaConsumer, want: int, timeout_s: float = 20) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        batches = await consumer.getmany(timeout_ms=300)
        for messages in batches.values():
            got.extend(m.value for m in messages)
    return got


async def test_catalogue_topics_are_created_once(kafka_bootstrap: str, topic_prefix: str) -> None:
    created = await ensure_topics(kafka_bootstrap, topic_prefix)
    assert sorted(created) == sorted(t.full_name(topic_prefix) for t in CATALOGUE)
    assert await ensure_topics(kafka_bootstrap, topic_prefix) == []

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([EVENTS.full_name(topic_prefix)])
    finally:
        await admin.close()
    assert len(described[0]["partitions"]) == EVENTS.partitions


async def test_produce_and_consume_back_in_a_consumer_group(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    await ensure_topics(kafka_bootstrap, topic_prefix)
    topic = EVENTS.full_name(topic_prefix)
    sent = [f"event-{i}".encode() for i in range(50)]

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for i, value in enumerate(sent):
            await producer.send_and_wait(topic, value, key=f"aggregate-{i % 5}".encode())
    finally:
        await producer.stop()

    group = f"{topic_prefix}group"
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
    )
    await consumer.start()
    try:
        got = await _consume(consumer, len(sent))
        await consumer.commit()
    finally:
        await consumer.stop()
    assert sorted(got) == sorted(sent)

    # The group's committed offsets cover everything consumed: a member that joins
    # later resumes after them instead of reading the stream again.
    reader = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group)
    await reader.start()
    try:
        committed = [
            await reader.committed(TopicPartition(topic, p)) or 0 for p in range(EVENTS.partitions)
        ]
    finally:
        await reader.stop()
    assert sum(committed) == len(sent)


async def test_per_key_order_is_kept(kafka_bootstrap: str, topic_prefix: str) -> None:
    await ensure_topics(kafka_bootstrap, topic_prefix)
    topic = EVENTS.full_name(topic_prefix)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, f"{key}:{seq}".encode(), key=key.encode())
            for seq in range(40)
            for key in ("a", "b", "c")
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        got = await _consume(consumer, 120)
    finally:
        await consumer.stop()
    for key in ("a", "b", "c"):
        seqs = [int(v.decode().split(":")[1]) for v in got if v.decode().startswith(f"{key}:")]
        assert seqs == list(range(40)), key
