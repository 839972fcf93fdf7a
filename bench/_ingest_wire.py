"""The ingest benchmark's load: one series model, hand-encoded as OTLP and as remote write.

Every agent owns `series // agents` series spread over `metrics` metrics (half gauges,
half cumulative monotonic counters), each point told apart by a `site` and a `zone`
attribute, plus one `bench.marker` series for latency markers. A round is one sample of
each of the agent's series, cut into requests of at most `batch` points, all stamped
with the round's timestamp.

Requests are pre-encoded once into templates: static byte segments with fixed-width
holes for the timestamps and values (OTLP `fixed64`/`double`; remote write `double` and
a 6-byte varint, the width of every millisecond timestamp from 1972 to 2109). Rendering a
round is a `bytes.join`, so the load generators cost little CPU, and both protocols carry
exactly the same samples: the same series (labels as YakPanel stores them), timestamps
and values.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator
from dataclasses import dataclass

MARKER_METRIC = "bench.marker"
MARKER_ID_BASE = 1_000_000  # marker id = agent * MARKER_ID_BASE + sequence
SERVICE_NAME = "bench-node"
_TS_VARINT_BYTES = 6


# --- protobuf wire format ---------------------------------------------------------------


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


@dataclass(frozen=True)
class Hole:
    """A fixed-width gap: the round's timestamp, or value number `index`."""

    kind: str  # "ts" or "value"
    size: int
    index: int = 0


Piece = bytes | Hole


def _size(pieces: list[Piece]) -> int:
    return sum(p.size if isinstance(p, Hole) else len(p) for p in pieces)


def field_bytes(field: int, data: bytes) -> list[Piece]:
    return [_tag(field, 2) + varint(len(data)) + data]


def field_message(field: int, body: list[Piece]) -> list[Piece]:
    return [_tag(field, 2) + varint(_size(body)), *body]


def field_string(field: int, text: str) -> list[Piece]:
    return field_bytes(field, text.encode())


def field_varint(field: int, value: int) -> list[Piece]:
    return [_tag(field, 0) + varint(value)]


def field_fixed64(field: int, value: int) -> list[Piece]:
    return [_tag(field, 1) + struct.pack("<Q", value)]


class Template:
    """Static segments with holes; `render` fills them.

    The holes of each kind must sit at evenly spaced positions (true of every template
    this module builds), so filling is two slice assignments.
    """

    def __init__(self, pieces: list[Piece]) -> None:
        parts: list[bytes] = []
        ts_positions: list[int] = []
        value_positions: list[tuple[int, int]] = []
        pending = b""
        for piece in pieces:
            if isinstance(piece, Hole):
                parts.append(pending)
                pending = b""
                position = len(parts)
                parts.append(b"\0" * piece.size)
                if piece.kind == "ts":
                    ts_positions.append(position)
                else:
                    value_positions.append((piece.index, position))
            else:
                pending += piece
        parts.append(pending)
        value_positions.sort()
        if [i for i, _ in value_positions] != list(range(len(value_positions))):
            raise ValueError("value holes must be numbered 0..n-1")
        self.parts = parts
        self.points = len(value_positions)
        self.size = sum(len(p) for p in parts)
        self._ts = _progression(ts_positions)
        self._values = _progression([p for _, p in value_positions])

    def render(self, ts: bytes, values: bytes) -> bytes:
        """`ts`: the timestamp hole's bytes; `values`: 8 bytes (little-endian double) each."""
        parts = self.parts.copy()
        start, step, count = self._ts
        if count:
            parts[start : start + step * count : step] = [ts] * count
        start, step, count = self._values
        if count:
            parts[start : start + step * count : step] = [
                values[k : k + 8] for k in range(0, 8 * count, 8)
            ]
        return b"".join(parts)


def _progression(positions: list[int]) -> tuple[int, int, int]:
    if not positions:
        return 0, 1, 0
    step = positions[1] - positions[0] if len(positions) > 1 else 1
    if any(b - a != step for a, b in itertools.pairwise(positions)) or step < 1:
        raise ValueError("holes are not evenly spaced")
    return positions[0], step, len(positions)


# --- the series model -------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    metric: int  # index into the agent's metrics
    site: int


@dataclass(frozen=True)
class SeriesModel:
    agents: int
    series: int  # over all agents, markers excluded
    metrics: int
    batch: int

    def __post_init__(self) -> None:
        if self.agents < 1 or self.series < self.agents or self.metrics < 1 or self.batch < 1:
            raise ValueError("need agents >= 1, series >= agents, metrics >= 1, batch >= 1")

    def series_of(self, agent: int) -> int:
        base, extra = divmod(self.series, self.agents)
        return base + (1 if agent < extra else 0)

    @staticmethod
    def metric_name(metric: int) -> str:
        """OTLP name; gauges on even indexes, counters on odd ones."""
        kind = "gauge" if metric % 2 == 0 else "counter"
        return f"bench.{kind}.m{metric:02d}"

    @staticmethod
    def prom_name(otlp_name: str) -> str:
        return otlp_name.replace(".", "_")

    @staticmethod
    def is_counter(metric: int) -> bool:
        return metric % 2 == 1

    def points(self, agent: int) -> list[Point]:
        n = self.series_of(agent)
        return [Point(i % self.metrics, i // self.metrics) for i in range(n)]

    def chunks(self, agent: int) -> list[list[Point]]:
        """The agent's points in request-sized chunks, grouped by metric inside each."""
        points = sorted(self.points(agent), key=lambda p: (p.metric, p.site))
        return [points[i : i + self.batch] for i in range(0, len(points), self.batch)]

    @staticmethod
    def attributes(point: Point) -> list[tuple[str, str]]:
        return [("site", f"site-{point.site:05d}"), ("zone", f"z{point.site % 4}")]

    @staticmethod
    def host(agent: int) -> str:
        return f"bench-{agent:04d}"


class Values:
    """Per-round sample values of one chunk: gauges wander, counters grow."""

    def __init__(self, agent: int, chunk: list[Point]) -> None:
        self.base = [float((agent * 7919 + p.site * 31 + p.metric * 17) % 1000) for p in chunk]
        self.slope = [
            float(1 + (p.site % 5)) if SeriesModel.is_counter(p.metric) else 0.0 for p in chunk
        ]
        self.wander = [0.0 if SeriesModel.is_counter(p.metric) else 0.25 for p in chunk]
        self.sites = [p.site for p in chunk]
        self._pack = struct.Struct(f"<{len(chunk)}d").pack

    def at(self, round_: int) -> bytes:
        r = float(round_)
        wobble = [((round_ * 7 + s) % 20) for s in self.sites]
        return self._pack(
            *[
                b + s * r + w * k
                for b, s, w, k in zip(self.base, self.slope, self.wander, wobble, strict=True)
            ]
        )


# --- OTLP (ExportMetricsServiceRequest) --------------------------------------------------


def _kv(field: int, key: str, value: str) -> list[Piece]:
    # KeyValue{key=1, value=2: AnyValue{string_value=1}}
    return field_message(field, [*field_string(1, key), *field_message(2, field_string(1, value))])


def _resource(agent: int, server_id: str) -> list[Piece]:
    attributes = [
        ("host.name", SeriesModel.host(agent)),
        ("service.name", SERVICE_NAME),
    ]
    body: list[Piece] = []
    for key, value in attributes:
        body += _kv(1, key, value)
    return field_message(1, body)  # ResourceMetrics.resource


def _number_point(
    attributes: list[tuple[str, str]], start_ns: int | None, index: int
) -> list[Piece]:
    # NumberDataPoint{attributes=7, start_time_unix_nano=2, time_unix_nano=3, as_double=4}
    body: list[Piece] = []
    for key, value in attributes:
        body += _kv(7, key, value)
    if start_ns is not None:
        body += field_fixed64(2, start_ns)
    body += [_tag(3, 1), Hole("ts", 8), _tag(4, 1), Hole("value", 8, index)]
    return field_message(1, body)  # Gauge/Sum.data_points


def _otlp_metric(name: str, counter: bool, points: list[list[Piece]], start_ns: int) -> list[Piece]:
    data: list[Piece] = [piece for point in points for piece in point]
    if counter:
        # Sum{data_points=1, aggregation_temporality=2 (CUMULATIVE), is_monotonic=3}
        data += field_varint(2, 2) + field_varint(3, 1)
        return field_message(2, [*field_string(1, name), *field_message(7, data)])
    return field_message(2, [*field_string(1, name), *field_message(5, data)])  # gauge=5


def otlp_template(
    model: SeriesModel, agent: int, server_id: str, chunk: list[Point], start_ns: int
) -> Template:
    """One ResourceMetrics (= a whole ExportMetricsServiceRequest: the top level is just the
    repeated field, so a marker's ResourceMetrics can be appended to it)."""
    metrics: list[Piece] = []
    index = 0
    by_metric: dict[int, list[Point]] = {}
    for p in chunk:
        by_metric.setdefault(p.metric, []).append(p)
    for metric, points in by_metric.items():
        counter = model.is_counter(metric)
        encoded = []
        for p in points:
            encoded.append(_number_point(model.attributes(p), start_ns if counter else None, index))
            index += 1
        metrics += _otlp_metric(model.metric_name(metric), counter, encoded, start_ns)
    scope = field_message(2, [*field_message(1, field_string(1, "bench")), *metrics])
    return Template(field_message(1, [*_resource(agent, server_id), *scope]))


def otlp_marker_template(agent: int, server_id: str) -> Template:
    point = _number_point([("agent", str(agent))], None, 0)
    metric = _otlp_metric(MARKER_METRIC, False, [point], 0)
    scope = field_message(2, [*field_message(1, field_string(1, "bench")), *metric])
    return Template(field_message(1, [*_resource(agent, server_id), *scope]))


def otlp_ts(ts_ms: int) -> bytes:
    return struct.pack("<Q", ts_ms * 1_000_000)


# --- Prometheus remote write (WriteRequest) ----------------------------------------------


def _prom_labels(
    model: SeriesModel, agent: int, server_id: str, name: str, attributes: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The labels YakPanel's aggregator derives for the same OTLP point (docs/metrics.md)."""
    labels = {
        "__name__": model.prom_name(name),
        "host_name": model.host(agent),
        "service_name": SERVICE_NAME,
        "server_id": server_id,
        **dict(attributes),
    }
    return sorted(labels.items())


def _timeseries(labels: list[tuple[str, str]], index: int) -> list[Piece]:
    # TimeSeries{labels=1: Label{name=1, value=2}, samples=2: Sample{value=1, timestamp=2}}
    body: list[Piece] = []
    for name, value in labels:
        body += field_message(1, [*field_string(1, name), *field_string(2, value)])
    sample: list[Piece] = [
        _tag(1, 1),
        Hole("value", 8, index),
        _tag(2, 0),
        Hole("ts", _TS_VARINT_BYTES),
    ]
    body += field_message(2, sample)
    return field_message(1, body)  # WriteRequest.timeseries


def remote_write_template(
    model: SeriesModel, agent: int, server_id: str, chunk: list[Point]
) -> Template:
    pieces: list[Piece] = []
    for index, p in enumerate(chunk):
        labels = _prom_labels(
            model, agent, server_id, model.metric_name(p.metric), model.attributes(p)
        )
        pieces += _timeseries(labels, index)
    return Template(pieces)


def remote_write_marker_template(model: SeriesModel, agent: int, server_id: str) -> Template:
    labels = _prom_labels(model, agent, server_id, MARKER_METRIC, [("agent", str(agent))])
    return Template(_timeseries(labels, 0))


def remote_write_ts(ts_ms: int) -> bytes:
    encoded = varint(ts_ms)
    if len(encoded) != _TS_VARINT_BYTES:
        raise ValueError(f"timestamp {ts_ms} is not a {_TS_VARINT_BYTES}-byte varint")
    return encoded


# --- an agent's requests -------------------------------------------------------------------


class AgentLoad:
    """The requests one agent sends, round after round, in one protocol."""

    def __init__(
        self, model: SeriesModel, agent: int, server_id: str, protocol: str, start_ns: int
    ) -> None:
        self.agent = agent
        chunks = model.chunks(agent)
        if protocol == "otlp":
            self.templates = [otlp_template(model, agent, server_id, c, start_ns) for c in chunks]
            self.marker = otlp_marker_template(agent, server_id)
            self._ts = otlp_ts
        elif protocol == "remote_write":
            self.templates = [remote_write_template(model, agent, server_id, c) for c in chunks]
            self.marker = remote_write_marker_template(model, agent, server_id)
            self._ts = remote_write_ts
        else:
            raise ValueError(f"unknown protocol {protocol}")
        self.values = [Values(agent, c) for c in chunks]
        self.series = sum(t.points for t in self.templates)
        self._marker_seq = 0

    def round(self, round_: int, ts_ms: int) -> Iterator[tuple[bytes, int]]:
        """(body, points) for each request of the round."""
        ts = self._ts(ts_ms)
        for template, values in zip(self.templates, self.values, strict=True):
            yield template.render(ts, values.at(round_)), template.points

    def with_marker(self, body: bytes, ts_ms: int) -> tuple[bytes, int]:
        """The body with one marker sample appended; (body, marker id)."""
        self._marker_seq += 1
        marker_id = self.agent * MARKER_ID_BASE + self._marker_seq
        value = struct.pack("<d", float(marker_id))
        return body + self.marker.render(self._ts(ts_ms), value), marker_id
