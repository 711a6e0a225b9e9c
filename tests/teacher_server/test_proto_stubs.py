"""The committed gRPC stubs are exactly what `make proto` generates from teacher.proto today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "teacher_server" / "pb"


def test_committed_stubs_equal_a_fresh_generation(tmp_path):
    out = tmp_path / "pb"
    run = subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), "--out", str(out)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    fresh = sorted(p.name for p in out.iterdir())
    committed = sorted(p.name for p in COMMITTED.iterdir() if p.is_file() and p.suffix in (".py", ".pyi"))
    assert fresh == committed == ["__init__.py", "teacher_pb2.py", "teacher_pb2.pyi", "teacher_pb2_grpc.py"]
    stale = [name for name in fresh if (out / name).read_bytes() != (COMMITTED / name).read_bytes()]
    assert not stale, f"stale stubs {stale}: run `make proto` and commit teacher_server/pb/"


def test_stubs_describe_the_teacher_service():
    from teacher_server.pb import teacher_pb2

    service = teacher_pb2.DESCRIPTOR.services_by_name["Teacher"]
    assert service.full_name == "distillery.teacher.v1.Teacher"
    assert [m.name for m in service.methods] == ["Info", "Score", "Generate"]
