"""param_server/server.py + servicer.py over real gRPC on port 0 (DESIGN §4.2, §7; STYLE §13)."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from param_server import wire
from param_server.partition_map import PartitionMap
from param_server.server import ServerConfig, create_server
from param_server.servicer import EPOCH_METADATA_KEY
from param_server.shard import Shard, ShardConfig
from protos.ultramem.v1 import memory_pb2 as pb
from protos.ultramem.v1 import memory_pb2_grpc as pb_grpc
from storage.layout import TableSpec, init_partition_values
from storage.table_store import create_table, open_table

SPEC = TableSpec(name="mem", rows=100, dim=8, num_partitions=4, optimizer="sgd")


def _serve(config: ServerConfig):
    """A started server over a shard holding partitions 0..3 of SPEC; yields (server, shard, channel)."""
    shard = Shard(ShardConfig())
    shard.add_table(SPEC, {p: {"values": init_partition_values(SPEC, p)} for p in range(4)})
    server, _ = create_server(shard, config)
    server.start()
    channel = grpc.insecure_channel(server.address)
    yield server, shard, channel
    channel.close()
    server.stop(0)
    shard.close()


@pytest.fixture
def served(request):
    """A started server over a shard holding partitions 0..3 of SPEC; yields (server, shard, channel)."""
    yield from _serve(getattr(request, "param", ServerConfig()))


def _stub(channel: grpc.Channel) -> pb_grpc.MemoryShardStub:
    return pb_grpc.MemoryShardStub(channel)


def test_binds_loopback_on_a_free_port_by_default(served) -> None:
    server, _, _ = served
    assert server.host == "127.0.0.1" and server.port > 0 and server.address == f"127.0.0.1:{server.port}"


def test_health_service_reports_serving(served) -> None:
    _, _, channel = served
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "ultramem.v1.MemoryShard"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_memory_and_health_services(served) -> None:
    _, _, channel = served
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"ultramem.v1.MemoryShard", "grpc.health.v1.Health"} <= names


def test_info_reports_tables_partitions_and_metrics(served) -> None:
    _, _, channel = served
    info = _stub(channel).Info(pb.InfoRequest(), timeout=5)
    (table,) = info.tables
    assert (table.name, table.rows, table.dim, table.num_partitions) == ("mem", 100, 8, 4)
    assert list(table.partitions) == [0, 1, 2, 3] and table.optimizer == "sgd"
    assert "bytes_resident" in info.metrics and not info.read_only


def test_standalone_partition_map_is_built_from_owned_partitions(served) -> None:
    server, _, channel = served
    pmap = _stub(channel).GetPartitionMap(pb.GetPartitionMapRequest(), timeout=5)
    assert pmap.epoch == 0 and list(pmap.addresses) == [server.address] and list(pmap.owner) == [0, 0, 0, 0]


def test_gather_answers_in_the_requested_wire_dtype(served) -> None:
    _, _, channel = served
    rows = np.array([7, 0, 99])
    header = pb.LookupHeader(table="mem")
    reply = _stub(channel).Gather(pb.GatherRequest(header=header, rows=wire.encode(rows), wire_dtype=pb.BFLOAT16))
    values = wire.decode(reply.values, "values", allowed=("bfloat16",), ndim=2, trailing=(8,))
    full = np.stack([init_partition_values(SPEC, r % 4)[r // 4] for r in rows])
    np.testing.assert_allclose(values.astype(np.float32), full, rtol=2**-8)


def test_stale_epoch_is_failed_precondition_with_the_new_epoch_in_trailing_metadata(served) -> None:
    server, _, channel = served
    server.set_partition_map(PartitionMap.from_owned([server.address], [range(4)], 4, epoch=5))
    header = pb.LookupHeader(table="mem", epoch=4)
    with pytest.raises(grpc.RpcError) as info:
        _stub(channel).Gather(pb.GatherRequest(header=header, rows=wire.encode(np.array([1]))), timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "epoch 4" in info.value.details() and "5" in info.value.details()
    assert dict(info.value.trailing_metadata())[EPOCH_METADATA_KEY] == "5"
    header.epoch = 5  # the current epoch passes
    _stub(channel).Gather(pb.GatherRequest(header=header, rows=wire.encode(np.array([1]))), timeout=5)


def test_messages_larger_than_grpc_default_4mb_are_accepted(served) -> None:
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(served[0].address, options=options) as big:
        rows = np.zeros(600_000, dtype=np.int64)  # 4.8 MB of row ids, 19 MB answer
        reply = _stub(big).Gather(pb.GatherRequest(header=pb.LookupHeader(table="mem"), rows=wire.encode(rows)))
        assert list(reply.values.shape) == [600_000, 8]


@pytest.mark.parametrize("served", [ServerConfig(token="s3cret")], indirect=True)
def test_token_auth_rejects_missing_or_wrong_tokens_but_leaves_health_open(served) -> None:
    _, _, channel = served
    for metadata in ((), (("authorization", "Bearer nope"),)):
        with pytest.raises(grpc.RpcError) as info:
            _stub(channel).Info(pb.InfoRequest(), timeout=5, metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _stub(channel).Info(pb.InfoRequest(), timeout=5, metadata=(("authorization", "Bearer s3cret"),)).tables
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _with_checkpoint_dir(tmp_path: Path) -> ServerConfig:
    return ServerConfig(checkpoint_dir=str(tmp_path / "ckpt"))


@pytest.fixture
def ckpt_served(tmp_path: Path):
    """`served` with the Checkpoint RPC confined to tmp_path/ckpt."""
    (tmp_path / "ckpt").mkdir()
    yield from _serve(_with_checkpoint_dir(tmp_path))


def test_checkpoint_writes_owned_partitions_after_draining(ckpt_served, tmp_path: Path) -> None:
    _, shard, channel = ckpt_served
    tmp_path = tmp_path / "ckpt"
    create_table(tmp_path / "tables" / "mem", SPEC, initialize=False)
    header = pb.PushHeader(table="mem", worker_id=1, seq=1, step=0, lr=0.5)
    grads = np.ones((2, 8), np.float32)
    _stub(channel).PushGradients(pb.PushGradientsRequest(
        header=header, rows=wire.encode(np.array([1, 6])), grads=wire.encode(grads)), timeout=5)
    reply = _stub(channel).Checkpoint(pb.CheckpointRequest(tables_dir=str(tmp_path / "tables")), timeout=30)
    assert list(reply.tables) == ["mem"] and list(reply.partitions) == [0, 1, 2, 3]
    saved = open_table(tmp_path / "tables" / "mem").read_partition(1)["values"]
    np.testing.assert_array_equal(saved, shard.export_partitions("mem")[1]["values"])
    np.testing.assert_allclose(saved[0], init_partition_values(SPEC, 1)[0] - 0.5)


def _checkpoint_code(channel: grpc.Channel, tables_dir: str) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        _stub(channel).Checkpoint(pb.CheckpointRequest(tables_dir=tables_dir), timeout=5)
    return info.value.code()


def test_checkpoint_is_refused_without_a_checkpoint_directory(served, tmp_path: Path) -> None:
    _, _, channel = served
    create_table(tmp_path / "tables" / "mem", SPEC, initialize=False)
    before = open_table(tmp_path / "tables" / "mem").read_partition(1)["values"].copy()
    assert _checkpoint_code(channel, str(tmp_path / "tables")) == grpc.StatusCode.PERMISSION_DENIED
    np.testing.assert_array_equal(open_table(tmp_path / "tables" / "mem").read_partition(1)["values"], before)


def test_checkpoint_outside_its_directory_is_denied_and_writes_nothing(ckpt_served, tmp_path: Path) -> None:
    _, _, channel = ckpt_served
    outside = tmp_path / "outside"
    create_table(outside / "mem", SPEC, initialize=False)
    (tmp_path / "ckpt" / "link").symlink_to(outside)
    before = sorted(p.name for p in (outside / "mem").rglob("*"))
    for name in (str(outside), "../outside", "link", "/", "../../../../etc"):
        assert _checkpoint_code(channel, name) == grpc.StatusCode.PERMISSION_DENIED, name
    assert sorted(p.name for p in (outside / "mem").rglob("*")) == before


def test_checkpoint_bad_names_are_not_found_or_invalid_never_internal(ckpt_served, tmp_path: Path) -> None:
    _, _, channel = ckpt_served
    (tmp_path / "ckpt" / "empty").mkdir()
    (tmp_path / "ckpt" / "file").write_text("x")
    assert _checkpoint_code(channel, "nope") == grpc.StatusCode.NOT_FOUND
    assert _checkpoint_code(channel, "file") == grpc.StatusCode.NOT_FOUND
    assert _checkpoint_code(channel, "empty") == grpc.StatusCode.NOT_FOUND  # no table group "mem" in it
    assert _checkpoint_code(channel, "") == grpc.StatusCode.INVALID_ARGUMENT
    assert _checkpoint_code(channel, "a" * 300) == grpc.StatusCode.INVALID_ARGUMENT  # file name too long
    assert _checkpoint_code(channel, "a\x00b") == grpc.StatusCode.INVALID_ARGUMENT


def test_stop_refuses_further_calls(served) -> None:
    server, _, channel = served
    server.stop(0)
    with pytest.raises(grpc.RpcError) as info:
        _stub(channel).Info(pb.InfoRequest(), timeout=2)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
