"""Tests of storage/chunk_cache.py: the cached path behaves exactly like a resident numpy oracle.

The contract test drives `CachedPartitions` and a whole-table numpy oracle with the same
hypothesis-generated reads, writes and flushes under a budget of a few chunks, so eviction and
write-back happen all the time; after every op the cache's byte accounting is checked, and at the
end (after flush) the Zarr store must equal the oracle.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import LayoutError, ReadOnlyTableError, TableSpec, create_table, open_table
from storage.chunk_cache import CachedPartitions

SMALL_CHUNKS = 160  # bytes per chunk: chunks of 5 and 2 rows (values), 12 rows (step): mixed sizes
OWNED = (0, 2, 3)  # partitions cached; partition 1 belongs to some other shard


def _spec(dtype: str = "float32", optimizer: str = "adamw") -> TableSpec:
    # P = 47 rows over NP = 4: R = 12, partition 3 ends in a padding row
    return TableSpec("t", rows=47, dim=8, dtype=dtype, num_partitions=4, optimizer=optimizer, seed=3)


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16) if a.dtype == ml_dtypes.bfloat16 else a


def _oracle(store) -> dict[str, np.ndarray]:
    """The whole table as resident numpy arrays in global row order: {name: [P, ...]}."""
    spec = store.spec
    rows = np.arange(spec.rows)
    out = {}
    for name in store.array_names:
        parts = {p: store.read_partition(p, [name])[name] for p in range(spec.num_partitions)}
        out[name] = np.stack([parts[r % spec.num_partitions][r // spec.num_partitions] for r in rows])
    return out


def _random_arrays(oracle: dict[str, np.ndarray], n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for name, a in oracle.items():
        shape = (n, *a.shape[1:])
        if a.dtype == np.int32:
            out[name] = rng.integers(0, 1000, shape).astype(np.int32)
        else:
            out[name] = rng.standard_normal(shape).astype(np.float32).astype(a.dtype)
    return out


def _owned_rows(spec: TableSpec) -> np.ndarray:
    rows = np.arange(spec.rows)
    return rows[np.isin(rows % spec.num_partitions, OWNED)]


def _accesses(cache: CachedPartitions, rows: np.ndarray, names) -> int:
    """Distinct (array, partition, chunk) a request touches: what hits + misses must grow by."""
    spec = cache.spec
    total = 0
    for name in names:
        chunk_rows = cache.store.chunk_shape(name)[1]
        total += len({(r % spec.num_partitions, (r // spec.num_partitions) // chunk_rows) for r in rows.tolist()})
    return total


def _check_accounting(cache: CachedPartitions) -> None:
    m = cache.metrics()
    held = sum(c.data.nbytes for c in cache._chunks.values())
    assert m["cache_bytes"] == held <= cache.budget_bytes
    assert m["chunks"] == len(cache._chunks)


_op = st.one_of(
    st.tuples(st.just("read"), st.lists(st.integers(0, 10**6), min_size=0, max_size=30),
              st.sampled_from([None, ("values",), ("exp_avg_sq", "step"), ("step", "values")])),
    st.tuples(st.just("write"), st.lists(st.integers(0, 10**6), min_size=1, max_size=30, unique=True),
              st.sampled_from([None, ("values",), ("exp_avg", "step")])),
    st.tuples(st.just("update"), st.lists(st.integers(0, 10**6), min_size=1, max_size=30, unique=True),
              st.just(None)),
    st.tuples(st.just("flush"), st.just([]), st.just(None)),
)


def _write(cache, oracle, rows: np.ndarray, names, rng: np.random.Generator, **kw
           ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """write_rows(**kw) of random data to `rows` (deduplicated, shuffled) of arrays `names` (None:
    all); the oracle follows. Returns (the rows written [n], what was written {name: [n, ...]})."""
    rows = np.unique(rows)[rng.permutation(len(np.unique(rows)))]
    data = _random_arrays(oracle, len(rows), rng)
    data = {n: data[n] for n in (names or oracle)}
    cache.write_rows(rows, data, **kw)
    for name, a in data.items():
        oracle[name][rows] = a
    return rows, data


def _update(cache, oracle, rows: np.ndarray, rng: np.random.Generator) -> None:
    """update_rows with new random data per row; checks each block it is handed against the oracle."""
    new = _random_arrays(oracle, len(rows), rng)

    def update(block, pos):
        for name, a in block.items():
            assert np.array_equal(_bits(a), _bits(oracle[name][rows[pos]])), name
            a[...] = new[name][pos]

    cache.update_rows(rows, update)
    for name, a in new.items():
        oracle[name][rows] = a


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, min_size=1, max_size=25), dtype=st.sampled_from(["float32", "bfloat16"]),
       budget_chunks=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_cached_reads_and_writes_match_a_resident_oracle(ops, dtype, budget_chunks, seed):
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        store = create_table(Path(tmp) / "t", _spec(dtype), target_chunk_bytes=SMALL_CHUNKS)
        oracle = _oracle(store)
        owned = _owned_rows(store.spec)
        largest = max(np.prod(store.chunk_shape(n)) * oracle[n].dtype.itemsize for n in store.array_names)
        cache = CachedPartitions(store, OWNED, budget_bytes=int(budget_chunks * largest))
        chunk_set = sum(np.prod(store.chunk_shape(n)) * oracle[n].dtype.itemsize for n in store.array_names)
        accesses = 0
        for kind, picks, names in ops:
            rows = owned[np.asarray(picks, dtype=np.int64) % len(owned)] if picks else np.empty(0, np.int64)
            if kind == "read":
                got = cache.read_rows(rows, names)
                assert list(got) == list(names or store.array_names)
                for name, a in got.items():
                    assert a.dtype == oracle[name].dtype
                    assert np.array_equal(_bits(a), _bits(oracle[name][rows]))
                accesses += _accesses(cache, rows, names or store.array_names)
            elif kind == "write":
                rows, data = _write(cache, oracle, rows, names, rng)
                accesses += _accesses(cache, rows, data)
            elif kind == "update":
                rows = np.unique(rows)[rng.permutation(len(np.unique(rows)))]
                misses = cache.metrics()["misses"]
                _update(cache, oracle, rows, rng)
                m = cache.metrics()
                if cache.budget_bytes >= chunk_set:  # each chunk loaded at most once per update
                    assert m["misses"] - misses <= _accesses(cache, rows, store.array_names)
                accesses = m["hits"] + m["misses"]
            else:
                cache.flush()
                assert cache.metrics()["dirty_chunks"] == 0
            _check_accounting(cache)
            m = cache.metrics()
            assert m["hits"] + m["misses"] == accesses

        cache.flush()
        assert cache.metrics()["dirty_chunks"] == 0
        reopened = _oracle(open_table(Path(tmp) / "t"))
        for name in store.array_names:
            assert np.array_equal(_bits(reopened[name]), _bits(oracle[name])), name


_op_in_place = st.one_of(
    _op,
    st.tuples(st.just("write_in_place"), st.lists(st.integers(0, 10**6), min_size=1, max_size=30, unique=True),
              st.sampled_from([None, ("values",), ("exp_avg", "step")])),
    st.tuples(st.just("update_at"), st.lists(st.integers(0, 10**6), min_size=1, max_size=30, unique=True),
              st.just(None)),
    st.tuples(st.just("read_in_place"), st.lists(st.integers(0, 10**6), min_size=0, max_size=30),  # repeats
              st.sampled_from([None, ("values",), ("exp_avg_sq", "step")])),
)


def _update_at(cache, oracle, rows: np.ndarray, rng: np.random.Generator, check_at=None) -> None:
    """update_rows with `update_at` (rows changed inside the held chunks where the grids allow);
    both callbacks check what they are handed against the oracle (and `check_at(arrays, index, pos)`
    what update_at is handed)."""
    new = _random_arrays(oracle, len(rows), rng)

    def update(block, pos):
        for name, a in block.items():
            assert np.array_equal(_bits(a), _bits(oracle[name][rows[pos]])), name
            a[...] = new[name][pos]

    def update_at(arrays, index, pos):
        assert len(index) == len(pos) and len({len(a) for a in arrays.values()}) == 1  # one stretch of rows
        if check_at is not None:
            check_at(arrays, index, pos)
        for name, a in arrays.items():
            assert np.array_equal(_bits(a[index]), _bits(oracle[name][rows[pos]])), name
            a[index] = new[name][pos]

    cache.update_rows(rows, update, update_at=update_at)
    for name, a in new.items():
        oracle[name][rows] = a


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op_in_place, min_size=1, max_size=15), dtype=st.sampled_from(["float32", "bfloat16"]),
       budget_chunks=st.integers(1, 8), raw=st.booleans(), share=st.sampled_from([0.0, 0.3, np.inf]),
       seed=st.integers(0, 2**16))
def test_rows_read_and_written_without_loading_their_chunks_match_a_resident_oracle(ops, dtype, budget_chunks, raw,
                                                                                     share, seed):
    """write_rows(load=False), as the row cache writes its evicted rows: rows of held chunks go into
    them, the others straight into their chunk files (raw arrays; compressed ones load the chunk),
    and read_rows(load=False) (rows repeat), mixed with reads, ordinary writes, updates (in blocks,
    and inside the held chunks with update_at, several stretches a batch where the budget holds
    them) and flushes. Partial chunks and bfloat16 included."""
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        store = create_table(Path(tmp) / "t", _spec(dtype), target_chunk_bytes=SMALL_CHUNKS, compress_state=not raw)
        oracle = _oracle(store)
        owned = _owned_rows(store.spec)
        largest = max(np.prod(store.chunk_shape(n)) * oracle[n].dtype.itemsize for n in store.array_names)
        cache = CachedPartitions(store, OWNED, budget_bytes=int(budget_chunks * largest))
        cache.in_place_read_share = share  # inf: every row in place; 0.0: every chunk loaded
        for kind, picks, names in ops:
            rows = owned[np.asarray(picks, dtype=np.int64) % len(owned)] if picks else np.empty(0, np.int64)
            if kind == "read":
                for name, a in cache.read_rows(rows, names).items():
                    assert np.array_equal(_bits(a), _bits(oracle[name][rows])), name
            elif kind == "write":
                _write(cache, oracle, rows, names, rng)
            elif kind == "write_in_place":
                held = {key for key in cache._chunks}
                before = cache.metrics()
                rows, data = _write(cache, oracle, rows, names, rng, load=False)
                m = cache.metrics()
                in_place = [n for n in data if cache.io.writes_in_place(n)]
                # raw tables write every array in place; default ones only values (state is zstd)
                assert in_place == [n for n in data if raw or n == "values"]
                if len(in_place) == len(data):  # nothing loaded, nothing evicted, held chunks stay held
                    assert (m["misses"], m["bytes_loaded"]) == (before["misses"], before["bytes_loaded"])
                    assert held <= set(cache._chunks)
            elif kind == "read_in_place":
                before = cache.metrics()
                got = cache.read_rows(rows, names, load=False)
                for name, a in got.items():
                    assert a.dtype == oracle[name].dtype
                    assert np.array_equal(_bits(a), _bits(oracle[name][rows])), name
                if raw and share == np.inf:  # nothing loaded, nothing evicted
                    m = cache.metrics()
                    assert (m["misses"], m["evictions"]) == (before["misses"], before["evictions"])
            elif kind == "update":
                _update(cache, oracle, np.unique(rows), rng)
            elif kind == "update_at":
                _update_at(cache, oracle, np.unique(rows)[rng.permutation(len(np.unique(rows)))], rng)
            else:
                cache.flush()
            _check_accounting(cache)
        cache.close()
        reopened = _oracle(open_table(Path(tmp) / "t"))
        for name in store.array_names:
            assert np.array_equal(_bits(reopened[name]), _bits(oracle[name])), name


def test_a_row_written_without_loading_goes_into_its_chunk_file_and_a_held_chunk_takes_its_rows(tmp_path):
    store = create_table(tmp_path / "t", _spec(optimizer="sgd"), target_chunk_bytes=SMALL_CHUNKS,
                         compress_state=False)
    chunk_bytes = int(np.prod(store.chunk_shape("values"))) * 4
    cache = CachedPartitions(store, OWNED, budget_bytes=chunk_bytes)  # one chunk
    cache.read_rows(np.array([0]))  # partition 0, chunk 0 (local rows 0-4) held
    new = np.arange(16, dtype=np.float32).reshape(2, 8)
    cache.write_rows(np.array([4, 40]), {"values": new}, load=False)  # local rows 1 (held) and 10 (not held)
    m = cache.metrics()
    assert (m["misses"], m["chunks"], m["dirty_chunks"], m["rows_written_in_place"]) == (1, 1, 1, 1)
    on_disk = open_table(tmp_path / "t").read_rows(0, np.array([1, 10]))["values"]
    assert np.array_equal(on_disk[1], new[1])  # local row 10: in its file already
    assert not np.array_equal(on_disk[0], new[0])  # local row 1: in the held chunk, dirty, not yet on disk
    cache.flush()
    assert np.array_equal(open_table(tmp_path / "t").read_rows(0, np.array([1, 10]))["values"], new)
    assert np.array_equal(cache.read_rows(np.array([4, 40]))["values"], new)


def _table(tmp_path: Path, **kw) -> tuple:
    store = create_table(tmp_path / "t", _spec(**kw), target_chunk_bytes=SMALL_CHUNKS)
    return store, _oracle(store)


def test_repeated_reads_of_a_resident_chunk_are_hits(tmp_path):
    store, _ = _table(tmp_path)
    cache = CachedPartitions(store, OWNED, budget_bytes=1 << 20)
    rows = np.array([0, 4, 8])  # partition 0, local rows 0-2: chunks of 2 rows (values) or more
    cache.read_rows(rows, ["values"])
    first = cache.metrics()
    cache.read_rows(rows[::-1], ["values"])
    second = cache.metrics()
    assert second["misses"] == first["misses"] and second["hits"] == first["hits"] + first["misses"]
    assert second["hit_rate"] == pytest.approx(0.5)


def test_evicting_a_dirty_chunk_writes_it_back_whole(tmp_path):
    store, oracle = _table(tmp_path, optimizer="sgd")
    chunk_bytes = int(np.prod(store.chunk_shape("values"))) * 4
    cache = CachedPartitions(store, OWNED, budget_bytes=chunk_bytes)  # exactly one chunk fits
    new = np.full((1, 8), 7.0, np.float32)
    cache.write_rows(np.array([0]), {"values": new})  # partition 0, chunk 0 (local rows 0-1)
    assert open_table(tmp_path / "t").read_rows(0, np.array([0]))["values"][0, 0] != 7.0  # not yet
    cache.read_rows(np.array([40]), ["values"])  # partition 0, local row 10: another chunk evicts it
    m = cache.metrics()
    assert (m["evictions"], m["writebacks"], m["dirty_chunks"]) == (1, 1, 0)
    on_disk = open_table(tmp_path / "t").read_rows(0, np.array([0, 1]))["values"]
    assert np.array_equal(on_disk[0], new[0]) and np.array_equal(on_disk[1], oracle["values"][4])


def test_budget_smaller_than_one_chunk_is_refused(tmp_path):
    store, _ = _table(tmp_path)
    with pytest.raises(LayoutError, match="smaller than one chunk"):
        CachedPartitions(store, OWNED, budget_bytes=16)


def test_rows_of_a_partition_not_cached_here_are_refused_and_change_nothing(tmp_path):
    store, _ = _table(tmp_path)
    cache = CachedPartitions(store, OWNED, budget_bytes=1 << 20)
    with pytest.raises(LayoutError, match=r"partitions \[1\] are not cached here"):
        cache.read_rows(np.array([0, 1]))  # row 1 lives in partition 1
    with pytest.raises(LayoutError, match="rows must be in"):
        cache.read_rows(np.array([47]))
    assert cache.metrics()["misses"] == 0 and cache.metrics()["chunks"] == 0


def test_bad_writes_change_nothing(tmp_path):
    store, oracle = _table(tmp_path, optimizer="sgd")
    cache = CachedPartitions(store, OWNED, budget_bytes=1 << 20)
    good = np.zeros((2, 8), np.float32)
    for rows, arrays, match in [
        (np.array([0, 0]), {"values": good}, "duplicate"),
        (np.array([0, 4]), {"values": good.astype(np.float64)}, "must be float32"),
        (np.array([0, 4]), {"values": good[:1]}, "must be float32"),
        (np.array([0, 4]), {"nope": good}, "unknown array"),
        (np.array([0, 1]), {"values": good}, "not cached here"),
    ]:
        with pytest.raises(LayoutError, match=match):
            cache.write_rows(rows, arrays)
    assert cache.metrics()["chunks"] == 0
    assert np.array_equal(cache.read_rows(np.array([0, 4]))["values"], oracle["values"][[0, 4]])


def test_writes_through_a_read_only_store_are_refused(tmp_path):
    _table(tmp_path)
    cache = CachedPartitions(open_table(tmp_path / "t", "r"), OWNED, budget_bytes=1 << 20)
    with pytest.raises(ReadOnlyTableError):
        cache.write_rows(np.array([0]), {"values": np.zeros((1, 8), np.float32)})


def test_copy_to_writes_only_owned_partitions_with_cached_changes(tmp_path):
    store, oracle = _table(tmp_path)
    cache = CachedPartitions(store, OWNED, budget_bytes=1 << 20)
    rows = np.array([3, 8, 46])  # partitions 3, 0, 2
    data = _random_arrays(oracle, 3, np.random.default_rng(0))
    cache.write_rows(rows, data)
    target = create_table(tmp_path / "ckpt", store.spec, initialize=False, target_chunk_bytes=SMALL_CHUNKS)
    cache.copy_to(target)
    copied = _oracle(open_table(tmp_path / "ckpt"))
    for name in store.array_names:
        oracle[name][rows] = data[name]
        owned = np.isin(np.arange(store.spec.rows) % 4, OWNED)
        assert np.array_equal(copied[name][owned], oracle[name][owned])
        assert not copied[name][~owned].any()  # partition 1 was never written: fill value 0


def test_copy_to_from_a_raw_work_table_fills_a_default_checkpoint_table(tmp_path):
    spec = _spec("bfloat16")
    store = create_table(tmp_path / "work", spec, target_chunk_bytes=SMALL_CHUNKS, compress_state=False)
    oracle = _oracle(store)
    cache = CachedPartitions(store, OWNED, budget_bytes=1 << 20)
    assert set(cache.io.engines.values()) == {"raw"}
    rows = _owned_rows(spec)[::3]
    data = _random_arrays(oracle, len(rows), np.random.default_rng(4))
    cache.write_rows(rows, data)  # dirty in the cache: copy_to must flush them first
    target = create_table(tmp_path / "ckpt", spec, initialize=False)  # 2 MiB chunks, zstd state
    cache.copy_to(target)
    cache.close()
    copied = _oracle(open_table(tmp_path / "ckpt"))
    owned = np.isin(np.arange(spec.rows) % 4, OWNED)
    for name in store.array_names:
        oracle[name][rows] = data[name]
        assert np.array_equal(_bits(copied[name][owned]), _bits(oracle[name][owned])), name
        assert not _bits(copied[name][~owned]).any()
    assert [type(c).__name__ for c in target.array_metadata("exp_avg").codecs] == ["BytesCodec", "ZstdCodec"]


_RSS_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, psutil
    from storage import open_table
    from storage.chunk_cache import CachedPartitions
    store = open_table(sys.argv[1], "r+")
    budget = int(sys.argv[2])
    cache = CachedPartitions(store, range(store.spec.num_partitions), budget)
    rng = np.random.default_rng(0)
    proc = psutil.Process()
    def work(rounds):
        for _ in range(rounds):
            rows = rng.integers(0, store.spec.rows, 4096)
            got = cache.read_rows(rows, ["values"])["values"]
            cache.write_rows(np.unique(rows), {"values": np.ones((len(np.unique(rows)), store.spec.dim), np.float32)})
    cache.read_rows(np.array([0]), ["values"])  # warm up the read path (imports, codec buffers)
    base = proc.memory_info().rss  # an unbounded cache would add the whole table (64 MiB) to this
    peak = base
    for _ in range(6):
        work(1)
        peak = max(peak, proc.memory_info().rss)
    m = cache.metrics()
    assert m["cache_bytes"] <= budget, m
    print(peak - base, m["bytes_loaded"])
    """
)


@pytest.mark.slow
def test_process_serving_a_table_eight_times_its_budget_keeps_rss_bounded(tmp_path):
    spec = TableSpec("big", rows=64 * 2048, dim=128, num_partitions=8, optimizer="sgd")  # 64 MiB values
    create_table(tmp_path / "big", spec)
    budget = 8 << 20
    # the allocator settings a cached shard runs with (DESIGN §8): two arenas, and buffers of a chunk or
    # more mmapped, so chunk buffers freed by eviction (and TensorStore's I/O threads) go back to the OS
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "big"), str(budget)],
                         capture_output=True, text=True, timeout=120, check=False, cwd=Path(__file__).parents[2],
                         env=env)
    assert out.returncode == 0, out.stderr
    growth, loaded = map(int, out.stdout.split())
    assert loaded > 4 * (64 << 20)  # the table really streamed through the cache several times
    assert growth < budget + (24 << 20)  # far below the 64 MiB a resident copy would add
