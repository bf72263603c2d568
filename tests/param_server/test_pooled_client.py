"""Client pooled paths (DESIGN §4.2): PooledBackward cut under the message limit, compact ids.

PooledBackward requests are cut by rows (a row's entries never split, so each row gets one optimizer
step per step) and sized by what they really carry, dL/do of every token they touch included; the
ids of pooled requests travel as INT32 when they fit.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from param_server.client import Client, ClientConfig, _backward_chunks
from param_server.server import create_server
from param_server.shard import Shard
from protos.ultramem.v1 import memory_pb2 as pb
from storage.layout import TableSpec, init_partition_values

SPEC = TableSpec(name="mem", rows=64, dim=8, num_partitions=4, optimizer="adamw")
E, H = 2, 2


class _Requests(grpc.ServerInterceptor):
    """Keeps the parsed requests of one method."""

    def __init__(self, method: str) -> None:
        self.method, self.seen = method, []

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not details.method.endswith("/" + self.method):
            return handler
        parse = handler.request_deserializer

        def keep(data: bytes):
            msg = parse(data)
            self.seen.append(msg)
            return msg

        return handler._replace(request_deserializer=keep)


@pytest.fixture
def shards() -> Iterator[tuple[list[Shard], list[str], _Requests]]:
    spy = _Requests("PooledBackward")
    made = [Shard(shard_id=i) for i in range(2)]
    for i, shard in enumerate(made):
        shard.add_table(SPEC, {p: {"values": init_partition_values(SPEC, p)} for p in range(i, 4, 2)})
    servers = [create_server(s, interceptors=[spy])[0].start() for s in made]
    yield made, [s.address for s in servers], spy
    for server in servers:
        server.stop(0)
    for shard in made:
        shard.close()


def _entries(n: int, num_tokens: int, seed: int):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, SPEC.rows, n), rng.integers(0, E, n), rng.integers(0, num_tokens, n),
            rng.uniform(-1, 1, (n, H)).astype(np.float32))


def _table(shards: list[Shard]) -> dict[str, np.ndarray]:
    out = {}
    for shard in shards:
        for p, arrays in shard.export_partitions(SPEC.name).items():
            for k, a in arrays.items():
                out[f"{p}/{k}"] = a
    return out


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 60), seed=st.integers(0, 1000), budget=st.integers(1, 4000))
def test_backward_chunks_cover_every_entry_once_in_row_order_and_never_split_a_row(n, seed, budget):
    rows = np.sort(np.random.default_rng(seed).integers(0, 20, n))
    token = np.random.default_rng(seed + 1).integers(0, 9, n)
    chunks = _backward_chunks(np.arange(n), rows, token, 32, 70, budget)
    np.testing.assert_array_equal(np.concatenate(chunks), np.arange(n))
    seen: set[int] = set()
    for part in chunks:
        mine = set(rows[part].tolist())
        assert not mine & seen  # a row lives in one chunk only
        seen |= mine
        size = part.size * 32 + np.unique(token[part]).size * 70
        assert size <= budget or np.unique(rows[part]).size == 1  # fits, or is one row that cannot split


def test_split_pooled_backward_matches_one_request_and_steps_each_row_once(shards):
    made, addresses, spy = shards
    rows, projector, token, scores = _entries(200, 12, seed=1)
    grad_out = np.random.default_rng(2).normal(size=(12, E, SPEC.dim)).astype(np.float32)
    small = ClientConfig(chunk_bytes=64, max_message_bytes=2048)  # a ~1 KB budget: several requests per shard
    with Client(addresses, config=small, worker_id=1) as client:
        split = client.pooled_backward(SPEC.name, rows, projector, token, scores, grad_out, lr=0.1, step=0)
    assert len(spy.seen) > 2
    for shard in made:
        shard.drain(timeout=10)
    after_split = _table(made)
    touched = np.unique(rows)
    steps = {int(r): int(after_split[f"{r % 4}/step"][r // 4]) for r in range(SPEC.rows)}
    assert all(steps[r] == (1 if r in touched else 0) for r in steps)  # one AdamW step per touched row

    # the same backward as one request per shard on fresh shards gives the same answer and table
    fresh = [Shard(shard_id=i) for i in range(2)]
    for i, shard in enumerate(fresh):
        shard.add_table(SPEC, {p: {"values": init_partition_values(SPEC, p)} for p in range(i, 4, 2)})
    servers = [create_server(s)[0].start() for s in fresh]
    try:
        with Client([s.address for s in servers], worker_id=1) as client:
            whole = client.pooled_backward(SPEC.name, rows, projector, token, scores, grad_out, lr=0.1, step=0)
        for shard in fresh:
            shard.drain(timeout=10)
        np.testing.assert_allclose(split, whole, rtol=1e-6, atol=1e-7)
        after_whole = _table(fresh)
        for key, value in after_whole.items():
            np.testing.assert_allclose(after_split[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
    finally:
        for server in servers:
            server.stop(0)
        for shard in fresh:
            shard.close()


def test_pooled_requests_send_int32_ids_and_shards_answer_them(shards):
    made, addresses, spy = shards
    rows, projector, token, scores = _entries(30, 4, seed=3)
    grad_out = np.ones((4, E, SPEC.dim), np.float32)
    with Client(addresses) as client:
        out = client.pooled_gather(SPEC.name, rows, projector, token, scores, 4, E)
        client.pooled_backward(SPEC.name, rows, projector, token, scores, grad_out, lr=0.0, step=0)
    assert out.shape == (4, E, SPEC.dim) and np.abs(out).sum() > 0
    for req in spy.seen:
        assert {req.rows.dtype, req.projector.dtype, req.token.dtype, req.tokens_touched.dtype} == {pb.INT32}
