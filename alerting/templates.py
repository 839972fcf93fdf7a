"""Label and annotation templates: jinja2 in a sandbox, Prometheus's Go syntax translated.

A template sees `labels` (the series' labels), `value` (the sample value; printed the way
Go prints a float64, so `{{ $value }}` reads as in Prometheus), `external_labels` and
`external_url`, plus Prometheus's functions (`humanize`, `humanizePercentage`, `printf`, …)
as functions and filters. Compiling refuses syntax errors, unknown Go functions and
attributes starting with `_`; rendering never raises: a failure becomes the text
`<error expanding template: …>`, as Prometheus shows it, so one bad annotation cannot stop
an alert from firing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from alerting.gotemplate import GoTemplateError, translate

MAX_OUTPUT = 16 * 1024  # characters of one rendered template
_MAX_BUILT = 64 * 1024  # longest string or list a template may build with * or **


class TemplateError(ValueError):
    """A template that cannot be compiled; the message says what to fix."""


class TemplateValue(float):
    """The sample value: a float that prints like Go's `%v` (`100`, `1e+06`, `NaN`)."""

    def __str__(self) -> str:
        return go_float(float(self))


class TemplateLabels(dict[str, str]):
    """Series labels; a missing one is an error naming it (see `_Undefined`)."""


class _Undefined(jinja2.StrictUndefined):
    @property
    def _undefined_message(self) -> str:
        owner, name = self._undefined_obj, self._undefined_name
        hinted = self._undefined_hint is not None  # e.g. the sandbox refusing a method
        if isinstance(owner, TemplateLabels) and isinstance(name, str) and not hinted:
            have = ", ".join(sorted(owner)) or "none"
            return f"label {name!r} is not set on this series (its labels: {have})"
        return str(super()._undefined_message)


def go_float(v: float) -> str:
    """Go's `%v` of a float64 (`strconv.FormatFloat(v, 'g', -1, 64)`): the shortest digits
    that round-trip, with an exponent from 1e6 up and below 1e-4 (`1e+06`, `1.5e-05`)."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == 0:
        return "-0" if math.copysign(1.0, v) < 0 else "0"
    sign, digits, exponent = Decimal(repr(v)).normalize().as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, digits))
    point = len(text) + exponent  # position of the decimal point after the first digit
    x = point - 1
    prefix = "-" if sign else ""
    if x < -4 or x >= 6:
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        return f"{prefix}{mantissa}e{'-' if x < 0 else '+'}{abs(x):02d}"
    if point <= 0:
        return f"{prefix}0.{'0' * -point}{text}"
    if point >= len(text):
        return prefix + text + "0" * (point - len(text))
    return f"{prefix}{text[:point]}.{text[point:]}"


def _g4(v: float) -> str:
    """Go's `%.4g`."""
    if math.isnan(v) or math.isinf(v):
        return go_float(v)
    return f"{v:.4g}"


def humanize(v: float) -> str:
    v = float(v)
    if v == 0 or math.isnan(v) or math.isinf(v):
        return _g4(v)
    prefix = ""
    if abs(v) >= 1:
        for p in ("k", "M", "G", "T", "P", "E", "Z", "Y"):
            if abs(v) < 1000:
                break
            prefix, v = p, v / 1000
        return _g4(v) + prefix
    for p in ("m", "u", "n", "p", "f", "a", "z", "y"):
        if abs(v) >= 1:
            break
        prefix, v = p, v * 1000
    return _g4(v) + prefix


def humanize1024(v: float) -> str:
    v = float(v)
    if abs(v) <= 1 or math.isnan(v) or math.isinf(v):
        return _g4(v)
    prefix = ""
    for p in ("ki", "Mi", "Gi", "Ti", "Pi", "Ei", "Zi", "Yi"):
        if abs(v) < 1024:
            break
        prefix, v = p, v / 1024
    return _g4(v) + prefix


def humanize_percentage(v: float) -> str:
    return _g4(float(v) * 100) + "%"


def humanize_duration(v: float) -> str:
    v = float(v)
    if math.isnan(v) or math.isinf(v):
        return _g4(v)
    if v == 0:
        return "0s"
    if abs(v) >= 1:
        sign = "-" if v < 0 else ""
        v = abs(v)
        whole = int(v)
        seconds, minutes = whole % 60, whole // 60 % 60
        hours, days = whole // 3600 % 24, whole // 86400
        if days:
            return f"{sign}{days}d {hours}h {minutes}m {seconds}s"
        if hours:
            return f"{sign}{hours}h {minutes}m {seconds}s"
        if minutes:
            return f"{sign}{minutes}m {seconds}s"
        return f"{sign}{_g4(v)}s"
    prefix = ""
    for p in ("m", "u", "n", "p", "f", "a", "z", "y"):
        if abs(v) >= 1:
            break
        prefix, v = p, v * 1000
    return f"{_g4(v)}{prefix}s"


def humanize_timestamp(v: float) -> str:
    v = float(v)
    if math.isnan(v) or math.isinf(v):
        return _g4(v)
    return datetime.fromtimestamp(v, UTC).strftime("%Y-%m-%d %H:%M:%S.%f %z UTC")


def printf(fmt: str, *args: Any) -> str:
    """Go's fmt.Sprintf for the verbs rule files use (%s %d %f %g %e %x %v %q %%)."""
    fmt = re.sub(r"%(-?\d*)v", r"%\1s", str(fmt))
    converted = []
    for verb, arg in zip(re.findall(r"%[-+# 0]*\d*(?:\.\d+)?([a-zA-Z%])", fmt), args, strict=False):
        if verb == "d" and isinstance(arg, float):
            arg = int(arg)
        if verb == "q":
            arg = '"' + str(arg).replace("\\", "\\\\").replace('"', '\\"') + '"'
        converted.append(arg)
    fmt = re.sub(r"%(-?\d*)q", r"%\1s", fmt)
    return fmt % tuple(converted)


def _go_replacement(template: str) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\d+)", lambda m: f"\\g<{m.group(1) or m.group(2)}>", template)


def re_replace_all(pattern: str, replacement: str, text: str) -> str:
    return re.sub(pattern, _go_replacement(replacement), text)


def match(pattern: str, text: str) -> bool:
    return re.search(pattern, text) is not None


def strip_port(host: str) -> str:
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "humanize": humanize,
    "humanize1024": humanize1024,
    "humanizePercentage": humanize_percentage,
    "humanizeDuration": humanize_duration,
    "humanizeTimestamp": humanize_timestamp,
    "printf": printf,
    "toUpper": lambda s: str(s).upper(),
    "toLower": lambda s: str(s).lower(),
    "title": lambda s: str(s).title(),
    "reReplaceAll": re_replace_all,
    "match": match,
    "stripPort": strip_port,
}


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(right) > 64:
                raise SecurityError("exponent too large for a template")
            return left**right
        for seq, times in ((left, right), (right, left)):
            sized = isinstance(seq, str | list | tuple) and isinstance(times, int)
            if sized and len(seq) * times > _MAX_BUILT:
                raise SecurityError("template builds too long a value")
        return left * right


@cache
def _environment() -> _Sandbox:
    env = _Sandbox(undefined=_Undefined, autoescape=False, keep_trailing_newline=True)
    env.globals.update(FUNCTIONS)
    env.filters.update(FUNCTIONS)
    return env


@dataclass(frozen=True)
class AlertTemplate:
    """One compiled label or annotation template; `source` is what the rule file wrote."""

    source: str
    _template: jinja2.Template | None = field(default=None, compare=False, repr=False)

    @property
    def is_static(self) -> bool:
        return self._template is None

    def render(
        self,
        labels: Mapping[str, str],
        value: float,
        external_labels: Mapping[str, str] | None = None,
        external_url: str = "",
    ) -> str:
        if self._template is None:
            return self.source
        try:
            text = self._template.render(
                labels=TemplateLabels(labels),
                value=TemplateValue(value),
                external_labels=TemplateLabels(external_labels or {}),
                external_url=external_url,
            )
        # A rule's notification must go out even when one of its templates fails.
        except Exception as exc:  # noqa: BLE001
            return f"<error expanding template: {exc}>"
        if len(text) > MAX_OUTPUT:
            return text[:MAX_OUTPUT] + "…"
        return text


def compile_template(source: str) -> AlertTemplate:
    """Compile `source` (jinja2, or Prometheus Go-template syntax), or raise TemplateError."""
    if "{{" not in source and "{%" not in source and "{#" not in source:
        return AlertTemplate(source)
    try:
        text = translate(source)
    except GoTemplateError as exc:
        raise TemplateError(str(exc)) from None
    env = _environment()
    try:
        tree = env.parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"template syntax error: {exc.message}") from None
    for node in tree.find_all(nodes.Getattr):
        if node.attr.startswith("_"):
            raise TemplateError(
                f"attribute {node.attr!r} is not allowed in templates"
                + (
                    f' (for the label write labels["{node.attr}"])'
                    if node.attr == "__name__"
                    else ""
                )
            )
    return AlertTemplate(source, env.from_string(tree))
