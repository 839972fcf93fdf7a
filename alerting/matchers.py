"""Label matchers in Alertmanager's syntax: `a="b"`, `a!="b"`, `a=~"re"`, `a!~"re"`.

A list is written `{a="b", c=~"d|e"}` (braces optional). Values may be quoted (with
`\\"`, `\\\\`, `\\n` escapes) or bare. Regular expressions are anchored at both ends, as in
Alertmanager, and a label the alert does not carry matches as the empty string.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class MatcherError(ValueError):
    """A matcher that does not parse, with the text and the reason."""


class MatchType(StrEnum):
    EQUAL = "="
    NOT_EQUAL = "!="
    REGEX = "=~"
    NOT_REGEX = "!~"


@dataclass(frozen=True)
class Matcher:
    name: str
    type: MatchType
    value: str
    _pattern: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise MatcherError("a matcher needs a label name")
        if self.type in (MatchType.REGEX, MatchType.NOT_REGEX):
            try:
                pattern = re.compile(f"^(?:{self.value})$", re.DOTALL)
            except re.error as exc:
                raise MatcherError(f"invalid regular expression in matcher {self}: {exc}") from None
            object.__setattr__(self, "_pattern", pattern)

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.name, "")
        if self.type is MatchType.EQUAL:
            return actual == self.value
        if self.type is MatchType.NOT_EQUAL:
            return actual != self.value
        assert self._pattern is not None
        found = self._pattern.match(actual) is not None
        return found if self.type is MatchType.REGEX else not found

    def __str__(self) -> str:
        return f"{_render_name(self.name)}{self.type.value}{_quote(self.value)}"

    def to_dict(self) -> dict[str, Any]:
        """Alertmanager's API shape (what amtool and the v2 silences API use)."""
        return {
            "name": self.name,
            "value": self.value,
            "isRegex": self.type in (MatchType.REGEX, MatchType.NOT_REGEX),
            "isEqual": self.type in (MatchType.EQUAL, MatchType.REGEX),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Matcher:
        try:
            name, value = str(data["name"]), str(data["value"])
        except KeyError as exc:
            raise MatcherError(f"a matcher needs {exc.args[0]!r}") from None
        regex, equal = bool(data.get("isRegex", False)), bool(data.get("isEqual", True))
        kind = {
            (False, True): MatchType.EQUAL,
            (False, False): MatchType.NOT_EQUAL,
            (True, True): MatchType.REGEX,
            (True, False): MatchType.NOT_REGEX,
        }[(regex, equal)]
        return cls(name, kind, value)


def matches_all(matchers: Iterable[Matcher], labels: Mapping[str, str]) -> bool:
    return all(m.matches(labels) for m in matchers)


def render_matchers(matchers: Iterable[Matcher]) -> str:
    return "{" + ", ".join(str(m) for m in matchers) + "}"


def parse_matcher(text: str) -> Matcher:
    """Exactly one matcher, e.g. `severity=~"critical|page"`."""
    found = parse_matchers(text)
    if len(found) != 1:
        raise MatcherError(f"expected exactly one matcher in {text!r}, found {len(found)}")
    return found[0]


def parse_matchers(text: str) -> list[Matcher]:
    """A matcher list: `{a="b", c!~"d"}` or `a="b", c!~"d"` (a trailing comma is fine)."""
    body = text.strip()
    if body.startswith("{"):
        if not body.endswith("}"):
            raise MatcherError(f"{text!r}: an opening '{{' needs a closing '}}'")
        body = body[1:-1]
    return _Parser(text, body).parse()


def parse_matcher_list(items: Iterable[str]) -> list[Matcher]:
    """The config form: a list of strings, each holding one or more matchers."""
    result: list[Matcher] = []
    for item in items:
        if not isinstance(item, str):
            raise MatcherError(f"a matcher must be a string like 'a=\"b\"', got {item!r}")
        result.extend(parse_matchers(item))
    return result


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS = ("=~", "!~", "!=", "=")
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t"}


class _Parser:
    def __init__(self, original: str, body: str) -> None:
        self.original = original
        self.text = body
        self.pos = 0

    def fail(self, reason: str) -> MatcherError:
        return MatcherError(f"{self.original!r}: {reason} (at character {self.pos + 1})")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def parse(self) -> list[Matcher]:
        matchers: list[Matcher] = []
        self.skip_space()
        while self.pos < len(self.text):
            name = self.read_name()
            self.skip_space()
            op = self.read_operator()
            self.skip_space()
            value = self.read_value()
            try:
                matchers.append(Matcher(name, MatchType(op), value))
            except MatcherError as exc:
                raise MatcherError(f"{self.original!r}: {exc}") from None
            self.skip_space()
            if self.pos < len(self.text):
                if self.text[self.pos] != ",":
                    raise self.fail("expected ',' between matchers")
                self.pos += 1
                self.skip_space()
        return matchers

    def read_name(self) -> str:
        if self.text.startswith('"', self.pos):
            return self.read_quoted()
        found = _NAME.match(self.text, self.pos)
        if found is None:
            raise self.fail("expected a label name")
        self.pos = found.end()
        return found.group()

    def read_operator(self) -> str:
        for op in _OPERATORS:
            if self.text.startswith(op, self.pos):
                self.pos += len(op)
                return op
        raise self.fail("expected one of =, !=, =~, !~")

    def read_value(self) -> str:
        if self.text.startswith('"', self.pos):
            return self.read_quoted()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in ',"{}':
            self.pos += 1
        return self.text[start : self.pos].strip()

    def read_quoted(self) -> str:
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == '"':
                self.pos += 1
                return "".join(out)
            if char == "\\" and self.pos + 1 < len(self.text):
                nxt = self.text[self.pos + 1]
                # An unknown escape keeps its backslash, so `"\d+"` stays a regex.
                out.append(_ESCAPES.get(nxt, "\\" + nxt))
                self.pos += 2
                continue
            out.append(char)
            self.pos += 1
        raise self.fail("unterminated quoted string")


def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _render_name(name: str) -> str:
    return name if _NAME.fullmatch(name) else _quote(name)
