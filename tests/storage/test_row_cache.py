"""Tests of storage/row_cache.py: the hot-row cache behaves exactly like a resident numpy oracle.

The contract test drives `HotRowCache` (over a chunk cache of one or two chunks) and a whole-table
numpy oracle with hypothesis-generated lookups, counted and uncounted reads, writes of all or some
arrays, in-place updates through `slots`/`mark_dirty` and `update_rows(update_at=)`, and flushes;
the row capacity is a few rows, so admission, eviction and write-back of dirty rows happen all the
time. After every op the byte budget is checked; at the end (after flush) the Zarr store must equal
the oracle. Other tests pin the admission rule (frequency wins, a one-off scan does not flush hot
rows, counters age).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import LayoutError, ReadOnlyTableError, create_table, open_table
from storage.chunk_cache import CachedPartitions
from storage.row_cache import INDEX_BYTES_PER_ROW, SLOT_OVERHEAD_BYTES, HotRowCache
from tests.storage.test_chunk_cache import (
    OWNED,
    SMALL_CHUNKS,
    _bits,
    _oracle,
    _owned_rows,
    _random_arrays,
    _spec,
    _update,
    _write,
)
from tests.storage.test_chunk_cache import _update_at as _chunk_update_at


def _cache(store, rows: int, chunks: int = 1, **kw) -> HotRowCache:
    """A row cache with room for `rows` rows over a chunk cache of `chunks` chunks of the largest array."""
    largest = max(np.prod(store.chunk_shape(n)) * np.dtype(store.spec.dtype if n == "values" else "float32").itemsize
                  for n in store.array_names)
    lower = CachedPartitions(store, OWNED, budget_bytes=int(chunks * largest))
    probe = HotRowCache(lower, 0)
    index = len(OWNED) * store.spec.rows_per_partition * INDEX_BYTES_PER_ROW
    cache = HotRowCache(lower, index + rows * (probe.row_bytes + SLOT_OVERHEAD_BYTES), **kw)
    assert cache.capacity == rows
    return cache


def _update_at(cache: HotRowCache, oracle, rows: np.ndarray, rng: np.random.Generator) -> None:
    """update_rows with `update_at` for the cached rows (slot arrays changed in place) and the block
    `update` for the others; both check what they are handed against the oracle."""

    def check_at(arrays, index, pos):  # the slots of cached rows, or views of held chunks below
        if arrays is cache.arrays:
            assert np.all(cache.slots(rows[pos]) == index)
        else:
            assert np.all(cache.slots(rows[pos]) < 0)

    _chunk_update_at(cache, oracle, rows, rng, check_at)


_op = st.one_of(
    st.tuples(st.just("read"), st.lists(st.integers(0, 10**6), min_size=0, max_size=20),
              st.sampled_from([None, ("values",), ("exp_avg_sq", "step")]), st.booleans()),
    st.tuples(st.just("write"), st.lists(st.integers(0, 10**6), min_size=1, max_size=20, unique=True),
              st.sampled_from([None, ("values",), ("exp_avg", "step")]), st.just(False)),
    st.tuples(st.just("update_in_place"), st.lists(st.integers(0, 10**6), min_size=1, max_size=20, unique=True),
              st.just(None), st.just(False)),
    st.tuples(st.just("update"), st.lists(st.integers(0, 10**6), min_size=1, max_size=20, unique=True),
              st.just(None), st.just(False)),
    st.tuples(st.just("update_at"), st.lists(st.integers(0, 10**6), min_size=1, max_size=20, unique=True),
              st.just(None), st.just(False)),
    st.tuples(st.just("flush"), st.just([]), st.just(None), st.just(False)),
    st.tuples(st.just("hot"), st.lists(st.integers(0, 10**6), min_size=1, max_size=6),  # becomes frequent
              st.just(None), st.just(True)),
)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, min_size=1, max_size=30), dtype=st.sampled_from(["float32", "bfloat16"]),
       capacity=st.integers(1, 12), aging=st.sampled_from([None, 3]), seed=st.integers(0, 2**16))
def test_row_cache_reads_and_writes_match_a_resident_oracle(ops, dtype, capacity, aging, seed):
    _run_against_the_oracle(ops, dtype, capacity, aging, seed, raw=False)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, min_size=1, max_size=15), dtype=st.sampled_from(["float32", "bfloat16"]),
       capacity=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_rows_evicted_into_their_chunk_files_match_a_resident_oracle(ops, dtype, capacity, seed):
    """A raw table (every array written in place): dirty rows evicted from the row cache go into
    their chunks, into the chunk files where the chunk is not held (no chunk load), and admitted
    rows are read from there; reads repeat rows, the last chunk of each partition is partial,
    values may be bfloat16, and updates change rows inside the held chunks (update_at)."""
    _run_against_the_oracle(ops, dtype, capacity, None, seed, raw=True)


def _run_against_the_oracle(ops, dtype, capacity, aging, seed, *, raw: bool) -> None:
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        store = create_table(Path(tmp) / "t", _spec(dtype), target_chunk_bytes=SMALL_CHUNKS, compress_state=not raw)
        oracle = _oracle(store)
        owned = _owned_rows(store.spec)
        cache = _cache(store, capacity, aging_window=aging)
        if raw:  # admitted rows of chunks not held read from the files, however many (the chunks here are tiny)
            cache.lower.in_place_read_share = np.inf
        for kind, picks, names, count in ops:
            rows = owned[np.asarray(picks, dtype=np.int64) % len(owned)] if picks else np.empty(0, np.int64)
            if kind in ("read", "hot"):
                for _ in range(3 if kind == "hot" else 1):
                    got = cache.read_rows(rows, names, count=count)
                assert list(got) == list(names or store.array_names)
                for name, a in got.items():
                    assert a.dtype == oracle[name].dtype
                    assert np.array_equal(_bits(a), _bits(oracle[name][rows])), name
            elif kind == "write":
                _write(cache, oracle, rows, names, rng)
            elif kind == "update_in_place":  # what the cached tier's optimizer step does with hot rows
                slots = cache.slots(rows)
                held = slots[slots >= 0]
                if held.size:
                    new = rng.standard_normal((held.size, store.spec.dim)).astype(np.float32)
                    cache.arrays["values"][held] = new.astype(oracle["values"].dtype)
                    cache.mark_dirty(held)
                    oracle["values"][rows[slots >= 0]] = new.astype(oracle["values"].dtype)
            elif kind == "update":  # the cached tier's optimizer step on rows that may or may not be cached
                _update(cache, oracle, np.unique(rows)[rng.permutation(len(np.unique(rows)))], rng)
            elif kind == "update_at":  # the same, cached rows changed where they are held
                _update_at(cache, oracle, np.unique(rows)[rng.permutation(len(np.unique(rows)))], rng)
            else:
                cache.flush()
                assert cache.metrics()["row_dirty"] == 0 and cache.lower.metrics()["dirty_chunks"] == 0
            m = cache.metrics()
            assert m["row_bytes"] <= m["row_budget_bytes"]
            assert cache.lower.metrics()["cache_bytes"] <= cache.lower.budget_bytes
            assert m["row_cached"] <= capacity
        cache.flush()
        reopened = _oracle(open_table(Path(tmp) / "t"))
        for name in store.array_names:
            assert np.array_equal(_bits(reopened[name]), _bits(oracle[name])), name


def test_an_evicted_dirty_row_is_written_into_its_chunk_file_without_loading_the_chunk(tmp_path):
    store = create_table(tmp_path / "t", _spec(), target_chunk_bytes=SMALL_CHUNKS, compress_state=False)
    owned = _owned_rows(store.spec)
    cache = _cache(store, 1, aging_window=2)
    a, b, c = owned[0], owned[-1], owned[-2]  # a: partition 0, local row 0; b, c: far from a's chunk
    new = _random_arrays(_oracle(store), 1, np.random.default_rng(0))
    cache.read_rows(np.array([a]))
    cache.write_rows(np.array([a]), new)  # a is cached: dirty in RAM
    cache.lower.flush()
    cache.lower.read_rows(np.array([c]))  # the chunk cache (one chunk) now holds c's chunks, not a's
    before = cache.lower.metrics()
    for _ in range(3):
        cache.read_rows(np.array([b]))  # b overtakes a: a is evicted
    assert cache.slots(np.array([a]))[0] < 0 and cache.metrics()["row_writebacks"] == 1
    m = cache.lower.metrics()
    assert m["rows_written_in_place"] - before["rows_written_in_place"] == len(store.array_names)  # per array
    got = open_table(tmp_path / "t").read_rows(0, np.array([0]))  # on disk already, before any flush
    for name, x in new.items():
        assert np.array_equal(got[name], x), name


def test_frequent_rows_stay_cached_through_a_scan_of_cold_rows(tmp_path):
    store = create_table(tmp_path / "t", _spec(), target_chunk_bytes=SMALL_CHUNKS)
    owned = _owned_rows(store.spec)
    cache = _cache(store, 4)
    hot, cold = owned[:4], owned[4:]
    for _ in range(3):
        cache.read_rows(hot)
    assert (cache.slots(hot) >= 0).all()
    for row in cold:  # each cold row is looked up once: never more frequent than a hot row
        cache.read_rows(np.array([row]))
    assert (cache.slots(hot) >= 0).all()
    assert (cache.slots(cold) < 0).all()
    before = cache.metrics()
    cache.read_rows(hot)
    after = cache.metrics()
    assert after["row_hits"] - before["row_hits"] == 4 and after["row_misses"] == before["row_misses"]


def test_a_row_more_frequent_than_the_coldest_cached_row_replaces_it(tmp_path):
    store = create_table(tmp_path / "t", _spec(), target_chunk_bytes=SMALL_CHUNKS)
    owned = _owned_rows(store.spec)
    cache = _cache(store, 2)
    a, b, c = owned[:3]
    cache.read_rows(np.array([a, b]))  # free slots: both admitted with count 1
    cache.read_rows(np.array([a]))  # a: 2, b: 1
    cache.read_rows(np.array([c]))  # c: 1, not more frequent than b: stays out
    assert cache.slots(np.array([c]))[0] < 0
    cache.read_rows(np.array([c]))  # c: 2 > b: 1 -> replaces b, never a
    assert (cache.slots(np.array([a, c])) >= 0).all() and cache.slots(np.array([b]))[0] < 0
    assert cache.metrics()["row_evictions"] == 1


def test_evicted_dirty_rows_reach_the_store_on_flush_and_counters_age(tmp_path):
    store = create_table(tmp_path / "t", _spec(), target_chunk_bytes=SMALL_CHUNKS)
    owned = _owned_rows(store.spec)
    cache = _cache(store, 1, aging_window=2)
    a, b = owned[:2]
    new = {n: x for n, x in _random_arrays(_oracle(store), 1, np.random.default_rng(0)).items()}
    cache.read_rows(np.array([a]))
    cache.write_rows(np.array([a]), new)  # a is cached: the write stays in RAM, dirty
    assert cache.metrics()["row_dirty"] == 1
    for _ in range(3):
        cache.read_rows(np.array([b]))  # b overtakes a (counts age by halving every 2 lookups)
    assert cache.slots(np.array([b]))[0] >= 0 and cache.slots(np.array([a]))[0] < 0
    m = cache.metrics()
    assert m["row_writebacks"] == 1 and m["row_agings"] >= 1
    cache.flush()
    got = open_table(tmp_path / "t").read_rows(int(a % 4), np.array([a // 4]))
    for name, x in new.items():
        assert np.array_equal(got[name], x), name


def test_budget_too_small_for_the_index_is_a_pass_through(tmp_path):
    store = create_table(tmp_path / "t", _spec(), target_chunk_bytes=SMALL_CHUNKS)
    lower = CachedPartitions(store, OWNED, budget_bytes=1 << 16)
    cache = HotRowCache(lower, 100)
    assert cache.capacity == 0 and cache.nbytes == 0
    rows = _owned_rows(store.spec)[:5]
    np.testing.assert_array_equal(cache.read_rows(rows)["values"], lower.read_rows(rows)["values"])
    assert cache.metrics()["row_misses"] == 5


def test_bad_writes_change_nothing(tmp_path):
    store = create_table(tmp_path / "t", _spec(), target_chunk_bytes=SMALL_CHUNKS)
    cache = _cache(store, 3)
    rows = _owned_rows(store.spec)[:2]
    before = cache.read_rows(rows)
    with pytest.raises(LayoutError):
        cache.write_rows(np.array([rows[0], rows[0]]), {"values": np.zeros((2, 8), np.float32)})
    with pytest.raises(LayoutError):
        cache.write_rows(rows, {"values": np.zeros((2, 8), np.float64)})
    with pytest.raises(LayoutError):
        cache.read_rows(np.array([1]))  # partition 1 is not cached here
    for name, a in cache.read_rows(rows).items():
        np.testing.assert_array_equal(a, before[name])
    ro = HotRowCache(CachedPartitions(open_table(tmp_path / "t", "r"), OWNED, 1 << 16), 1 << 16)
    with pytest.raises(ReadOnlyTableError):
        ro.write_rows(rows[:1], {"values": np.zeros((1, 8), np.float32)})


def test_close_writes_dirty_rows_in_place_and_releases_the_chunk_files(tmp_path):
    store = create_table(tmp_path / "t", _spec(), target_chunk_bytes=SMALL_CHUNKS, compress_state=False)
    cache = _cache(store, 4)
    assert set(cache.lower.io.engines.values()) == {"raw"}
    rows = _owned_rows(store.spec)[:3]
    new = _random_arrays(_oracle(store), len(rows), np.random.default_rng(2))
    cache.read_rows(rows)  # admitted: the write below stays in RAM, dirty
    cache.write_rows(rows, new)
    assert cache.metrics()["row_dirty"] == len(rows) and cache.lower.io.open_files() > 0
    cache.close()
    assert cache.metrics()["row_dirty"] == 0 and cache.lower.io.open_files() == 0
    reopened = open_table(tmp_path / "t")
    for i, r in enumerate(rows.tolist()):
        got = reopened.read_rows(r % 4, np.array([r // 4]))
        for name, x in new.items():
            assert np.array_equal(_bits(got[name][0]), _bits(x[i])), name
