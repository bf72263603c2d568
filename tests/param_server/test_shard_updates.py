"""Shard pushes, the apply queue and consistency (DESIGN §4.2-4.4): exactly once, min_step, backpressure."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from param_server.errors import QueueFullError, ReadOnlyError, ShardClosedError, WaitTimeoutError
from param_server.shard import Shard, ShardConfig

from .conftest import snapshot


def sgd_oracle(values, pushes):
    """Plain SGD over (rows, grads, lr) pushes, one row at a time (duplicates summed)."""
    out = values.astype(np.float64).copy()
    for rows, grads, lr in pushes:
        for r in set(rows.tolist()):
            out[r] -= lr * grads[rows == r].sum(axis=0)
    return out


@settings(max_examples=25, deadline=None)
@given(data=st.data(), n_pushes=st.integers(1, 4))
def test_pushes_with_repeated_rows_apply_summed_sgd(make_table, data, n_pushes):
    table = make_table(rows=20, dim=4, num_partitions=2)
    rng = np.random.default_rng(n_pushes)
    pushes = []
    with Shard(ShardConfig()) as shard:
        shard.add_table(table.spec, table.partitions)
        for seq in range(1, n_pushes + 1):
            rows = np.array(data.draw(st.lists(st.integers(0, 19), max_size=15)), np.int64)
            grads = rng.standard_normal((rows.shape[0], 4)).astype(np.float32)
            lr = data.draw(st.floats(0.0, 1.0))
            assert shard.push("mem", 0, seq, seq, lr, rows, grads) is True
            pushes.append((rows, grads, lr))
        shard.drain()
        got = shard.gather("mem", np.arange(20))
        assert shard.applied_step(0) == n_pushes and shard.last_seq(0) == n_pushes
    np.testing.assert_allclose(got, sgd_oracle(table.values, pushes), rtol=1e-5, atol=1e-5)


def test_retried_push_is_applied_once(make_table, shards):
    table = make_table()
    shard = shards(table)
    rows, grads = np.array([3, 3, 7]), np.ones((3, 8), np.float32)
    assert shard.push("mem", 1, 1, 0, 0.5, rows, grads) is True
    assert shard.push("mem", 1, 1, 0, 0.5, rows, grads) is False  # a client retry of seq 1
    shard.drain()
    assert shard.push("mem", 1, 1, 0, 0.5, rows, grads) is False  # ... also after it was applied
    shard.drain()
    np.testing.assert_allclose(shard.gather("mem", np.array([3, 7])), table.values[[3, 7]] - [[1.0], [0.5]])
    assert shard.metrics()["pushes_applied"] == 1 and shard.metrics()["pushes_duplicate"] == 2


def test_retried_push_is_dropped_while_the_original_is_still_queued(make_table, shards):
    table = make_table()
    shard = shards(table)
    with shard._cond:  # hold the table lock: the apply thread cannot apply anything
        assert shard.push("mem", 0, 1, 0, 1.0, np.array([2]), np.ones((1, 8), np.float32))
        assert not shard.push("mem", 0, 1, 0, 1.0, np.array([2]), np.ones((1, 8), np.float32))
        assert shard.metrics()["queue_depth"] == 1
    shard.drain()
    np.testing.assert_allclose(shard.gather("mem", np.array([2]))[0], table.values[2] - 1.0)


def test_pushes_of_different_workers_are_numbered_separately(make_table, shards):
    shard = shards(make_table())
    assert shard.push("mem", 0, 1, 0, 0.1, np.array([1]), np.ones((1, 8), np.float32))
    assert shard.push("mem", 1, 1, 4, 0.1, np.array([1]), np.ones((1, 8), np.float32))
    shard.drain()
    assert (shard.last_seq(0), shard.last_seq(1), shard.applied_step(0), shard.applied_step(1)) == (1, 1, 0, 4)


def test_empty_push_only_advances_the_step(make_table, shards):
    table = make_table()
    shard = shards(table)
    assert shard.push("mem", 2, 1, 7, 0.1, np.zeros(0, np.int64), np.zeros((0, 8), np.float32))
    shard.drain()
    assert shard.applied_step(2) == 7
    np.testing.assert_array_equal(shard.gather("mem", np.arange(50)), table.values)


def test_min_step_lookup_waits_for_the_push_then_answers_with_it_applied(make_table, shards, wait_until):
    table = make_table()
    shard = shards(table)
    answer: list[np.ndarray] = []
    reader = threading.Thread(target=lambda: answer.append(shard.gather("mem", np.array([5]), worker_id=3, min_step=1)))
    reader.start()
    wait_until(lambda: shard.metrics()["lookups_waiting"] == 1, what="the lookup to block")
    assert reader.is_alive() and not answer  # worker 3 has applied nothing yet
    checks = shard.metrics()["wait_checks"]
    shard.push("mem", 3, 1, 0, 1.0, np.array([5]), np.ones((1, 8), np.float32))  # step 0: not enough
    shard.drain()
    wait_until(lambda: shard.metrics()["wait_checks"] > checks, what="the lookup to re-check after step 0")
    assert reader.is_alive() and not answer and shard.metrics()["lookups_waiting"] == 1  # woke, still waits
    shard.push("mem", 3, 2, 1, 1.0, np.array([5]), np.ones((1, 8), np.float32))
    reader.join(timeout=10)
    np.testing.assert_allclose(answer[0][0], table.values[5] - 2.0)


def test_min_step_lookup_times_out_with_wait_timeout_error(make_table, shards):
    shard = shards(make_table(), wait_timeout_s=0.05)
    with pytest.raises(WaitTimeoutError):
        shard.pooled_gather("mem", np.array([1]), np.array([0]), np.array([0]), np.ones((1, 1), np.float32), 1,
                            worker_id=0, min_step=0)
    assert shard.gather("mem", np.array([1]), worker_id=0, min_step=-1).shape == (1, 8)  # already reached
    assert shard.metrics()["wait_timeouts"] == 1


def test_full_queue_raises_queue_full_and_changes_nothing(make_table, shards):
    table = make_table()
    shard = shards(table, max_pending=2)
    one = np.ones((1, 8), np.float32)
    with shard._cond:  # stall the apply thread so the queue fills
        shard.push("mem", 0, 1, 0, 1.0, np.array([0]), one)
        shard.push("mem", 0, 2, 1, 1.0, np.array([0]), one)
        with pytest.raises(QueueFullError):
            shard.push("mem", 0, 3, 2, 1.0, np.array([0]), one)
        assert shard.last_seq(0) == 2 and shard.metrics()["queue_full_rejections"] == 1
        np.testing.assert_array_equal(shard.gather("mem", np.array([0]))[0], table.values[0])
    shard.drain()
    np.testing.assert_allclose(shard.gather("mem", np.array([0]))[0], table.values[0] - 2.0)
    assert shard.push("mem", 0, 3, 2, 1.0, np.array([0]), one)  # the refused push, retried, is taken


def test_read_only_shard_refuses_writes_and_changes_nothing(make_table, shards):
    shard = shards(make_table(), read_only=True)
    before = snapshot(shard)
    with pytest.raises(ReadOnlyError):
        shard.push("mem", 0, 1, 0, 0.1, np.array([1]), np.ones((1, 8), np.float32))
    with pytest.raises(ReadOnlyError):
        shard.pooled_backward("mem", 0, 1, 0, 0.1, np.array([1]), np.array([0]), np.array([0]),
                              np.ones((1, 1), np.float32), np.ones((1, 1, 8), np.float32), np.array([0]), 1)
    assert snapshot(shard) == before
    assert shard.gather("mem", np.array([1])).shape == (1, 8)  # reads still work


def test_closed_shard_applies_what_it_accepted_and_refuses_more(make_table):
    table = make_table()
    shard = Shard(ShardConfig())
    shard.add_table(table.spec, table.partitions)
    shard.push("mem", 0, 1, 0, 1.0, np.array([9]), np.ones((1, 8), np.float32))
    shard.close()
    np.testing.assert_allclose(shard.gather("mem", np.array([9]))[0], table.values[9] - 1.0)
    with pytest.raises(ShardClosedError):
        shard.push("mem", 0, 2, 1, 1.0, np.array([9]), np.ones((1, 8), np.float32))


def test_pushed_grads_are_copied_so_later_caller_writes_do_not_leak_in(make_table, shards):
    table = make_table()
    shard = shards(table)
    grads = np.ones((1, 8), np.float32)
    with shard._cond:
        shard.push("mem", 0, 1, 0, 1.0, np.array([4]), grads)
        grads[:] = 100.0  # the caller reuses its buffer before the apply
    shard.drain()
    np.testing.assert_allclose(shard.gather("mem", np.array([4]))[0], table.values[4] - 1.0)


def test_concurrent_gathers_during_applies_never_see_a_torn_row(make_table, shards):
    table = make_table(rows=64, dim=4096, num_partitions=4, optimizer="adamw")
    for part in table.partitions.values():  # every row constant along d_v
        part["values"][:] = part["values"][:, :1]
    shard = shards(table)
    torn: list[int] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            got = shard.gather("mem", np.arange(64))
            torn.extend(np.flatnonzero(got.max(axis=1) != got.min(axis=1)).tolist())

    readers = [threading.Thread(target=read) for _ in range(2)]
    for r in readers:
        r.start()
    rng = np.random.default_rng(0)
    for seq in range(1, 61):  # row-constant grads keep rows constant under AdamW too
        rows = rng.choice(64, size=32, replace=False)
        grads = np.repeat(rng.standard_normal((32, 1)).astype(np.float32), 4096, axis=1)
        while True:
            try:
                shard.push("mem", 0, seq, seq, 0.01, rows, grads)
                break
            except QueueFullError:  # back-pressure: a real client backs off and retries the same way
                time.sleep(0.001)
    shard.drain()
    stop.set()
    for r in readers:
        r.join()
    assert shard.metrics()["pushes_applied"] == 60 and shard.metrics()["lookups"] > 0
    assert torn == []


def test_min_step_on_one_table_is_not_satisfied_by_another_tables_push(make_table, shards):
    """A worker pushes to every table each step: table B's lookup must wait for B's own push."""
    a, b = make_table(name="a"), make_table(name="b", seed=1)
    shard = shards(a, b, wait_timeout_s=0.3)
    shard.push("a", 0, 1, 0, 0.1, np.array([1]), np.ones((1, 8), np.float32))
    shard.drain()
    assert shard.applied_step(0, "a") == 0 and shard.applied_step(0, "b") == -1
    with pytest.raises(WaitTimeoutError, match="table b"):
        shard.gather("b", np.array([1]), worker_id=0, min_step=0)
    shard.push("b", 0, 2, 0, 0.1, np.array([1]), np.ones((1, 8), np.float32))
    shard.drain()  # applied before the lookup: its short wait_timeout_s bounds only the refusal above
    got = shard.gather("b", np.array([1]), worker_id=0, min_step=0)
    np.testing.assert_allclose(got, b.values[[1]] - 0.1, rtol=1e-6)
    assert shard.applied_step(0) == 0
