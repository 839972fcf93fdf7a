"""Decode `yak.metrics.v1` messages (OTLP `ExportMetricsServiceRequest`) into samples.

Identity (tenant, server), receive time and retention come from the message headers the
gateway stamped from the client certificate and the tenant's plan, never from resource
attributes. Each OTLP data point becomes one or more Prometheus-style samples:

- gauge and sum points: one sample, value as reported (cumulative sums stay counters,
  delta sums keep their per-interval increments);
- explicit-bucket histograms: `<name>_bucket{le="…"}` (cumulative counts, ending with
  `le="+Inf"`), `<name>_sum` (when reported) and `<name>_count`;
- exponential histograms: `<name>_sum` and `<name>_count` only (their buckets move with
  the scale; turned into `le` labels they would mint new series whenever it changes);
- summaries: `<name>{quantile="…"}`, `<name>_sum`, `<name>_count`.

Points flagged "no recorded value", non-finite values (NaN is Prometheus' staleness
marker; an infinity would poison every sum it enters) and metrics with an empty name are
skipped and counted. A point without a timestamp takes the message's `received_at`.

Series identity: labels are the data point's attributes plus `RESOURCE_LABELS`, keys
normalised like metric names, plus `server_id` from the header (attributes named
`server_id` or `tenant_id` are dropped). The canonical key is `series_key()`; `series_id`
is the first 8 bytes (big-endian unsigned) of BLAKE2b-512 over
`"<tenant_id>\\n<canonical key>"` in UTF-8 — stable across processes and releases, so the
query layer can compute it from labels.
"""

from __future__ import annotations

import hashlib
import math
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import polars as pl
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric

# Resource attributes copied into every series' labels (after name normalisation).
RESOURCE_LABELS: tuple[str, ...] = ("host.name", "service.name", "service.instance.id")
# Label names the aggregator owns; attributes with these names are ignored.
RESERVED_LABELS = frozenset({"server_id", "tenant_id"})
# OTLP DataPointFlags.FLAG_NO_RECORDED_VALUE.
_NO_RECORDED_VALUE = 1
_MAX_RETENTION_DAYS = 65_535  # the UInt16 column
IDENTITY_HEADERS = ("tenant_id", "server_id", "received_at", "retention_days")

_INVALID_METRIC_CHARS = re.compile(r"[^a-zA-Z0-9_:]")
_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")

Labels = tuple[tuple[str, str], ...]
Headers = Sequence[tuple[str, bytes]]

LABELS_DTYPE = pl.List(pl.Struct({"key": pl.String, "value": pl.String}))
SAMPLE_SCHEMA: dict[str, pl.DataType] = {
    "tenant_id": pl.String(),
    "server_id": pl.String(),
    "metric": pl.String(),
    "labels": LABELS_DTYPE,
    "series_id": pl.UInt64(),
    "ts": pl.Int64(),
    "value": pl.Float64(),
    "received_at": pl.Int64(),
    "retention_days": pl.UInt16(),
}


class UndecodableMessage(ValueError):
    """The message can never be decoded (bad headers or payload): dead-letter it."""


@dataclass(frozen=True)
class MessageIdentity:
    """What the gateway stamped on a message."""

    tenant_id: str
    server_id: str
    received_at: int  # unix ms
    retention_days: int


def normalize_metric_name(name: str) -> str:
    """Prometheus style: characters outside `[a-zA-Z0-9_:]` (dots included) become `_`."""
    out = _INVALID_METRIC_CHARS.sub("_", name)
    return f"_{out}" if out[:1].isdigit() else out


def normalize_label_name(name: str) -> str:
    out = _INVALID_LABEL_CHARS.sub("_", name)
    return f"_{out}" if out[:1].isdigit() else out


def format_float(value: float) -> str:
    """`le`/`quantile` label values: `+Inf`, integers without a fraction, else `repr`."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def series_key(metric: str, labels: Labels) -> str:
    """`metric{k="v",…}` with labels sorted by name and values escaped as in Prometheus."""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels))
    return f"{metric}{{{body}}}"


def series_id_of(tenant_id: str, metric: str, labels: Labels) -> int:
    digest = hashlib.blake2b(f"{tenant_id}\n{series_key(metric, labels)}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _header(headers: Headers, name: str) -> str:
    for key, value in headers:
        if key == name:
            try:
                return value.decode("ascii")
            except (UnicodeDecodeError, AttributeError):
                raise UndecodableMessage(f"header {name} is not ASCII") from None
    raise UndecodableMessage(f"header {name} is missing")


def identity_from_headers(headers: Headers) -> MessageIdentity:
    raw = {name: _header(headers, name) for name in IDENTITY_HEADERS}
    try:
        tenant_id = str(uuid.UUID(raw["tenant_id"]))
        server_id = str(uuid.UUID(raw["server_id"]))
    except ValueError:
        raise UndecodableMessage("tenant_id/server_id header is not a uuid") from None
    try:
        received_at = int(raw["received_at"])
        retention_days = int(raw["retention_days"])
    except ValueError:
        raise UndecodableMessage("received_at/retention_days header is not an integer") from None
    if received_at < 0:
        raise UndecodableMessage(f"received_at {received_at} is negative")
    if not 1 <= retention_days <= _MAX_RETENTION_DAYS:
        raise UndecodableMessage(f"retention_days {retention_days} is out of range")
    return MessageIdentity(tenant_id, server_id, received_at, retention_days)


def _any_value_text(value: AnyValue) -> str:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "int_value":
        return str(value.int_value)
    if kind == "double_value":
        return repr(value.double_value)
    if kind == "bytes_value":
        return value.bytes_value.hex()
    if kind == "array_value":
        return "[" + ",".join(_any_value_text(v) for v in value.array_value.values) + "]"
    if kind == "kvlist_value":
        inner = ",".join(
            f"{kv.key}={_any_value_text(kv.value)}" for kv in value.kvlist_value.values
        )
        return "{" + inner + "}"
    return ""


def _labels(attributes: Iterable[KeyValue], base: dict[str, str]) -> dict[str, str]:
    out = dict(base)
    # Attributes that normalise to the same name are joined with ";" (as Prometheus does).
    merged: dict[str, list[str]] = {}
    for kv in sorted(attributes, key=lambda kv: kv.key):
        if kv.key in RESERVED_LABELS:
            continue
        merged.setdefault(normalize_label_name(kv.key), []).append(_any_value_text(kv.value))
    for name, values in merged.items():
        if name not in RESERVED_LABELS and name:
            out[name] = ";".join(values)
    return out


@dataclass(frozen=True)
class SeriesInfo:
    tenant_id: str
    server_id: str
    metric: str
    labels: Labels


class SampleBatchBuilder:
    """Accumulates decoded messages column-wise; `frame()` gives the samples DataFrame.

    `add` is atomic: a message that fails to decode adds nothing.
    """

    def __init__(self) -> None:
        self.series: dict[int, SeriesInfo] = {}
        self._ids: dict[tuple[str, str, Labels], int] = {}
        self._series_id: list[int] = []
        self._ts: list[int] = []
        self._value: list[float] = []
        self._received_at: list[int] = []
        self._retention: list[int] = []
        self.skipped_points = 0

    def __len__(self) -> int:
        return len(self._ts)

    def add(self, payload: bytes, headers: Headers) -> int:
        """Decode one message; returns how many samples it added."""
        ident = identity_from_headers(headers)
        try:
            request = ExportMetricsServiceRequest.FromString(payload)
        except DecodeError as exc:
            raise UndecodableMessage(f"not an OTLP ExportMetricsServiceRequest: {exc}") from None
        message = _MessageSamples(self, ident)
        for resource_metrics in request.resource_metrics:
            base = {"server_id": ident.server_id}
            for kv in resource_metrics.resource.attributes:
                if kv.key in RESOURCE_LABELS:
                    base[normalize_label_name(kv.key)] = _any_value_text(kv.value)
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    message.add_metric(metric, base)
        self._series_id.extend(message.series_id)
        self._ts.extend(message.ts)
        self._value.extend(message.value)
        n = len(message.ts)
        self._received_at.extend([ident.received_at] * n)
        self._retention.extend([ident.retention_days] * n)
        self.skipped_points += message.skipped
        return n

    def series_id(self, ident: MessageIdentity, metric: str, labels: dict[str, str]) -> int:
        key = (ident.tenant_id, metric, tuple(sorted(labels.items())))
        found = self._ids.get(key)
        if found is None:
            found = series_id_of(ident.tenant_id, metric, key[2])
            self._ids[key] = found
            self.series[found] = SeriesInfo(ident.tenant_id, ident.server_id, metric, key[2])
        return found

    def frame(self) -> pl.DataFrame:
        samples = pl.DataFrame(
            {
                "series_id": pl.Series(self._series_id, dtype=pl.UInt64),
                "ts": pl.Series(self._ts, dtype=pl.Int64),
                "value": pl.Series(self._value, dtype=pl.Float64),
                "received_at": pl.Series(self._received_at, dtype=pl.Int64),
                "retention_days": pl.Series(self._retention, dtype=pl.UInt16),
            }
        )
        infos = list(self.series.items())
        series = pl.DataFrame(
            {
                "series_id": pl.Series([sid for sid, _ in infos], dtype=pl.UInt64),
                "tenant_id": pl.Series([i.tenant_id for _, i in infos], dtype=pl.String),
                "server_id": pl.Series([i.server_id for _, i in infos], dtype=pl.String),
                "metric": pl.Series([i.metric for _, i in infos], dtype=pl.String),
                "labels": pl.Series(
                    [[{"key": k, "value": v} for k, v in i.labels] for _, i in infos],
                    dtype=LABELS_DTYPE,
                ),
            }
        )
        return samples.join(series, on="series_id", how="left").select(list(SAMPLE_SCHEMA))


class _MessageSamples:
    """The samples of one message, staged so that a decode error adds nothing."""

    def __init__(self, builder: SampleBatchBuilder, ident: MessageIdentity) -> None:
        self.builder = builder
        self.ident = ident
        self.series_id: list[int] = []
        self.ts: list[int] = []
        self.value: list[float] = []
        self.skipped = 0

    def _emit(self, metric: str, labels: dict[str, str], ts: int, value: float) -> None:
        if not math.isfinite(value):
            self.skipped += 1
            return
        self.series_id.append(self.builder.series_id(self.ident, metric, labels))
        self.ts.append(ts)
        self.value.append(value)

    def _ts(self, time_unix_nano: int) -> int:
        return time_unix_nano // 1_000_000 if time_unix_nano else self.ident.received_at

    def add_metric(self, metric: Metric, base: dict[str, str]) -> None:
        name = normalize_metric_name(metric.name)
        kind = metric.WhichOneof("data")
        if not name or kind is None:
            self.skipped += 1
            return
        if kind in ("gauge", "sum"):
            points = metric.gauge.data_points if kind == "gauge" else metric.sum.data_points
            for p in points:
                which = p.WhichOneof("value")
                if p.flags & _NO_RECORDED_VALUE or which is None:
                    self.skipped += 1
                    continue
                value = p.as_double if which == "as_double" else float(p.as_int)
                self._emit(name, _labels(p.attributes, base), self._ts(p.time_unix_nano), value)
        elif kind == "histogram":
            for h in metric.histogram.data_points:
                if h.flags & _NO_RECORDED_VALUE:
                    self.skipped += 1
                    continue
                labels = _labels(h.attributes, base)
                ts = self._ts(h.time_unix_nano)
                cumulative = 0
                for bound, count in zip(h.explicit_bounds, h.bucket_counts, strict=False):
                    cumulative += count
                    le = {**labels, "le": format_float(bound)}
                    self._emit(f"{name}_bucket", le, ts, float(cumulative))
                self._emit(f"{name}_bucket", {**labels, "le": "+Inf"}, ts, float(h.count))
                if h.HasField("sum"):
                    self._emit(f"{name}_sum", labels, ts, h.sum)
                self._emit(f"{name}_count", labels, ts, float(h.count))
        elif kind == "exponential_histogram":
            for e in metric.exponential_histogram.data_points:
                if e.flags & _NO_RECORDED_VALUE:
                    self.skipped += 1
                    continue
                labels = _labels(e.attributes, base)
                ts = self._ts(e.time_unix_nano)
                if e.HasField("sum"):
                    self._emit(f"{name}_sum", labels, ts, e.sum)
                self._emit(f"{name}_count", labels, ts, float(e.count))
        elif kind == "summary":
            for s in metric.summary.data_points:
                if s.flags & _NO_RECORDED_VALUE:
                    self.skipped += 1
                    continue
                labels = _labels(s.attributes, base)
                ts = self._ts(s.time_unix_nano)
                for q in s.quantile_values:
                    quantile = {**labels, "quantile": format_float(q.quantile)}
                    self._emit(name, quantile, ts, q.value)
                self._emit(f"{name}_sum", labels, ts, s.sum)
                self._emit(f"{name}_count", labels, ts, float(s.count))
        else:
            self.skipped += 1


def decode(payload: bytes, headers: Headers) -> pl.DataFrame:
    """One message's samples: columns of `SAMPLE_SCHEMA` (ts and received_at in unix ms)."""
    builder = SampleBatchBuilder()
    builder.add(payload, headers)
    return builder.frame()
