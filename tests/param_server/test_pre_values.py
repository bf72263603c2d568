"""UltraMemV2 pre-values scored on the shard (DESIGN §3.3 item 3, §4.2 PooledGather / PooledBackward).

The oracle is a direct float64 computation with torch autograd: o[t, p, slice c] = sum_j a_j s_c[j]
V[row_j, slice c] with a_j = <q_p[t_j], P_tab[row_j]>, and L = sum(dL/do * o) differentiated in V,
P_tab, q_p and s. The shard (plain, then through gRPC and the client, then the in-process backend)
must give the same sums, the same dL/ds and dL/dq_p, and leave both tables updated by one SGD step.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_workers.values import LocalBackend
from param_server import wire
from param_server.client import Client
from param_server.server import create_server
from param_server.shard import Shard, ShardConfig
from param_server.update_log import UpdateLog
from protos.ultramem.v1 import memory_pb2 as pb
from protos.ultramem.v1 import memory_pb2_grpc as pb_grpc
from storage.layout import TableSpec, init_partition_values
from storage.table_store import create_table, open_table

Code = grpc.StatusCode
P, NP, D_V, D_P = 24, 3, 6, 4
V_SPEC = TableSpec(name="mem0.values", rows=P, dim=D_V, num_partitions=NP, optimizer="sgd", init_std=0.5, seed=1)
P_SPEC = TableSpec(name="mem0.pre_values", rows=P, dim=D_P, num_partitions=NP, optimizer="sgd", init_std=0.5, seed=2)


def _parts(spec: TableSpec, owned) -> dict[int, dict[str, np.ndarray]]:
    return {p: {"values": init_partition_values(spec, p)} for p in owned}


def _whole(spec: TableSpec) -> np.ndarray:
    """The table as [P, dim] float64, row r = local row r // NP of partition r % NP."""
    out = np.zeros((spec.rows, spec.dim))
    for p in range(spec.num_partitions):
        n = spec.valid_rows(p)
        out[p::spec.num_partitions] = init_partition_values(spec, p)[:n]
    return out


def oracle(v, pre, q_p, rows, projector, token, scores, grad_out, tokens, e):
    """float64 autograd: (sums [len(tokens), E, d_v], dL/ds, dL/dq_p, dL/dV, dL/dP_tab) for L = sum(grad_out * o)."""
    v, pre, q, s = (torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in (v, pre, q_p, scores))
    h = s.shape[1]
    a = (q[torch.from_numpy(token)] * pre[torch.from_numpy(rows)]).sum(1)  # (n,)
    weighted = a[:, None] * s  # (n, h)
    d_v = v.shape[1]
    per_entry = weighted.repeat_interleave(d_v // h, dim=1) * v[torch.from_numpy(rows)]  # (n, d_v): slice c * s'_c
    num_tokens = int(token.max(initial=0)) + 1
    o = torch.zeros(num_tokens * e, d_v, dtype=torch.float64).index_add(0, torch.from_numpy(token * e + projector),
                                                                        per_entry)
    o = o.view(num_tokens, e, d_v)[torch.from_numpy(tokens)]
    (o * torch.from_numpy(np.asarray(grad_out, np.float64))).sum().backward()
    return o.detach().numpy(), s.grad.numpy(), q.grad.numpy(), v.grad.numpy(), pre.grad.numpy()


def _entries(rng: np.random.Generator, n: int, rows_from: np.ndarray, e: int, h: int, num_tokens: int):
    rows = rng.choice(rows_from, n).astype(np.int64)
    return (rows, rng.integers(0, e, n), rng.integers(0, num_tokens, n),
            rng.standard_normal((n, h)).astype(np.float32))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 25), e=st.integers(1, 3), h=st.sampled_from([1, 2, 3]), num_tokens=st.integers(1, 6),
       owned=st.sampled_from([(0, 1, 2), (1,), (0, 2)]), seed=st.integers(0, 10_000))
def test_shard_scores_pre_values_and_its_backward_matches_float64_autograd(n, e, h, num_tokens, owned, seed):
    rng = np.random.default_rng(seed)
    mine = np.flatnonzero(np.isin(np.arange(P) % NP, owned))
    rows, projector, token, scores = _entries(rng, n, mine, e, h, num_tokens)
    tokens = np.unique(token)
    q_p = rng.standard_normal((tokens.shape[0], D_P)).astype(np.float32)  # one row per touched token
    q_full = np.zeros((num_tokens, D_P), np.float32)
    q_full[tokens] = q_p
    grad_out = rng.standard_normal((tokens.shape[0], e, D_V)).astype(np.float32)
    v, pre, lr = _whole(V_SPEC), _whole(P_SPEC), 0.25
    want = oracle(v, pre, q_full, rows, projector, token, scores, grad_out, tokens, e)
    with Shard(ShardConfig()) as shard:
        shard.add_table(V_SPEC, _parts(V_SPEC, owned))
        shard.add_table(P_SPEC, _parts(P_SPEC, owned))
        got_tokens, sums = shard.pooled_gather(V_SPEC.name, rows, projector, token, scores, e,
                                               pre_table=P_SPEC.name, q_p=q_p, tokens_touched=tokens)
        grad_s, grad_q, accepted = shard.pooled_backward_pre(
            V_SPEC.name, P_SPEC.name, 0, 1, 0, lr, rows, projector, token, scores, q_p, grad_out, tokens, e)
        shard.drain()
        v_after = shard.gather(V_SPEC.name, mine)
        p_after = shard.gather(P_SPEC.name, mine)
        assert accepted and shard.applied_step(0, V_SPEC.name) == shard.applied_step(0, P_SPEC.name) == 0
    np.testing.assert_array_equal(got_tokens, tokens)
    np.testing.assert_allclose(sums, want[0], rtol=1e-5, atol=1e-5)
    assert grad_s.dtype == grad_q.dtype == np.float32 and grad_q.shape == q_p.shape
    np.testing.assert_allclose(grad_s, want[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grad_q, want[2][tokens], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(v_after, (v - lr * want[3])[mine], rtol=1e-5, atol=1e-5)  # SGD on both tables
    np.testing.assert_allclose(p_after, (pre - lr * want[4])[mine], rtol=1e-5, atol=1e-5)


def test_a_lookup_without_q_p_on_a_shard_with_pre_values_is_the_v1_lookup():
    rng = np.random.default_rng(0)
    rows, projector, token, scores = _entries(rng, 30, np.arange(P), 2, 2, 5)
    tokens = np.unique(token)
    grad_out = rng.standard_normal((tokens.shape[0], 2, D_V)).astype(np.float32)
    answers = []
    for tables in ((V_SPEC,), (V_SPEC, P_SPEC)):
        with Shard(ShardConfig()) as shard:
            for spec in tables:
                shard.add_table(spec, _parts(spec, range(NP)))
            sums = shard.pooled_gather(V_SPEC.name, rows, projector, token, scores, 2)[1]
            grad_s = shard.pooled_backward(V_SPEC.name, 0, 1, 0, 0.5, rows, projector, token, scores, grad_out,
                                           tokens, 2)
            shard.drain()
            answers.append((sums, grad_s, shard.gather(V_SPEC.name, np.arange(P))))
            if len(tables) == 2:  # P_tab untouched by a v1 backward
                np.testing.assert_array_equal(shard.gather(P_SPEC.name, np.arange(P)), _whole(P_SPEC))
    for a, b in zip(*answers, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_update_log_replays_a_pre_value_backward_as_one_update(tmp_path):
    rng = np.random.default_rng(3)
    rows, projector, token, scores = _entries(rng, 20, np.arange(P), 1, 2, 4)
    tokens = np.unique(token)
    q_p = rng.standard_normal((tokens.shape[0], D_P)).astype(np.float32)
    grad_out = rng.standard_normal((tokens.shape[0], 1, D_V)).astype(np.float32)
    log = UpdateLog(tmp_path / "log")
    log.open(-1)
    states = []
    for replay in (False, True):
        with Shard(ShardConfig()) as shard:
            for spec in (V_SPEC, P_SPEC):
                shard.add_table(spec, _parts(spec, range(NP)))
            if replay:
                assert shard.replay(log.replay_records(-1)) == 1  # two records, one seq: one update
            else:
                shard.attach_log(log)
                shard.pooled_backward_pre(V_SPEC.name, P_SPEC.name, 0, 1, 0, 0.5, rows, projector, token, scores,
                                          q_p, grad_out, tokens, 1)
                shard.drain()
            states.append([shard.gather(s.name, np.arange(P)) for s in (V_SPEC, P_SPEC)])
            assert shard.last_seq(0) == 1 and shard.applied_step(0, P_SPEC.name) == 0
    log.close()
    for a, b in zip(*states, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(states[0][1], _whole(P_SPEC).astype(np.float32))


# --------------------------------------------------------------------------- over the wire


@pytest.fixture
def two_shards() -> Iterator[tuple[list[Shard], list[str]]]:
    made = [Shard(shard_id=i) for i in range(2)]
    for i, shard in enumerate(made):
        for spec in (V_SPEC, P_SPEC):
            shard.add_table(spec, _parts(spec, range(i, NP, 2)))
    servers = [create_server(s)[0].start() for s in made]
    yield made, [s.address for s in servers]
    for server in servers:
        server.stop(0)
    for shard in made:
        shard.close()


def test_client_round_trip_over_two_shards_equals_the_local_backend(two_shards):
    _, addresses = two_shards
    rng = np.random.default_rng(7)
    num_tokens, e = 6, 2
    rows, projector, token, scores = _entries(rng, 40, np.arange(P), e, 2, num_tokens)
    q_p = rng.standard_normal((num_tokens, D_P)).astype(np.float32)
    grad_out = rng.standard_normal((num_tokens, e, D_V)).astype(np.float32)
    local = LocalBackend([V_SPEC, P_SPEC])
    local.begin_step(0, 0.5)
    t = torch.from_numpy
    want_sums = local.pooled(V_SPEC.name, t(rows), t(projector), t(token), t(scores), num_tokens, e,
                             pre_table=P_SPEC.name, q_p=t(q_p)).numpy()
    want_s, want_q = local.pooled_backward_pre(V_SPEC.name, P_SPEC.name, t(rows), t(projector), t(token),
                                               t(scores), t(q_p), t(grad_out))
    with Client(addresses) as client:
        sums = client.pooled_gather(V_SPEC.name, rows, projector, token, scores, num_tokens, e,
                                    pre_table=P_SPEC.name, q_p=q_p)
        grad_s, grad_q = client.pooled_backward_pre(V_SPEC.name, P_SPEC.name, rows, projector, token, scores, q_p,
                                                    grad_out, lr=0.5, step=0)
        client.flush()
        got = {s.name: client.gather(s.name, np.arange(P), min_step=0) for s in (V_SPEC, P_SPEC)}
    np.testing.assert_allclose(sums, want_sums, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad_s, want_s.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad_q, want_q.numpy(), rtol=1e-5, atol=1e-6)  # summed over the two shards
    for spec in (V_SPEC, P_SPEC):
        np.testing.assert_allclose(got[spec.name], local.fetch_rows(spec.name, t(np.arange(P))).numpy(),
                                   rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def served():
    other = TableSpec(name="other", rows=P + 1, dim=D_P, num_partitions=NP, optimizer="sgd")
    shard = Shard(ShardConfig())
    for spec in (V_SPEC, P_SPEC, other):
        shard.add_table(spec, _parts(spec, range(NP)))
    server, _ = create_server(shard)
    server.start()
    channel = grpc.insecure_channel(server.address)
    yield pb_grpc.MemoryShardStub(channel), shard
    channel.close()
    server.stop(0)
    shard.close()


_ROWS, _PROJ, _TOK = np.array([0, 5, 7]), np.array([0, 0, 0]), np.array([0, 1, 1])
_SCORES = np.ones((3, 2), np.float32)
_Q = np.ones((2, D_P), np.float32)
_NAN_Q = np.where(np.eye(2, D_P) > 0, np.nan, 1.0).astype(np.float32)


def _gather_req(**pre) -> pb.PooledGatherRequest:
    req = pb.PooledGatherRequest(header=pb.LookupHeader(table=V_SPEC.name), rows=wire.encode(_ROWS),
                                 projector=wire.encode(_PROJ), token=wire.encode(_TOK),
                                 scores=wire.encode(_SCORES), num_projectors=1)
    return _with_pre(req, **pre)


def _backward_req(**pre) -> pb.PooledBackwardRequest:
    header = pb.PushHeader(table=V_SPEC.name, worker_id=1, seq=1, step=0, lr=0.1)
    req = pb.PooledBackwardRequest(header=header, rows=wire.encode(_ROWS), projector=wire.encode(_PROJ),
                                   token=wire.encode(_TOK), scores=wire.encode(_SCORES),
                                   grad_out=wire.encode(np.ones((2, 1, D_V), np.float32)),
                                   tokens_touched=wire.encode(np.array([0, 1])), num_projectors=1)
    return _with_pre(req, touched=False, **pre)


def _with_pre(req, *, pre_table: str | None = P_SPEC.name, q_p=_Q, dtype: str = "float32", touched: bool = True):
    if pre_table is not None:
        req.pre_table = pre_table
    if q_p is not None:
        req.q_p.CopyFrom(wire.encode(q_p, dtype))
    if touched:
        req.tokens_touched.CopyFrom(wire.encode(np.array([0, 1])))
    return req


BAD = [
    ("wrong d_p", {"q_p": np.ones((2, D_P + 1), np.float32)}, Code.INVALID_ARGUMENT, "q_p must have shape"),
    ("bfloat16 q_p", {"dtype": "bfloat16"}, Code.INVALID_ARGUMENT, "q_p: dtype bfloat16 not allowed"),
    ("int64 q_p", {"q_p": np.ones((2, D_P), np.int64), "dtype": "int64"}, Code.INVALID_ARGUMENT,
     "q_p: dtype int64 not allowed"),
    ("NaN q_p", {"q_p": _NAN_Q}, Code.INVALID_ARGUMENT, "q_p has non-finite"),
    ("q_p rows != tokens", {"q_p": np.ones((3, D_P), np.float32)}, Code.INVALID_ARGUMENT, "q_p must have shape"),
    ("q_p without pre_table", {"pre_table": None}, Code.INVALID_ARGUMENT, "pre_table"),
    ("pre_table without q_p", {"q_p": None}, Code.INVALID_ARGUMENT, "q_p"),
    ("no such pre-value table", {"pre_table": "mem9.pre_values"}, Code.NOT_FOUND, "has no pre-values"),
    ("not a pre-value table", {"pre_table": "other"}, Code.INVALID_ARGUMENT, "is not a pre-value table"),
    ("the table itself", {"pre_table": V_SPEC.name}, Code.INVALID_ARGUMENT, "is not a pre-value table"),
]


def _state(shard: Shard) -> tuple:
    shard.drain()
    return ({n: shard.gather(n, np.arange(P)).tobytes() for n in (V_SPEC.name, P_SPEC.name)},
            shard.last_seq(1), shard.applied_step(1, V_SPEC.name), shard.applied_step(1, P_SPEC.name))


@pytest.mark.parametrize("method", ["PooledGather", "PooledBackward"])
@pytest.mark.parametrize(("case", "pre", "code", "needle"), BAD, ids=[b[0] for b in BAD])
def test_bad_pre_value_input_gets_its_status_and_changes_nothing(served, method, case, pre, code, needle):
    stub, shard = served
    before = _state(shard)
    req = _gather_req(**pre) if method == "PooledGather" else _backward_req(**pre)
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, method)(req, timeout=10)
    assert err.value.code() == code, err.value.details()
    assert needle in err.value.details()
    assert _state(shard) == before


def test_good_pre_value_requests_after_bad_ones_answer_and_update_both_tables(served):
    stub, shard = served
    before = _state(shard)
    sums = stub.PooledGather(_gather_req(), timeout=10)
    assert wire.decode(sums.sums, "sums", allowed=("float32",)).shape == (2, 1, D_V)
    resp = stub.PooledBackward(_backward_req(), timeout=10)
    assert resp.accepted and wire.decode(resp.grad_q_p, "grad_q_p", allowed=("float32",)).shape == (2, D_P)
    after = _state(shard)
    assert after[0][V_SPEC.name] != before[0][V_SPEC.name] and after[0][P_SPEC.name] != before[0][P_SPEC.name]
    assert after[1:] == (1, 0, 0)


def test_pre_values_beyond_the_ram_budget_answer_like_resident_ones(tmp_path):
    # both tables of a layer partly (values: 1 of 3 partitions in RAM) or wholly (pre-values) through the
    # chunk cache (chunks of 8 rows, a budget of a few chunks) give the same sums, gradients and final
    # state (optimizer state included) as resident ones
    specs = [TableSpec(name=s.name, rows=P, dim=s.dim, num_partitions=NP, optimizer="adamw", init_std=0.5,
                       seed=s.seed) for s in (V_SPEC, P_SPEC)]
    for spec in specs:
        create_table(tmp_path / spec.name, spec, initialize=True, target_chunk_bytes=8 * spec.dim * 4)
    resident = Shard(ShardConfig(wait_timeout_s=5), shard_id=0)
    cached = Shard(ShardConfig(ram_budget_bytes=1600, cache_share=0.5, wait_timeout_s=5), shard_id=1)
    rng = np.random.default_rng(11)
    try:
        for spec in specs:
            resident.load_table(open_table(tmp_path / spec.name), range(NP))
            cached.load_table(open_table(tmp_path / spec.name, "r+"), range(NP))
        assert len(cached.cached_partitions(V_SPEC.name)) == 2 and len(cached.cached_partitions(P_SPEC.name)) == 3
        for step in range(3):
            rows, projector, token, scores = _entries(rng, 30, np.arange(P), 2, 2, 5)
            tokens = np.unique(token)
            q_p = rng.standard_normal((tokens.shape[0], D_P)).astype(np.float32)
            grad_out = rng.standard_normal((tokens.shape[0], 2, D_V)).astype(np.float32)
            answers = []
            for shard in (resident, cached):
                shard.drain()
                sums = shard.pooled_gather(V_SPEC.name, rows, projector, token, scores, 2, pre_table=P_SPEC.name,
                                           q_p=q_p, tokens_touched=tokens)
                back = shard.pooled_backward_pre(V_SPEC.name, P_SPEC.name, 0, step + 1, step, 0.1, rows, projector,
                                                 token, scores, q_p, grad_out, tokens, 2)
                answers.append((*sums, *back))
            for a, b in zip(*answers, strict=True):
                np.testing.assert_array_equal(a, b)
        for spec in specs:
            for a, b in zip(resident.export_partitions(spec.name).values(),
                            cached.export_partitions(spec.name).values(), strict=True):
                for k in a:
                    np.testing.assert_array_equal(a[k], b[k], err_msg=f"{spec.name} {k}")
    finally:
        resident.close()
        cached.close()
