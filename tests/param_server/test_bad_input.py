"""Bad requests through a real server get the right status code, a clear message, and change nothing.

DESIGN §4.2 / STYLE §11: the servicer validates the wire form, the shard validates the rest, all
before mutating. Each case sends a raw request (no client-side checks in the way) to a shard on
port 0 and compares the shard's partitions, optimizer state and clocks byte for byte afterwards.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from param_server import wire
from param_server.server import ServerConfig, create_server
from param_server.shard import Shard, ShardConfig
from protos.ultramem.v1 import memory_pb2 as pb
from protos.ultramem.v1 import memory_pb2_grpc as pb_grpc
from storage.layout import TableSpec, init_partition_values

SPEC = TableSpec(name="mem", rows=64, dim=8, num_partitions=4, optimizer="adamw")
OWNED = (0, 1, 2)  # partition 3 lives elsewhere
MAX_ROWS = 1000
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def served():
    shard = Shard(ShardConfig(max_rows_per_request=MAX_ROWS))
    shard.add_table(SPEC, {p: {"values": init_partition_values(SPEC, p)} for p in OWNED})
    server, _ = create_server(shard, ServerConfig(max_message_bytes=2 << 20))
    server.start()
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)])
    yield pb_grpc.MemoryShardStub(channel), shard
    channel.close()
    server.stop(0)
    shard.close()


def _snapshot(shard: Shard) -> tuple:
    shard.drain()
    parts = shard.export_partitions("mem")
    return ({p: {k: a.tobytes() for k, a in arrays.items()} for p, arrays in parts.items()},
            shard.last_seq(1), shard.applied_step(1))


def _push(rows, grads, *, table="mem", seq=1) -> pb.PushGradientsRequest:
    header = pb.PushHeader(table=table, worker_id=1, seq=seq, step=0, lr=0.1)
    return pb.PushGradientsRequest(header=header, rows=wire.encode(np.asarray(rows)), grads=wire.encode(grads))


def _gather(rows, *, table="mem") -> pb.GatherRequest:
    return pb.GatherRequest(header=pb.LookupHeader(table=table), rows=wire.encode(np.asarray(rows)))


_G = np.ones((2, 8), np.float32)
_NAN = np.where(np.eye(2, 8) > 0, np.nan, 1.0).astype(np.float32)
_INF = np.full((2, 8), np.inf, np.float32)


def _bad_length() -> pb.PushGradientsRequest:
    req = _push([0, 1], _G)
    req.grads.data = req.grads.data[:-3]
    return req


def _float_rows() -> pb.GatherRequest:
    req = _gather([0, 1])
    req.rows.CopyFrom(wire.encode(np.array([0.0, 1.0], np.float32)))
    return req


CASES = [
    ("gather_row_out_of_range", "Gather", lambda: _gather([0, 64]), Code.INVALID_ARGUMENT, "rows must be in"),
    ("gather_negative_row", "Gather", lambda: _gather([-1]), Code.INVALID_ARGUMENT, "rows must be in"),
    ("push_row_out_of_range", "PushGradients", lambda: _push([1, 1000], _G), Code.INVALID_ARGUMENT, "rows must be in"),
    ("rows_of_wrong_dtype", "Gather", _float_rows, Code.INVALID_ARGUMENT, "dtype float32 not allowed"),
    ("grads_of_wrong_dtype", "PushGradients", lambda: _push([0, 1], np.ones((2, 8), np.int64)),
     Code.INVALID_ARGUMENT, "dtype int64 not allowed"),
    ("grads_of_wrong_dim", "PushGradients", lambda: _push([0, 1], np.ones((2, 4), np.float32)),
     Code.INVALID_ARGUMENT, "trailing dims"),
    ("grads_and_rows_disagree", "PushGradients", lambda: _push([0, 1, 2], _G), Code.INVALID_ARGUMENT, "grads has 2"),
    ("byte_length_mismatch", "PushGradients", _bad_length, Code.INVALID_ARGUMENT, "bytes do not match"),
    ("nan_gradient", "PushGradients", lambda: _push([0, 1], _NAN), Code.INVALID_ARGUMENT, "non-finite"),
    ("inf_gradient", "PushGradients", lambda: _push([0, 1], _INF), Code.INVALID_ARGUMENT, "non-finite"),
    ("unknown_table_gather", "Gather", lambda: _gather([0], table="nope"), Code.NOT_FOUND, "nope"),
    ("unknown_table_push", "PushGradients", lambda: _push([0, 1], _G, table="nope"), Code.NOT_FOUND, "nope"),
    ("empty_gather_request", "Gather", pb.GatherRequest, Code.INVALID_ARGUMENT, "empty request"),
    ("empty_push_request", "PushGradients", pb.PushGradientsRequest, Code.INVALID_ARGUMENT, "empty request"),
    ("empty_pooled_request", "PooledGather", pb.PooledGatherRequest, Code.INVALID_ARGUMENT, "empty request"),
    ("gather_with_no_rows", "Gather", lambda: _gather(np.zeros(0, np.int64)), Code.INVALID_ARGUMENT, "empty"),
    ("too_many_rows", "Gather", lambda: _gather(np.zeros(MAX_ROWS + 1, np.int64)),
     Code.RESOURCE_EXHAUSTED, "max_rows_per_request"),
    ("message_over_the_size_limit", "PushGradients",
     lambda: _push(np.zeros(70_000, np.int64), np.ones((70_000, 8), np.float32)), Code.RESOURCE_EXHAUSTED, ""),
    ("row_of_a_partition_owned_elsewhere", "Gather", lambda: _gather([3]), Code.FAILED_PRECONDITION,
     "does not own partitions [3]"),
    ("push_with_seq_zero", "PushGradients", lambda: _push([0, 1], _G, seq=0), Code.INVALID_ARGUMENT, "seq"),
]


@pytest.mark.parametrize(("name", "method", "make", "code", "needle"), CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_its_status_code_and_changes_nothing(served, name, method, make, code, needle) -> None:
    stub, shard = served
    before = _snapshot(shard)
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, method)(make(), timeout=10)
    assert info.value.code() == code, info.value.details()
    assert needle in (info.value.details() or "")
    assert _snapshot(shard) == before


def test_pooled_gather_with_projector_out_of_range_is_invalid_argument(served) -> None:
    stub, shard = served
    before = _snapshot(shard)
    req = pb.PooledGatherRequest(
        header=pb.LookupHeader(table="mem"), rows=wire.encode(np.array([0, 1])),
        projector=wire.encode(np.array([0, 2])), token=wire.encode(np.array([0, 0])),
        scores=wire.encode(np.ones((2, 2), np.float32)), num_projectors=2)
    with pytest.raises(grpc.RpcError) as info:
        stub.PooledGather(req, timeout=10)
    assert info.value.code() == Code.INVALID_ARGUMENT and "projector" in info.value.details()
    assert _snapshot(shard) == before


def test_a_good_push_after_bad_ones_still_applies(served) -> None:
    stub, shard = served
    before = shard.export_partitions("mem")[0]["values"][0].copy()
    assert stub.PushGradients(_push([0], np.ones((1, 8), np.float32), seq=7), timeout=10).accepted
    shard.drain()
    assert not np.array_equal(shard.export_partitions("mem")[0]["values"][0], before)
