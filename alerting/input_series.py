"""`input_series` of rule unit tests, in `promtool test rules` notation.

`series: 'metric{label="value"}'` names one series; `values` lists its samples, one per
test interval from time 0, in expanding notation:

| item | gives |
|---|---|
| `a` | one sample |
| `a+bxn`, `a-bxn` | n+1 samples: a, a±b, …, a±n·b (added step by step, as promtool) |
| `axn` | n+1 samples of a |
| `_` | no sample at this step |
| `_xn` | no sample for n steps |
| `stale` | no sample (YakPanel has no staleness markers; see docs/alerting.md) |

Numbers are decimal, exponent (`1e3`), `Inf`, `-Inf` or `NaN`.
"""

from __future__ import annotations

import math
import re

from ingest.query import METRIC_LABEL, MemoryStore, QueryError, parse_selectors

MAX_SAMPLES = 1_000_000  # per series: expanding notation must not exhaust memory
Series = list[tuple[str, dict[str, str], list[tuple[int, float]]]]  # metric, labels, samples

_NUMBER = r"[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|Inf|inf)|NaN|nan"
_UNSIGNED = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_ITEM = re.compile(
    rf"^(?:(?P<blank>_)(?:x(?P<blanks>\d+))?"
    rf"|(?P<stale>stale)"
    rf"|(?P<a>{_NUMBER})(?:(?P<op>[-+])(?P<b>{_UNSIGNED}))?(?:x(?P<n>\d+))?)$"
)


class SeriesNotationError(ValueError):
    pass


def parse_labels(text: str) -> dict[str, str]:
    """`metric{a="b"}` or `{a="b"}` → its labels, the metric name as `__name__`."""
    try:
        (selector,) = parse_selectors([text])
    except QueryError as exc:
        raise SeriesNotationError(f"series {text!r}: {exc.message}") from None
    labels: dict[str, str] = {}
    for m in selector:
        if m.op != "=":
            raise SeriesNotationError(
                f'series {text!r}: labels are written name="value" (not {m.op})'
            )
        if m.name in labels:
            raise SeriesNotationError(f"series {text!r}: label {m.name} given twice")
        labels[m.name] = m.value
    return labels


def parse_series(text: str) -> tuple[str, dict[str, str]]:
    """`metric{a="b"}` → ("metric", {"a": "b"})."""
    labels = parse_labels(text)
    metric = labels.pop(METRIC_LABEL, "")
    if not metric:
        raise SeriesNotationError(f"series {text!r}: a metric name is required")
    return metric, labels


def _number(text: str) -> float:
    lowered = text.lower().lstrip("+")
    if lowered in ("inf", "-inf", "nan"):
        return {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}[lowered]
    return float(text)


def expand_values(text: str) -> list[float | None]:
    """The samples of `values`, None where a step has none."""
    out: list[float | None] = []
    for item in str(text).split():
        found = _ITEM.match(item)
        if found is None:
            raise SeriesNotationError(
                f"cannot read {item!r} in values {text!r}: expected a number, a+bxn, a-bxn,"
                " axn, _, _xn or stale"
            )
        if found["blank"]:
            out.extend([None] * int(found["blanks"] or 1))
        elif found["stale"]:
            out.append(None)
        else:
            value = _number(found["a"])
            times = int(found["n"]) if found["n"] is not None else 0
            if found["op"] and found["n"] is None:
                raise SeriesNotationError(
                    f"{item!r} in values {text!r}: a step needs a count, as in {item}x10"
                )
            step = float(found["b"]) if found["b"] else 0.0
            if found["op"] == "-":
                step = -step
            if len(out) + times + 1 > MAX_SAMPLES:
                raise SeriesNotationError(f"values {text!r} expand past {MAX_SAMPLES} samples")
            out.append(value)
            for _ in range(times):
                value += step
                out.append(value)
        if len(out) > MAX_SAMPLES:
            raise SeriesNotationError(f"values {text!r} expand past {MAX_SAMPLES} samples")
    return out


class SampleFeed:
    """Series written into a `MemoryStore` as time goes by, as agents send them: a rollup
    group then holds only samples up to the evaluation time, as in production (promtool
    loads samples the same way)."""

    def __init__(self, series: Series, tenant_id: str) -> None:
        self.series = series
        self.tenant_id = tenant_id
        self.store = MemoryStore()
        self._written = [0] * len(series)

    def until(self, at_ms: int) -> MemoryStore:
        for i, (metric, labels, samples) in enumerate(self.series):
            end = self._written[i]
            while end < len(samples) and samples[end][0] <= at_ms:
                end += 1
            if end > self._written[i]:
                self.store.add(self.tenant_id, metric, labels, samples[self._written[i] : end])
                self._written[i] = end
        return self.store
