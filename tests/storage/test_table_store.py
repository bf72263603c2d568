"""Tests of storage/table_store.py: create/open, partition and row round trips, errors, init."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import (
    LayoutError,
    ReadOnlyTableError,
    TableExistsError,
    TableNotFoundError,
    TableSpec,
    create_table,
    init_partition_values,
    open_table,
    table_store,
)

SMALL_CHUNKS = 64  # bytes: several chunks per partition even in tiny tables


def random_arrays(store, n_rows, rng):
    """Random data for every array of a table: {name: [n_rows, ...]} in the exact dtypes."""
    spec = store.spec
    out = {"values": rng.standard_normal((n_rows, spec.dim)).astype(np.float32)}
    out["values"] = out["values"].astype(ml_dtypes.bfloat16 if spec.dtype == "bfloat16" else spec.dtype)
    for name in store.array_names[1:]:
        shape = (n_rows, *store.chunk_shape(name)[2:])
        out[name] = (rng.integers(1, 1000, shape) if name == "step" else rng.random(shape)).astype(
            np.int32 if name == "step" else np.float32
        )
    return out


def bits(a):
    return a.view(np.uint16) if a.dtype == ml_dtypes.bfloat16 else a


def assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(bits(a), bits(b))


table_specs = st.builds(
    TableSpec,
    name=st.just("t"),
    rows=st.integers(1, 60),
    dim=st.integers(1, 5),
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
    num_partitions=st.integers(1, 5),
    optimizer=st.sampled_from(["adamw", "adagrad", "sgd"]),
)


@given(table_specs, st.sampled_from([8, SMALL_CHUNKS, 1 << 20]), st.data())
@settings(max_examples=25, deadline=None)
def test_written_partition_reads_back_and_leaves_other_partitions_alone(spec, chunk_bytes, data):
    with tempfile.TemporaryDirectory() as d:
        store = create_table(Path(d) / "t", spec, initialize=False, target_chunk_bytes=chunk_bytes)
        p = data.draw(st.integers(0, spec.num_partitions - 1))
        arrays = random_arrays(
            store, spec.rows_per_partition, np.random.default_rng(data.draw(st.integers(0, 99)))
        )
        store.write_partition(p, arrays)
        reopened = open_table(Path(d) / "t")
        for q in range(spec.num_partitions):
            got = reopened.read_partition(q)
            assert list(got) == list(store.array_names)
            for name, a in got.items():
                if q == p:
                    assert_same(a, arrays[name])
                else:
                    assert not np.any(a.astype(np.float32)), f"partition {q} {name} changed"


@given(table_specs, st.sampled_from([8, SMALL_CHUNKS]), st.data())
@settings(max_examples=25, deadline=None)
def test_written_rows_read_back_in_any_order_and_only_they_change(spec, chunk_bytes, data):
    with tempfile.TemporaryDirectory() as d:
        store = create_table(Path(d) / "t", spec, initialize=True, target_chunk_bytes=chunk_bytes)
        p = data.draw(st.integers(0, spec.num_partitions - 1))
        valid = spec.valid_rows(p)
        rows = np.array(
            data.draw(st.lists(st.integers(0, max(valid - 1, 0)), unique=True, max_size=valid)),
            dtype=np.int64,
        )
        before = store.read_partition(p)
        arrays = random_arrays(store, len(rows), np.random.default_rng(1))
        store.write_rows(p, rows, arrays)
        after = store.read_partition(p)
        for name in store.array_names:
            expected = before[name].copy()
            expected[rows] = arrays[name]
            assert_same(after[name], expected)
        if valid:
            query = np.array(data.draw(st.lists(st.integers(0, valid - 1), max_size=12)), dtype=np.int64)
            got = store.read_rows(p, query)
            for name in store.array_names:
                assert_same(got[name], after[name][query])


def test_chunks_never_straddle_partitions_in_the_stored_metadata(tmp_path):
    spec = TableSpec("t", rows=50, dim=3, num_partitions=4, optimizer="adamw")
    create_table(tmp_path / "t", spec, target_chunk_bytes=SMALL_CHUNKS)
    for name in ("values", "exp_avg", "exp_avg_sq", "step"):
        meta = json.loads((tmp_path / "t" / name / "zarr.json").read_text())
        chunk = meta["chunk_grid"]["configuration"]["chunk_shape"]
        assert chunk[0] == 1 and 1 <= chunk[1] <= spec.rows_per_partition
        assert chunk[2:] == meta["shape"][2:], "a chunk holds whole rows"
        assert meta["shape"][:2] == [4, 13]
        assert all(c["name"] != "sharding_indexed" for c in meta["codecs"])


def test_writing_one_partition_creates_chunk_files_of_that_partition_only(tmp_path):
    spec = TableSpec("t", rows=50, dim=3, num_partitions=4)
    store = create_table(tmp_path / "t", spec, initialize=False, target_chunk_bytes=SMALL_CHUNKS)
    assert not list((tmp_path / "t").rglob("c/*")), "no data written for an uninitialised table"
    store.write_partition(2, random_arrays(store, spec.rows_per_partition, np.random.default_rng(0)))
    store.write_rows(2, np.array([0, 7]), random_arrays(store, 2, np.random.default_rng(1)))
    chunk_files = [f for f in (tmp_path / "t").rglob("*") if f.is_file() and f.name != "zarr.json"]
    assert len(chunk_files) > 4, "several chunks per array"
    for f in chunk_files:
        key = f.relative_to(tmp_path / "t").parts  # <array>/c/<partition>/<chunk>[/0]
        assert key[1] == "c" and key[2] == "2", key


def test_initial_values_do_not_depend_on_who_initialises_which_partitions_in_which_order(
    tmp_path, monkeypatch
):
    spec = TableSpec("t", rows=37, dim=3, num_partitions=5, seed=11, dtype="bfloat16")
    whole = create_table(tmp_path / "whole", spec)
    create_table(tmp_path / "split", spec, initialize=[3])
    monkeypatch.setattr(table_store, "_INIT_BLOCK_BYTES", 1)  # one chunk per block from here on
    worker_a, worker_b = open_table(tmp_path / "split", "r+"), open_table(tmp_path / "split", "r+")
    worker_b.initialize_partitions([4, 0])
    worker_a.initialize_partitions([2, 1])
    split = open_table(tmp_path / "split")
    for p in range(spec.num_partitions):
        assert_same(split.read_partition(p)["values"], whole.read_partition(p)["values"])
        assert_same(whole.read_partition(p)["values"], init_partition_values(spec, p))
    other = create_table(tmp_path / "other", TableSpec("t", rows=37, dim=3, num_partitions=5, seed=12))
    assert not np.array_equal(other.read_partition(0)["values"], whole.read_partition(0)["values"])


def test_optimizer_state_of_a_new_table_is_zero_without_writing_it(tmp_path):
    spec = TableSpec("t", rows=20, dim=4, num_partitions=2, optimizer="adamw")
    store = create_table(tmp_path / "t", spec)
    assert not list((tmp_path / "t" / "exp_avg").rglob("c/*"))
    for name, a in store.read_partition(1).items():
        if name != "values":
            assert not np.any(a)


def test_uninitialised_partitions_read_as_zero(tmp_path):
    spec = TableSpec("t", rows=20, dim=4, num_partitions=4)
    store = create_table(tmp_path / "t", spec, initialize=[1])
    assert not np.any(store.read_partition(0)["values"])
    assert np.any(store.read_partition(1)["values"])


def test_bfloat16_table_round_trips_every_bit_pattern(tmp_path):
    spec = TableSpec("t", rows=4096, dim=16, num_partitions=4, dtype="bfloat16", optimizer="sgd")
    store = create_table(tmp_path / "t", spec, initialize=False)
    patterns = np.arange(1 << 16, dtype=np.uint16).reshape(4, 1024, 16)  # NaNs, infs, subnormals
    for p in range(4):
        store.write_partition(p, {"values": patterns[p].view(ml_dtypes.bfloat16)})
    reopened = open_table(tmp_path / "t")
    for p in range(4):
        got = reopened.read_partition(p)["values"]
        assert got.dtype == ml_dtypes.bfloat16
        assert np.array_equal(got.view(np.uint16), patterns[p])
    rows = np.array([1023, 5, 0])
    assert np.array_equal(reopened.read_rows(2, rows)["values"].view(np.uint16), patterns[2][rows])


def test_opening_a_missing_table_raises_table_not_found(tmp_path):
    with pytest.raises(TableNotFoundError):
        open_table(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):  # TableNotFoundError is also a FileNotFoundError
        open_table(tmp_path / "empty")
    zarr.open_group(tmp_path / "plain", mode="w")
    with pytest.raises(TableNotFoundError, match="not an ultramem table"):
        open_table(tmp_path / "plain")


def test_table_whose_metadata_disagrees_with_its_arrays_raises_layout_error(tmp_path):
    create_table(tmp_path / "t", TableSpec("t", rows=20, dim=4, num_partitions=2))
    meta_path = tmp_path / "t" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["ultramem"]["dim"] = 5
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(LayoutError, match="values"):
        open_table(tmp_path / "t")
    meta_path.write_text("{ not json")
    with pytest.raises(LayoutError):
        open_table(tmp_path / "t")


def _bad_writes(spec):
    r = spec.rows_per_partition
    good = np.ones((r, spec.dim), np.float32)
    return [
        {"values": np.ones((r, spec.dim), np.float64)},  # wrong dtype
        {"values": np.ones((r - 1, spec.dim), np.float32)},  # wrong shape
        {"values": np.ones((r, spec.dim + 1), np.float32)},
        {"values": good.tolist()},  # not an array
        {"values": good, "exp_avg": np.ones((r,), np.float32)},  # one good, one bad: nothing written
        {"values": good, "momentum": good},  # unknown array
        {"step": np.ones((r,), np.int64)},
        {},
    ]


def test_bad_partition_write_raises_layout_error_and_writes_nothing(tmp_path):
    spec = TableSpec("t", rows=20, dim=4, num_partitions=2)
    store = create_table(tmp_path / "t", spec)
    before = store.read_partition(1)
    for arrays in _bad_writes(spec):
        with pytest.raises(LayoutError):
            store.write_partition(1, arrays)
    with pytest.raises(LayoutError):
        store.write_partition(2, {"values": before["values"]})  # partition out of range
    for name, a in store.read_partition(1).items():
        assert_same(a, before[name])


@pytest.mark.parametrize(
    "rows",
    [np.array([0, 0]), np.array([10]), np.array([-1]), np.array([[0]]), np.array([0.0]), np.array([9, 1, 9])],
)
def test_bad_row_write_raises_layout_error_and_writes_nothing(tmp_path, rows):
    spec = TableSpec("t", rows=19, dim=2, num_partitions=2)  # partition 1 holds 9 rows + 1 padding row
    store = create_table(tmp_path / "t", spec)
    before = store.read_partition(1)
    n = rows.shape[0]
    with pytest.raises(LayoutError):
        store.write_rows(1, rows, {"values": np.ones((n, 2), np.float32), "step": np.ones(n, np.int32)})
    for name, a in store.read_partition(1).items():
        assert_same(a, before[name])


def test_reading_rows_outside_the_partition_raises_layout_error(tmp_path):
    store = create_table(tmp_path / "t", TableSpec("t", rows=19, dim=2, num_partitions=2))
    with pytest.raises(LayoutError):
        store.read_rows(1, np.array([9]))
    with pytest.raises(LayoutError):
        store.read_partition(0, names=["nope"])
    assert store.read_rows(1, np.array([], dtype=np.int64))["values"].shape == (0, 2)


def test_read_only_table_refuses_writes_and_keeps_data(tmp_path):
    create_table(tmp_path / "t", TableSpec("t", rows=20, dim=4, num_partitions=2))
    store = open_table(tmp_path / "t")
    before = store.read_partition(0)["values"]
    with pytest.raises(ReadOnlyTableError):
        store.write_partition(0, {"values": np.zeros_like(before)})
    with pytest.raises(ReadOnlyTableError):
        store.write_rows(0, np.array([1]), {"values": np.zeros((1, 4), np.float32)})
    with pytest.raises(ReadOnlyTableError):
        store.initialize_partitions([0])
    assert_same(open_table(tmp_path / "t").read_partition(0)["values"], before)


def test_create_refuses_existing_data_and_overwrites_only_tables(tmp_path):
    spec = TableSpec("t", rows=20, dim=4, num_partitions=2)
    create_table(tmp_path / "t", spec)
    with pytest.raises(TableExistsError):
        create_table(tmp_path / "t", spec)
    replaced = create_table(tmp_path / "t", TableSpec("t", rows=8, dim=2, num_partitions=2), overwrite=True)
    assert open_table(tmp_path / "t").spec == replaced.spec
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(TableExistsError):
        create_table(tmp_path / "precious", spec, overwrite=True)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_nbytes_counts_every_array_uncompressed(tmp_path):
    spec = TableSpec("t", rows=10, dim=4, num_partitions=3, dtype="bfloat16", optimizer="adamw")
    store = create_table(tmp_path / "t", spec, initialize=False)
    assert store.nbytes() == {
        "values": 3 * 4 * 4 * 2,
        "exp_avg": 3 * 4 * 4 * 4,
        "exp_avg_sq": 3 * 4 * 4 * 4,
        "step": 3 * 4 * 4,
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compress_state_false_makes_every_array_plain_bytes_that_any_reader_reads(tmp_path, dtype):
    import tensorstore as ts

    spec = TableSpec("t", rows=53, dim=5, dtype=dtype, num_partitions=4, optimizer="adamw", seed=2)
    raw = create_table(tmp_path / "raw", spec, target_chunk_bytes=64, compress_state=False)
    default = create_table(tmp_path / "zstd", spec, target_chunk_bytes=64)
    for name in raw.array_names:
        codecs = [type(c).__name__ for c in raw.array_metadata(name).codecs]
        assert codecs == ["BytesCodec"], name
        zstd = [type(c).__name__ for c in default.array_metadata(name).codecs]
        assert zstd == (["BytesCodec"] if name == "values" else ["BytesCodec", "ZstdCodec"]), name
    group = zarr.open_group(tmp_path / "raw", mode="r")
    for name in raw.array_names:
        by_ts = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "raw" / name)}})
        by_ts = by_ts.result().read().result()
        assert np.array_equal(group[name][:], by_ts)
        assert np.array_equal(by_ts, zarr.open_group(tmp_path / "zstd", mode="r")[name][:])
        if name != "values":
            assert not by_ts.any()  # state starts at the fill value 0
    for p in range(4):
        assert np.array_equal(raw.read_partition(p)["values"].view(np.uint8),
                              init_partition_values(spec, p).view(np.uint8))


def test_compress_state_must_be_a_bool(tmp_path):
    with pytest.raises(LayoutError, match="compress_state"):
        create_table(tmp_path / "t", TableSpec("t", rows=8, dim=2, num_partitions=2), compress_state="no")
    assert not (tmp_path / "t").exists()
