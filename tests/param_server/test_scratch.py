"""Reused row-gradient buffers (param_server/scratch.py), token positions (checks.positions_in) and
repeated ids (checks.repeats_of).

The pool may only hand out a buffer nothing references: a queued update's row gradients must never
be overwritten by a later call, whatever the apply thread is doing.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import param_server.shard as shard_module
from param_server.checks import positions_in, repeats_of, unique_inverse
from param_server.errors import InvalidRequestError
from param_server.scratch import ScratchPool
from param_server.shard import Shard, ShardConfig

MB = 1 << 20


def test_a_buffer_is_reused_only_once_nothing_references_it() -> None:
    pool = ScratchPool(max_bytes=64 * MB)
    a = pool.empty((2048, 256))  # 2 MB
    b = pool.empty((2048, 256))
    assert not np.shares_memory(a, b) and pool.fresh == 2
    view = a[5:9]  # a view keeps a's buffer alive
    del a
    c = pool.empty((1024, 256))
    assert not np.shares_memory(c, view) and not np.shares_memory(c, b) and pool.reused == 0
    del view, c
    d = pool.empty((1024, 256))  # a's (or c's) buffer is free now
    assert pool.reused == 1 and d.shape == (1024, 256) and d.dtype == np.float32
    assert not np.shares_memory(d, b)


def test_small_requests_and_a_full_pool_get_plain_arrays() -> None:
    pool = ScratchPool(max_bytes=3 * MB)
    small = pool.empty((10, 10))
    assert small.base is None and pool.kept_bytes() == 0 and pool.fresh == 0
    held = pool.empty((1024, 512))  # 2 MB kept
    other = pool.empty((1024, 512))  # would exceed 3 MB with `held` in use: not kept
    assert other.base is None and pool.kept_bytes() == 2 * MB
    del held
    big = pool.empty((1024, 700))  # 2.7 MB: the free 2 MB buffer is dropped to make room
    assert big.base is not None and pool.kept_bytes() == 1024 * 700 * 4
    assert ScratchPool(max_bytes=0).empty((1024, 512)).base is None  # scratch_bytes = 0: always fresh


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-5, 60), min_size=1, max_size=30, unique=True),
       st.lists(st.integers(-10, 70), max_size=40), st.booleans())
def test_positions_in_matches_a_search_and_refuses_missing_values(keys, values, far) -> None:
    keys = np.array(sorted(keys), np.int64)
    if far:  # a wide id range: the binary-search path
        keys = keys * 1_000_003
        values = [v * 1_000_003 for v in values]
    values = np.array(values, np.int64)
    if np.isin(values, keys).all():
        pos = positions_in(keys, values, "missing")
        assert pos.dtype == np.int64
        np.testing.assert_array_equal(keys[pos], values)
    else:
        with pytest.raises(InvalidRequestError, match="missing"):
            positions_in(keys, values, "missing")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 99), max_size=60), st.sampled_from([100, 5000]))
def test_repeats_of_matches_numpy_unique(ids, bound) -> None:
    ids = np.array(ids, np.int64)  # bound 100: the mark per id; 5000 (> 16 x 60): the sort
    got = repeats_of(ids, bound)
    unique, inverse = np.unique(ids, return_inverse=True)
    if unique.size == ids.size:
        assert got is None
    else:
        np.testing.assert_array_equal(got[0], unique)
        np.testing.assert_array_equal(got[1], inverse.reshape(-1))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-50, 99), max_size=60), st.sampled_from([1, 1 << 40]))
def test_unique_inverse_matches_numpy_unique(ids, scale) -> None:
    ids = np.array(ids, np.int64) * scale  # scale 1: the mark per id; 2**40: a wide range, the sort
    unique, inverse = unique_inverse(ids)
    want_unique, want_inverse = np.unique(ids, return_inverse=True)
    assert unique.dtype == inverse.dtype == np.int64
    np.testing.assert_array_equal(unique, want_unique)
    np.testing.assert_array_equal(inverse, want_inverse.reshape(-1))


def _oracle(values, rows, projector, t_pos, scores, grad_out):
    """dL/ds [n, h] and dL/dV [P, d_v] of the pooled lookup, vectorised."""
    n, h = scores.shape
    g = grad_out[t_pos, projector].reshape(n, h, -1)
    grad_s = np.einsum("nhk,nhk->nh", g, values[rows].reshape(n, h, -1))
    grad_v = np.zeros_like(values)
    np.add.at(grad_v, rows, (g * scores[:, :, None]).reshape(n, -1))
    return grad_s, grad_v


def test_queued_row_gradients_are_not_overwritten_while_the_apply_thread_is_busy(make_table, monkeypatch) -> None:
    table = make_table(rows=4096, dim=256, num_partitions=4)  # ~1,700 unique rows a call: 1.7 MB gradients
    busy, go = threading.Event(), threading.Event()
    real = shard_module.sum_duplicates

    def held_first(slots, grads):  # the apply thread stops at the first update until `go`
        if not busy.is_set():
            busy.set()
            assert go.wait(30)
        return real(slots, grads)

    monkeypatch.setattr(shard_module, "sum_duplicates", held_first)
    rng = np.random.default_rng(3)
    lr, e, t = 0.25, 2, 50
    calls = []
    for _ in range(4):
        n = 2000
        calls.append((rng.integers(0, 4096, n), rng.integers(0, e, n), rng.integers(0, t, n),
                      rng.standard_normal((n, 2)).astype(np.float32),
                      rng.standard_normal((t, e, 256)).astype(np.float32)))
    with Shard(ShardConfig()) as shard:
        shard.add_table(table.spec, table.partitions)
        pool = shard._scratch
        got = []
        for seq, (rows, proj, tok, s, g) in enumerate(calls[:3], start=1):
            got.append(shard.pooled_backward("mem", 0, seq, seq, lr, rows, proj, tok, s, g, np.arange(t), e))
            assert busy.wait(30)
        assert pool.fresh == 3 and pool.reused == 0  # each queued update kept its own buffer
        go.set()
        shard.drain(timeout=30)
        rows, proj, tok, s, g = calls[3]
        got.append(shard.pooled_backward("mem", 0, 4, 4, lr, rows, proj, tok, s, g, np.arange(t), e))
        shard.drain(timeout=30)
        assert pool.reused == 1  # an applied update's buffer served the next call
        after = shard.gather("mem", np.arange(4096))
    values = table.values.copy()
    summed = np.zeros_like(values)
    for i, (rows, proj, tok, s, g) in enumerate(calls[:3]):  # all three read the initial V
        want_s, want_v = _oracle(values, rows, proj, tok, s, g)
        np.testing.assert_allclose(got[i], want_s, rtol=1e-4, atol=1e-4)
        summed += want_v
    values = values - lr * summed
    rows, proj, tok, s, g = calls[3]
    want_s, want_v = _oracle(values, rows, proj, tok, s, g)
    np.testing.assert_allclose(got[3], want_s, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(after, values - lr * want_v, rtol=1e-4, atol=1e-4)
