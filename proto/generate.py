"""Regenerate the Python modules of proto/*.proto (run: python -m proto.generate).

Generated files are committed; tests/unit/test_proto_drift.py fails when they differ
from what this produces."""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = ("agent.proto",)


def generate(out_dir: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{HERE}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(HERE / p) for p in PROTOS],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    written = sorted(out_dir.glob("*_pb2*.py*"))
    for path in written:
        text = path.read_text()
        # Generated gRPC modules import siblings absolutely; make them package-relative.
        text = re.sub(r"^import (\w+_pb2) as", r"from proto import \1 as", text, flags=re.M)
        path.write_text(text)
    return written


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            (HERE / path.name).write_text(path.read_text())
            print(f"wrote proto/{path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
