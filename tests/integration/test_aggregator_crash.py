"""The aggregator killed with SIGKILL mid-stream and restarted: ClickHouse ends up with
exactly what was sent, neither less nor more.

The aggregator runs in its own process with its own chDB path (chDB opens a path from one
process only); the counts are read after it exited, by a short-lived process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from yakpanel.topics import METRICS, METRICS_DLQ, ROLLUPS, ensure_topics

from ..support.otlp import GaugePoint, gauge_request, metrics_headers

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

DATABASE = "metrics"
TENANT = str(uuid.uuid4())
SERVERS = [str(uuid.uuid4()) for _ in range(6)]
RECORDS = 240
POINTS_PER_RECORD = 10

COUNT_SCRIPT = """
import json, sys
import clickhouse_connect
client = clickhouse_connect.get_client(dsn=sys.argv[1])
print(json.dumps([int(client.command(q)) for q in sys.argv[2:]]))
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("YAKPANEL_")}
    env.update(extra)
    return env


class AggregatorProcess:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = self.log_path.open("ab")
        log.write(f"--- start {self.starts}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ingest.aggregator",
                "--migrate",
                "--max-records",
                "4",
                "--max-wait-s",
                "0.1",
                "--session-timeout-ms",
                "2000",
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


async def committed_total(watcher: AIOKafkaConsumer, topic: str) -> int:
    """Offsets the group committed, summed over the topic's partitions (read, not joined)."""
    total = 0
    for partition in range(METRICS.partitions):
        total += await watcher.committed(TopicPartition(topic, partition)) or 0
    return total


async def produce_stream(bootstrap: str, topic: str, sent: dict[int, int]) -> None:
    """RECORDS records at about 100 per second; `sent` maps partition -> end offset."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    await producer.start()
    try:
        for i in range(RECORDS):
            server = SERVERS[i % len(SERVERS)]
            now = int(time.time() * 1000)
            points = [
                GaugePoint(f"probe.m{k % 3}", now - k * 250, float(i * POINTS_PER_RECORD + k))
                for k in range(POINTS_PER_RECORD)
            ]
            meta = await producer.send_and_wait(
                topic,
                gauge_request(points, host=f"h{i % len(SERVERS)}"),
                key=server.encode(),
                headers=metrics_headers(TENANT, server, now),
            )
            sent[meta.partition] = meta.offset + 1
            await asyncio.sleep(0.01)
    finally:
        await producer.stop()


async def test_sigkill_mid_stream_then_restart_writes_every_sample_exactly_once(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    await ensure_topics(kafka_bootstrap, topic_prefix, (METRICS, METRICS_DLQ, ROLLUPS))
    topic = METRICS.full_name(topic_prefix)
    group = f"{topic_prefix}aggregator"
    dsn = f"chdb://{tmp_path / 'clickhouse'}"
    env = _env(
        YAKPANEL_KAFKA_BOOTSTRAP=kafka_bootstrap,
        YAKPANEL_KAFKA_TOPIC_PREFIX=topic_prefix,
        YAKPANEL_CLICKHOUSE_DSN=dsn,
        YAKPANEL_CLICKHOUSE_DATABASE=DATABASE,
        YAKPANEL_LOG_LEVEL="INFO",
    )
    log_path = tmp_path / "aggregator.log"
    aggregator = AggregatorProcess(env, log_path)
    sent: dict[int, int] = {}
    watcher = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group)
    await watcher.start()
    producing = asyncio.create_task(produce_stream(kafka_bootstrap, topic, sent))
    try:
        aggregator.start()
        # Kill it twice while records stream in, each time once it has committed more.
        done = 0
        for _ in range(2):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                now_done = await committed_total(watcher, topic)
                if now_done > done + 15:
                    break
                assert aggregator.alive(), log_path.read_text()
                await asyncio.sleep(0.02)
            else:
                raise AssertionError(f"no progress to kill in:\n{log_path.read_text()}")
            aggregator.kill()
            done = await committed_total(watcher, topic)
            aggregator.start()
        await producing
        total_records = sum(sent.values())
        assert done < total_records, "the kills came after the stream had been consumed"
        deadline = time.monotonic() + 40
        while await committed_total(watcher, topic) < total_records:
            assert time.monotonic() < deadline, log_path.read_text()
            assert aggregator.alive(), log_path.read_text()
            await asyncio.sleep(0.1)
        assert aggregator.terminate() == 0, log_path.read_text()
    finally:
        if not producing.done():
            producing.cancel()
        if aggregator.alive():
            aggregator.kill()
        await watcher.stop()

    result = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-c",
            COUNT_SCRIPT,
            dsn,
            f"SELECT count() FROM {DATABASE}.samples_raw",
            f"SELECT sum(count) FROM {DATABASE}.rollup_10s",
            f"SELECT sum(count) FROM {DATABASE}.rollup_1h",
            f"SELECT count() FROM {DATABASE}.metric_series FINAL",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    raw, tier_10s, tier_1h, series = json.loads(result.stdout)
    samples_sent = RECORDS * POINTS_PER_RECORD
    assert (raw, tier_10s, tier_1h) == (samples_sent, samples_sent, samples_sent), (
        log_path.read_text()
    )
    assert series == 3 * len(SERVERS)
