"""Shard lookups (DESIGN §4.2 Gather, PooledGather; §3.1 steps 4-6) against a numpy oracle."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from param_server.pooling import pooled_backward, pooled_sum
from param_server.shard import Shard, ShardConfig


def pooled_oracle(values, rows, projector, token, scores, e):
    """o[t, p, slice c] = sum_j [proj_j = p][token_j = t] s_c[j] V[row_j, slice c], one entry at a time."""
    d_v, h = values.shape[1], scores.shape[1]
    tokens = sorted(set(token.tolist()))
    out = np.zeros((len(tokens), e, d_v), np.float64)
    for j in range(rows.shape[0]):
        t = tokens.index(token[j])
        for c in range(h):
            sl = slice(c * d_v // h, (c + 1) * d_v // h)
            out[t, projector[j], sl] += scores[j, c] * values[rows[j], sl]
    return np.array(tokens, dtype=np.int64), out


@settings(max_examples=30, deadline=None)
@given(data=st.data(), num_partitions=st.integers(1, 6), rows=st.integers(1, 60),
       dtype=st.sampled_from(["float32", "bfloat16", "float16"]))
def test_gather_returns_the_oracle_rows(make_table, data, num_partitions, rows, dtype):
    owned = data.draw(st.lists(st.integers(0, num_partitions - 1), min_size=1, unique=True))
    table = make_table(rows=rows, dim=5, num_partitions=num_partitions, owned=owned, dtype=dtype)
    ours = table.owned_rows()
    if ours.shape[0] == 0:
        return  # the owned partitions hold no row of this small table
    request = np.array(data.draw(st.lists(st.sampled_from(ours.tolist()), min_size=1, max_size=30)), np.int64)
    with Shard(ShardConfig()) as shard:
        shard.add_table(table.spec, table.partitions)
        got = shard.gather("mem", request)
    assert got.shape == (request.shape[0], 5) and got.dtype == table.partitions[owned[0]]["values"].dtype
    np.testing.assert_array_equal(got.astype(np.float32), table.values[request])


def test_gather_writes_into_a_given_output(make_table, shards):
    table = make_table()
    shard = shards(table)
    out = np.full((3, 8), np.nan, np.float32)
    assert shard.gather("mem", np.array([4, 0, 49]), out=out) is out
    np.testing.assert_array_equal(out, table.values[[4, 0, 49]])


@settings(max_examples=30, deadline=None)
@given(data=st.data(), e=st.integers(1, 4), h=st.sampled_from([1, 2, 4]), n=st.integers(1, 40),
       dtype=st.sampled_from(["float32", "bfloat16", "float16"]))
def test_pooled_gather_matches_the_oracle(make_table, data, e, h, n, dtype):
    # entries in any order, rows and (token, projector) pairs repeating; fp32 tables pool in place
    table = make_table(rows=30, dim=8, num_partitions=3, owned=[0, 2], dtype=dtype)
    ours = table.owned_rows().tolist()
    rows = np.array(data.draw(st.lists(st.sampled_from(ours), min_size=n, max_size=n)), np.int64)
    projector = np.array(data.draw(st.lists(st.integers(0, e - 1), min_size=n, max_size=n)), np.int64)
    token = np.array(data.draw(st.lists(st.integers(0, 6), min_size=n, max_size=n)), np.int64)
    scores = np.array(data.draw(st.lists(st.floats(-2, 2, width=32), min_size=n * h, max_size=n * h)),
                      np.float32).reshape(n, h)
    with Shard(ShardConfig()) as shard:
        shard.add_table(table.spec, table.partitions)
        tokens, sums = shard.pooled_gather("mem", rows, projector, token, scores, e)
    want_tokens, want = pooled_oracle(table.values, rows, projector, token, scores, e)
    np.testing.assert_array_equal(tokens, want_tokens)
    assert sums.dtype == np.float32 and sums.shape == (len(want_tokens), e, 8)
    np.testing.assert_allclose(sums, want, rtol=1e-5, atol=1e-5)


def test_pooled_sum_of_distinct_tokens_and_projectors_places_each_weighted_row():
    v = np.arange(8, dtype=np.float32).reshape(2, 4)
    tokens, out = pooled_sum(v, np.array([1, 0]), np.array([9, 3]), np.array([[2.0, -1.0], [1.0, 0.5]], np.float32), 2)
    assert tokens.tolist() == [3, 9]
    np.testing.assert_array_equal(out[0, 0], [4, 5, 3, 3.5])  # token 3, projector 0: row 1 weighted (1, .5)
    np.testing.assert_array_equal(out[1, 1], [0, 2, -2, -3])  # token 9, projector 1: row 0 weighted (2, -1)
    assert not out[0, 1].any() and not out[1, 0].any()


def test_lookups_are_counted_in_metrics(make_table, shards):
    shard = shards(make_table())
    shard.gather("mem", np.array([1, 2, 3]))
    shard.pooled_gather("mem", np.array([5]), np.array([0]), np.array([0]), np.ones((1, 1), np.float32), 1)
    m = shard.metrics()
    assert m["lookups"] == 2 and m["rows_looked_up"] == 4
    assert m["bytes_resident"] == 4 * 13 * 8 * 4  # NP * R * d_v * float32 (sgd: no state)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), n=st.integers(1, 50), h=st.sampled_from([1, 2, 4]))
def test_pooled_sum_over_a_whole_table_equals_it_over_the_gathered_rows(data, n, h):
    table = np.random.default_rng(n).standard_normal((20, 8)).astype(np.float32)
    flat = np.array(data.draw(st.lists(st.integers(0, 19), min_size=n, max_size=n)), np.int64)
    projector = np.array(data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)), np.int64)
    token = np.array(data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n)), np.int64)
    scores = np.random.default_rng(n + 1).standard_normal((n, h)).astype(np.float32)
    tokens, sums = pooled_sum(table, projector, token, scores, 3, flat=flat)
    want_tokens, want = pooled_oracle(table, flat, projector, token, scores, 3)
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_allclose(sums, want, rtol=1e-5, atol=1e-5)
    gathered_tokens, gathered = pooled_sum(table[flat], projector, token, scores, 3)
    np.testing.assert_array_equal(gathered_tokens, tokens)
    np.testing.assert_allclose(gathered, sums, rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), n=st.integers(1, 50), h=st.sampled_from([1, 2, 4]))
def test_pooled_backward_sums_repeated_rows_like_a_per_entry_oracle(data, n, h):
    rows = np.array(data.draw(st.lists(st.integers(0, 9), min_size=n, max_size=n)), np.int64)  # repeats
    projector = np.array(data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)), np.int64)
    token = np.array(data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)), np.int64)
    rng = np.random.default_rng(n)
    table = rng.standard_normal((10, 8)).astype(np.float32)
    scores = rng.standard_normal((n, h)).astype(np.float32)
    grad_out = rng.standard_normal((5, 3, 8)).astype(np.float32)
    grad_scores, unique, summed = pooled_backward(table[rows], rows, projector, token, scores, grad_out)
    g = grad_out[token, projector].reshape(n, h, 8 // h)
    want_scores = np.einsum("nhk,nhk->nh", g, table[rows].reshape(n, h, 8 // h))
    want = np.zeros((10, 8))
    np.add.at(want, rows, (g * scores[:, :, None]).reshape(n, 8))  # per entry, repeats summed
    np.testing.assert_allclose(grad_scores, want_scores, rtol=1e-5, atol=1e-5)
    assert unique.tolist() == sorted(set(rows.tolist()))
    np.testing.assert_allclose(summed, want[unique], rtol=1e-5, atol=1e-5)


def test_applies_count_their_cpu_in_metrics(make_table, shards):
    table = make_table()
    shard = shards(table)
    before = shard.metrics()["apply_cpu_s"]
    shard.push("mem", 0, 1, 0, 0.1, np.array([4, 0, 4]), np.ones((3, 8), np.float32))
    shard.drain()
    m = shard.metrics()
    assert m["pushes_applied"] == 1 and m["apply_cpu_s"] > before
