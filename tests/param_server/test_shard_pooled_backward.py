"""PooledBackward (DESIGN §4.2): dL/ds from the current values, and the queued row update."""

from __future__ import annotations

import threading

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from param_server.shard import Shard, ShardConfig


def backward_oracle(values, rows, projector, token, scores, grad_out, tokens_touched):
    """dL/ds [n, h] and dL/dV [P, d_v] of L = sum(grad_out * o), one entry at a time."""
    n, h = scores.shape
    d_v = values.shape[1]
    grad_s = np.zeros((n, h))
    grad_v = np.zeros(values.shape)
    for j in range(n):
        t = tokens_touched.tolist().index(token[j])
        for c in range(h):
            sl = slice(c * d_v // h, (c + 1) * d_v // h)
            grad_s[j, c] = grad_out[t, projector[j], sl] @ values[rows[j], sl]
            grad_v[rows[j], sl] += scores[j, c] * grad_out[t, projector[j], sl]
    return grad_s, grad_v


@settings(max_examples=25, deadline=None)
@given(data=st.data(), e=st.integers(1, 3), h=st.sampled_from([1, 2]), n=st.integers(0, 20))
def test_pooled_backward_matches_the_oracle_and_queues_the_row_update(make_table, data, e, h, n):
    table = make_table(rows=24, dim=4, num_partitions=3, owned=[1, 2])
    ours = table.owned_rows().tolist()
    rng = np.random.default_rng(n)
    rows = np.array(data.draw(st.lists(st.sampled_from(ours), min_size=n, max_size=n)), np.int64)
    projector = rng.integers(0, e, n)
    token = rng.integers(0, 5, n)
    scores = rng.standard_normal((n, h)).astype(np.float32)
    tokens_touched = np.unique(np.concatenate([token, [7]])).astype(np.int64)  # may hold extra tokens
    grad_out = rng.standard_normal((tokens_touched.shape[0], e, 4)).astype(np.float32)
    with Shard(ShardConfig()) as shard:  # the table is SGD: new V = V - lr * dL/dV
        shard.add_table(table.spec, table.partitions)
        grad_s, accepted = shard.pooled_backward_with_ack(
            "mem", 0, 1, 0, 0.5, rows, projector, token, scores, grad_out, tokens_touched, e)
        shard.drain()
        after = shard.gather("mem", np.array(ours))
        assert accepted and shard.applied_step(0) == 0
    want_s, want_v = backward_oracle(table.values, rows, projector, token, scores, grad_out, tokens_touched)
    assert grad_s.shape == (n, h) and grad_s.dtype == np.float32
    np.testing.assert_allclose(grad_s, want_s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(after, (table.values - 0.5 * want_v)[ours], rtol=1e-5, atol=1e-5)


def test_pooled_backward_scores_gradient_matches_finite_differences(make_table, shards):
    table = make_table(rows=12, dim=6, num_partitions=2)
    shard = shards(table, read_only=False)
    rows, projector, token = np.array([3, 3, 8, 11]), np.array([0, 1, 1, 0]), np.array([2, 5, 2, 5])
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((4, 3)).astype(np.float32)
    tokens, _ = shard.pooled_gather("mem", rows, projector, token, scores, 2)
    grad_out = rng.standard_normal((tokens.shape[0], 2, 6)).astype(np.float32)

    def loss(s: np.ndarray) -> float:
        _, o = shard.pooled_gather("mem", rows, projector, token, s.astype(np.float32), 2)
        return float((o.astype(np.float64) * grad_out).sum())

    eps = 1e-2
    numeric = np.zeros((4, 3))
    for j in range(4):
        for c in range(3):
            d = np.zeros((4, 3), np.float32)
            d[j, c] = eps
            numeric[j, c] = (loss(scores + d) - loss(scores - d)) / (2 * eps)
    grad_s = shard.pooled_backward("mem", 0, 1, 0, 0.0, rows, projector, token, scores, grad_out, tokens, 2)
    np.testing.assert_allclose(grad_s, numeric, rtol=1e-3, atol=1e-3)


def test_retried_pooled_backward_answers_again_but_updates_once(make_table, shards):
    table = make_table(rows=8, dim=2, num_partitions=1)
    shard = shards(table)
    args = (np.array([1]), np.array([0]), np.array([0]), np.ones((1, 1), np.float32),
            np.ones((1, 1, 2), np.float32), np.array([0]), 1)
    with shard._cond:  # stall the apply thread: the retry arrives while the original is queued
        first, ok1 = shard.pooled_backward_with_ack("mem", 0, 1, 0, 1.0, *args)
        second, ok2 = shard.pooled_backward_with_ack("mem", 0, 1, 0, 1.0, *args)
    shard.drain()
    assert (ok1, ok2) == (True, False)
    np.testing.assert_allclose(second, first)  # answered from the same values
    np.testing.assert_allclose(first[0, 0], table.values[1].sum(), rtol=1e-6)
    np.testing.assert_allclose(shard.gather("mem", np.array([1]))[0], table.values[1] - 1.0)


def test_a_backward_with_min_step_reads_the_values_the_workers_earlier_push_left(make_table, monkeypatch):
    # the apply thread is held at a gate (before it takes the shard's lock), so the backward arrives
    # while the push of step 0 is queued: with min_step=0 it waits for that push (read-your-writes, as
    # a lookup); without, it reads the values from before it (what the client-level oracle test
    # caught as a rare race)
    table = make_table(rows=12, dim=4, num_partitions=2, owned=[0, 1])
    with Shard(ShardConfig()) as shard:
        shard.add_table(table.spec, table.partitions)
        apply = shard._queue._apply  # noqa: SLF001
        gate = threading.Event()

        def gated_apply(update):
            assert gate.wait(60), "the test never opened the apply thread's gate"
            return apply(update)

        monkeypatch.setattr(shard._queue, "_apply", gated_apply)  # noqa: SLF001
        rows, scores = np.array([3], np.int64), np.ones((1, 1), np.float32)
        grad_out = np.ones((1, 1, 4), np.float32)
        before = shard.gather(table.spec.name, rows)
        args = (rows, np.zeros(1, np.int64), np.zeros(1, np.int64), scores, grad_out, np.zeros(1, np.int64), 1)
        shard.push(table.spec.name, 5, 1, 0, 1.0, rows, np.full((1, 4), 2.0, np.float32))
        stale = shard.pooled_backward(table.spec.name, 5, 2, 1, 0.0, *args)
        np.testing.assert_allclose(stale, before.sum(1, keepdims=True), rtol=1e-6)  # the push was still queued
        gate.set()
        shard.push(table.spec.name, 5, 3, 2, 1.0, rows, np.full((1, 4), 2.0, np.float32))
        fresh = shard.pooled_backward(table.spec.name, 5, 4, 3, 0.0, *args, min_step=2)
        after = shard.gather(table.spec.name, rows)
        np.testing.assert_allclose(after, before - 4.0, rtol=1e-6)  # SGD, lr 1, grad 2, twice (lr 0 backwards)
        np.testing.assert_allclose(fresh, after.sum(1, keepdims=True), rtol=1e-6)
