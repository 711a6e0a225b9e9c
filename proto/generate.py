"""Generate the Python gRPC stubs for the teacher contract.

    python proto/generate.py                 # writes teacher_server/pb/
    python proto/generate.py --out /tmp/pb   # writes elsewhere (the staleness test does this)

protoc emits absolute imports (`from distillery.teacher.v1 import teacher_pb2`); they are
rewritten to relative ones so the stubs live inside the `teacher_server.pb` package.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROTO = "distillery/teacher/v1/teacher.proto"
DEFAULT_OUT = ROOT.parent / "teacher_server" / "pb"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency, only needed to regenerate

    tmp = out / "_gen"
    tmp.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(
        ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
         f"--grpc_python_out={tmp}", str(ROOT / PROTO)]
    )
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    written = []
    for src in sorted((tmp / Path(PROTO).parent).glob("teacher_pb2*")):
        text = src.read_text()
        text = re.sub(r"^from distillery\.teacher\.v1 import", "from . import", text, flags=re.M)
        dst = out / src.name
        dst.write_text(text)
        written.append(dst)
    for p in sorted(tmp.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    tmp.rmdir()
    init = out / "__init__.py"
    init.write_text('"""Generated gRPC stubs for distillery.teacher.v1 (do not edit; run `make proto`)."""\n')
    return [init, *written]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    for path in generate(args.out):
        print(path, file=sys.stderr)


if __name__ == "__main__":
    main()
