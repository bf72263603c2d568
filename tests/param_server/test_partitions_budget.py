"""Tests of param_server/partitions.py's planning for tables beyond RAM (DESIGN §5): the chunk size
and codecs a work table gets (`chunk_bytes_for_budget`, `work_table_options`), and the life of the
chunk I/O a `CachedTablePartitions` keeps (files released on rescaling and on close); and the
row -> (partition, local row) arithmetic of the hot paths."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from param_server.optimizers import SparseOptimizerConfig, make_optimizer
from param_server.partitions import (
    BEYOND_RAM_CHUNK_BYTES,
    CHUNK_SET_SHARE,
    MIN_CHUNK_BYTES,
    CachedTablePartitions,
    chunk_bytes_for_budget,
    chunk_set_bytes,
    chunk_set_bytes_for,
    initial_arrays,
    local_row_of_valid,
    partition_nbytes,
    partition_of_valid,
    work_table_options,
)
from storage import TableSpec, create_table, open_table
from storage.layout import DEFAULT_TARGET_CHUNK_BYTES

_specs = st.builds(
    TableSpec, name=st.just("t"), rows=st.integers(1_000, 4_000_000), dim=st.sampled_from([16, 64, 128, 256]),
    dtype=st.sampled_from(["float32", "bfloat16"]), num_partitions=st.sampled_from([16, 64, 256]),
    optimizer=st.sampled_from(["adamw", "adagrad", "sgd"]))


@settings(max_examples=200, deadline=None)
@given(spec=_specs, shards=st.integers(1, 8), fraction=st.floats(0.01, 0.9), cache_share=st.floats(0.1, 1.0))
def test_chunks_beyond_ram_are_the_largest_whose_chunk_set_fits_a_share_of_the_cache(spec, shards, fraction,
                                                                                  cache_share):
    per_shard = -(-spec.num_partitions // shards)
    budget = int(partition_nbytes(spec) * per_shard * fraction)  # the shard's partitions do not fit
    target = chunk_bytes_for_budget(spec, budget, shards, cache_share=cache_share)
    assert MIN_CHUNK_BYTES <= target <= BEYOND_RAM_CHUNK_BYTES
    assert BEYOND_RAM_CHUNK_BYTES % target == 0  # 512 KiB halved some times
    limit = CHUNK_SET_SHARE * budget * cache_share
    assert chunk_set_bytes_for(spec, target) <= limit or target == MIN_CHUNK_BYTES
    if target < BEYOND_RAM_CHUNK_BYTES:
        assert chunk_set_bytes_for(spec, 2 * target) > limit  # never smaller than it has to be
    assert work_table_options(spec, budget, shards, cache_share=cache_share) == {
        "target_chunk_bytes": target, "compress_state": False}


def test_a_table_that_fits_keeps_the_default_chunks_and_zstd_state():
    spec = TableSpec("t", rows=4096, dim=128, num_partitions=16)
    whole = partition_nbytes(spec) * 16
    for budget in (None, whole, whole // 2):
        assert work_table_options(spec, budget, 2) == {"target_chunk_bytes": DEFAULT_TARGET_CHUNK_BYTES,
                                                       "compress_state": True}


def test_a_planned_work_table_is_served_raw_and_leaves_the_row_cache_most_of_the_cache(tmp_path):
    # the beyond-RAM bench's 16x training table: 2 shards, each 1/8 of the table, half of it cache
    spec = TableSpec("t", rows=65_536, dim=128, num_partitions=16)
    budget = partition_nbytes(spec) * 16 // 8
    store = create_table(tmp_path / "t", spec, initialize=False, **work_table_options(spec, budget, 2))
    cache_bytes = budget // 2
    parts = CachedTablePartitions(store, range(0, 16, 2), cache_bytes)
    assert set(parts.io.engines.values()) == {"raw"}
    m = parts.metrics()
    assert chunk_set_bytes(store) <= CHUNK_SET_SHARE * cache_bytes
    assert m["row_capacity"] * (partition_nbytes(spec) // spec.rows_per_partition) >= 0.6 * cache_bytes
    parts.close()


def test_partitions_rewritten_while_away_are_read_fresh_and_files_are_released(tmp_path):
    spec = TableSpec("t", rows=64, dim=4, num_partitions=4, optimizer="sgd", seed=1)
    store = create_table(tmp_path / "t", spec, target_chunk_bytes=32, compress_state=False)
    parts = CachedTablePartitions(store, [0, 1], 4096, row_share=0.0)
    rows = np.arange(1, 64, 4)  # partition 1
    assert np.array_equal(parts.read(rows), initial_arrays(spec, 1)["values"])
    assert parts.io.open_files() > 0
    parts.export(1)  # a hand-off: flushed and files closed before the next owner reads
    assert parts.io.open_files() == 0
    sgd = make_optimizer(SparseOptimizerConfig(name="sgd"))
    parts.step(sgd, rows, np.ones((len(rows), 4), np.float32), lr=1.0)
    parts.flush()  # written back in place: partition 1's files are open again
    assert parts.io.open_files() > 0
    parts.remove(1)
    new = np.full((spec.rows_per_partition, 4), 5.0, np.float32)
    parts.add(1, {"values": new})  # written with zarr-python: new files, renamed over the old ones
    assert np.array_equal(parts.read(rows), new)
    parts.close()
    assert parts.io.open_files() == 0
    assert np.array_equal(open_table(tmp_path / "t").read_partition(1)["values"], new)


@pytest.mark.parametrize("engine", ["tensorstore", "zarr"])
def test_an_engine_can_still_be_forced(tmp_path, engine):
    spec = TableSpec("t", rows=64, dim=4, num_partitions=4, seed=1)
    store = create_table(tmp_path / "t", spec, target_chunk_bytes=32, compress_state=False)
    parts = CachedTablePartitions(store, [0, 1, 2, 3], 8192, io=engine)
    assert set(parts.io.engines.values()) == {engine}
    assert parts.metrics()[f"io_{engine}_arrays"] == 4
    assert np.array_equal(parts.read(np.array([5])), initial_arrays(spec, 1)["values"][[1]])
    parts.close()


@settings(max_examples=200, deadline=None)
@given(num_partitions=st.one_of(st.sampled_from([1, 2, 16, 256, 1 << 20]), st.integers(1, 10_000)),
       rows=st.lists(st.integers(0, (1 << 62) - 1), max_size=64))
def test_the_fast_row_mapping_is_the_layouts_remainder_and_quotient(num_partitions, rows):
    """partition_of_valid / local_row_of_valid (masks and shifts for a power of two) give exactly
    rows % NP and rows // NP (storage/layout.py's mapping) for every valid row."""
    r = np.asarray(rows, dtype=np.int64)
    part, local = partition_of_valid(r, num_partitions), local_row_of_valid(r, num_partitions)
    np.testing.assert_array_equal(part, r % num_partitions)
    np.testing.assert_array_equal(local, r // num_partitions)
    assert part.dtype == np.int64 and local.dtype == np.int64
