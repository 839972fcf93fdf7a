"""Config model, matchers, routing tree, silences, inhibition and URL redaction."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from alerting.inhibition import InhibitionIndex, InhibitRule, SourceAlert
from alerting.matchers import (
    Matcher,
    MatcherError,
    MatchType,
    parse_matcher,
    parse_matchers,
    render_matchers,
)
from alerting.receivers import SecretURL, redact, redact_text
from alerting.routing import (
    ConfigError,
    Route,
    format_duration,
    load_config,
    parse_config,
    parse_duration,
)
from alerting.silences import Silence, SilenceError, Silences, SilenceState
from controlplane.crypto import SecretBox

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

# --- matchers ----------------------------------------------------------------------


def test_matcher_operators_and_missing_labels() -> None:
    labels = {"severity": "critical", "job": "node"}
    assert parse_matcher('severity="critical"').matches(labels)
    assert not parse_matcher('severity!="critical"').matches(labels)
    assert parse_matcher('severity=~"crit.*|page"').matches(labels)
    assert parse_matcher('job!~"api|web"').matches(labels)
    # A label the alert lacks is the empty string.
    assert parse_matcher('team=""').matches(labels)
    assert parse_matcher('team!="ops"').matches(labels)
    assert not parse_matcher('team=~".+"').matches(labels)


def test_regex_matchers_are_anchored() -> None:
    m = parse_matcher('instance=~"web"')
    assert not m.matches({"instance": "web-1"})
    assert not m.matches({"instance": "my-web"})
    assert m.matches({"instance": "web"})


def test_matcher_list_forms_quotes_and_escapes() -> None:
    found = parse_matchers('{alertname="Disk \\"full\\"", job=~"node|api", env!=prod,}')
    assert [(m.name, m.type, m.value) for m in found] == [
        ("alertname", MatchType.EQUAL, 'Disk "full"'),
        ("job", MatchType.REGEX, "node|api"),
        ("env", MatchType.NOT_EQUAL, "prod"),
    ]
    assert parse_matchers("a=b, c!~d") == [
        Matcher("a", MatchType.EQUAL, "b"),
        Matcher("c", MatchType.NOT_REGEX, "d"),
    ]
    # An unknown escape keeps its backslash, so a regex class survives quoting.
    digits = parse_matcher('code=~"5\\d\\d"')
    assert digits.value == "5\\d\\d"
    assert digits.matches({"code": "503"})
    # Rendering round-trips.
    for m in [*found, digits]:
        assert parse_matcher(str(m)) == m
    assert parse_matchers(render_matchers(found)) == found


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('severity=~"(crit"', "invalid regular expression"),
        ('severity=="x"', "expected"),
        ('="x"', "expected a label name"),
        ('a="b" c="d"', "expected ','"),
        ('a="unterminated', "unterminated"),
        ('{a="b"', "closing"),
        ("severity", "expected one of"),
    ],
)
def test_bad_matchers_say_why(text: str, reason: str) -> None:
    with pytest.raises(MatcherError, match=reason):
        parse_matchers(text)


def test_matcher_api_shape_round_trips() -> None:
    for text in ('a="1"', 'a!="1"', 'a=~"1"', 'a!~"1"'):
        m = parse_matcher(text)
        assert Matcher.from_dict(m.to_dict()) == m
    assert parse_matcher('a!~"x"').to_dict() == {
        "name": "a",
        "value": "x",
        "isRegex": True,
        "isEqual": False,
    }


# --- routing tree --------------------------------------------------------------------

TREE = """
route:
  receiver: default
  group_by: [alertname]
  group_wait: 10s
  routes:
    - matchers: ['severity="critical"']
      receiver: pager
      group_by: ['...']
      group_wait: 1s
      continue: true
      routes:
        - matchers: ['team="db"']
          receiver: db-pager
          repeat_interval: 1h
    - matchers: ['team=~"db|storage"']
      receiver: db-team
      routes:
        - matchers: ['env="staging"']
          receiver: blackhole
    - match: {team: web}
      receiver: web-team
      group_interval: 1m
    - matchers: ['team="web"']
      receiver: never-reached
receivers:
  - {name: default, urls: ['json://hooks.example.com/default']}
  - {name: pager, urls: ['jsons://pager:s3cret@pager.example.com/hook']}
  - {name: db-pager, urls: ['mailto://oncall:pw@mail.example.com?to=db@example.com']}
  - {name: db-team, urls: ['json://hooks.example.com/db']}
  - {name: blackhole}
  - {name: web-team, urls: ['json://hooks.example.com/web'], send_resolved: false}
  - {name: never-reached, urls: ['json://hooks.example.com/never']}
"""


def receivers_for(route: Route, labels: dict[str, str]) -> list[str]:
    return [r.receiver for r in route.match(labels)]


def test_routing_is_depth_first_with_continue_and_fallback() -> None:
    root = load_config(TREE).route
    assert receivers_for(root, {"alertname": "X"}) == ["default"]
    # continue on the critical route lets the db-team sibling match too.
    assert receivers_for(root, {"severity": "critical", "team": "db"}) == ["db-pager", "db-team"]
    # No child of the critical route matches: the critical route itself is the match.
    assert receivers_for(root, {"severity": "critical", "team": "web"}) == ["pager", "web-team"]
    # First matching child wins without continue: never-reached stays unreached.
    assert receivers_for(root, {"team": "web"}) == ["web-team"]
    assert receivers_for(root, {"team": "storage", "env": "staging"}) == ["blackhole"]


def test_children_inherit_unset_options_from_their_parent() -> None:
    root = load_config(TREE).route
    critical, db_team, web, _ = root.routes
    db_pager = critical.routes[0]
    assert root.group_wait == timedelta(seconds=10)
    assert root.group_interval == timedelta(minutes=5)
    assert root.repeat_interval == timedelta(hours=4)
    assert critical.group_by_all and critical.group_wait == timedelta(seconds=1)
    assert db_pager.group_by_all and db_pager.group_wait == timedelta(seconds=1)
    assert db_pager.repeat_interval == timedelta(hours=1)
    assert db_team.group_by == ("alertname",) and db_team.group_wait == timedelta(seconds=10)
    assert web.group_interval == timedelta(minutes=1) and web.receiver == "web-team"
    assert db_team.routes[0].receiver == "blackhole"


def test_group_labels_and_stable_route_keys() -> None:
    config = load_config(TREE)
    root = config.route
    labels = {"alertname": "DiskFull", "instance": "a", "severity": "critical"}
    assert root.group_labels(labels) == {"alertname": "DiskFull"}
    assert root.routes[0].group_labels(labels) == labels  # '...'
    assert root.group_labels({"instance": "a"}) == {}
    keys = [r.key for r in root.walk()]
    assert len(keys) == len(set(keys))
    assert root.routes[0].routes[0].key == '{}/{severity="critical"}/{team="db"}'
    assert root.routes[3].key == '{}/{team="web"}#2'  # same matchers as its sibling
    assert config.receivers["web-team"].send_resolved is False
    assert config.receivers["blackhole"].urls == ()


def test_config_round_trips_and_hides_secrets_unless_revealed() -> None:
    config = load_config(TREE)
    shown = config.to_dict()
    assert "s3cret" not in str(shown) and "pw@" not in str(shown)
    again = parse_config(config.to_dict(reveal=True))
    assert again == config
    assert [r.key for r in again.route.walk()] == [r.key for r in config.route.walk()]
    # JSON is accepted too (it is YAML).
    assert load_config('{"route": {"receiver": "r"}, "receivers": [{"name": "r"}]}')


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ("route: {receiver: nobody}", "route.receiver: 'nobody' is not a defined receiver"),
        ("route: {receiver: r, group_wait: 5x}", "route.group_wait: invalid duration"),
        ("route: {receiver: r, group_interval: 0s}", "route.group_interval: must be greater"),
        ("route: {receiver: r, group_by: ['...', job]}", "list it alone"),
        ("route: {receiver: r, matchers: ['a=\"b\"']}", "root route cannot have 'matchers'"),
        ("route: {receiver: r, recevier: x}", "unknown field(s) ['recevier']"),
        ("route: {receiver: r, routes: [{matchers: ['a=~\"(\"']}]}", "route.routes[0].matchers"),
        ("route: {receiver: r, routes: [{continue: yes please}]}", "routes[0].continue"),
        ("route: {}", "root route needs a receiver"),
        ("receivers: []", "top-level 'route' is required"),
    ],
)
def test_config_errors_name_the_field(patch: str, message: str) -> None:
    text = patch + ("\nreceivers: [{name: r}]" if "receivers" not in patch else "")
    with pytest.raises(ConfigError) as caught:
        load_config(text)
    assert message in str(caught.value)


def test_receiver_errors_never_echo_secrets() -> None:
    with pytest.raises(ConfigError, match="defined twice"):
        load_config("route: {receiver: r}\nreceivers: [{name: r}, {name: r}]")
    with pytest.raises(ConfigError) as caught:
        load_config(
            "route: {receiver: r}\n"
            "receivers: [{name: r, urls: ['nosuchscheme://user:hunter2@example.com/tok']}]"
        )
    assert "receivers[0].urls[0]" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    with pytest.raises(ConfigError, match="inhibit_rules\\[0\\]"):
        load_config("route: {receiver: r}\nreceivers: [{name: r}]\ninhibit_rules: [{equal: [a]}]")


def test_durations() -> None:
    assert parse_duration("500ms") == timedelta(milliseconds=500)
    assert parse_duration("1h30m") == timedelta(minutes=90)
    assert parse_duration("1d") == timedelta(days=1)
    assert parse_duration(2.5) == timedelta(seconds=2.5)
    for bad in ("", "5", "1x", "m", "-1s", True):
        with pytest.raises(ValueError, match="invalid duration"):
            parse_duration(bad)
    for text in ("500ms", "30s", "5m", "4h", "1h30m", "1d2h", "0s"):
        assert format_duration(parse_duration(text)) == text


# --- silences ------------------------------------------------------------------------


def test_silence_states_follow_time_and_expire_early() -> None:
    silences = Silences()
    s = silences.add(
        matchers=parse_matchers('alertname="DiskFull", instance=~"web-.*"'),
        starts_at=T0 + timedelta(minutes=10),
        ends_at=T0 + timedelta(hours=1),
        created_by="ana",
        comment="disk swap",
        now=T0,
    )
    labels = {"alertname": "DiskFull", "instance": "web-1"}
    assert s.state(T0) is SilenceState.PENDING
    assert silences.muted_by(labels, T0) == []
    at = T0 + timedelta(minutes=10)
    assert s.state(at) is SilenceState.ACTIVE
    assert silences.muted_by(labels, at) == [s.id]
    assert silences.muted_by({"alertname": "DiskFull", "instance": "db-1"}, at) == []
    assert s.state(T0 + timedelta(hours=1)) is SilenceState.EXPIRED

    early = silences.expire(s.id, T0 + timedelta(minutes=20))
    assert early.ends_at == T0 + timedelta(minutes=20)
    assert silences.muted_by(labels, T0 + timedelta(minutes=20)) == []
    assert silences.query(T0 + timedelta(minutes=20), SilenceState.EXPIRED) == [early]
    with pytest.raises(SilenceError, match="already expired"):
        silences.expire(s.id, T0 + timedelta(minutes=30))

    pending = silences.add(
        matchers=[parse_matcher('job="x"')],
        starts_at=T0 + timedelta(hours=2),
        ends_at=T0 + timedelta(hours=3),
        created_by="ana",
        comment="later",
        now=T0,
    )
    gone = silences.expire(pending.id, T0)
    assert gone.starts_at == gone.ends_at == T0
    assert gone.state(T0 + timedelta(hours=2, minutes=30)) is SilenceState.EXPIRED

    restored = Silences()
    restored.restore(Silence.from_dict(d) for d in silences.to_dicts())
    assert restored.query(T0) == silences.query(T0)
    assert silences.gc(T0 + timedelta(days=10), timedelta(days=5)) == 2


def test_silences_refuse_what_alertmanager_refuses() -> None:
    silences = Silences()
    ok = {
        "matchers": [parse_matcher('a="b"')],
        "starts_at": T0,
        "ends_at": T0 + timedelta(hours=1),
        "created_by": "ana",
        "comment": "why",
        "now": T0,
    }
    for change, reason in (
        ({"matchers": []}, "at least one matcher"),
        ({"matchers": [parse_matcher('a=~".*"')]}, "must not match the empty string"),
        ({"created_by": " "}, "author"),
        ({"comment": ""}, "comment"),
        ({"ends_at": T0}, "after starts_at"),
        ({"starts_at": T0 - timedelta(hours=3), "ends_at": T0 - timedelta(hours=2)}, "past"),
    ):
        with pytest.raises(SilenceError, match=reason):
            silences.add(**{**ok, **change})  # type: ignore[arg-type]
    # A start in the past begins now.
    started = silences.add(**{**ok, "starts_at": T0 - timedelta(hours=1)})  # type: ignore[arg-type]
    assert started.starts_at == T0 and started.to_dict(T0)["status"] == {"state": "active"}


# --- inhibition ----------------------------------------------------------------------


def test_inhibition_needs_equal_labels_and_never_inhibits_itself() -> None:
    rule = InhibitRule.from_dict(
        {
            "source_matchers": ['severity="critical"'],
            "target_matchers": ['severity=~"warning|critical"'],
            "equal": ["instance", "cluster"],
        }
    )
    crit = SourceAlert("c1", {"severity": "critical", "instance": "a"})
    index = InhibitionIndex([rule], [crit])
    assert index.inhibited_by("w1", {"severity": "warning", "instance": "a"}) == "c1"
    assert index.inhibited_by("w2", {"severity": "warning", "instance": "b"}) is None
    # cluster is missing on both sides: equal as the empty string; present on one: not.
    assert (
        index.inhibited_by("w3", {"severity": "warning", "instance": "a", "cluster": "x"}) is None
    )
    assert index.inhibited_by("i1", {"severity": "info", "instance": "a"}) is None
    assert index.inhibited_by("c1", dict(crit.labels)) is None
    assert InhibitionIndex([rule], []).inhibited_by("w1", {"severity": "warning"}) is None
    assert InhibitRule.from_dict(rule.to_dict()) == rule
    legacy = InhibitRule.from_dict(
        {"source_match": {"severity": "critical"}, "target_match_re": {"severity": "warn.*"}}
    )
    assert legacy.target_matchers == (Matcher("severity", MatchType.REGEX, "warn.*"),)


# --- secrets in receiver URLs ----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown", "hidden"),
    [
        (
            "jsons://bot:s3cretpw@hooks.example.com/alerts?+Authorization=Bearer%20tok123&method=PUT",
            "jsons://bot:****@hooks.example.com/alerts?+Authorization=****&method=PUT",
            ["s3cretpw", "tok123"],
        ),
        (
            "mailtos://oncall:mailpass@smtp.example.com:465?to=ops@example.com&from=yak@example.com",
            "mailtos://oncall:****@smtp.example.com:465?to=ops@example.com&from=yak@example.com",
            ["mailpass"],
        ),
        (
            "slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7FQ/#general",
            "slack://T...2/A...D/T...Q/#general",
            ["T1JJ3T3L2", "TIiajkdnlazkcOXrIdevi7FQ"],
        ),
        (
            "tgram://123456789:AABCeFGhIJKLmnOPqrStUvWXYZ12345678/12315544/",
            "tgram://1...8/1...4/",
            ["AABCeFGhIJKLmnOPqrStUvWXYZ12345678"],
        ),
        (
            "jsons://hooks.slack.com/services/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",
            "jsons://hooks.slack.com/services/T0AB12CD3/B0AB12CD3/x...4",
            ["x8Yq2LmNpQrStUvWxYz01234"],
        ),
        ("not a url", "<unparseable URL>", ["not a url"]),
    ],
)
def test_redact_masks_passwords_tokens_and_parameters(
    url: str, shown: str, hidden: list[str]
) -> None:
    assert redact(url) == shown
    secret = SecretURL(url)
    for text in (str(secret), repr(secret), f"{secret}", redact_text(f"failed: {url}", url)):
        for piece in hidden:
            assert piece not in text
    assert secret.reveal() == url


def test_redact_text_scrubs_secrets_inside_error_messages() -> None:
    url = "json://u:pa%2Fss@h.example.com/p?-token=abcd1234"
    error = "POST http://u:pa/ss@h.example.com/p?token=abcd1234 refused (pa%2Fss)"
    cleaned = redact_text(error, url)
    assert "abcd1234" not in cleaned and "pa/ss" not in cleaned and "pa%2Fss" not in cleaned


def test_secret_urls_seal_under_the_master_key() -> None:
    box = SecretBox(os.urandom(32))
    url = SecretURL("jsons://u:p@hooks.example.com/x")
    sealed = url.seal(box, "tenant:t1:receiver:ops:0")
    assert b"hooks.example.com" not in sealed
    assert SecretURL.unseal(box, sealed, "tenant:t1:receiver:ops:0") == url
    with pytest.raises(ValueError, match="does not open"):
        SecretURL.unseal(box, sealed, "tenant:t2:receiver:ops:0")


def test_the_documented_example_config_loads() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "alerting.md"
    section = docs.read_text().split("## Routing and notifications", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    config = load_config(example)
    labels = {"alertname": "ReplicationLag", "team": "db", "severity": "critical"}
    assert [r.receiver for r in config.route.match(labels)] == ["pager", "db-team"]
    assert config.route.match(labels)[1].repeat_interval == timedelta(hours=1)
