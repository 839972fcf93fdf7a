"""`python -m bench`: run every benchmark module in bench/ and pass its JSON lines through.

`python -m bench NAME …` runs only the named ones; arguments after `--` go to each of
them (`python -m bench ingest -- --series 20000`; see `python -m bench.NAME --help`).
A benchmark that fails makes the run fail, after the others have run. Modules whose name
starts with `_` are helpers, not benchmarks.

Benchmarks: `foundation` (embedded Kafka, ClickHouse, PostgreSQL baselines), `commands`
(command round trips against SSH), `ingest` (metrics end to end against VictoriaMetrics
and Prometheus), `query` (metrics query latency), `alert_latency` (sample to webhook
against Prometheus + Alertmanager).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    names = argv or sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_"))
    failed = []
    for name in names:
        result = subprocess.run([sys.executable, "-m", f"bench.{name}", *extra], cwd=HERE.parent)
        if result.returncode != 0:
            failed.append(name)
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
