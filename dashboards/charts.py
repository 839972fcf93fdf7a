"""Line charts as inline SVG, rendered on the server (no JavaScript chart library).

A chart is a list of lines over a fixed timeline of steps. A step without a value
(`None`), or a missing step, breaks the line: gaps show as gaps, never as a straight
segment across an outage. Every chart carries a `<title>` and a `<desc>` (summary of the
values), labelled axes, and a `<table>` of the values for screen readers and copy-paste.
All text is escaped; styling comes from CSS classes, so the page works under a CSP
without inline styles.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

from dashboards import formatting

Value = float | None


@dataclass(frozen=True)
class ChartLine:
    label: str
    points: Sequence[tuple[int, Value]]  # (unix seconds, value in the scale's unit)


@dataclass(frozen=True)
class Scale:
    """The y axis: its label, how a value reads, and a fixed top (e.g. 100 %)."""

    unit: str
    format: Callable[[float], str]
    fixed_max: float | None = None
    min_top: float = 1.0  # the axis top when all values are lower (or there are none)


PERCENT = Scale("%", lambda v: f"{v:.0f} %", 100.0)
LOAD = Scale("load", lambda v: f"{v:.2f}")
BYTES_PER_SECOND = Scale("bytes/s", formatting.bytes_per_second, min_top=1024.0)


@dataclass(frozen=True)
class Frame:
    """The drawing area inside the SVG viewBox."""

    width: int = 720
    height: int = 200
    left: int = 64
    right: int = 12
    top: int = 12
    bottom: int = 36

    @property
    def plot_width(self) -> int:
        return self.width - self.left - self.right

    @property
    def plot_height(self) -> int:
        return self.height - self.top - self.bottom


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times 10^k at or above `value` (1 for nothing to show)."""
    if not math.isfinite(value) or value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    base = 10.0**exponent
    for factor in (1.0, 2.0, 2.5, 5.0, 10.0):
        if value <= factor * base * (1 + 1e-9):
            return factor * base
    return 10.0 * base


def y_top(lines: Sequence[ChartLine], scale: Scale) -> float:
    """The top of the y axis: the scale's fixed top unless a value is above it."""
    values = [v for line in lines for _, v in line.points if v is not None]
    top = max(nice_ceiling(max(values)) if values else 0.0, scale.min_top)
    if scale.fixed_max is not None and top <= scale.fixed_max:
        return scale.fixed_max
    return top


@dataclass(frozen=True)
class Mapper:
    frame: Frame
    start: int
    end: int
    y_max: float

    def x(self, t: int) -> float:
        span = max(self.end - self.start, 1)
        return self.frame.left + (t - self.start) / span * self.frame.plot_width

    def y(self, v: float) -> float:
        v = min(max(v, 0.0), self.y_max)
        return self.frame.top + self.frame.plot_height * (1 - v / self.y_max)


def segments(points: Sequence[tuple[int, Value]], step: int) -> list[list[tuple[int, float]]]:
    """Runs of consecutive points with values; a None or a missing step ends a run."""
    runs: list[list[tuple[int, float]]] = []
    current: list[tuple[int, float]] = []
    previous_t: int | None = None
    for t, v in sorted(points, key=lambda p: p[0]):
        if v is None or (previous_t is not None and current and t - previous_t > step):
            if current:
                runs.append(current)
            current = []
        if v is not None:
            current.append((t, v))
        previous_t = t
    if current:
        runs.append(current)
    return runs


def path_data(runs: list[list[tuple[int, float]]], mapper: Mapper) -> str:
    parts = []
    for run in runs:
        coords = [f"{mapper.x(t):.1f},{mapper.y(v):.1f}" for t, v in run]
        parts.append("M" + " L".join(coords))
    return " ".join(parts)


_ID = re.compile(r"[^a-z0-9-]+")


def _dom_id(text: str) -> str:
    return _ID.sub("-", text.lower()).strip("-") or "chart"


def _summary(line: ChartLine, scale: Scale) -> str:
    values = [v for _, v in line.points if v is not None]
    if not values:
        return f"{line.label}: no data"
    latest = next(v for _, v in reversed(line.points) if v is not None)
    return (
        f"{line.label}: latest {scale.format(latest)}, min {scale.format(min(values))},"
        f" max {scale.format(max(values))}"
    )


def line_chart(
    chart_id: str,
    title: str,
    lines: Sequence[ChartLine],
    start: int,
    end: int,
    step: int,
    scale: Scale,
    period: str = "",
    frame: Frame = Frame(),
) -> Markup:
    """A `<figure>` with the SVG chart, a legend and the values as a table."""
    cid = _dom_id(chart_id)
    y_max = y_top(lines, scale)
    mapper = Mapper(frame, start, end, y_max)
    with_date = end - start > 12 * 3600
    out: list[str] = [
        f'<figure class="chart" id="{escape(cid)}">',
        f'<h2 class="chart-title">{escape(title)}</h2>',
        f'<svg class="chart-svg" role="img" viewBox="0 0 {frame.width} {frame.height}"'
        f' aria-labelledby="{escape(cid)}-title {escape(cid)}-desc">',
        f'<title id="{escape(cid)}-title">{escape(title)}</title>',
        f'<desc id="{escape(cid)}-desc">{escape(period)}'
        f"{escape('. ' if period else '')}"
        f"{escape('; '.join(_summary(line, scale) for line in lines))}</desc>",
    ]
    # Y grid and tick labels.
    out.append('<g class="axis axis-y">')
    for i in range(5):
        value = y_max * i / 4
        y = mapper.y(value)
        out.append(
            f'<line class="grid" x1="{frame.left}" x2="{frame.width - frame.right}"'
            f' y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="tick" x="{frame.left - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(scale.format(value))}</text>"
        )
    mid = frame.top + frame.plot_height / 2
    out.append(
        f'<text class="axis-label" x="12" y="{mid:.1f}" text-anchor="middle"'
        f' transform="rotate(-90 12 {mid:.1f})">{escape(scale.unit)}</text>'
    )
    out.append("</g>")
    # X tick labels: five times across the window, and the axis label.
    out.append('<g class="axis axis-x">')
    baseline = frame.top + frame.plot_height
    out.append(
        f'<line class="baseline" x1="{frame.left}" x2="{frame.width - frame.right}"'
        f' y1="{baseline:.1f}" y2="{baseline:.1f}"/>'
    )
    for i in range(5):
        t = start + (end - start) * i // 4
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        out.append(
            f'<text class="tick" x="{mapper.x(t):.1f}" y="{baseline + 14:.1f}"'
            f' text-anchor="{anchor}">{escape(formatting.clock_time(t, with_date))}</text>'
        )
    out.append(
        f'<text class="axis-label" x="{frame.left + frame.plot_width / 2:.0f}"'
        f' y="{frame.height - 3}" text-anchor="middle">time (UTC)</text>'
    )
    out.append("</g>")
    # The lines.
    out.append('<g class="lines">')
    for i, line in enumerate(lines):
        runs = segments(line.points, step)
        label = escape(line.label)
        out.append(f'<g class="series series-{i}" data-label="{label}">')
        d = path_data([r for r in runs if len(r) > 1], mapper)
        if d:
            out.append(f'<path class="line" d="{d}"><title>{label}</title></path>')
        for run in runs:
            if len(run) == 1:  # a lone point has no segment to draw
                t, v = run[0]
                out.append(
                    f'<circle class="dot" cx="{mapper.x(t):.1f}" cy="{mapper.y(v):.1f}" r="2">'
                    f"<title>{label}: {escape(scale.format(v))}</title></circle>"
                )
        out.append("</g>")
    out.append("</g></svg>")
    # Legend with the latest values.
    out.append('<figcaption><ul class="legend">')
    for i, line in enumerate(lines):
        out.append(
            f'<li class="series-{i}"><span class="swatch" aria-hidden="true"></span>'
            f"{escape(_summary(line, scale))}</li>"
        )
    out.append("</ul></figcaption>")
    out.append(_table(title, lines, scale, with_date))
    out.append("</figure>")
    # Every piece of text above went through escape(); the rest is our own markup.
    return Markup("".join(out))  # noqa: S704


def _table(title: str, lines: Sequence[ChartLine], scale: Scale, with_date: bool) -> str:
    times = sorted({t for line in lines for t, v in line.points if v is not None})
    by_line = [dict(line.points) for line in lines]
    head = "".join(f'<th scope="col">{escape(line.label)}</th>' for line in lines)
    rows = []
    for t in times:
        cells = "".join(
            f"<td>{escape(formatting.DASH if (v := values.get(t)) is None else scale.format(v))}"
            "</td>"
            for values in by_line
        )
        when = formatting.clock_time(t, with_date, seconds=not with_date)
        rows.append(f'<tr><th scope="row">{escape(when)}</th>{cells}</tr>')
    body = "".join(rows) or (
        f'<tr><td colspan="{len(lines) + 1}">{escape("no data in this period")}</td></tr>'
    )
    return (
        f'<details class="chart-values"><summary>{escape(title)}: values</summary>'
        f'<table><thead><tr><th scope="col">time (UTC)</th>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></details>"
    )
