"""Server-side SVG charts: scaling, gaps, escaping, and the rates they draw."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from dashboards import charts, formatting
from dashboards.charts import LOAD, PERCENT, ChartLine, line_chart, nice_ceiling, segments
from ingest.query.fleet import _Bucket, counter_rates

# The default frame: x from 64 to 708 (644 wide), y from 164 (zero) up to 12 (152 high).


def paths(svg: str) -> list[str]:
    return re.findall(r'<path class="line" d="([^"]*)"', svg)


def test_points_are_scaled_onto_the_frame() -> None:
    line = ChartLine("cpu", [(0, 0.0), (10, 50.0), (20, 100.0)])
    svg = line_chart("cpu", "CPU busy %", [line], start=0, end=30, step=10, scale=PERCENT)
    assert paths(svg) == ["M64.0,164.0 L278.7,88.0 L493.3,12.0"]
    # Percent axis: 0 to 100 in quarters, whatever the data.
    y_axis = re.search(r'<g class="axis axis-y">(.*?)</g>', svg)
    assert y_axis is not None
    ticks = re.findall(r'<text class="tick"[^>]*>([^<]*)</text>', y_axis.group(1))
    assert ticks == ["0 %", "25 %", "50 %", "75 %", "100 %"]
    # Values beyond the axis are drawn at its edge, not outside the frame.
    clipped = line_chart("c", "t", [ChartLine("x", [(0, -5.0), (10, 250.0)])], 0, 20, 10, PERCENT)
    assert paths(clipped) == ["M64.0,164.0 L386.0,12.0"]


def test_the_axis_top_is_a_round_number_above_the_largest_value() -> None:
    assert [nice_ceiling(v) for v in (0.0, 0.3, 1.0, 1.2, 3.2, 7.0, 2100.0)] == [
        1.0,
        0.5,
        1.0,
        2.0,
        5.0,
        10.0,
        2500.0,
    ]
    svg = line_chart("load", "Load", [ChartLine("load", [(0, 3.2), (60, 2.5)])], 0, 120, 60, LOAD)
    assert paths(svg) == ["M64.0,66.7 L386.0,88.0"]  # top 5.00: 2.5 is half-way
    assert ">5.00</text>" in svg and ">1.25</text>" in svg
    # No data at all: an empty chart with an axis, and no line.
    empty = line_chart("n", "Network", [ChartLine("rx", [(0, None), (10, None)])], 0, 20, 10, LOAD)
    assert paths(empty) == [] and "<circle" not in empty
    assert "rx: no data" in empty and "no data in this period" in empty


def test_missing_buckets_and_none_values_break_the_line() -> None:
    points: list[tuple[int, float | None]] = [
        (0, 10.0),
        (10, 20.0),
        (20, None),  # no value for this step
        (30, 30.0),
        (40, 40.0),
        # 50 and 60 missing altogether
        (70, 50.0),
        (80, 60.0),
        (90, None),
        (100, 70.0),  # a lone point
    ]
    assert segments(points, 10) == [
        [(0, 10.0), (10, 20.0)],
        [(30, 30.0), (40, 40.0)],
        [(70, 50.0), (80, 60.0)],
        [(100, 70.0)],
    ]
    svg = line_chart("g", "Gaps", [ChartLine("v", points)], 0, 110, 10, PERCENT)
    (d,) = paths(svg)
    assert d.count("M") == 3 and d.count("L") == 3
    # The lone point is a dot with its value, not a segment to nowhere.
    assert re.search(r'<circle class="dot" cx="649.5" cy="57.6" r="2"><title>v: 70 %', svg)
    # Order of input does not matter.
    assert segments(list(reversed(points)), 10) == segments(points, 10)


def test_text_is_escaped_and_the_markup_is_well_formed() -> None:
    evil = '<script>alert("x")</script> & co'
    svg = line_chart(
        'cpu" onload="x',
        f"Title {evil}",
        [ChartLine(evil, [(0, 1.0), (10, 2.0)]), ChartLine("other", [(0, None), (10, 3.0)])],
        0,
        20,
        10,
        PERCENT,
        period=evil,
    )
    assert "<script>" not in svg and 'onload="' not in svg
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; co" in svg
    # It parses as XML: every attribute and text was escaped (our own output, not untrusted).
    root = ET.fromstring(str(svg))  # noqa: S314
    assert root.get("id") == "cpu-onload-x"
    svg_el = root.find("svg")
    assert svg_el is not None
    assert svg_el.get("role") == "img"
    assert svg_el.get("aria-labelledby") == "cpu-onload-x-title cpu-onload-x-desc"
    title = svg_el.find("title")
    assert title is not None and title.text == f"Title {evil}"
    series = svg_el.findall(".//g[@data-label]")
    assert [g.get("data-label") for g in series] == [evil, "other"]


def test_the_accessible_parts_carry_the_values() -> None:
    line = ChartLine("CPU busy", [(0, 20.0), (10, None), (20, 73.0)])
    svg = line_chart("cpu", "CPU busy %", [line], 0, 30, 10, PERCENT, period="last hour")
    desc = re.search(r"<desc[^>]*>(.*?)</desc>", svg)
    assert desc is not None
    assert desc.group(1) == "last hour. CPU busy: latest 73 %, min 20 %, max 73 %"
    rows = re.findall(r'<tr><th scope="row">([^<]+)</th><td>([^<]+)</td></tr>', svg)
    assert rows == [("00:00:00", "20 %"), ("00:00:20", "73 %")]
    assert '<th scope="col">time (UTC)</th><th scope="col">CPU busy</th>' in svg
    assert ">time (UTC)</text>" in svg and ">%</text>" in svg  # axis labels
    # Long windows label the time axis with the date.
    day = line_chart("d", "Day", [line], 0, 86_400, 240, PERCENT)
    assert ">01-01 00:00</text>" in day


def test_byte_rates_read_in_binary_units() -> None:
    scale = charts.BYTES_PER_SECOND
    assert [scale.format(v) for v in (0.0, 1023.0, 2048.0, 5.5 * 2**20)] == [
        "0 B/s",
        "1023 B/s",
        "2.0 KiB/s",
        "5.5 MiB/s",
    ]
    assert formatting.percent(0.734) == "73 %" and formatting.percent(None) == "—"
    assert [formatting.duration(s) for s in (5, 125, 7300, 200_000)] == [
        "5 s",
        "2 min",
        "2 h",
        "2 d",
    ]


def test_counter_rates_handle_resets_and_gaps() -> None:
    def b(last_ms: int, value: float) -> _Bucket:
        return _Bucket(sum=value, count=1, last_ms=last_ms, last_value=value)

    buckets = {
        0: b(9_000, 1_000.0),
        10: b(19_000, 3_000.0),  # +2000 in 10 s
        20: b(29_000, 500.0),  # reset: counted from zero
        30: b(39_000, 1_500.0),
        # 40 missing: the rate at 50 spans both steps
        50: b(59_000, 3_500.0),
        200: b(209_000, 9_999.0),  # after a long gap: no rate
    }
    assert counter_rates(buckets, 10) == {
        10: pytest.approx(200.0),
        20: pytest.approx(50.0),
        30: pytest.approx(100.0),
        50: pytest.approx(100.0),
    }
