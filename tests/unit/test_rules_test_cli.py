"""`yakpanel rules test` (promtool's rule unit-test format) and `yakpanel rules check`:
the example files pass and fail as they should, with promtool-like reports and exit codes,
through typer's runner and as a real `python -m yakpanel` process."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alerting.input_series import SeriesNotationError, expand_values, parse_series
from yakpanel.cli import app

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "alerting" / "examples"
PASSING = EXAMPLES / "host-rules.test.yml"
FAILING = EXAMPLES / "host-rules.failing.test.yml"
RULES = EXAMPLES / "host-rules.yml"
INVALID = EXAMPLES / "invalid-rules.yml"


def rules(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["rules", *map(str, args)])
    return result.exit_code, result.output


# --- expanding notation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1+2x3", [1, 3, 5, 7]),
        ("1-2x4", [1, -1, -3, -5, -7]),
        ("-2+4x3", [-2, 2, 6, 10]),
        ("1x4", [1, 1, 1, 1, 1]),
        ("1 _x3 stale 5", [1, None, None, None, None, 5]),
        ("_ 2.5 1e3 0.1+0.1x2", [None, 2.5, 1000, 0.1, 0.2, 0.30000000000000004]),
        ("", []),
    ],
)
def test_expanding_notation(text: str, expected: list[float | None]) -> None:
    assert expand_values(text) == expected


def test_special_values_and_bad_notation() -> None:
    inf, minus_inf, nan = expand_values("Inf -Inf NaN")
    assert (inf, minus_inf) == (math.inf, -math.inf)
    assert nan is not None and math.isnan(nan)
    for bad in ("1+2", "abc", "1x", "x3", "1+2x3x4"):
        with pytest.raises(SeriesNotationError):
            expand_values(bad)
    with pytest.raises(SeriesNotationError, match="expand past"):
        expand_values("0+1x5000000")


def test_series_names() -> None:
    assert parse_series('up{job="node", instance="a:9100"}') == (
        "up",
        {"job": "node", "instance": "a:9100"},
    )
    assert parse_series('{__name__="up", job="x"}') == ("up", {"job": "x"})
    for bad, message in (
        ('{job="x"}', "a metric name is required"),
        ('up{job=~"x"}', 'written name="value"'),
        ("up{", "series 'up{'"),
    ):
        with pytest.raises(SeriesNotationError, match=message):
            parse_series(bad)


# --- the example files ----------------------------------------------------------------------


def test_the_passing_example_passes() -> None:
    code, output = rules("test", PASSING)
    assert code == 0, output
    assert output.splitlines()[:2] == [f"Unit Testing:  {PASSING}", "  SUCCESS"]


def test_the_failing_example_fails_with_a_diff_per_failing_case() -> None:
    code, output = rules("test", FAILING)
    assert code == 1
    assert "  FAILED:" in output
    # Fired too early: expected, not firing.
    assert "alertname: HostHighCpu, time: 8m," in output
    assert (
        '- {alertname="HostHighCpu", host_name="web-1", server_id="s1", severity="page"}:'
        " expected, not firing"
    ) in output
    # Same alert, other annotation: named with both texts.
    assert (
        'annotation summary: expected "shop.example.com is up", got "shop.example.com is down'
        ' (https://shop.example.com/)"'
    ) in output
    # Firing but not expected.
    assert (
        '+ {alertname="HostAgentSilent", host_name="web-1", server_id="s1", severity="page"}:'
        " firing, not expected"
    ) in output
    # A PromQL expression test with the wrong value.
    assert 'expr: "yakpanel_site_up == 0", time: 10m,' in output
    assert output.count('test "') == 4


def test_exit_codes_over_several_files(tmp_path: Path) -> None:
    assert rules("test", PASSING, FAILING)[0] == 1
    code, output = rules("test", PASSING, tmp_path / "missing.yml", FAILING)
    assert code == 2
    assert "cannot read the file" in output
    broken = tmp_path / "broken.yml"
    broken.write_text("tests: [\n")
    code, output = rules("test", broken)
    assert (code, "not valid YAML" in output) == (2, True)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_rule_files_that_do_not_load_fail_the_test_file(tmp_path: Path) -> None:
    test_file = write(
        tmp_path,
        "t.yml",
        f"""
        rule_files: ["{INVALID}", missing-*.yml]
        tests: []
        """,
    )
    code, output = rules("test", test_file)
    assert code == 1
    assert f'{INVALID}: group "broken" rule 2 (SlowLoad): field expr: unsupported PromQL' in output
    assert "rule_files: nothing matches missing-*.yml" in output


def test_mistakes_in_a_test_file_are_failures_that_say_where(tmp_path: Path) -> None:
    write(tmp_path, "r.yml", "groups: [{name: g, rules: [{alert: A, expr: up == 0}]}]\n")
    test_file = write(
        tmp_path,
        "t.yml",
        """
        rule_files: [r.yml]
        tests:
          - name: typo
            input_seris: []
          - input_series: [{series: 'up{a="b"}', values: '1 2 three'}]
          - alert_rule_test: [{eval_time: 1m, alertname: B}]
        """,
    )
    code, output = rules("test", test_file)
    assert code == 1
    assert 'test "typo": unknown field(s) input_seris' in output
    assert "test 2: input_series: cannot read 'three'" in output
    assert "test 3: alertname B: no alerting rule of that name in the rule files" in output


def test_for_keep_firing_for_delay_and_templates_play_out_as_in_production(tmp_path: Path) -> None:
    write(
        tmp_path,
        "rules.yml",
        """
        groups:
          - name: sites
            evaluation_delay: 1m
            rules:
              - alert: SiteDown
                expr: yakpanel_site_up == 0
                for: 2m
                keep_firing_for: 3m
                annotations:
                  summary: "{{ $labels.site }} down in {{ $externalLabels.region }}"
                  link: "{{ $externalURL }}/sites/{{ $labels.site }}"
        """,
    )
    expectation = """
    rule_files: [rules.yml]
    evaluation_interval: 30s
    tests:
      - interval: 1m
        external_labels: {region: eu-1}
        external_url: https://panel.example.com
        input_series:
          - series: 'yakpanel_site_up{site="a.example"}'
            values: '1 0 0 0 0 1 0 1 1 1 1 1 1'
        alert_rule_test:
          - {eval_time: 3m30s, alertname: SiteDown, exp_alerts: []}
          - eval_time: 4m15s
            alertname: SiteDown
            exp_alerts: &down
              - exp_labels: {site: a.example}
                exp_annotations:
                  summary: a.example down in eu-1
                  link: https://panel.example.com/sites/a.example
          - {eval_time: 10m30s, alertname: SiteDown, exp_alerts: *down}
          - {eval_time: 11m, alertname: SiteDown, exp_alerts: []}
    """
    # Down from minute 1, seen a minute late (2m), firing 2m later (4m). Up from 7 (seen
    # at 8), held 3m by keep_firing_for (the 6m flicker never resolved it): resolved at 11m.
    test_file = write(tmp_path, "t.yml", expectation)
    code, output = rules("test", test_file)
    assert code == 0, output
    # The same file expecting the alert half a minute early fails.
    write(tmp_path, "t.yml", expectation.replace("4m15s", "3m45s"))
    code, output = rules("test", test_file)
    assert code == 1
    assert "alertname: SiteDown, time: 3m45s," in output


def test_rules_check(tmp_path: Path) -> None:
    code, output = rules("check", RULES)
    assert (code, output.splitlines()[1]) == (0, "  SUCCESS: 6 rules found")
    code, output = rules("check", RULES, INVALID)
    assert code == 1
    assert "group \"broken\": field interval: invalid duration '1 minute'" in output
    assert "rule 3: recording rules (record:) are not supported" in output
    assert "rule 4 (SiteDown): unknown field 'severity'" in output
    assert rules("check", tmp_path / "nope.yml")[0] == 2


@pytest.mark.parametrize(("path", "status"), [(PASSING, 0), (FAILING, 1)])
def test_as_a_process(path: Path, status: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "yakpanel", "rules", "test", str(path.relative_to(ROOT))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == status, done.stdout + done.stderr
    assert ("  SUCCESS" in done.stdout) == (status == 0)
    assert ("  FAILED:" in done.stdout) == (status == 1)
