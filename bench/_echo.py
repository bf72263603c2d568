"""A bare gRPC server that answers every call with the same N bytes: the ceiling of gRPC itself.

`bench lookup` runs it as a process like a shard (`python bench/_echo.py NBYTES`, the same malloc
settings and server options as a shard's) and requests 1 MB answers with the client's channel
settings, both as unary calls (`Get`) and as server streams (`Stream`: the request is the answer
count, as a little-endian uint64), so "Gather / echo" says how much of gRPC's own rate the shard's
handler leaves.
The first line printed says where it listens; stop it by PID.
"""

from __future__ import annotations

import itertools
import os
import sys
from concurrent import futures
from pathlib import Path

import grpc

if str(Path(__file__).resolve().parent.parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from param_server.server import DEFAULT_MAX_MESSAGE_BYTES, grpc_options  # noqa: E402

METHOD = "/ultramem.bench.Echo/Get"
STREAM_METHOD = "/ultramem.bench.Echo/Stream"


def main(nbytes: int) -> None:
    payload = os.urandom(nbytes)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=grpc_options(DEFAULT_MAX_MESSAGE_BYTES))
    unary = grpc.unary_unary_rpc_method_handler(lambda request, context: payload)
    stream = grpc.unary_stream_rpc_method_handler(
        lambda request, context: itertools.repeat(payload, int.from_bytes(request, "little")))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "ultramem.bench.Echo", {"Get": unary, "Stream": stream}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main(int(sys.argv[1]))
