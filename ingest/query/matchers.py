"""Label matchers with Prometheus semantics.

A missing label has the value "" (so `a=""` selects series without `a`), `__name__` is
the metric name, and regular expressions are fully anchored RE2 in which `.` also
matches a newline (`^(?s:re)$`), as in Prometheus.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from ingest.query.errors import bad_data

MatchOp = Literal["=", "!=", "=~", "!~"]
METRIC_LABEL = "__name__"
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_MATCHER = re.compile(r"^([a-zA-Z_][a-zA-Z0-9_]*)(=~|!~|!=|=)(.*)$", re.DOTALL)


@dataclass(frozen=True)
class LabelMatcher:
    name: str
    op: MatchOp
    value: str

    @property
    def anchored(self) -> str:
        return f"^(?s:{self.value})$"

    @property
    def is_regex(self) -> bool:
        return self.op in ("=~", "!~")

    def matches(self, value: str) -> bool:
        if self.op == "=":
            return value == self.value
        if self.op == "!=":
            return value != self.value
        found = _compiled(self.value).fullmatch(value) is not None
        return found if self.op == "=~" else not found

    def __str__(self) -> str:
        escaped = self.value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'{self.name}{self.op}"{escaped}"'


Selector = tuple[LabelMatcher, ...]


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise bad_data(f"invalid regular expression {pattern!r}: {exc}") from None


def selector_matches(selector: Sequence[LabelMatcher], labels: Mapping[str, str]) -> bool:
    return all(m.matches(labels.get(m.name, "")) for m in selector)


def parse_matcher(text: str) -> LabelMatcher:
    """`name=value`, `name!=value`, `name=~regex` or `name!~regex` (the structured API)."""
    found = _MATCHER.match(text)
    if found is None:
        raise bad_data(
            f"invalid matcher {text!r}: expected <label><op><value> with op one of "
            "=, !=, =~, !~ (for example host_name=~web-.*)"
        )
    name, op, value = found.groups()
    matcher = LabelMatcher(name, op, value)  # type: ignore[arg-type]
    if matcher.is_regex:
        _compiled(value)
    return matcher


def metric_selector(metric: str | None, matchers: Sequence[LabelMatcher]) -> Selector:
    if metric is not None:
        if not METRIC_NAME.match(metric):
            raise bad_data(f"invalid metric name {metric!r}")
        return (LabelMatcher(METRIC_LABEL, "=", metric), *matchers)
    return tuple(matchers)
