"""The committed stubs are exactly what the generation script makes from the .proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert [str(p) for p in fresh] == [
        "inference/v2/grpc_service_pb2.py",
        "inference/v2/grpc_service_pb2.pyi",
        "inference/v2/grpc_service_pb2_grpc.py",
        "salience/v1/salience_pb2.py",
        "salience/v1/salience_pb2.pyi",
        "salience/v1/salience_pb2_grpc.py",
    ]
    for rel in fresh:
        committed = ROOT / "proto" / rel
        assert committed.read_text() == (tmp_path / rel).read_text(), (
            f"{rel} drifted from the .proto: run scripts/generate_protos.py and commit"
        )
