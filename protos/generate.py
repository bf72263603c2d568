"""Regenerate the Python code of the ultramem wire protocol (STYLE §14, DESIGN §4.2).

`protos/ultramem/v1/memory.proto` is the source; this script writes `memory_pb2.py`,
`memory_pb2.pyi` and `memory_pb2_grpc.py` beside it with grpcio-tools. The generated files are
committed and never edited; tests/param_server/test_protos.py regenerates them into a temporary
directory and fails on any byte difference. The proto is compiled from the repository root, so
the generated code imports as `protos.ultramem.v1.memory_pb2`.

Usage: python protos/generate.py [OUT_ROOT]   (default OUT_ROOT: the repository root)
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("protos/ultramem/v1/memory.proto")
GENERATED = ("memory_pb2.py", "memory_pb2.pyi", "memory_pb2_grpc.py")


def generate(out_root: Path = REPO_ROOT) -> list[Path]:
    """Compile the proto into `out_root/protos/ultramem/v1/`; returns the generated paths."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    out_root = Path(out_root)
    (out_root / PROTO.parent).mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(PROTO),
    ]
    status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status}: {' '.join(args)}")
    return [out_root / PROTO.parent / name for name in GENERATED]


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT
    for path in generate(root):
        print(path)
