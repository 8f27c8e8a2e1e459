"""Regenerates the committed Python stubs of every `.proto` under `proto/`.

That is salience's own schema (`salience/v1`) and the Open Inference Protocol's
(`inference/v2`, KServe's published definition), each importable by its path.

Run `python scripts/generate_protos.py` after changing a `.proto`; pass `--out DIR`
to write the stubs elsewhere (the drift test compares such a fresh copy with the
committed files).
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"


def proto_files() -> list[Path]:
    """Every schema file, relative to the proto root, in a stable order."""
    return sorted(p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    """Writes `_pb2.py`, `_pb2.pyi` and `_pb2_grpc.py` for every schema file."""
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=PROTO_ROOT, help="output root (default: proto/)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    generate(args.out)
    print(f"generated stubs for {len(proto_files())} file(s) under {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
