"""The client + shards behave like one numpy table with the same optimizer (DESIGN §4.3 sync mode).

A hypothesis state machine of sorts: random sequences of gather, push, pooled gather and pooled
backward run through `Client` against 1, 2 and 3 in-process shards (servers on port 0, reused
across examples; each example gets a fresh table and a fresh worker id) and against a plain numpy
reference: the whole table in one array, updated by the same sparse optimizer. Sync mode: pushes
wait, lookups carry min_step, so every answer must match the reference to float tolerance.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from param_server.client import Client, ClientConfig
from param_server.optimizers import SparseOptimizerConfig, make_optimizer, sum_duplicates
from param_server.server import create_server
from param_server.shard import Shard, ShardConfig
from storage.layout import TableSpec, init_partition_values, state_layout

ROWS, DIM, NP, H, E = 97, 8, 6, 2, 3  # 97 rows: some partitions are one row shorter
_names = itertools.count()


class Reference:
    """The whole table as one numpy array, updated like a shard would."""

    def __init__(self, spec: TableSpec) -> None:
        r = np.arange(spec.rows)
        self.values = np.empty((spec.rows, spec.dim), np.float32)
        for p in range(spec.num_partitions):
            self.values[r[r % NP == p]] = init_partition_values(spec, p)[r[r % NP == p] // NP]
        self.state = {k: np.zeros((spec.rows, *t), d) for k, (t, d) in state_layout(spec).items()}
        self.optimizer = make_optimizer(SparseOptimizerConfig.from_spec(spec))

    def push(self, rows: np.ndarray, grads: np.ndarray, lr: float) -> None:
        if rows.size:
            rows, grads = sum_duplicates(rows, grads)
            self.optimizer.step(self.values, self.state, rows, grads, lr)

    def pooled(self, rows, projector, token, scores, num_tokens) -> np.ndarray:
        out = np.zeros((num_tokens, E, DIM), np.float32)
        weighted = (self.values[rows].reshape(-1, H, DIM // H) * scores[:, :, None]).reshape(-1, DIM)
        np.add.at(out, (token, projector), weighted)
        return out

    def backward(self, rows, projector, token, scores, grad_out, lr) -> np.ndarray:
        g = grad_out[token, projector].reshape(-1, H, DIM // H)
        grad_scores = np.einsum("nhk,nhk->nh", g, self.values[rows].reshape(-1, H, DIM // H))
        self.push(rows, (g * scores[:, :, None]).reshape(-1, DIM), lr)
        return grad_scores


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda s: f"{s}-shards")
def cluster(request):
    shards = [Shard(ShardConfig(), shard_id=s) for s in range(request.param)]
    servers = [create_server(shard)[0].start() for shard in shards]
    yield shards, [s.address for s in servers]
    for server, shard in zip(servers, shards):
        server.stop(0)
        shard.close()


_rows = st.lists(st.integers(0, ROWS - 1), min_size=1, max_size=40)
_op = st.one_of(
    st.tuples(st.just("gather"), _rows, st.sampled_from(["float32", "bfloat16"])),
    st.tuples(st.just("push"), _rows, st.integers(0, 2**31), st.sampled_from([0.01, 0.1, 1.0])),
    st.tuples(st.just("pooled"), _rows, st.integers(0, 2**31), st.integers(1, 5)),
    st.tuples(st.just("backward"), _rows, st.integers(0, 2**31), st.integers(1, 5)),
)


def _pooled_inputs(rows: list[int], seed: int, num_tokens: int):
    rng = np.random.default_rng(seed)
    n = len(rows)
    return (np.array(rows), rng.integers(0, E, n), rng.integers(0, num_tokens, n),
            rng.uniform(-1, 1, (n, H)).astype(np.float32))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(optimizer=st.sampled_from(["adamw", "adagrad", "sgd"]), ops=st.lists(_op, min_size=1, max_size=8),
       chunk=st.sampled_from([96, 1 << 20]))
def test_client_and_shards_match_a_numpy_table_with_the_same_optimizer(cluster, optimizer, ops, chunk) -> None:
    shards, addresses = cluster
    spec = TableSpec(name=f"t{next(_names)}", rows=ROWS, dim=DIM, num_partitions=NP, optimizer=optimizer,
                     optimizer_args=(("weight_decay", 0.01),) if optimizer == "adamw" else ())
    for s, shard in enumerate(shards):
        shard.add_table(spec, {p: {"values": init_partition_values(spec, p)} for p in range(s, NP, len(shards))})
    ref = Reference(spec)
    worker = next(_names)
    step = -1
    with Client(addresses, worker_id=worker, config=ClientConfig(chunk_bytes=chunk)) as client:
        for op in ops:
            min_step = step if step >= 0 else None
            if op[0] == "gather":
                got = client.gather(spec.name, np.array(op[1]), min_step=min_step, wire_dtype=op[2])
                rtol = 2**-8 if op[2] == "bfloat16" else 1e-6
                np.testing.assert_allclose(got, ref.values[op[1]], rtol=rtol, atol=1e-7)
            elif op[0] == "push":
                step += 1
                grads = np.random.default_rng(op[2]).normal(size=(len(op[1]), DIM)).astype(np.float32)
                client.push(spec.name, np.array(op[1]), grads, lr=op[3], step=step, wait=True)
                ref.push(np.array(op[1]), grads, op[3])
            elif op[0] == "pooled":
                inputs = _pooled_inputs(op[1], op[2], op[3])
                got = client.pooled_gather(spec.name, *inputs, op[3], E, min_step=min_step)
                np.testing.assert_allclose(got, ref.pooled(*inputs, op[3]), rtol=1e-5, atol=1e-6)
            else:
                step += 1
                inputs = _pooled_inputs(op[1], op[2], op[3])
                grad_out = np.random.default_rng(op[2] + 1).normal(size=(op[3], E, DIM)).astype(np.float32)
                # min_step as in sync training: dL/ds reads V after every earlier push of this worker
                # (without it, a backward right after another push of the same rows raced the apply)
                got = client.pooled_backward(spec.name, *inputs, grad_out, lr=0.1, step=step, min_step=min_step)
                np.testing.assert_allclose(got, ref.backward(*inputs, grad_out, 0.1), rtol=1e-5, atol=1e-6)
        final = client.gather(spec.name, np.arange(ROWS), min_step=step if step >= 0 else None)
    np.testing.assert_allclose(final, ref.values, rtol=1e-5, atol=1e-6)
