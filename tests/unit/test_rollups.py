"""Rollups, the late policy and OTLP decoding (pure code, no services)."""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2

from ingest.aggregator.decode import (
    SAMPLE_SCHEMA,
    SampleBatchBuilder,
    UndecodableMessage,
    decode,
    normalize_metric_name,
    series_id_of,
    series_key,
)
from ingest.aggregator.live import encode_partials
from ingest.aggregator.rollup import TIERS, LatePolicy, aggregate, rollup, split_by_time
from ingest.aggregator.writer import BatchSource

TENANTS = ("6f1c2a4e-0000-4000-8000-000000000001", "6f1c2a4e-0000-4000-8000-000000000002")
SERVER = "0b7e3a51-1111-4111-8111-111111111111"
BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z

Sample = tuple[int, int, int, float]  # (tenant index, series index, ts ms, value)


def frame(samples: Sequence[Sample], received_at: int | None = None) -> pl.DataFrame:
    """A samples frame of the decoder's schema."""
    received = received_at if received_at is not None else BASE_MS + 4 * 3_600_000
    rows: dict[str, list[Any]] = {name: [] for name in SAMPLE_SCHEMA}
    for tenant, series, ts, value in samples:
        rows["tenant_id"].append(TENANTS[tenant])
        rows["server_id"].append(SERVER)
        rows["metric"].append(f"m{series}")
        rows["labels"].append([{"key": "server_id", "value": SERVER}])
        rows["series_id"].append(series_id_of(TENANTS[tenant], f"m{series}", ()))
        rows["ts"].append(ts)
        rows["value"].append(value)
        rows["received_at"].append(received)
        rows["retention_days"].append(90)
    return pl.DataFrame(rows, schema=SAMPLE_SCHEMA)


Key = tuple[str, int, int]
Partial = tuple[float, float, float, int, tuple[int, float]]


def merge(partials: list[dict[str, Any]]) -> dict[Key, Partial]:
    """What ClickHouse does with partial rows: min, max, sum, sum, max of (ts, value)."""
    merged: dict[Key, Partial] = {}
    for p in partials:
        key = (p["tenant_id"], p["series_id"], p["bucket"])
        row: Partial = (
            p["min"],
            p["max"],
            p["sum"],
            p["count"],
            (p["last_ts"], p["last_value"]),
        )
        old = merged.get(key)
        if old is not None:
            row = (
                min(old[0], row[0]),
                max(old[1], row[1]),
                old[2] + row[2],
                old[3] + row[3],
                max(old[4], row[4]),
            )
        merged[key] = row
    return merged


def reference(samples: Sequence[Sample], tier_seconds: int) -> dict[Key, Partial]:
    """Aggregates computed from all raw samples with plain Python."""
    groups: dict[Key, list[tuple[int, float]]] = defaultdict(list)
    for tenant, series, ts, value in samples:
        sid = series_id_of(TENANTS[tenant], f"m{series}", ())
        bucket = ts // 1000 // tier_seconds * tier_seconds
        groups[(TENANTS[tenant], sid, bucket)].append((ts, value))
    return {
        key: (
            min(v for _, v in points),
            max(v for _, v in points),
            math.fsum(v for _, v in points),
            len(points),
            max(points),
        )
        for key, points in groups.items()
    }


timestamps = st.one_of(
    # Few distinct timestamps: duplicates within a series are common.
    st.integers(0, 40).map(lambda k: BASE_MS + k * 2_500),
    st.integers(0, 3 * 3_600_000).map(lambda k: BASE_MS + k),
)
values = st.one_of(
    st.integers(-1000, 1000).map(float),
    st.floats(-1e9, 1e9, allow_nan=False, allow_infinity=False),
)
samples_strategy = st.lists(
    st.tuples(st.integers(0, 1), st.integers(0, 3), timestamps, values), min_size=1, max_size=60
)


@settings(max_examples=150, deadline=None)
@given(samples=samples_strategy, data=st.data())
def test_partials_of_any_batching_merge_to_the_aggregates_of_all_samples(
    samples: list[Sample], data: st.DataObject
) -> None:
    # Random batch for every sample; the list order is random too, so batches hold
    # out-of-order samples and one bucket spreads over several batches.
    n_batches = data.draw(st.integers(1, 5))
    assignment = data.draw(
        st.lists(st.integers(0, n_batches - 1), min_size=len(samples), max_size=len(samples))
    )
    batches = [
        [s for s, b in zip(samples, assignment, strict=True) if b == i] for i in range(n_batches)
    ]
    for tier in TIERS:
        partials = [
            row
            for batch in batches
            if batch
            for row in rollup(frame(batch), tier.seconds).iter_rows(named=True)
        ]
        got = merge(partials)
        want = reference(samples, tier.seconds)
        assert got.keys() == want.keys()
        for key, (mn, mx, total, count, last) in want.items():
            g = got[key]
            assert (g[0], g[1], g[3], g[4]) == (mn, mx, count, last), (tier.name, key)
            assert math.isclose(g[2], total, rel_tol=1e-9, abs_tol=1e-3), (tier.name, key)


def test_rollup_buckets_and_last_value() -> None:
    # Out of order, with the latest timestamp duplicated: last = larger value at max ts.
    out = rollup(
        frame(
            [
                (0, 0, BASE_MS + 9_000, 5.0),
                (0, 0, BASE_MS + 1_000, 1.0),
                (0, 0, BASE_MS + 9_000, 7.0),
                (0, 0, BASE_MS + 10_000, 2.0),
            ]
        ),
        10,
    )
    rows = out.select("bucket", "min", "max", "sum", "count", "last_ts", "last_value").rows()
    assert rows == [
        (BASE_MS // 1000, 1.0, 7.0, 13.0, 3, BASE_MS + 9_000, 7.0),
        (BASE_MS // 1000 + 10, 2.0, 2.0, 2.0, 1, BASE_MS + 10_000, 2.0),
    ]


def test_tier_retention_caps_the_plan() -> None:
    plan = pl.DataFrame({"days": pl.Series([1, 7, 400], dtype=pl.UInt16)})
    caps = {
        tier.name: plan.select(tier.retention_days(pl.col("days")))["days"].to_list()
        for tier in TIERS
    }
    assert caps == {"10s": [1, 3, 3], "1m": [1, 7, 30], "1h": [1, 7, 400]}


def test_live_partials_are_keyed_by_series_and_keep_64_bit_ids() -> None:
    rows = rollup(frame([(0, 0, BASE_MS + 1_000, 1.5), (0, 0, BASE_MS + 2_000, 2.5)]), 10)
    source = BatchSource("p.yak.metrics.v1", 4, 10, 12, 99)
    ((key, value),) = encode_partials(rows, "10s", source)
    sid = series_id_of(TENANTS[0], "m0", ())
    assert sid > 2**53  # beyond what a JSON number keeps exactly
    assert key == str(sid).encode()
    assert json.loads(value) == {
        "tenant_id": TENANTS[0],
        "series_id": str(sid),
        "tier": "10s",
        "bucket": BASE_MS // 1000,
        "min": 1.5,
        "max": 2.5,
        "sum": 4.0,
        "count": 2,
        "last_ts": BASE_MS + 2_000,
        "last_value": 2.5,
        "source": "p.yak.metrics.v1:4:10-12@99",
    }


# --- late policy ------------------------------------------------------------------------


def test_late_and_future_samples_are_dropped_from_raw_and_rollups_and_counted() -> None:
    policy = LatePolicy(late_window_ms=600_000, future_window_ms=60_000)
    received = BASE_MS + 3_600_000
    samples = [
        (0, 0, received - 600_001, 100.0),  # late by 1 ms
        (0, 0, received - 600_000, 1.0),  # exactly at the window: kept
        (0, 1, received, 2.0),
        (0, 1, received + 60_000, 3.0),  # at the future edge: kept
        (0, 1, received + 60_001, 200.0),  # too far ahead
        (1, 2, BASE_MS, 300.0),  # an hour late
    ]
    batch = aggregate(frame(samples, received_at=received), policy)
    assert (batch.late_dropped, batch.future_dropped) == (2, 1)
    assert sorted(batch.samples["value"].to_list()) == [1.0, 2.0, 3.0]
    for tier_rows in batch.rollups.values():
        assert tier_rows["count"].sum() == 3
        assert tier_rows["max"].max() == 3.0


def test_late_reference_is_the_batch_newest_received_at() -> None:
    # A backlog read long after it arrived is not late: the reference is gateway time.
    old = frame([(0, 0, BASE_MS, 1.0)], received_at=BASE_MS + 1_000)
    newer = frame([(0, 0, BASE_MS + 900_000, 2.0)], received_at=BASE_MS + 901_000)
    kept, late, future = split_by_time(pl.concat([old, newer]), LatePolicy())
    assert (late, future) == (1, 0)
    assert kept["value"].to_list() == [2.0]
    kept, late, _ = split_by_time(old, LatePolicy())
    assert (kept.height, late) == (1, 0)


@settings(max_examples=50, deadline=None)
@given(samples=samples_strategy)
def test_every_sample_is_either_kept_or_counted(samples: list[Sample]) -> None:
    batch = aggregate(frame(samples, received_at=BASE_MS + 2 * 3_600_000))
    assert batch.samples.height + batch.late_dropped + batch.future_dropped == len(samples)
    assert batch.rollups["1h"]["count"].sum() == batch.samples.height


# --- decoding ---------------------------------------------------------------------------

TENANT = str(uuid.UUID("a3b1c2d4-0000-4000-8000-00000000aaaa"))
T0_NS = BASE_MS * 1_000_000


def headers(
    tenant: str = TENANT, server: str = SERVER, received: int = BASE_MS
) -> list[tuple[str, bytes]]:
    return [
        ("tenant_id", tenant.encode()),
        ("server_id", server.encode()),
        ("received_at", str(received).encode()),
        ("retention_days", b"30"),
    ]


def kv(key: str, value: str | int | float | bool) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def request(*metrics: metrics_pb2.Metric, resource: dict[str, str] | None = None) -> bytes:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    attrs = {"host.name": "web-1", "os.type": "linux"} if resource is None else resource
    for k, v in attrs.items():
        rm.resource.attributes.append(kv(k, v))
    rm.scope_metrics.add().metrics.extend(metrics)
    return req.SerializeToString()


def rows_of(df: pl.DataFrame) -> dict[str, float]:
    """series key -> value, for single-sample series."""
    out = {}
    for r in df.iter_rows(named=True):
        labels = tuple((item["key"], item["value"]) for item in r["labels"])
        out[series_key(r["metric"], labels)] = r["value"]
    return out


def test_gauge_labels_come_from_attributes_selected_resource_and_headers() -> None:
    m = metrics_pb2.Metric(name="system.cpu.utilization")
    p = m.gauge.data_points.add(time_unix_nano=T0_NS + 1_500_000, as_double=0.25)
    p.attributes.extend([kv("cpu", 3), kv("state", "idle"), kv("server_id", "spoofed")])
    m.gauge.data_points.add(time_unix_nano=T0_NS, as_int=7).attributes.append(kv("cpu", 4))
    df = decode(
        request(m, resource={"host.name": "web-1", "server_id": "x", "os.type": "l"}), headers()
    )
    assert df.schema == pl.Schema(SAMPLE_SCHEMA)
    common = f'host_name="web-1",server_id="{SERVER}"'
    assert rows_of(df) == {
        f'system_cpu_utilization{{cpu="3",{common},state="idle"}}': 0.25,
        f'system_cpu_utilization{{cpu="4",{common}}}': 7.0,
    }
    assert df["ts"].to_list() == [BASE_MS + 1, BASE_MS]
    assert set(df["tenant_id"]) == {TENANT}
    assert set(df["server_id"]) == {SERVER}
    assert set(df["received_at"]) == {BASE_MS}
    assert set(df["retention_days"]) == {30}


def test_series_id_is_blake2b_of_tenant_and_canonical_key() -> None:
    labels = (("server_id", SERVER), ("path", 'a"b\\c'))
    key = series_key("http_requests", labels)
    assert key == f'http_requests{{path="a\\"b\\\\c",server_id="{SERVER}"}}'
    digest = hashlib.blake2b(f"{TENANT}\n{key}".encode()).digest()
    assert series_id_of(TENANT, "http_requests", labels) == int.from_bytes(digest[:8], "big")
    # Pinned: a change here re-keys every stored series.
    assert series_id_of(TENANT, "up", (("server_id", SERVER),)) == 0xA098466B4B6DA40A
    other_tenant = str(uuid.uuid4())
    assert series_id_of(other_tenant, "http_requests", labels) != series_id_of(
        TENANT, "http_requests", labels
    )


def test_cumulative_sum_is_kept_as_reported() -> None:
    m = metrics_pb2.Metric(name="http.server.requests")
    m.sum.is_monotonic = True
    m.sum.aggregation_temporality = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
    for i, value in enumerate([10, 25, 25, 40]):
        m.sum.data_points.add(time_unix_nano=T0_NS + i * 10_000_000_000, as_int=value)
    df = decode(request(m), headers())
    assert df["metric"].unique().to_list() == ["http_server_requests"]
    assert df["series_id"].n_unique() == 1
    assert df.sort("ts")["value"].to_list() == [10.0, 25.0, 25.0, 40.0]


def test_histogram_expands_to_cumulative_buckets_sum_and_count() -> None:
    m = metrics_pb2.Metric(name="http.server.duration")
    p = m.histogram.data_points.add(time_unix_nano=T0_NS, count=10, sum=4.5)
    p.explicit_bounds.extend([0.1, 1.0, 2.5])
    p.bucket_counts.extend([2, 3, 4, 1])
    p.attributes.append(kv("route", "/"))
    got = rows_of(decode(request(m), headers()))
    rest = f'route="/",server_id="{SERVER}"'
    common = f'host_name="web-1",{rest}'
    assert got == {
        f'http_server_duration_bucket{{host_name="web-1",le="0.1",{rest}}}': 2.0,
        f'http_server_duration_bucket{{host_name="web-1",le="1",{rest}}}': 5.0,
        f'http_server_duration_bucket{{host_name="web-1",le="2.5",{rest}}}': 9.0,
        f'http_server_duration_bucket{{host_name="web-1",le="+Inf",{rest}}}': 10.0,
        f"http_server_duration_sum{{{common}}}": 4.5,
        f"http_server_duration_count{{{common}}}": 10.0,
    }


def test_summary_expands_to_quantiles_sum_and_count() -> None:
    m = metrics_pb2.Metric(name="rpc.latency")
    p = m.summary.data_points.add(time_unix_nano=T0_NS, count=100, sum=12.5)
    p.quantile_values.add(quantile=0.5, value=0.1)
    p.quantile_values.add(quantile=0.99, value=0.9)
    got = rows_of(decode(request(m, resource={}), headers()))
    assert got == {
        f'rpc_latency{{quantile="0.5",server_id="{SERVER}"}}': 0.1,
        f'rpc_latency{{quantile="0.99",server_id="{SERVER}"}}': 0.9,
        f'rpc_latency_sum{{server_id="{SERVER}"}}': 12.5,
        f'rpc_latency_count{{server_id="{SERVER}"}}': 100.0,
    }


def test_points_without_values_are_skipped_and_counted() -> None:
    m = metrics_pb2.Metric(name="g")
    m.gauge.data_points.add(time_unix_nano=T0_NS, as_double=float("nan"))
    m.gauge.data_points.add(time_unix_nano=T0_NS, as_double=1.0, flags=1)  # no recorded value
    m.gauge.data_points.add(time_unix_nano=T0_NS)  # neither as_double nor as_int
    m.gauge.data_points.add(time_unix_nano=0, as_double=2.0)  # no time: received_at
    builder = SampleBatchBuilder()
    assert builder.add(request(m), headers(received=BASE_MS + 5)) == 1
    assert builder.skipped_points == 3
    assert builder.frame().select("ts", "value").rows() == [(BASE_MS + 5, 2.0)]


@pytest.mark.parametrize(
    ("name", "normalized"),
    [("system.cpu.time", "system_cpu_time"), ("k8s.pod-name", "k8s_pod_name"), ("1up", "_1up")],
)
def test_metric_names_are_normalized_prometheus_style(name: str, normalized: str) -> None:
    assert normalize_metric_name(name) == normalized


@pytest.mark.parametrize(
    ("hdrs", "message"),
    [
        (headers()[1:], "tenant_id is missing"),
        ([("tenant_id", b"nope"), *headers()[1:]], "not a uuid"),
        ([*headers()[:2], ("received_at", b"soon"), headers()[3]], "not an integer"),
        ([*headers()[:3], ("retention_days", b"0")], "out of range"),
    ],
)
def test_bad_headers_are_undecodable(hdrs: list[tuple[str, bytes]], message: str) -> None:
    with pytest.raises(UndecodableMessage, match=message):
        decode(request(), hdrs)


def test_a_bad_payload_is_undecodable_and_adds_nothing() -> None:
    builder = SampleBatchBuilder()
    m = metrics_pb2.Metric(name="g")
    m.gauge.data_points.add(time_unix_nano=T0_NS, as_double=1.0)
    builder.add(request(m), headers())
    with pytest.raises(UndecodableMessage, match="not an OTLP"):
        builder.add(b"\xff\xff\xff\x00garbage", headers())
    assert len(builder) == 1
    assert builder.frame().height == 1
