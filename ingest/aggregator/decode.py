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

Speed: agents send the same series round after round, so the series ids of a gauge or sum
are cached per (tenant, server, resource labels, metric, exact attribute bytes of its
points), and when every point has the plain shape (a timestamp, one value, no flags) the
timestamps and values are read with one `struct` call instead of point by point. Both
are shortcuts to the same result; anything else takes the point-by-point path.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
import uuid
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl
import pyarrow as pa  # type: ignore[import-untyped]
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
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


# --- fast path: lite views of gauge/sum data points ------------------------------------
#
# `PointsAttributes` and `PointsValues` read the bytes of a Gauge or Sum (data points are
# field 1 of both) keeping only the attributes (as raw bytes), or only time, value and
# flags, of each NumberDataPoint. With unknown fields discarded they serialise canonically.
# `RawRequest` reads a whole request keeping each metric's gauge or sum as the bytes it
# arrived as (the full parse validates the request; this only spares re-encoding them).


def _lite_types() -> tuple[Any, Any, Any]:
    name = "yakpanel/ingest/aggregator/lite.proto"
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(name)
    except KeyError:
        f = descriptor_pb2.FileDescriptorProto(
            name=name,
            package="yakpanel.ingest.lite",
            syntax="proto3",
        )
        repeated, optional = 3, 1
        m = f.message_type.add(name="PointAttributes")
        # Attributes as raw KeyValue bytes: a cache key, never decoded.
        m.field.add(
            name="attributes",
            number=7,
            label=repeated,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
        )
        m = f.message_type.add(name="PointsAttributes")
        m.field.add(
            name="data_points",
            number=1,
            label=repeated,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
            type_name=".yakpanel.ingest.lite.PointAttributes",
        )
        m = f.message_type.add(name="PointValue")
        m.oneof_decl.add(name="value")
        m.field.add(
            name="time_unix_nano",
            number=3,
            label=optional,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_FIXED64,
        )
        m.field.add(
            name="as_double",
            number=4,
            label=optional,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
            oneof_index=0,
        )
        m.field.add(
            name="as_int",
            number=6,
            label=optional,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_SFIXED64,
            oneof_index=0,
        )
        m.field.add(
            name="flags",
            number=8,
            label=optional,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_UINT32,
        )
        # A request whose gauges and sums stay raw bytes (names decoded for nothing else).
        m = f.message_type.add(name="RawMetric")
        for field_name, number in (("gauge", 5), ("sum", 7)):
            m.field.add(
                name=field_name,
                number=number,
                label=optional,
                type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
            )
        m = f.message_type.add(name="RawScopeMetrics")
        m.field.add(
            name="metrics",
            number=2,
            label=repeated,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
            type_name=".yakpanel.ingest.lite.RawMetric",
        )
        m = f.message_type.add(name="RawResourceMetrics")
        m.field.add(
            name="scope_metrics",
            number=2,
            label=repeated,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
            type_name=".yakpanel.ingest.lite.RawScopeMetrics",
        )
        m = f.message_type.add(name="RawRequest")
        m.field.add(
            name="resource_metrics",
            number=1,
            label=repeated,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
            type_name=".yakpanel.ingest.lite.RawResourceMetrics",
        )
        m = f.message_type.add(name="PointsValues")
        m.field.add(
            name="data_points",
            number=1,
            label=repeated,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
            type_name=".yakpanel.ingest.lite.PointValue",
        )
        pool.Add(f)
    return (
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("yakpanel.ingest.lite.PointsAttributes")
        ),
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("yakpanel.ingest.lite.PointsValues")
        ),
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("yakpanel.ingest.lite.RawRequest")
        ),
    )


_PointsAttributes, _PointsValues, _RawRequest = _lite_types()

# A plain point in `PointsValues` bytes: data_points tag, length 18, time tag, 8 bytes,
# value tag (as_double 0x21 or as_int 0x31), 8 bytes.
_PLAIN_POINT = 20
_AS_DOUBLE, _AS_INT = 0x21, 0x31
_unpackers: dict[tuple[int, int], struct.Struct] = {}


def _plain_points(values_bytes: bytes, n: int) -> tuple[Sequence[int], Sequence[float]] | None:
    """(time_unix_nano of each point, value of each point) when every point is plain."""
    if len(values_bytes) != _PLAIN_POINT * n:
        return None
    tag = values_bytes[11]
    if (
        values_bytes[0::_PLAIN_POINT] != b"\x0a" * n
        or values_bytes[1::_PLAIN_POINT] != b"\x12" * n
        or values_bytes[2::_PLAIN_POINT] != b"\x19" * n
        or values_bytes[11::_PLAIN_POINT] != bytes([tag]) * n
        or tag not in (_AS_DOUBLE, _AS_INT)
    ):
        return None
    unpack = _unpackers.get((tag, n))
    if unpack is None:
        if len(_unpackers) > 4096:
            _unpackers.clear()
        one = "3xQxd" if tag == _AS_DOUBLE else "3xQxq"
        unpack = _unpackers[(tag, n)] = struct.Struct("<" + one * n)
    fields = unpack.unpack(values_bytes)
    return fields[0::2], fields[1::2]


class _SeriesGroup:
    """The series ids of one metric's points, in point order, and their descriptions."""

    __slots__ = ("_frame", "ids", "infos")

    def __init__(self, ids: bytes, infos: dict[int, SeriesInfo]) -> None:
        self.ids = ids  # array("Q") bytes, one id per point
        self.infos = infos
        self._frame: pl.DataFrame | None = None

    def frame(self) -> pl.DataFrame:
        if self._frame is None:
            self._frame = _series_frame(self.infos)
        return self._frame


GroupKey = tuple[str, str, Labels, str, bytes]


class _GroupCache:
    """Series groups seen recently (bounded by the points they cover)."""

    def __init__(self, max_points: int = 4_000_000) -> None:
        self.max_points = max_points
        self._groups: dict[GroupKey, _SeriesGroup] = {}
        self._points = 0

    def get(self, key: GroupKey) -> _SeriesGroup | None:
        return self._groups.get(key)

    def put(self, key: GroupKey, group: _SeriesGroup) -> None:
        points = len(group.ids) // 8
        if self._points + points > self.max_points:
            self._groups.clear()
            self._points = 0
        self._groups[key] = group
        self._points += points


_GROUPS = _GroupCache()


def _series_frame(infos: dict[int, SeriesInfo]) -> pl.DataFrame:
    items = list(infos.items())
    # Labels go in flat (keys, values, offsets): building List(Struct) from Python dicts
    # costs tens of microseconds a series.
    offsets = [0]
    keys: list[str] = []
    values: list[str] = []
    for _, info in items:
        for k, v in info.labels:
            keys.append(k)
            values.append(v)
        offsets.append(len(keys))
    pairs = pa.StructArray.from_arrays(
        [pa.array(keys, pa.large_string()), pa.array(values, pa.large_string())],
        names=["key", "value"],
    )
    labels = pl.from_arrow(pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pairs))
    assert isinstance(labels, pl.Series)
    return pl.DataFrame(
        {
            "series_id": pl.Series([sid for sid, _ in items], dtype=pl.UInt64),
            "tenant_id": pl.Series([i.tenant_id for _, i in items], dtype=pl.String),
            "server_id": pl.Series([i.server_id for _, i in items], dtype=pl.String),
            "metric": pl.Series([i.metric for _, i in items], dtype=pl.String),
            "labels": labels.cast(LABELS_DTYPE),
        }
    )


def _column(chunks: list[bytes], dtype: pa.DataType, n: int) -> pl.Series:
    buffer = pa.py_buffer(b"".join(chunks))
    array_ = pa.Array.from_buffers(dtype, n, [None, buffer])
    series = pl.from_arrow(array_)
    assert isinstance(series, pl.Series)
    return series


@dataclass
class _Chunk:
    """Samples of one metric (or a run of slow-path samples): ids, times (ns), values."""

    ids: bytes
    ts_ns: bytes
    values: bytes
    rows: int


class SampleBatchBuilder:
    """Accumulates decoded messages column-wise; `frame()` gives the samples DataFrame.

    `add` is atomic: a message that fails to decode adds nothing.
    """

    def __init__(self) -> None:
        # Series decoded point by point in this batch (the cached groups hold the others).
        self.series: dict[int, SeriesInfo] = {}
        self._ids: dict[tuple[str, str, Labels], int] = {}
        self._groups: dict[int, _SeriesGroup] = {}
        self._ids_chunks: list[bytes] = []
        self._ts_chunks: list[bytes] = []
        self._value_chunks: list[bytes] = []
        self._message_rows: list[int] = []
        self._message_meta: list[MessageIdentity] = []
        self._rows = 0
        self.skipped_points = 0

    def __len__(self) -> int:
        return self._rows

    def add(self, payload: bytes, headers: Headers) -> int:
        """Decode one message; returns how many samples it added."""
        ident = identity_from_headers(headers)
        try:
            request = ExportMetricsServiceRequest.FromString(payload)
        except DecodeError as exc:
            raise UndecodableMessage(f"not an OTLP ExportMetricsServiceRequest: {exc}") from None
        raw_request = _RawRequest.FromString(payload)  # the same structure, element by element
        message = _MessageSamples(self, ident)
        for resource_metrics, raw_resource_metrics in zip(
            request.resource_metrics, raw_request.resource_metrics, strict=True
        ):
            base = {"server_id": ident.server_id}
            for kv in resource_metrics.resource.attributes:
                if kv.key in RESOURCE_LABELS:
                    base[normalize_label_name(kv.key)] = _any_value_text(kv.value)
            base_key = tuple(sorted(base.items()))
            for scope_metrics, raw_scope_metrics in zip(
                resource_metrics.scope_metrics, raw_resource_metrics.scope_metrics, strict=True
            ):
                for metric, raw_metric in zip(
                    scope_metrics.metrics, raw_scope_metrics.metrics, strict=True
                ):
                    message.add_metric(metric, base, base_key, raw_metric)
        message.flush()
        n = 0
        for chunk in message.chunks:
            self._ids_chunks.append(chunk.ids)
            self._ts_chunks.append(chunk.ts_ns)
            self._value_chunks.append(chunk.values)
            n += chunk.rows
        for group in message.groups:
            self._groups[id(group)] = group
        if n:
            self._message_rows.append(n)
            self._message_meta.append(ident)
        self._rows += n
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

    def samples(self) -> pl.DataFrame:
        """The samples without their series description: tenant_id, series_id, ts, value,
        received_at, retention_days (`frame()` without server_id, metric and labels)."""
        n = self._rows
        index = b"".join(struct.pack("<I", i) * rows for i, rows in enumerate(self._message_rows))
        message = _column([index], pa.uint32(), n)
        meta = self._message_meta
        tenants = pl.Series([m.tenant_id for m in meta], dtype=pl.String)
        received = pl.Series([m.received_at for m in meta], dtype=pl.Int64)
        retention = pl.Series([m.retention_days for m in meta], dtype=pl.UInt16)
        ts_ns = _column(self._ts_chunks, pa.uint64(), n)
        return pl.DataFrame(
            {
                "tenant_id": tenants.gather(message),
                "series_id": _column(self._ids_chunks, pa.uint64(), n),
                "ts": (ts_ns // 1_000_000).cast(pl.Int64),
                "value": _column(self._value_chunks, pa.float64(), n),
                "received_at": received.gather(message),
                "retention_days": retention.gather(message),
            }
        )

    def series_frame(self) -> pl.DataFrame:
        """One row per series of the batch: series_id, tenant_id, server_id, metric, labels."""
        frames = [group.frame() for group in self._groups.values()]
        if self.series or not frames:
            frames.append(_series_frame(self.series))
        return pl.concat(frames).unique(subset="series_id", keep="first", maintain_order=True)

    def frame(self) -> pl.DataFrame:
        series = self.series_frame().drop("tenant_id")
        return (
            self.samples()
            .join(series, on="series_id", how="left", maintain_order="left")
            .select(list(SAMPLE_SCHEMA))
        )


class _MessageSamples:
    """The samples of one message, staged so that a decode error adds nothing."""

    def __init__(self, builder: SampleBatchBuilder, ident: MessageIdentity) -> None:
        self.builder = builder
        self.ident = ident
        self.chunks: list[_Chunk] = []
        self.groups: list[_SeriesGroup] = []
        # Point-by-point samples not yet in a chunk.
        self.series_id: list[int] = []
        self.ts: list[int] = []
        self.value: list[float] = []
        self.skipped = 0

    def flush(self) -> None:
        if self.ts:
            n = len(self.ts)
            self.chunks.append(
                _Chunk(
                    array("Q", self.series_id).tobytes(),
                    array("Q", [t * 1_000_000 for t in self.ts]).tobytes(),
                    array("d", self.value).tobytes(),
                    n,
                )
            )
            self.series_id, self.ts, self.value = [], [], []

    def _plain(
        self, name: str, data: Any, base: dict[str, str], base_key: Labels, raw: bytes | None
    ) -> bool:
        """A gauge's or sum's samples the fast way; False when its points are not plain.
        `raw`: the bytes the gauge or sum arrived as, if known."""
        if raw is None:
            raw = data.SerializeToString()
        values = _PointsValues.FromString(raw)
        n = len(values.data_points)
        if n != len(data.data_points):
            # The field came more than once (the parser merged them): re-encode it.
            raw = data.SerializeToString()
            values = _PointsValues.FromString(raw)
            n = len(values.data_points)
        if n == 0:
            return True
        values.DiscardUnknownFields()
        plain = _plain_points(values.SerializeToString(), n)
        if plain is None:
            return False
        ts_ns, points = plain
        total = sum(points)
        if total - total != 0:  # a NaN or an infinity: skipped point by point
            return False
        attributes = _PointsAttributes.FromString(raw)
        attributes.DiscardUnknownFields()
        ident = self.ident
        key = (ident.tenant_id, ident.server_id, base_key, name, attributes.SerializeToString())
        group = _GROUPS.get(key)
        if group is None:
            ids = array("Q")
            infos: dict[int, SeriesInfo] = {}
            for p in data.data_points:
                labels = _labels(p.attributes, base)
                sid = self.builder.series_id(ident, name, labels)
                ids.append(sid)
                infos[sid] = self.builder.series[sid]
            group = _SeriesGroup(ids.tobytes(), infos)
            _GROUPS.put(key, group)
        self.flush()
        self.chunks.append(
            _Chunk(group.ids, array("Q", ts_ns).tobytes(), array("d", points).tobytes(), n)
        )
        self.groups.append(group)
        return True

    def _emit(self, metric: str, labels: dict[str, str], ts: int, value: float) -> None:
        if not math.isfinite(value):
            self.skipped += 1
            return
        self.series_id.append(self.builder.series_id(self.ident, metric, labels))
        self.ts.append(ts)
        self.value.append(value)

    def _ts(self, time_unix_nano: int) -> int:
        return time_unix_nano // 1_000_000 if time_unix_nano else self.ident.received_at

    def add_metric(
        self, metric: Metric, base: dict[str, str], base_key: Labels, raw_metric: Any = None
    ) -> None:
        name = normalize_metric_name(metric.name)
        kind = metric.WhichOneof("data")
        if not name or kind is None:
            self.skipped += 1
            return
        if kind in ("gauge", "sum"):
            data = metric.gauge if kind == "gauge" else metric.sum
            raw: bytes | None = None
            if raw_metric is not None:
                # Both fields set on the wire: the parser kept the last; so must we.
                gauge, sum_ = raw_metric.gauge, raw_metric.sum
                if kind == "gauge" and not sum_:
                    raw = gauge
                elif kind == "sum" and not gauge:
                    raw = sum_
            if self._plain(name, data, base, base_key, raw):
                return
            points = data.data_points
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
