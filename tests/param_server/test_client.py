"""param_server/client.py against real in-process shards on port 0 (DESIGN §4.1-4.3).

Routing, dedupe and request order, chunking, one numbered push per shard per step, retries that
reuse their seq, backoff on RESOURCE_EXHAUSTED, map refresh on a stale epoch, token auth.
"""

from __future__ import annotations

import itertools

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from param_server import wire
from param_server.client import Client, ClientConfig
from param_server.errors import InvalidRequestError, ReadOnlyError, UnknownTableError
from param_server.partition_map import PartitionMap
from param_server.server import ServerConfig, create_server
from param_server.shard import Shard, ShardConfig
from protos.ultramem.v1 import memory_pb2 as pb
from storage.layout import TableSpec, init_partition_values
from tests.param_server.conftest import with_behaviour

SPEC = TableSpec(name="mem", rows=500, dim=16, num_partitions=8, optimizer="sgd")


def _full_table(spec: TableSpec) -> np.ndarray:
    rows = np.arange(spec.rows)
    out = np.empty((spec.rows, spec.dim), np.float32)
    for p in range(spec.num_partitions):
        mine = rows[rows % spec.num_partitions == p]
        out[mine] = init_partition_values(spec, p)[mine // spec.num_partitions]
    return out


class _FailFirst(grpc.ServerInterceptor):
    """Fault injection: the first `times` calls of `method` fail with `code` (after running if `after`)."""

    def __init__(self, method: str, code: grpc.StatusCode, times: int, after: bool) -> None:
        self.method, self.code, self.left, self.after = method, code, times, after

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not details.method.endswith("/" + self.method):
            return handler

        def wrap(inner):
            def wrapped(request, context):
                if self.left > 0:
                    self.left -= 1
                    if self.after:
                        inner(request, context)  # the shard applies it; the answer is "lost"
                    context.abort(self.code, "injected fault")
                return inner(request, context)
            return wrapped

        return with_behaviour(handler, wrap)


class _BreakStreams(grpc.ServerInterceptor):
    """The first `times` GatherStream calls end with UNAVAILABLE after `answers` answers; every
    call's request row count is kept."""

    def __init__(self, times: int, answers: int) -> None:
        self.left, self.answers, self.asked = times, answers, []

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not details.method.endswith("/GatherStream"):
            return handler

        def wrap(inner):
            def wrapped(request, context):
                self.asked.append(len(request.rows.data) // 8)
                answers = inner(request, context)
                if self.left > 0:
                    self.left -= 1
                    yield from itertools.islice(answers, self.answers)
                    context.abort(grpc.StatusCode.UNAVAILABLE, "injected: connection lost")
                yield from answers
            return wrapped

        return with_behaviour(handler, wrap)


class Cluster:
    """S shards (round-robin partitions) with servers started on port 0."""

    def __init__(self, num_shards: int, *, interceptors=(), server_config=None, shard_config=None) -> None:
        self.shards, self.servers = [], []
        for s in range(num_shards):
            shard = Shard(shard_config or ShardConfig(), shard_id=s)
            owned = range(s, SPEC.num_partitions, num_shards)
            shard.add_table(SPEC, {p: {"values": init_partition_values(SPEC, p)} for p in owned})
            server, _ = create_server(shard, server_config or ServerConfig(), interceptors=interceptors)
            self.shards.append(shard)
            self.servers.append(server.start())
        self.addresses = [s.address for s in self.servers]

    def close(self) -> None:
        for server, shard in zip(self.servers, self.shards):
            server.stop(0)
            shard.close()


@pytest.fixture(scope="module")
def two_shards():
    cluster = Cluster(2)
    yield cluster
    cluster.close()


@settings(max_examples=25, deadline=None)
@given(rows=st.lists(st.integers(0, SPEC.rows - 1), min_size=1, max_size=300),
       chunk=st.sampled_from([64, 1000, 1 << 20]), distinct=st.booleans())
def test_gather_returns_rows_in_request_order_duplicates_included(two_shards, rows, chunk, distinct) -> None:
    if distinct:  # all unique: asked for in request order, answers written in place
        rows = list(dict.fromkeys(rows))
    with Client(two_shards.addresses, config=ClientConfig(chunk_bytes=chunk, max_in_flight=2)) as client:
        got = client.gather("mem", np.array(rows))
    np.testing.assert_array_equal(got, _full_table(SPEC)[rows])


def test_unique_rows_from_one_shard_come_back_in_request_order_in_blocks() -> None:
    rows = np.random.default_rng(5).permutation(SPEC.rows)  # every row once, shuffled
    cluster = Cluster(1)
    try:
        with Client(cluster.addresses, config=ClientConfig(chunk_bytes=64 * SPEC.dim * 4)) as client:
            out = np.full((rows.size, SPEC.dim), np.nan, np.float32)
            assert client.gather("mem", rows, out=out) is out
    finally:
        cluster.close()
    np.testing.assert_array_equal(out, _full_table(SPEC)[rows])


def test_bfloat16_wire_is_within_bf16_rounding(two_shards) -> None:
    with Client(two_shards.addresses) as client:
        rows = np.arange(SPEC.rows)
        got = client.gather("mem", rows, wire_dtype="bfloat16")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _full_table(SPEC), rtol=2**-8)


def test_client_knows_tables_and_rejects_bad_rows_before_sending(two_shards) -> None:
    with Client(two_shards.addresses) as client:
        assert client.table("mem").dim == 16
        with pytest.raises(UnknownTableError):
            client.gather("nope", np.array([1]))
        with pytest.raises(InvalidRequestError, match=r"\[0, 500\)"):
            client.gather("mem", np.array([500]))


def test_every_shard_gets_one_numbered_push_per_step_even_without_rows() -> None:
    cluster = Cluster(2)
    try:
        with Client(cluster.addresses, worker_id=3) as client:
            client.push("mem", np.array([0, 2, 4]), np.ones((3, 16), np.float32), lr=0.1, step=0)  # even rows
            client.push("mem", np.array([1]), np.ones((1, 16), np.float32), lr=0.1, step=1)
        for shard in cluster.shards:
            shard.drain()
            assert shard.last_seq(3) == 2 and shard.applied_step(3) == 1
    finally:
        cluster.close()


def test_lookups_report_the_workers_applied_step_so_staleness_can_be_measured() -> None:
    cluster = Cluster(2)
    try:
        with Client(cluster.addresses, worker_id=5) as client:
            assert client.applied_step("mem") is None  # no lookup yet
            client.gather("mem", np.arange(4))
            assert client.applied_step("mem") == -1  # nothing pushed yet
            for step in range(3):
                client.push("mem", np.array([step]), np.ones((1, 16), np.float32), lr=0.1, step=step)
            client.gather("mem", np.arange(4), min_step=2)
            assert client.applied_step("mem") == 2
            tokens = np.array([0, 0, 1])
            client.pooled_gather("mem", np.array([0, 1, 2]), np.zeros(3, np.int64), tokens,
                                 np.ones((3, 1), np.float32), 2, 1, min_step=2)
            assert client.applied_step("mem") == 2
    finally:
        cluster.close()


def test_push_then_lookup_with_min_step_sees_the_update_and_duplicates_are_summed() -> None:
    cluster = Cluster(2)
    try:
        with Client(cluster.addresses, config=ClientConfig(chunk_bytes=128)) as client:
            rows = np.array([5, 5, 6, 7, 8, 9, 10, 11, 12])
            client.push("mem", rows, np.ones((rows.size, 16), np.float32), lr=0.5, step=2, wait=False)
            client.flush()
            got = client.gather("mem", np.array([5, 6]), min_step=2)
        want = _full_table(SPEC)[[5, 6]] - 0.5 * np.array([[2.0], [1.0]], np.float32)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert all(s.last_seq(0) >= 2 for s in cluster.shards)  # 128-byte chunks: several pushes each
    finally:
        cluster.close()


def test_retried_push_is_applied_once() -> None:
    fault = _FailFirst("PushGradients", grpc.StatusCode.UNAVAILABLE, times=1, after=True)
    cluster = Cluster(1, interceptors=[fault])
    try:
        with Client(cluster.addresses, config=ClientConfig(backoff_s=0.001)) as client:
            client.push("mem", np.array([3]), np.ones((1, 16), np.float32), lr=1.0, step=0)
            got = client.gather("mem", np.array([3]), min_step=0)
        assert fault.left == 0
        np.testing.assert_allclose(got[0], _full_table(SPEC)[3] - 1.0, rtol=1e-6)
        assert cluster.shards[0].metrics()["pushes_duplicate"] == 1
    finally:
        cluster.close()


@pytest.mark.parametrize(("chunk", "method"), [(1 << 20, "Gather"), (64, "GatherStream")],
                         ids=["one-call-blocking", "streamed"])
def test_resource_exhausted_is_retried_with_backoff(chunk, method) -> None:
    # one answer per shard is a Gather on fanout's blocking path; more answers stream
    fault = _FailFirst(method, grpc.StatusCode.RESOURCE_EXHAUSTED, times=3, after=False)
    cluster = Cluster(1, interceptors=[fault])
    try:
        with Client(cluster.addresses, config=ClientConfig(backoff_s=0.001, chunk_bytes=chunk)) as client:
            np.testing.assert_array_equal(client.gather("mem", np.array([1, 2])), _full_table(SPEC)[[1, 2]])
        assert fault.left == 0
    finally:
        cluster.close()


def test_a_broken_stream_is_resumed_asking_only_for_the_answers_it_did_not_get() -> None:
    rows = np.random.default_rng(7).permutation(SPEC.rows)[:300]
    per_answer = 16  # 64-byte rows in 1 KB answers
    fault = _BreakStreams(times=2, answers=3)
    cluster = Cluster(1, interceptors=[fault])
    try:
        config = ClientConfig(backoff_s=0.001, chunk_bytes=per_answer * SPEC.dim * 4, stream_answers=8,
                              channels_per_shard=1)
        with Client(cluster.addresses, config=config) as client:
            got = client.gather("mem", rows)
    finally:
        cluster.close()
    np.testing.assert_array_equal(got, _full_table(SPEC)[rows])
    # 300 rows: calls of 128, 128 and 44 rows. The first breaks after 3 answers (48 rows) and is
    # asked again for its other 80, which breaks after 48 more and is asked for the last 32.
    assert fault.asked == [128, 128 - 48, 128 - 96, 128, 44]


def test_a_streamed_lookup_is_refused_whole_before_any_answer(two_shards) -> None:
    layout = PartitionMap.round_robin(two_shards.addresses, SPEC.num_partitions, epoch=0)
    channel = grpc.insecure_channel(two_shards.addresses[0])
    call = channel.unary_stream("/ultramem.v1.MemoryShard/GatherStream",
                                request_serializer=pb.GatherRequest.SerializeToString,
                                response_deserializer=pb.GatherResponse.FromString)
    mine = np.flatnonzero(layout.route(np.arange(SPEC.rows)) == 0)
    theirs = np.flatnonzero(layout.route(np.arange(SPEC.rows)) == 1)
    try:
        def ask(rows, per_answer=4):
            return list(call(pb.GatherRequest(header=pb.LookupHeader(table="mem"), rows=wire.encode(rows, "int64"),
                                              rows_per_answer=per_answer), timeout=10))

        answers = ask(mine[:10])
        assert [a.values.shape[0] for a in answers] == [4, 4, 2]
        got = np.concatenate([wire.decode_values(a.values, "values") for a in answers])
        np.testing.assert_array_equal(got, _full_table(SPEC)[mine[:10]])
        assert [a.values.shape[0] for a in ask(mine[:10], per_answer=0)] == [10]
        for bad, code in ((np.concatenate([mine[:8], theirs[:1]]), grpc.StatusCode.FAILED_PRECONDITION),
                          (np.concatenate([mine[:8], [SPEC.rows]]), grpc.StatusCode.INVALID_ARGUMENT),
                          (mine[:0], grpc.StatusCode.INVALID_ARGUMENT)):
            answers = call(pb.GatherRequest(header=pb.LookupHeader(table="mem"), rows=wire.encode(bad, "int64"),
                                            rows_per_answer=4), timeout=10)
            with pytest.raises(grpc.RpcError) as info:
                next(answers)  # not even the first 4 rows, which are fine
            assert info.value.code() == code
    finally:
        channel.close()


def test_stale_epoch_refreshes_the_partition_map_and_retries(two_shards) -> None:
    layout = PartitionMap.round_robin(two_shards.addresses, SPEC.num_partitions, epoch=1)
    for server in two_shards.servers:
        server.set_partition_map(layout)
    try:
        with Client(two_shards.addresses, partition_map=layout) as client:
            for server in two_shards.servers:  # the coordinator bumps the epoch behind the client's back
                server.set_partition_map(layout.with_epoch(2))
            got = client.gather("mem", np.array([1, 2, 3]))
            assert client.partition_map.epoch == 2
            client.push("mem", np.array([1]), np.zeros((1, 16), np.float32), lr=0.0, step=0)
        np.testing.assert_array_equal(got, _full_table(SPEC)[[1, 2, 3]])
    finally:
        for server in two_shards.servers:
            server.set_partition_map(layout.with_epoch(0))


def test_connect_bootstraps_the_whole_map_from_one_shard(two_shards) -> None:
    layout = PartitionMap.round_robin(two_shards.addresses, SPEC.num_partitions, epoch=0)
    two_shards.servers[1].set_partition_map(layout)
    with Client.connect(two_shards.addresses[1]) as client:
        assert client.partition_map.addresses == tuple(two_shards.addresses)
        np.testing.assert_array_equal(client.gather("mem", np.arange(20)), _full_table(SPEC)[:20])


def test_token_is_sent_on_every_call() -> None:
    cluster = Cluster(1, server_config=ServerConfig(token="tok"))
    try:
        with Client(cluster.addresses, config=ClientConfig(token="tok", chunk_bytes=64 * 4 * SPEC.dim)) as client:
            client.gather("mem", np.array([0]))
            rows = np.arange(SPEC.rows)  # 500 rows in 64-row answers: streamed
            np.testing.assert_array_equal(client.gather("mem", rows), _full_table(SPEC))
        with pytest.raises(Exception, match="UNAUTHENTICATED|bearer"):
            Client(cluster.addresses)
    finally:
        cluster.close()


def test_push_to_a_read_only_shard_is_refused() -> None:
    cluster = Cluster(1, shard_config=ShardConfig(read_only=True))
    try:
        with Client(cluster.addresses) as client:
            with pytest.raises(ReadOnlyError.__mro__[1]):  # PermissionDeniedError
                client.push("mem", np.array([0]), np.ones((1, 16), np.float32), lr=0.1, step=0)
            assert client.info()[0]["read_only"]
    finally:
        cluster.close()
