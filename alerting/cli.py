"""`yakpanel rules …`: check alerting rule files and run their unit tests."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

rules_app = typer.Typer(
    name="rules",
    help="Alerting rule files: check them, run their unit tests (promtool format).",
    no_args_is_help=True,
    add_completion=False,
)

FilesArgument = Annotated[list[Path], typer.Argument(help="Files to read.", show_default=False)]


@rules_app.command(
    "test",
    help="Run rule unit tests written in `promtool test rules` format. Exit status: 0 when"
    " every test passes, 1 when one fails (or its rules do not load), 2 when a test file"
    " cannot be read.",
)
def test_rules(files: FilesArgument) -> None:
    from alerting.promtool import run_test_files

    raise typer.Exit(run_test_files(files, out=_say))


@rules_app.command(
    "check",
    help="Validate rule files: YAML shape, durations, PromQL, labels and templates. Exit"
    " status: 0 when all are valid, 1 when one is not, 2 when one cannot be read.",
)
def check_rules(files: FilesArgument) -> None:
    from alerting.rules import RuleError, count_rules, load_rule_file

    status = 0
    for path in files:
        _say(f"Checking {path}")
        try:
            groups = load_rule_file(path)
        except OSError as exc:
            _say(f"  FAILED:\n    cannot read the file: {exc.strerror or exc}")
            status = 2
        except RuleError as exc:
            _say("  FAILED:")
            for problem in exc.problems:
                _say(f"    {problem}")
            status = max(status, 1)
        else:
            _say(f"  SUCCESS: {count_rules(groups)} rules found")
        _say("")
    raise typer.Exit(status)


def _say(line: str) -> None:
    print(line, flush=True)
