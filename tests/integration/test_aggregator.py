"""The aggregator against the real broker and chDB: what is sent is what ClickHouse holds,
replays do not double it, and poison records are dead-lettered without stopping the stream."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from clickhouse_connect.driver.exceptions import DatabaseError

from ingest.aggregator.config import AggregatorConfig
from ingest.aggregator.decode import SampleBatchBuilder, normalize_metric_name, series_id_of
from ingest.aggregator.rollup import aggregate
from ingest.aggregator.service import Aggregator
from ingest.aggregator.writer import BatchSource, ClickHouseWriter
from ingest.metrics_schema import METRIC_TABLES
from yakpanel.clickhouse import ClickHouseTarget
from yakpanel.migrations import CLICKHOUSE_SOURCES, ClickHouseMigrator, split_statements
from yakpanel.topics import METRICS, METRICS_DLQ, ROLLUPS, ensure_topics

from ..support.otlp import GaugePoint, gauge_request, metrics_headers

TENANT = str(uuid.uuid4())
SERVERS = [str(uuid.uuid4()) for _ in range(4)]
METRIC_NAMES = ("system.cpu.load", "system.memory.used", "http.probe.latency")


def migrate(client: Any, database: str) -> None:
    ClickHouseMigrator(client, database).apply([m for s in CLICKHOUSE_SOURCES for m in s.load()])


Series = tuple[str, str]  # (metric, server_id)


@dataclass
class Sent:
    """What the test produced, and the aggregates ClickHouse must end up with."""

    samples: dict[Series, list[tuple[int, float]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    end_offsets: dict[int, int] = field(default_factory=dict)
    poison: list[tuple[int, int]] = field(default_factory=list)  # (partition, offset)

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.samples.values())

    def expected(self, tier_seconds: int) -> dict[tuple[int, int], tuple[Any, ...]]:
        out: dict[tuple[int, int], tuple[Any, ...]] = {}
        for (metric, server), points in self.samples.items():
            sid = series_id_of(TENANT, normalize_metric_name(metric), labels(server))
            buckets: dict[int, list[tuple[int, float]]] = defaultdict(list)
            for ts, value in points:
                buckets[ts // 1000 // tier_seconds * tier_seconds].append((ts, value))
            for bucket, pts in buckets.items():
                values = [v for _, v in pts]
                out[(sid, bucket)] = (min(values), max(values), sum(values), len(pts), max(pts))
        return out


def labels(server: str) -> tuple[tuple[str, str], ...]:
    return (("host_name", f"host-{server[:4]}"), ("server_id", server))


async def produce(
    bootstrap: str,
    topic: str,
    messages: int,
    points_per_metric: int,
    sent: Sent,
    start_ms: int,
    spread: bool = False,
) -> None:
    """`messages` records spread over the servers (keyed by server, or round-robin over all
    partitions with `spread`); the third one is poison."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(messages):
            server = SERVERS[i % len(SERVERS)]
            received = start_ms + i * 500
            partition = i % METRICS.partitions if spread else None
            if i == 2:
                meta = await producer.send_and_wait(
                    topic,
                    b"\x0a\xffnot protobuf",
                    key=server.encode(),
                    partition=partition,
                    headers=metrics_headers(TENANT, server, received),
                )
                sent.poison.append((meta.partition, meta.offset))
                sent.end_offsets[meta.partition] = meta.offset + 1
                continue
            points = []
            for m, name in enumerate(METRIC_NAMES):
                for k in range(points_per_metric):
                    # Out of order inside the record, with a duplicate timestamp.
                    ts = received - (0, 7_400, 3_700, 11_100, 11_100, 900)[k % 6]
                    value = float((i * 31 + m * 7 + k * 13) % 97) + 0.25
                    points.append(GaugePoint(name, ts, value))
                    sent.samples[(name, server)].append((ts, value))
            meta = await producer.send_and_wait(
                topic,
                gauge_request(points, host=f"host-{server[:4]}"),
                key=server.encode(),
                partition=partition,
                headers=metrics_headers(TENANT, server, received),
            )
            sent.end_offsets[meta.partition] = meta.offset + 1
    finally:
        await producer.stop()


async def run_until_committed(
    aggregator: Aggregator, topic: str, end_offsets: dict[int, int], timeout_s: float = 30
) -> None:
    want = {(topic, p): o for p, o in end_offsets.items()}
    await aggregator.start()
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            committed = aggregator.stats.committed
            if all(committed.get(k, -1) >= o for k, o in want.items()):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"not all committed: {aggregator.stats.committed} vs {want}")
    finally:
        await aggregator.stop()


def merged(client: Any, table: str) -> dict[tuple[int, int], tuple[Any, ...]]:
    rows = client.query(
        "SELECT series_id, toUnixTimestamp(bucket), min(min), max(max), sum(sum), sum(count),"
        " toUnixTimestamp64Milli(max(last).1), max(last).2"
        f" FROM {table} WHERE tenant_id = {{t:UUID}} GROUP BY series_id, bucket",
        parameters={"t": TENANT},
    ).result_rows
    return {
        (int(sid), int(bucket)): (mn, mx, total, int(count), (int(last_ms), last_value))
        for sid, bucket, mn, mx, total, count, last_ms, last_value in rows
    }


def assert_rollups_match(client: Any, sent: Sent) -> None:
    for table, seconds in (("rollup_10s", 10), ("rollup_1m", 60), ("rollup_1h", 3600)):
        got = merged(client, table)
        want = sent.expected(seconds)
        assert got.keys() == want.keys(), table
        for key, (mn, mx, total, count, last) in want.items():
            g = got[key]
            assert (g[0], g[1], g[3], g[4]) == (mn, mx, count, last), (table, key)
            assert g[2] == pytest.approx(total), (table, key)


def aggregator_for(
    kafka_bootstrap: str, topic_prefix: str, target: ClickHouseTarget, **config: Any
) -> Aggregator:
    defaults: dict[str, Any] = {
        "max_records": 4,
        "max_wait_s": 0.2,
        "session_timeout_ms": 3_000,
        "heartbeat_interval_ms": 300,
    }
    return Aggregator(
        kafka_bootstrap,
        topic_prefix,
        target.client,
        target.database,
        AggregatorConfig(**(defaults | config)),
    )


async def read_topic(bootstrap: str, topic: str, want: int, timeout_s: float = 10) -> list[Any]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", fetch_max_wait_ms=20
    )
    await consumer.start()
    got: list[Any] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(got) < want and time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=200)).values():
                got.extend(messages)
    finally:
        await consumer.stop()
    return got


async def wait_for(condition: Callable[[], bool], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def rewind_group(bootstrap: str, group_id: str, topic: str) -> None:
    """Commit offset 0 for every partition as a member of the group (the embedded broker
    takes commits from members only)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        session_timeout_ms=3_000,
        heartbeat_interval_ms=300,
        fetch_max_wait_ms=20,
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + 15
        while not consumer.assignment() and time.monotonic() < deadline:
            await consumer.getmany(timeout_ms=100)
        assert consumer.assignment(), "the rewinding consumer got no partitions"
        await consumer.commit(dict.fromkeys(consumer.assignment(), 0))
    finally:
        await consumer.stop()


@pytest.mark.clickhouse
def test_metrics_schema_is_idempotent_and_has_the_documented_tables(
    ch_client: Any, clickhouse_target: ClickHouseTarget
) -> None:
    (migration,) = [m for s in CLICKHOUSE_SOURCES for m in s.load() if m.name == "metrics"]
    sql = migration.sql.replace("{database}", clickhouse_target.database)
    for _ in range(2):  # an interrupted migration runs again from the top
        for statement in split_statements(sql):
            ch_client.command(statement)
    tables = dict(
        ch_client.query(
            "SELECT name, engine_full FROM system.tables WHERE database = currentDatabase()"
        ).result_rows
    )
    assert set(tables) == set(METRIC_TABLES)
    assert tables["metric_series"].startswith("ReplacingMergeTree(last_seen)")
    assert "TTL toDateTime(ts) + toIntervalDay(2)" in tables["samples_raw"]
    for name, partition in (
        ("rollup_10s", "toYYYYMMDD(bucket)"),
        ("rollup_1m", "toYYYYMMDD(bucket)"),
        ("rollup_1h", "toYYYYMM(bucket)"),
    ):
        assert tables[name].startswith("AggregatingMergeTree"), name
        assert f"PARTITION BY {partition}" in tables[name], name
        assert "TTL bucket + toIntervalDay(retention_days)" in tables[name], name
    for name in METRIC_TABLES:
        assert "non_replicated_deduplication_window = 10000" in tables[name], name
    (last_type,) = ch_client.query(
        "SELECT type FROM system.columns WHERE database = currentDatabase()"
        " AND table = 'rollup_1m' AND name = 'last'"
    ).result_rows[0]
    assert last_type == "SimpleAggregateFunction(max, Tuple(DateTime64(3, 'UTC'), Float64))"


@pytest.mark.clickhouse
def test_writer_drops_a_replayed_range_and_keeps_a_new_one(
    ch_client: Any, clickhouse_target: ClickHouseTarget
) -> None:
    migrate(ch_client, clickhouse_target.database)
    now = int(time.time() * 1000)
    builder = SampleBatchBuilder()
    points = [GaugePoint("load", now - k * 4_000, float(k)) for k in range(6)]
    builder.add(gauge_request(points), metrics_headers(TENANT, SERVERS[0], now, 7))
    batch = aggregate(builder.frame())
    source = BatchSource("t.yak.metrics.v1", 3, 100, 109, now)

    # Two writers: the replay comes from a restarted process with nothing in memory.
    ClickHouseWriter(ch_client, clickhouse_target.database).write(batch, source)
    ClickHouseWriter(ch_client, clickhouse_target.database).write(batch, source)

    def count(table: str) -> int:
        return int(ch_client.command(f"SELECT count() FROM {table}"))

    assert count("samples_raw") == 6
    assert ch_client.command("SELECT sum(count) FROM rollup_10s") == 6
    assert ch_client.command("SELECT sum(count) FROM rollup_1h") == 6
    assert count("metric_series FINAL") == 1
    assert ClickHouseWriter(ch_client, clickhouse_target.database).recorded_batches(
        "t.yak.metrics.v1", 3, 100
    ) == {(100, now): 109}

    # Tier retention: the plan's 7 days, capped at 3 for the 10 s tier.
    retention = ch_client.query(
        "SELECT (SELECT max(retention_days) FROM rollup_10s),"
        " (SELECT max(retention_days) FROM rollup_1m), (SELECT max(retention_days) FROM rollup_1h)"
    ).result_rows
    assert retention == [(3, 7, 7)]

    # The same records in another range (or another log incarnation) are new data.
    ClickHouseWriter(ch_client, clickhouse_target.database).write(
        batch, BatchSource("t.yak.metrics.v1", 3, 110, 119, now)
    )
    ClickHouseWriter(ch_client, clickhouse_target.database).write(
        batch, BatchSource("t.yak.metrics.v1", 3, 100, 109, now + 1)
    )
    assert count("samples_raw") == 18
    first_seen, last_seen = ch_client.query(
        "SELECT toUnixTimestamp64Milli(first_seen), toUnixTimestamp64Milli(last_seen)"
        " FROM metric_series FINAL"
    ).result_rows[0]
    assert (first_seen, last_seen) == (now - 20_000, now)


@pytest.mark.kafka
@pytest.mark.clickhouse
async def test_aggregator_writes_what_was_sent_dead_letters_poison_and_replays_idempotently(
    kafka_bootstrap: str, topic_prefix: str, ch_client: Any, clickhouse_target: ClickHouseTarget
) -> None:
    migrate(ch_client, clickhouse_target.database)
    await ensure_topics(kafka_bootstrap, topic_prefix, (METRICS, METRICS_DLQ, ROLLUPS))
    topic = METRICS.full_name(topic_prefix)
    sent = Sent()
    await produce(kafka_bootstrap, topic, 40, 5, sent, int(time.time() * 1000) - 30_000)

    # Small batches and a small pending-rows bound, so fetching pauses under load.
    first = aggregator_for(
        kafka_bootstrap, topic_prefix, clickhouse_target, max_records=3, max_pending_rows=40
    )
    await run_until_committed(first, topic, sent.end_offsets)
    assert first.stats.dlq == 1
    assert first.stats.samples == sent.total
    assert first.stats.pauses > 0
    assert first.stats.late_dropped == 0

    assert ch_client.command("SELECT count() FROM samples_raw") == sent.total
    assert_rollups_match(ch_client, sent)
    series = ch_client.query(
        "SELECT metric, labels, toString(server_id) FROM metric_series FINAL"
    ).result_rows
    assert sorted((m, dict(lbl)["server_id"], srv) for m, lbl, srv in series) == sorted(
        (normalize_metric_name(m), s, s) for m, s in sent.samples
    )

    # The poison record is in the DLQ with where it came from; the records after it in
    # the same partition were written (the totals above include them).
    dlq = await read_topic(kafka_bootstrap, METRICS_DLQ.full_name(topic_prefix), 1)
    assert len(dlq) == 1
    headers = {k: v.decode() for k, v in dlq[0].headers}
    poison_partition, poison_offset = sent.poison[0]
    assert headers["source_topic"] == topic
    assert (int(headers["source_partition"]), int(headers["source_offset"])) == sent.poison[0]
    assert "OTLP" in headers["error"]
    assert headers["tenant_id"] == TENANT
    assert sent.end_offsets[poison_partition] > poison_offset + 1

    # Live partials on yak.rollups.v1 add up to what was sent.
    published = first.stats.rollups_published
    live = await read_topic(kafka_bootstrap, ROLLUPS.full_name(topic_prefix), published)
    assert len(live) == published
    rows = [json.loads(m.value) for m in live]
    assert sum(r["count"] for r in rows) == sent.total
    assert {r["tier"] for r in rows} == {"10s"}
    assert all(m.key.decode() == r["series_id"] for m, r in zip(live, rows, strict=True))

    # Rewind the group to the beginning and run again with other batch sizes: every range
    # is re-cut as it was first written, and ClickHouse drops the repeated inserts.
    await rewind_group(kafka_bootstrap, first.group_id, topic)
    again = aggregator_for(kafka_bootstrap, topic_prefix, clickhouse_target, max_records=50)
    await run_until_committed(again, topic, sent.end_offsets)
    assert again.stats.records == first.stats.records
    assert ch_client.command("SELECT count() FROM samples_raw") == sent.total
    assert_rollups_match(ch_client, sent)


@pytest.mark.kafka
@pytest.mark.clickhouse
async def test_two_aggregators_in_one_group_split_the_stream_through_a_rebalance(
    kafka_bootstrap: str, topic_prefix: str, ch_client: Any, clickhouse_target: ClickHouseTarget
) -> None:
    migrate(ch_client, clickhouse_target.database)
    await ensure_topics(kafka_bootstrap, topic_prefix, (METRICS, METRICS_DLQ, ROLLUPS))
    topic = METRICS.full_name(topic_prefix)
    sent = Sent()
    start_ms = int(time.time() * 1000) - 60_000
    await produce(kafka_bootstrap, topic, 30, 2, sent, start_ms)

    one = aggregator_for(kafka_bootstrap, topic_prefix, clickhouse_target, max_records=2)
    two = aggregator_for(kafka_bootstrap, topic_prefix, clickhouse_target, max_records=5)
    await one.start()
    try:
        await wait_for(lambda: one.stats.batches >= 3)
        # The second member joins mid-stream: the first gives up part of its partitions.
        await two.start()
        await wait_for(lambda: two.stats.partitions > 0 and one.stats.partitions > 0)
        assert one.stats.partitions + two.stats.partitions == METRICS.partitions
        more = Sent()
        await produce(kafka_bootstrap, topic, 36, 2, more, start_ms + 20_000, spread=True)
        for key, points in more.samples.items():
            sent.samples[key].extend(points)
        want = {(topic, p): o for p, o in more.end_offsets.items()}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            committed = one.stats.committed | {
                k: max(v, one.stats.committed.get(k, -1)) for k, v in two.stats.committed.items()
            }
            if all(committed.get(k, -1) >= o for k, o in want.items()):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"not all committed: {one.stats} {two.stats}")
    finally:
        await two.stop()
        await one.stop()
    assert one.stats.batches > 0 and two.stats.batches > 0
    assert ch_client.command("SELECT count() FROM samples_raw") == sent.total
    assert_rollups_match(ch_client, sent)


class InsertFailsOnce:
    """The real client, except that one insert fails after others of its batch went in."""

    def __init__(self, client: Any, fail_at: int) -> None:
        self.client = client
        self.inserts = 0
        self.fail_at = fail_at
        self.failed = False

    def insert_arrow(self, *args: Any, **kwargs: Any) -> Any:
        self.inserts += 1
        if self.inserts == self.fail_at and not self.failed:
            self.failed = True
            raise DatabaseError("injected: the server went away mid-batch")
        return self.client.insert_arrow(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


@pytest.mark.kafka
@pytest.mark.clickhouse
async def test_a_write_failing_half_way_is_retried_without_doubling(
    kafka_bootstrap: str, topic_prefix: str, ch_client: Any, clickhouse_target: ClickHouseTarget
) -> None:
    migrate(ch_client, clickhouse_target.database)
    await ensure_topics(kafka_bootstrap, topic_prefix, (METRICS, METRICS_DLQ, ROLLUPS))
    topic = METRICS.full_name(topic_prefix)
    sent = Sent()
    await produce(kafka_bootstrap, topic, 12, 3, sent, int(time.time() * 1000) - 30_000)
    flaky: list[InsertFailsOnce] = []

    def client_factory() -> Any:
        # Inserts per batch: raw, 10s, 1m, 1h; the 7th is the second batch's 1m tier.
        flaky.append(InsertFailsOnce(clickhouse_target.client(), fail_at=7))
        return flaky[-1]

    aggregator = Aggregator(
        kafka_bootstrap,
        topic_prefix,
        client_factory,
        clickhouse_target.database,
        AggregatorConfig(
            max_records=2,
            max_wait_s=0.2,
            session_timeout_ms=3_000,
            heartbeat_interval_ms=300,
            retry_backoff_s=0.05,
        ),
    )
    await run_until_committed(aggregator, topic, sent.end_offsets)
    assert flaky[0].failed
    assert aggregator.stats.write_retries == 1
    assert ch_client.command("SELECT count() FROM samples_raw") == sent.total
    assert_rollups_match(ch_client, sent)
