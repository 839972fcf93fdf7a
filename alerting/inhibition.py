"""Inhibition: a firing source alert mutes target alerts that share the `equal` labels.

As in Alertmanager, only a source that is firing inhibits (a resolved one stops at once),
a missing label counts as the empty string in `equal`, and an alert that matches both the
source and the target side never inhibits itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from alerting.matchers import Matcher, MatchType, matches_all, parse_matcher_list


@dataclass(frozen=True)
class InhibitRule:
    source_matchers: tuple[Matcher, ...]
    target_matchers: tuple[Matcher, ...]
    equal: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> InhibitRule:
        """Parse one `inhibit_rules` entry; raises ValueError naming the bad field."""
        allowed = {
            "source_matchers",
            "target_matchers",
            "equal",
            "source_match",
            "source_match_re",
            "target_match",
            "target_match_re",
        }
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; expected some of {sorted(allowed)}")
        source = [
            *parse_matcher_list(_string_list(raw, "source_matchers")),
            *_legacy(raw, "source_match", MatchType.EQUAL),
            *_legacy(raw, "source_match_re", MatchType.REGEX),
        ]
        target = [
            *parse_matcher_list(_string_list(raw, "target_matchers")),
            *_legacy(raw, "target_match", MatchType.EQUAL),
            *_legacy(raw, "target_match_re", MatchType.REGEX),
        ]
        if not source or not target:
            raise ValueError("an inhibit rule needs both source_matchers and target_matchers")
        return cls(tuple(source), tuple(target), tuple(_string_list(raw, "equal")))

    def to_dict(self) -> dict[str, Any]:
        return {
            "source_matchers": [str(m) for m in self.source_matchers],
            "target_matchers": [str(m) for m in self.target_matchers],
            "equal": list(self.equal),
        }

    def _equal_values(self, labels: Mapping[str, str]) -> tuple[str, ...]:
        return tuple(labels.get(name, "") for name in self.equal)


@dataclass(frozen=True)
class SourceAlert:
    fingerprint: str
    labels: Mapping[str, str]


class InhibitionIndex:
    """The firing source alerts of every rule at one instant, indexed by `equal` values.

    Build it once per flush from the alerts firing then; `inhibited_by` is then one
    dictionary lookup per rule.
    """

    def __init__(self, rules: Iterable[InhibitRule], firing: Iterable[SourceAlert]) -> None:
        self._rules = tuple(rules)
        self._sources: list[dict[tuple[str, ...], list[str]]] = [{} for _ in self._rules]
        for alert in firing:
            for index, rule in enumerate(self._rules):
                if matches_all(rule.source_matchers, alert.labels):
                    bucket = self._sources[index].setdefault(rule._equal_values(alert.labels), [])
                    bucket.append(alert.fingerprint)

    def inhibited_by(self, fingerprint: str, labels: Mapping[str, str]) -> str | None:
        """The fingerprint of a firing source that mutes this alert, or None."""
        for index, rule in enumerate(self._rules):
            if not matches_all(rule.target_matchers, labels):
                continue
            for source in self._sources[index].get(rule._equal_values(labels), ()):
                if source != fingerprint:
                    return source
        return None


def _string_list(raw: Mapping[str, Any], key: str) -> list[str]:
    value = raw.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be a list of strings")
    return value


def _legacy(raw: Mapping[str, Any], key: str, kind: MatchType) -> list[Matcher]:
    value = raw.get(key) or {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{key} must be a mapping of label name to value")
    return [Matcher(str(name), kind, str(v)) for name, v in value.items()]
