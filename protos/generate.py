"""Regenerate the Python code of the ultramem wire protocol (STYLE §14, DESIGN §4.2).

`protos/ultramem/v1/memory.proto` is the source; this script writes `memory_pb2.py`,
`memory_pb2.pyi` and `memory_pb2_grpc.py` beside it with grpcio-tools. The generated files are
committed and never edited; tests/param_server/test_protos.py regenerates them into a temporary
directory and fails on any difference but the generator's version stamps (`normalized`), and
checks that those stamps name the grpcio-tools release pinned in requirements/lock.txt. The proto
is compiled from the repository root, so the generated code imports as
`protos.ultramem.v1.memory_pb2`.

Usage: python protos/generate.py [OUT_ROOT]   (default OUT_ROOT: the repository root)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("protos/ultramem/v1/memory.proto")
GENERATED = ("memory_pb2.py", "memory_pb2.pyi", "memory_pb2_grpc.py")


# The lines where the generator writes its own version (grpcio-tools, and the protobuf it bundles).
_STAMPS = (
    re.compile(r"^(# Protobuf Python Version: ).*$", re.M),
    re.compile(r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,"),
    re.compile(r"^(GRPC_GENERATED_VERSION = )'[^']*'$", re.M),
)


def normalized(code: str) -> str:
    """Generated code with the generator's version stamps blanked, so that two patch releases of
    grpcio-tools compare equal while any change of the proto still shows."""
    for stamp in _STAMPS:
        code = stamp.sub(r"\1<version>", code)
    return code


def grpc_generated_version(grpc_code: str) -> str:
    """The grpcio-tools release that wrote a `*_pb2_grpc.py` file."""
    match = re.search(r"^GRPC_GENERATED_VERSION = '([^']*)'$", grpc_code, re.M)
    if match is None:
        raise ValueError("no GRPC_GENERATED_VERSION line: not grpcio-tools output")
    return match.group(1)


def generate(out_root: Path = REPO_ROOT, src_root: Path = REPO_ROOT) -> list[Path]:
    """Compile `src_root`'s proto into `out_root/protos/ultramem/v1/`; returns the generated paths."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    out_root = Path(out_root)
    (out_root / PROTO.parent).mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{src_root}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(Path(src_root) / PROTO),
    ]
    status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status}: {' '.join(args)}")
    return [out_root / PROTO.parent / name for name in GENERATED]


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT
    for path in generate(root):
        print(path)
