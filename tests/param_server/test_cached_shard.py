"""A shard beyond its RAM budget answers exactly like a resident one (DESIGN §5), and hands partitions off.

The contract: the same sequence of gather, push, pooled gather and pooled backward gives identical
answers and identical final state whether the partitions are resident or served through the chunk
cache (a budget of a few chunks, so eviction and write-back happen all the time). Also: the cache
never holds more than its budget, a checkpoint of a cached shard equals the resident one, and the
hand-off steps of a rescale (DESIGN §4.1) move a partition without losing or repeating an update.
"""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from param_server.errors import ConfigError, WrongShardError
from param_server.optimizers import SparseOptimizerConfig, make_optimizer
from param_server.partitions import (
    BEYOND_RAM_CHUNK_BYTES,
    CachedTablePartitions,
    chunk_bytes_for_budget,
    chunk_set_bytes,
    partition_nbytes,
)
from param_server.shard import Shard, ShardConfig
from storage.layout import DEFAULT_TARGET_CHUNK_BYTES, TableSpec
from storage.table_store import create_table, open_table

ROWS, DIM, NP, H, E = 203, 8, 4, 2, 3
_names = itertools.count()


def _table(tmp_path, optimizer: str = "adamw", dtype: str = "float32"):
    """A fresh table group with tiny chunks (16 rows), so a partition spans several chunks."""
    spec = TableSpec(name=f"t{next(_names)}", rows=ROWS, dim=DIM, num_partitions=NP, optimizer=optimizer,
                     dtype=dtype, init_std=0.5, seed=7)
    path = tmp_path / spec.name
    create_table(path, spec, initialize=True, target_chunk_bytes=16 * DIM * 4)
    return spec, path


def _pair(path, budget: int) -> tuple[Shard, Shard]:
    """(resident shard, cached shard) over copies of the same table; the cached one writes back into path."""
    resident = Shard(ShardConfig(wait_timeout_s=5), shard_id=0)
    resident.load_table(open_table(path), range(NP))
    cached = Shard(ShardConfig(ram_budget_bytes=budget, cache_share=1.0, wait_timeout_s=5), shard_id=1)
    cached.load_table(open_table(path, "r+"), range(NP))
    return resident, cached


ops = st.lists(
    st.tuples(st.sampled_from(["gather", "push", "pooled", "backward"]),
              st.lists(st.integers(0, ROWS - 1), min_size=1, max_size=24),
              st.integers(0, 2**31 - 1)),
    min_size=1, max_size=10)


# 3 chunks (8x less than the table): too small for the hot-row cache's index, so chunks only;
# 4 KiB: a chunk cache of 2 chunks under a hot-row cache of 16 rows (adamw) to 40 (sgd)
BUDGETS = (3 * 16 * DIM * 4, 4096)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops, optimizer=st.sampled_from(["adamw", "adagrad", "sgd"]), budget=st.sampled_from(BUDGETS))
def test_cached_and_resident_shards_give_identical_answers_and_state(tmp_path, ops, optimizer, budget):
    spec, path = _table(tmp_path, optimizer)
    resident, cached = _pair(path, budget=budget)
    assert cached.cached_partitions(spec.name) == list(range(NP))
    last = None  # the step of the newest push: lookups wait for it (sync mode)
    try:
        for step, (op, rows, seed) in enumerate(ops):
            rng = np.random.default_rng(seed)
            rows = np.asarray(rows, np.int64)
            n = rows.size
            if op == "gather":
                a = resident.gather(spec.name, np.unique(rows), min_step=last)
                b = cached.gather(spec.name, np.unique(rows), min_step=last)
                np.testing.assert_array_equal(a, b)
            elif op == "push":
                grads = rng.normal(size=(n, DIM)).astype(np.float32)
                for s in (resident, cached):
                    assert s.push(spec.name, 0, step + 1, step, 0.1, rows, grads)
                last = step
            else:
                projector, token = rng.integers(0, E, n), rng.integers(0, 5, n)
                scores = rng.normal(size=(n, H)).astype(np.float32)
                if op == "pooled":
                    a = resident.pooled_gather(spec.name, rows, projector, token, scores, E, min_step=last)
                    b = cached.pooled_gather(spec.name, rows, projector, token, scores, E, min_step=last)
                else:
                    touched = np.unique(token)
                    resident.drain()  # a pooled backward reads V as it is now: let both be up to date
                    cached.drain()
                    g = rng.normal(size=(touched.size, E, DIM)).astype(np.float32)
                    a = resident.pooled_backward(spec.name, 0, step + 1, step, 0.1, rows, projector, token, scores,
                                                 g, touched, E)
                    b = cached.pooled_backward(spec.name, 0, step + 1, step, 0.1, rows, projector, token, scores,
                                               g, touched, E)
                    last = step
                for x, y in zip(a, b, strict=True):
                    np.testing.assert_array_equal(x, y)
        for a, b in zip(resident.export_partitions(spec.name).values(), cached.export_partitions(spec.name).values(),
                        strict=True):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        m = cached.metrics()
        assert m["cache_bytes"] <= m["cache_budget_bytes"] == budget
    finally:
        resident.close()
        cached.close()


def test_cache_evicts_writes_back_and_stays_within_budget(tmp_path):
    spec, path = _table(tmp_path)
    budget = 4 * 16 * DIM * 4
    resident, cached = _pair(path, budget)
    rng = np.random.default_rng(0)
    try:
        for step in range(30):
            rows = rng.choice(ROWS, 40, replace=False)
            grads = rng.normal(size=(40, DIM)).astype(np.float32)
            for s in (resident, cached):
                s.push(spec.name, 0, step + 1, step, 0.05, rows, grads)
            np.testing.assert_array_equal(resident.gather(spec.name, rows, min_step=step),
                                          cached.gather(spec.name, rows, min_step=step))
            m = cached.metrics()
            assert m["cache_bytes"] <= budget
        assert m["cache_evictions"] > 0 and m["cache_writebacks"] > 0 and 0 < m["cache_hit_rate"] < 1
        assert m["bytes_resident"] == 0 and m["cached_partitions"] == NP
        cached.push(spec.name, 0, 99, 99, 0.05, rows[:1], grads[:1])
        cached.drain()
        assert cached.metrics()["cache_dirty_chunks"] > 0
        cached.flush()
        assert cached.metrics()["cache_dirty_chunks"] == 0
    finally:
        resident.close()
        cached.close()


def test_partitions_that_fit_stay_resident_and_the_rest_is_cached(tmp_path):
    spec, path = _table(tmp_path)
    each = partition_nbytes(spec)
    shard = Shard(ShardConfig(ram_budget_bytes=2 * each + 2 * 16 * DIM * 4 * 3, cache_share=0.01))
    try:
        shard.load_table(open_table(path, "r+"), range(NP))
        m = shard.metrics()
        assert (m["resident_partitions"], m["cached_partitions"]) == (2, 2)
        assert m["bytes_resident"] == 2 * each
    finally:
        shard.close()
    with pytest.raises(ConfigError):
        Shard(ShardConfig(ram_budget_bytes=100)).load_table(open_table(path, "r+"), range(NP))


@pytest.mark.parametrize("budget", [2 * 16 * DIM * 4, 4096], ids=["chunks", "rows+chunks"])
def test_checkpoint_of_a_cached_shard_equals_the_resident_one(tmp_path, budget):
    spec, path = _table(tmp_path, dtype="bfloat16")
    resident, cached = _pair(path, budget=budget)
    rows = np.arange(0, ROWS, 3)
    grads = np.random.default_rng(1).normal(size=(rows.size, DIM)).astype(np.float32)
    try:
        for s in (resident, cached):
            s.push(spec.name, 0, 1, 0, 0.1, rows, grads)
        if budget == 4096:
            assert cached.metrics()["cache_bytes"] <= budget
        for name, s in (("a", resident), ("b", cached)):
            create_table(tmp_path / name / spec.name, spec, initialize=False)
            s.save(tmp_path / name)
        a, b = open_table(tmp_path / "a" / spec.name), open_table(tmp_path / "b" / spec.name)
        for p in range(NP):
            for k, v in a.read_partition(p).items():
                np.testing.assert_array_equal(v, b.read_partition(p)[k], err_msg=f"{p}/{k}")
    finally:
        resident.close()
        cached.close()


def test_lazily_initialised_shard_equals_one_loaded_from_an_initialised_table(tmp_path):
    spec, path = _table(tmp_path)
    lazy_path = tmp_path / "lazy"
    create_table(lazy_path, spec, initialize=False, target_chunk_bytes=16 * DIM * 4)
    ram, disk = Shard(), Shard(ShardConfig(ram_budget_bytes=2 * 16 * DIM * 4, cache_share=1.0))
    try:
        ram.load_table(open_table(lazy_path, "r+"), [0, 1], initialize=True)
        disk.load_table(open_table(lazy_path, "r+"), [2, 3], initialize=True)
        want = open_table(path)
        rows = np.arange(ROWS)
        np.testing.assert_array_equal(ram.gather(spec.name, rows[rows % NP < 2]),
                                      np.concatenate([want.read_rows(p, np.arange(spec.valid_rows(p)))["values"]
                                                      for p in (0, 1)])[np.argsort(np.concatenate(
                                                          [rows[rows % NP == p] for p in (0, 1)]))])
        got = disk.gather(spec.name, rows[rows % NP == 2])
        np.testing.assert_array_equal(got, want.read_rows(2, np.arange(spec.valid_rows(2)))["values"])
    finally:
        ram.close()
        disk.close()


@pytest.mark.parametrize("budget", [None, 2 * 16 * DIM * 4, 4096], ids=["resident", "cached", "rows+chunks"])
def test_handoff_moves_a_partition_without_losing_or_repeating_an_update(tmp_path, budget, wait_until):
    spec, path = _table(tmp_path)
    reference = Shard()
    reference.load_table(open_table(path), range(NP))
    src = Shard(ShardConfig(ram_budget_bytes=budget, cache_share=1.0), shard_id=1)
    src.load_table(open_table(path, "r+"), [0, 1])
    dst = Shard(ShardConfig(ram_budget_bytes=budget, cache_share=1.0), shard_id=2)
    dst.load_table(open_table(path, "r+"), [2, 3])
    rows = np.arange(ROWS)
    on = {s: rows[np.isin(rows % NP, ps)] for s, ps in ((src, [0, 1]), (dst, [2, 3]))}
    grads = np.ones((ROWS, DIM), np.float32)
    try:
        for s in (src, dst):
            s.push(spec.name, 0, 1, 0, 0.1, on[s], grads[: on[s].size])
        reference.push(spec.name, 0, 1, 0, 0.1, rows, grads)
        src.freeze([1])
        moved = rows[rows % NP == 1]
        paused = {}

        def late_push() -> None:  # a push to the frozen partition waits, then is refused
            try:
                src.push(spec.name, 0, 2, 1, 0.1, moved, grads[: moved.size])
            except WrongShardError as err:
                paused["error"] = err

        t = threading.Thread(target=late_push)
        t.start()
        wait_until(lambda: src.metrics()["requests_waiting_handoff"] == 1, what="the push to pause")
        assert t.is_alive() and src.last_seq(0) == 1  # paused, not accepted
        exported = src.handoff_export([1])
        dst.adopt({spec.name: exported[spec.name] if budget is None else {1: None}})
        src.release([1])
        t.join(5)
        assert "error" in paused and src.last_seq(0) == 1
        dst.merge_clocks(src.clocks())
        # the client re-routes the refused push to the new owner
        dst.push(spec.name, 0, 2, 1, 0.1, moved, grads[: moved.size])
        reference.push(spec.name, 0, 2, 1, 0.1, moved, grads[: moved.size])
        assert src.owned_partitions(spec.name) == [0] and dst.owned_partitions(spec.name) == [1, 2, 3]
        mine = rows[rows % NP != 0]
        np.testing.assert_array_equal(dst.gather(spec.name, mine, min_step=1),
                                      reference.gather(spec.name, mine, min_step=1))  # both pushes applied
        with pytest.raises(WrongShardError):
            src.gather(spec.name, moved)
    finally:
        for s in (reference, src, dst):
            s.close()


def test_min_step_lookup_waits_for_a_queued_push_of_that_step(tmp_path, monkeypatch, wait_until):
    spec, path = _table(tmp_path, "sgd")
    shard = Shard(ShardConfig(wait_timeout_s=60))
    shard.load_table(open_table(path), range(NP))
    one = np.ones((1, DIM), np.float32)
    before = shard.gather(spec.name, np.array([5]))
    gate = threading.Event()
    try:
        shard.push(spec.name, 0, 1, 3, 1.0, np.array([1]), one)  # step 3 applied
        shard.drain()
        apply = shard._queue._apply  # noqa: SLF001
        monkeypatch.setattr(shard._queue, "_apply", lambda u: (gate.wait(60), apply(u)))  # noqa: SLF001
        got = {}
        shard.push(spec.name, 0, 2, 3, 1.0, np.array([5]), one)  # a re-routed push of step 3: queued, not applied
        t = threading.Thread(target=lambda: got.setdefault("v", shard.gather(spec.name, np.array([5]), min_step=3)))
        t.start()
        wait_until(lambda: shard.metrics()["lookups_waiting"] == 1, what="the lookup to block on the queued push")
        assert "v" not in got
        gate.set()
        t.join(60)
        np.testing.assert_allclose(got["v"], before - 1.0)
    finally:
        gate.set()
        shard.close()


def test_hot_rows_are_updated_in_the_row_cache_and_counted_in_its_metrics(tmp_path):
    spec, path = _table(tmp_path)
    parts = CachedTablePartitions(open_table(path, "r+"), range(NP), 4096)
    opt = make_optimizer(SparseOptimizerConfig.from_spec(spec))
    hot = np.array([5, 17, 42, 99])
    for _ in range(3):
        parts.read(hot)
        parts.step(opt, hot, np.ones((hot.size, DIM), np.float32), 0.1)
    m = parts.metrics()
    assert m["row_hits"] == 8 and m["row_misses"] == 4 and m["row_hit_rate"] == pytest.approx(2 / 3)
    assert m["row_dirty"] == hot.size and m["dirty_chunks"] == 0  # hot updates stayed in RAM
    assert m["cache_bytes"] == m["chunk_bytes"] + m["row_bytes"] <= m["budget_bytes"] == 4096
    parts.flush()
    assert parts.metrics()["row_dirty"] == 0
    assert (open_table(path).read_rows(1, hot[:1] // NP)["step"] == 3).all()  # row 5: partition 1, 3 AdamW steps


def test_a_step_on_cold_rows_loads_each_of_their_chunks_once(tmp_path):
    spec, path = _table(tmp_path)
    store = open_table(path, "r+")
    chunk_set = chunk_set_bytes(store)  # one chunk of every array: the smallest budget for one pass
    parts = CachedTablePartitions(store, range(NP), chunk_set, row_share=0)
    rows = np.arange(0, ROWS, 3)  # scattered over every chunk of every partition
    chunks = sum(len({(r % NP, r // NP // store.chunk_shape(n)[1]) for r in rows.tolist()}) for n in store.array_names)
    parts.step(make_optimizer(SparseOptimizerConfig.from_spec(spec)), rows, np.ones((rows.size, DIM), np.float32), 0.1)
    m = parts.metrics()
    assert m["row_capacity"] == 0 and m["misses"] == chunks  # read, updated and written in one visit each
    assert m["cache_bytes"] <= chunk_set


def test_tables_beyond_their_shards_budget_get_smaller_chunks():
    spec = TableSpec(name="t", rows=1 << 16, dim=128, num_partitions=16)
    table = partition_nbytes(spec) * spec.num_partitions
    assert chunk_bytes_for_budget(spec, None, 2) == DEFAULT_TARGET_CHUNK_BYTES
    assert chunk_bytes_for_budget(spec, table // 2, 2) == DEFAULT_TARGET_CHUNK_BYTES  # fits: 8 partitions each
    assert chunk_bytes_for_budget(spec, table // 8, 2) == BEYOND_RAM_CHUNK_BYTES < DEFAULT_TARGET_CHUNK_BYTES


@pytest.mark.parametrize("compress_state", [True, False])
def test_a_cached_table_with_compressed_arrays_is_named_in_a_warning(tmp_path, caplog, compress_state):
    """The cache writes raw chunks in place and compressed ones through a slower engine: a shard
    whose writable table is compressed says so, and which arrays."""
    spec = TableSpec(name=f"t{next(_names)}", rows=ROWS, dim=DIM, num_partitions=NP, optimizer="adamw")
    path = tmp_path / spec.name
    create_table(path, spec, target_chunk_bytes=16 * DIM * 4, compress_state=compress_state)
    shard = Shard(ShardConfig(ram_budget_bytes=3 * 16 * DIM * 4, cache_share=1.0))
    try:
        with caplog.at_level("WARNING", logger="param_server.partitions"):
            shard.load_table(open_table(path, "r+"), range(NP))
        warned = [r.getMessage() for r in caplog.records if "not raw chunks" in r.getMessage()]
        if compress_state:
            assert len(warned) == 1 and "exp_avg" in warned[0] and spec.name in warned[0]
            assert "'values'" not in warned[0]
        else:
            assert warned == []
        assert shard.metrics()["cached_partitions"] == NP
    finally:
        shard.close()
