"""`python -m bench`: run every benchmark module in bench/ and pass its JSON lines through.

`python -m bench NAME …` runs only the named ones. A benchmark that fails makes the
run fail, after the others have run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    names = argv or sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_"))
    failed = []
    for name in names:
        result = subprocess.run([sys.executable, "-m", f"bench.{name}"], cwd=HERE.parent)
        if result.returncode != 0:
            failed.append(name)
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
