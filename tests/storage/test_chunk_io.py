"""Tests of storage/chunk_io.py's raw engine: chunk files read with pread and rewritten in place.

The contract: through `CachedPartitions` with the raw engine a table behaves like a resident numpy
oracle, and what it leaves on disk is plain Zarr v3 that zarr-python and TensorStore read back the
same. Around it: missing chunk files read as the fill value and are created full size on write, a
write keeps the file (same inode: no new file, no rename), a read-only store refuses writes and
changes nothing, compressed arrays fall back per array, chunk paths come from the array's own key
encoding, and open file descriptors stay bounded and are closed by their owner.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import LayoutError, ReadOnlyTableError, TableSpec, create_table, open_table
from storage.chunk_cache import CachedPartitions
from storage.chunk_io import RawChunkIO, open_chunk_io
from tests.storage.test_chunk_cache import OWNED, SMALL_CHUNKS, _bits, _oracle, _random_arrays, _spec, _update, _write


def _raw_table(path: Path, **kw) -> object:
    return create_table(path, _spec(**kw), target_chunk_bytes=SMALL_CHUNKS, compress_state=False)


def _tensorstore_table(path: Path, spec: TableSpec) -> dict[str, np.ndarray]:
    """The table in global row order, read with TensorStore alone (bfloat16 values as their uint16 bits)."""
    rows = np.arange(spec.rows)
    out = {}
    for name in open_table(path).array_names:
        arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / name)}}).result()
        whole = arr.read().result()
        out[name] = whole[rows % spec.num_partitions, rows // spec.num_partitions]
    return out


def _chunk_file(store, name: str, p: int, c: int) -> Path:
    trailing = store.chunk_shape(name)[2:]
    return store.array_path(name) / store.array_metadata(name).encode_chunk_key((p, c, *(0 for _ in trailing)))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


_op = st.one_of(
    st.tuples(st.just("read"), st.lists(st.integers(0, 10**6), max_size=30),
              st.sampled_from([None, ("values",), ("exp_avg_sq", "step")])),
    st.tuples(st.just("write"), st.lists(st.integers(0, 10**6), min_size=1, max_size=30, unique=True),
              st.sampled_from([None, ("values",), ("exp_avg", "step")])),
    st.tuples(st.just("update"), st.lists(st.integers(0, 10**6), min_size=1, max_size=30, unique=True),
              st.just(None)),
    st.tuples(st.just("flush"), st.just([]), st.just(None)),
)


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, min_size=1, max_size=20), dtype=st.sampled_from(["float32", "bfloat16"]),
       budget_chunks=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_raw_cache_matches_an_oracle_and_zarr_and_tensorstore_read_what_it_wrote(ops, dtype, budget_chunks, seed):
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t"
        store = _raw_table(path, dtype=dtype)
        oracle = _oracle(store)
        rows_all = np.arange(store.spec.rows)
        owned = rows_all[np.isin(rows_all % 4, OWNED)]
        largest = max(np.prod(store.chunk_shape(n)) * oracle[n].dtype.itemsize for n in store.array_names)
        cache = CachedPartitions(store, OWNED, budget_bytes=int(budget_chunks * largest))
        assert set(cache.io.engines.values()) == {"raw"}
        for kind, picks, names in ops:
            rows = owned[np.asarray(picks, dtype=np.int64) % len(owned)] if picks else np.empty(0, np.int64)
            if kind == "read":
                for name, a in cache.read_rows(rows, names).items():
                    assert a.dtype == oracle[name].dtype
                    assert np.array_equal(_bits(a), _bits(oracle[name][rows])), name
            elif kind == "write":
                _write(cache, oracle, rows, names, rng)
            elif kind == "update":
                _update(cache, oracle, np.unique(rows), rng)
            else:
                cache.flush()
        cache.close()
        assert cache.io.open_files() == 0
        by_zarr = _oracle(open_table(path))
        by_ts = _tensorstore_table(path, store.spec)
        for name in store.array_names:
            assert np.array_equal(_bits(by_zarr[name]), _bits(oracle[name])), name
            assert np.array_equal(by_ts[name], _bits(oracle[name])), name


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(picks=st.lists(st.integers(0, 10**6), min_size=1, max_size=40, unique=True),
       dtype=st.sampled_from(["float32", "bfloat16"]), seed=st.integers(0, 2**16))
def test_scattered_rows_are_written_in_place_and_read_back_like_the_other_engines(picks, dtype, seed):
    """`write_rows` and `read_rows`: unique rows in any order, runs of consecutive rows that cross chunk boundaries,
    partial last chunks (R = 12 rows in chunks of 5 or 10) and missing chunk files (partition 2 is
    never initialised); only those rows change, the files stay the same files, and the TensorStore
    engine, given the same rows, leaves the same bytes."""
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        spec = _spec(dtype)
        stores = {e: create_table(Path(tmp) / e, spec, target_chunk_bytes=SMALL_CHUNKS, compress_state=False)
                  for e in ("raw", "tensorstore")}
        for store in stores.values():  # partition 2 back to no chunk files at all
            for name in store.array_names:
                for c in range(-(-spec.rows_per_partition // store.chunk_shape(name)[1])):
                    _chunk_file(store, name, 2, c).unlink(missing_ok=True)
        oracle = _oracle(stores["raw"])
        valid = [(p, r) for p in range(spec.num_partitions) for r in range(spec.valid_rows(p))]
        pairs = np.array([valid[i] for i in dict.fromkeys(i % len(valid) for i in picks)])  # unique, drawn order
        part, local = pairs[:, 0], pairs[:, 1]
        if rng.random() < 0.5:  # sometimes a sorted request: every run of consecutive rows is one write
            order = np.lexsort((local, part))
            part, local = part[order], local[order]
        data = _random_arrays(oracle, len(part), rng)
        inodes = {f: f.stat().st_ino for f in stores["raw"].path.rglob("*") if f.is_file()}
        ios = {e: RawChunkIO(s) if e == "raw" else open_chunk_io(s, e) for e, s in stores.items()}
        assert ios["raw"].writes_in_place("values") and not ios["tensorstore"].writes_in_place("values")
        for name in stores["raw"].array_names:
            for io in ios.values():
                io.write_rows(name, part, local, data[name])
            oracle[name][local * spec.num_partitions + part] = data[name]
        assert ios["raw"].counters["write_bytes"] == sum(a.nbytes for a in data.values())
        for engine, io in ios.items():  # read_rows: the same rows back, in request order
            for name, x in data.items():
                got = io.read_rows(name, part, local)
                assert got.dtype == x.dtype and np.array_equal(_bits(got), _bits(x)), (engine, name)
        ios["raw"].close()
        assert all(f.stat().st_ino == i for f, i in inodes.items())  # rewritten in place, none replaced
        for engine, store in stores.items():
            by_zarr, by_ts = _oracle(open_table(store.path)), _tensorstore_table(store.path, spec)
            for name in store.array_names:
                assert np.array_equal(_bits(by_zarr[name]), _bits(oracle[name])), (engine, name)
                assert np.array_equal(by_ts[name], _bits(oracle[name])), (engine, name)


def test_writing_scattered_rows_to_a_read_only_store_is_refused(tmp_path):
    _raw_table(tmp_path / "t")
    io = RawChunkIO(open_table(tmp_path / "t", "r"))
    with pytest.raises(ReadOnlyTableError):
        io.write_rows("values", np.array([0]), np.array([0]), np.zeros((1, 8), np.float32))
    assert io.counters["write_ops"] == 0


def test_missing_chunk_files_read_as_zero_and_a_write_creates_them_full_size(tmp_path):
    store = create_table(tmp_path / "t", _spec(), initialize=False, target_chunk_bytes=SMALL_CHUNKS,
                         compress_state=False)
    io = RawChunkIO(store)
    f = _chunk_file(store, "values", 2, 1)  # partition 2, local rows 5-9
    assert not f.exists()
    (got,) = io.read("values", [(2, 5, 10)])
    assert got.shape == (5, 8) and not got.any()
    io.write([("values", 2, 7, np.full((2, 8), 3.0, np.float32))])  # two rows in the middle of the chunk
    assert f.stat().st_size == 5 * 8 * 4  # the whole chunk, the rest the fill value
    expected = np.zeros((5, 8), np.float32)
    expected[2:4] = 3.0
    assert np.array_equal(io.read("values", [(2, 5, 10)])[0], expected)
    assert np.array_equal(open_table(tmp_path / "t").read_partition(2)["values"][5:10], expected)


def test_a_write_rewrites_the_chunk_file_in_place(tmp_path):
    store = _raw_table(tmp_path / "t")
    io = RawChunkIO(store)
    f = _chunk_file(store, "values", 0, 0)
    inode = f.stat().st_ino
    io.write([("values", 0, 0, np.ones((5, 8), np.float32))])
    assert f.stat().st_ino == inode  # same file: no new file and rename
    assert np.array_equal(open_table(tmp_path / "t").read_rows(0, np.arange(5))["values"], np.ones((5, 8)))


def test_spans_across_chunk_boundaries_read_and_write_like_tensorstore(tmp_path):
    store = _raw_table(tmp_path / "t", dtype="bfloat16")  # values chunks of 10 rows, R = 12
    raw, reference = RawChunkIO(store), open_chunk_io(store, "tensorstore")
    data = np.arange(11 * 8, dtype=np.float32).reshape(11, 8).astype(ml_dtypes.bfloat16)
    raw.write([("values", 3, 0, data)])  # partition 3 has 11 valid rows: two chunks
    (got,) = reference.read("values", [(3, 0, 11)])
    assert np.array_equal(_bits(got), _bits(data))
    (back,) = raw.read("values", [(3, 4, 11)])
    assert back.dtype == ml_dtypes.bfloat16 and np.array_equal(_bits(back), _bits(data[4:]))


def test_a_read_only_store_refuses_writes_and_changes_nothing(tmp_path):
    _raw_table(tmp_path / "t")
    before = {p: p.read_bytes() for p in (tmp_path / "t").rglob("*") if p.is_file()}
    store = open_table(tmp_path / "t", "r")
    io = RawChunkIO(store)
    io.read("values", [(0, 0, 5), (1, 0, 5)])
    with pytest.raises(ReadOnlyTableError):
        io.write([("values", 0, 0, np.ones((5, 8), np.float32)), ("step", 1, 0, np.ones(12, np.int32))])
    cache = CachedPartitions(store, OWNED, budget_bytes=1 << 20)
    with pytest.raises(ReadOnlyTableError):
        cache.write_rows(np.array([0]), {"values": np.ones((1, 8), np.float32)})
    cache.close()
    io.close()
    after = {p: p.read_bytes() for p in (tmp_path / "t").rglob("*") if p.is_file()}
    assert after == before  # no file changed, none created


@pytest.mark.parametrize("fallback", ["tensorstore", "zarr"])
def test_compressed_arrays_fall_back_per_array_and_round_trip(tmp_path, fallback):
    store = create_table(tmp_path / "t", _spec(), target_chunk_bytes=SMALL_CHUNKS)  # zstd state
    io = RawChunkIO(store, fallback=fallback)
    assert io.engines == {"values": "raw", "exp_avg": fallback, "exp_avg_sq": fallback, "step": fallback}
    cache = CachedPartitions(store, OWNED, budget_bytes=1 << 20, io=io)
    rows = np.array([0, 4, 46, 3])  # partitions 0, 0, 2, 3
    data = _random_arrays(cache.templates, len(rows), np.random.default_rng(1))
    cache.write_rows(rows, data)
    cache.flush()
    reopened = open_table(tmp_path / "t")
    for r, i in zip(rows.tolist(), range(len(rows)), strict=True):
        got = reopened.read_rows(r % 4, np.array([r // 4]))
        for name in store.array_names:
            assert np.array_equal(got[name][0], data[name][i]), name
    m = cache.metrics()
    assert (m["io_raw_arrays"], m[f"io_{fallback}_arrays"], m["io_engine.values.raw"]) == (1, 3, 1)


def test_chunk_files_follow_the_arrays_own_key_encoding(tmp_path):
    store = create_table(tmp_path / "t", _spec(optimizer="sgd"), initialize=False, target_chunk_bytes=SMALL_CHUNKS)
    meta_path = tmp_path / "t" / "values" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["chunk_key_encoding"] = {"name": "default", "configuration": {"separator": "."}}
    meta_path.write_text(json.dumps(meta))
    store = open_table(tmp_path / "t", "r+")
    io = RawChunkIO(store)
    io.write([("values", 1, 5, np.full((5, 8), 2.0, np.float32))])
    assert (tmp_path / "t" / "values" / "c.1.1.0").is_file()
    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "t" / "values")}}).result()
    assert np.array_equal(arr[1, 5:10].read().result(), np.full((5, 8), 2.0, np.float32))


def test_a_truncated_chunk_file_is_a_layout_error(tmp_path):
    store = _raw_table(tmp_path / "t")
    f = _chunk_file(store, "values", 0, 1)
    os.truncate(f, 16)
    with pytest.raises(LayoutError, match="shorter than"):
        RawChunkIO(store).read("values", [(0, 5, 10)])


def test_open_files_stay_bounded_and_close_releases_them(tmp_path):
    store = _raw_table(tmp_path / "t")
    base = _open_fds()
    io = RawChunkIO(store, max_open_files=3)
    spans = [(p, c * 5, min(c * 5 + 5, store.spec.valid_rows(p))) for p in range(4) for c in range(3)]
    io.read("values", spans)  # 12 chunk files
    io.write([("exp_avg", p, 0, np.zeros((5, 8), np.float32)) for p in range(4)])
    assert io.open_files() == 3 and _open_fds() == base + 3
    io.close()
    assert io.open_files() == 0 and _open_fds() == base
    io.read("values", spans[:2])  # usable after close: files reopen on demand
    assert io.open_files() == 2
    io.close()


def test_a_cache_closes_the_engine_it_opened_but_not_one_it_was_given(tmp_path):
    store = _raw_table(tmp_path / "t")
    given_io = RawChunkIO(store)
    for io in (None, given_io):
        cache = CachedPartitions(store, OWNED, budget_bytes=1 << 20, io=io)
        cache.write_rows(np.array([0, 2]), {"values": np.ones((2, 8), np.float32)})
        cache.read_rows(np.array([3]))
        assert cache.io.open_files() > 0
        cache.close()
        assert cache.io.open_files() == (0 if io is None else 3)  # values chunks of p 0, 2 and 3's chunks
    given_io.close()
    assert np.array_equal(open_table(tmp_path / "t").read_rows(2, np.array([0]))["values"], np.ones((1, 8)))


def test_an_engine_over_another_store_is_refused(tmp_path):
    a, b = _raw_table(tmp_path / "a"), _raw_table(tmp_path / "b")
    with pytest.raises(LayoutError, match="serves"):
        CachedPartitions(a, OWNED, budget_bytes=1 << 20, io=RawChunkIO(b))


def test_unknown_engine_is_refused(tmp_path):
    store = _raw_table(tmp_path / "t")
    with pytest.raises(LayoutError, match="engine"):
        open_chunk_io(store, "mmap")  # type: ignore[arg-type]
    with pytest.raises(LayoutError, match="max_open_files"):
        RawChunkIO(store, max_open_files=0)
