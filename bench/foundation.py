"""Baseline throughput of the embedded components every pipeline stands on.

- Kafka: produce (acks=all, 200-byte values, batched) and consume back, messages/s.
- ClickHouse (chDB): insert rows/s in 50k-row batches with dedup tokens; group-by p50/p99.
- PostgreSQL: full migration run on an empty database, and a no-op second run.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench._common import emit, percentile
from yakpanel.clickhouse import ClickHouseTarget
from yakpanel.embedded import EmbeddedBroker, EmbeddedPostgres, free_port
from yakpanel.migrations import migrate_all
from yakpanel.topics import METRICS, ensure_topics

MESSAGES = 100_000
ROWS = 1_000_000


async def kafka_bench(bootstrap: str) -> None:
    await ensure_topics(bootstrap, "bench.")
    topic = METRICS.full_name("bench.")
    value = b"x" * 200
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024
    )
    await producer.start()
    started = time.perf_counter()
    pending = []
    for i in range(MESSAGES):
        pending.append(await producer.send(topic, value, key=f"srv-{i % 500}".encode()))
        if len(pending) >= 5000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    produce_s = time.perf_counter() - started
    await producer.stop()

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", max_poll_records=10_000
    )
    await consumer.start()
    got = 0
    started = time.perf_counter()
    while got < MESSAGES and time.perf_counter() - started < 120:
        batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
        got += sum(len(v) for v in batches.values())
    consume_s = time.perf_counter() - started
    await consumer.stop()
    emit(
        "foundation.kafka",
        messages=MESSAGES,
        value_bytes=200,
        produce_msgs_per_s=round(MESSAGES / produce_s),
        consume_msgs_per_s=round(got / consume_s),
        consumed=got,
    )


def clickhouse_bench(root: Path) -> None:
    client = ClickHouseTarget(f"chdb://{root}", "bench").client()
    client.command(
        "CREATE TABLE IF NOT EXISTS samples (series UInt64, ts DateTime64(3, 'UTC'), v Float64)"
        " ENGINE = MergeTree ORDER BY (series, ts)"
        " SETTINGS non_replicated_deduplication_window = 1000"
    )
    batch = 50_000
    started = time.perf_counter()
    for n in range(ROWS // batch):
        rows = [[i % 10_000, 1_700_000_000 + n * batch + i, float(i)] for i in range(batch)]
        client.insert(
            "samples",
            rows,
            column_names=["series", "ts", "v"],
            settings={"insert_deduplication_token": f"bench-{n}"},
        )
    insert_s = time.perf_counter() - started
    latencies = []
    for _ in range(30):
        t = time.perf_counter()
        client.query(
            "SELECT series, min(v), max(v), sum(v), count() FROM samples"
            " WHERE series < 100 GROUP BY series"
        )
        latencies.append((time.perf_counter() - t) * 1000)
    emit(
        "foundation.clickhouse",
        rows=ROWS,
        insert_rows_per_s=round(ROWS / insert_s),
        groupby_p50_ms=round(percentile(latencies, 50), 2),
        groupby_p99_ms=round(percentile(latencies, 99), 2),
    )
    client.close()


def postgres_bench(root: Path, ch_root: Path) -> None:
    pg = EmbeddedPostgres(root / "pg")
    t = time.perf_counter()
    pg.start()
    start_s = time.perf_counter() - t
    try:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute("CREATE DATABASE bench")
        dsn = pg.dsn.replace("/postgres?", "/bench?")
        client = ClickHouseTarget(f"chdb://{ch_root}", "bench_migrate").client()
        t = time.perf_counter()
        migrate_all(dsn, client, "bench_migrate")
        first_s = time.perf_counter() - t
        t = time.perf_counter()
        migrate_all(dsn, client, "bench_migrate")
        second_s = time.perf_counter() - t
        client.close()
    finally:
        pg.stop()
    emit(
        "foundation.postgres",
        server_start_s=round(start_s, 3),
        migrate_first_run_ms=round(first_s * 1000, 1),
        migrate_noop_run_ms=round(second_s * 1000, 1),
    )


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="yak-bench-"))
    broker = EmbeddedBroker(free_port())
    try:
        broker.start()
        asyncio.run(kafka_bench(broker.bootstrap))
        broker.stop()
        clickhouse_bench(root / "ch")
        postgres_bench(root, root / "ch")
    finally:
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
