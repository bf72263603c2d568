"""Tests of storage/layout.py: the table spec, row <-> partition mapping, chunking, initial values."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.errors import LayoutError
from storage.layout import (
    OPTIMIZER_STATE,
    VALUES,
    TableSpec,
    chunk_rows,
    global_row_of,
    init_partition_values,
    local_row_of,
    partition_of,
    partition_value_blocks,
    spec_from_attributes,
    state_layout,
    table_arrays,
    table_attributes,
)

specs = st.builds(
    TableSpec,
    name=st.from_regex(r"[a-z_][a-z0-9_.-]{0,10}", fullmatch=True),
    rows=st.integers(1, 200),
    dim=st.integers(1, 8),
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
    num_partitions=st.integers(1, 9),
    optimizer=st.sampled_from(["adamw", "adagrad", "sgd"]),
    optimizer_args=st.dictionaries(st.sampled_from(["beta1", "beta2", "eps"]), st.floats(0, 1)).map(
        lambda d: tuple(d.items())
    ),
    init_std=st.floats(0, 2),
    seed=st.integers(0, 2**32),
)


@given(specs)
def test_spec_survives_json_round_trip_of_its_attributes(spec):
    attrs = json.loads(json.dumps(table_attributes(spec)))
    assert spec_from_attributes(attrs) == spec
    assert TableSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_attributes_carry_the_table_spec_and_the_bfloat16_storage_note():
    spec = TableSpec(
        "v", rows=10, dim=4, dtype="bfloat16", num_partitions=3, seed=7, optimizer_args=(("beta2", 0.95),)
    )
    meta = table_attributes(spec)["ultramem"]
    assert (meta["rows"], meta["dim"], meta["num_partitions"], meta["seed"]) == (10, 4, 3, 7)
    assert meta["dtype"] == "bfloat16" and meta["storage_dtype"]["values"] == "uint16"
    assert meta["optimizer"] == "adamw" and meta["optimizer_args"] == {"beta2": 0.95}
    assert meta["init_std"] == 0.02 and meta["version"] == 1 and meta["rows_per_partition"] == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": ""},
        {"name": "a/b"},
        {"name": ".."},
        {"rows": 0},
        {"rows": 2.0},
        {"dim": -1},
        {"num_partitions": 0},
        {"dtype": "float64"},
        {"optimizer": "adam"},
        {"optimizer_args": (("beta2", "x"),)},
        {"optimizer_args": (("eps", 1.0), ("eps", 2.0))},
        {"init_std": float("nan")},
        {"init_std": -1.0},
        {"seed": -1},
        {"version": 2},
        {"rows": True},
    ],
)
def test_invalid_spec_field_raises_layout_error(kwargs):
    base = {"name": "t", "rows": 10, "dim": 4}
    with pytest.raises(LayoutError):
        TableSpec(**{**base, **kwargs})


def test_spec_dict_with_unknown_key_raises_layout_error_naming_valid_keys():
    with pytest.raises(LayoutError, match="valid keys"):
        TableSpec.from_dict({"name": "t", "rows": 1, "dim": 1, "colour": "red"})
    with pytest.raises(LayoutError):
        TableSpec.from_dict({"name": "t", "dim": 1})


def test_attributes_with_inconsistent_derived_fields_are_rejected():
    attrs = table_attributes(TableSpec("t", rows=10, dim=4, num_partitions=3))
    attrs["ultramem"]["rows_per_partition"] = 99
    with pytest.raises(LayoutError, match="rows_per_partition"):
        spec_from_attributes(attrs)
    with pytest.raises(LayoutError):
        spec_from_attributes({"something": "else"})


@given(st.integers(1, 10_000), st.integers(1, 300), st.data())
def test_row_maps_to_partition_and_local_row_and_back(rows, num_partitions, data):
    spec = TableSpec("t", rows=rows, dim=1, num_partitions=num_partitions)
    r = np.asarray(data.draw(st.lists(st.integers(0, rows - 1), min_size=1, max_size=50)), dtype=np.int64)
    p, local = partition_of(r, num_partitions), local_row_of(r, num_partitions)
    assert np.array_equal(global_row_of(p, local, num_partitions), r)
    assert np.all(local < spec.rows_per_partition)
    assert np.all(local < np.array([spec.valid_rows(int(q)) for q in p]))


@given(st.integers(1, 5_000), st.integers(1, 300))
def test_valid_rows_of_all_partitions_add_up_to_the_table(rows, num_partitions):
    spec = TableSpec("t", rows=rows, dim=1, num_partitions=num_partitions)
    counts = np.bincount(partition_of(np.arange(rows), num_partitions), minlength=num_partitions)
    assert [spec.valid_rows(p) for p in range(num_partitions)] == counts.tolist()
    assert spec.rows_per_partition == counts.max()


def test_negative_or_non_integer_rows_raise_layout_error():
    with pytest.raises(LayoutError):
        partition_of(np.array([3, -1]), 4)
    with pytest.raises(LayoutError):
        local_row_of(np.array([1.5]), 4)
    with pytest.raises(LayoutError):
        partition_of(np.array([1]), 0)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZER_STATE))
def test_state_layout_resolves_dim_to_d_v(optimizer):
    spec = TableSpec("t", rows=10, dim=6, optimizer=optimizer)
    layout = state_layout(spec)
    assert list(layout) == list(OPTIMIZER_STATE[optimizer])
    for name, (dims, dtype) in OPTIMIZER_STATE[optimizer].items():
        assert layout[name] == (tuple(6 if d == "dim" else d for d in dims), np.dtype(dtype))
    assert next(iter(table_arrays(spec))) == VALUES


@given(st.integers(1, 1 << 16), st.integers(1, 1 << 20), st.integers(1, 1 << 24))
def test_chunk_rows_fit_the_target_and_never_exceed_a_partition(row_bytes, rows_per_partition, target):
    n = chunk_rows(row_bytes, rows_per_partition, target)
    assert 1 <= n <= rows_per_partition
    assert n == 1 or n * row_bytes <= target
    assert n == rows_per_partition or (n + 1) * row_bytes > target


def test_default_chunks_are_about_two_mib_for_a_wide_table():
    spec = TableSpec("t", rows=1 << 22, dim=256, num_partitions=256)  # R = 16384 rows of 1 KiB
    chunks = table_arrays(spec)[VALUES].chunks(spec)
    assert chunks == (1, 2048, 256)
    assert table_arrays(spec)["step"].chunks(spec) == (1, spec.rows_per_partition)


@given(specs, st.data())
@settings(max_examples=50)
def test_initial_values_depend_only_on_seed_and_partition(spec, data):
    p = data.draw(st.integers(0, spec.num_partitions - 1))
    a = init_partition_values(spec, p)
    assert a.shape == (spec.rows_per_partition, spec.dim)
    assert a.dtype == (ml_dtypes.bfloat16 if spec.dtype == "bfloat16" else np.dtype(spec.dtype))
    assert not np.any(a[spec.valid_rows(p) :].astype(np.float32)), "padding rows must be 0"
    b = init_partition_values(spec, p)
    assert a.tobytes() == b.tobytes()
    block_rows = data.draw(st.integers(1, spec.rows_per_partition))
    blocks = list(partition_value_blocks(spec, p, block_rows))
    assert [start for start, _ in blocks] == list(range(0, spec.rows_per_partition, block_rows))
    assert np.concatenate([blk for _, blk in blocks]).tobytes() == a.tobytes()


def test_initial_values_differ_between_partitions_and_seeds_and_have_the_init_std():
    spec = TableSpec("t", rows=40_000, dim=8, num_partitions=2, init_std=0.5, seed=3)
    p0, p1 = init_partition_values(spec, 0), init_partition_values(spec, 1)
    other_seed = init_partition_values(TableSpec("t", rows=40_000, dim=8, num_partitions=2, init_std=0.5), 0)
    assert not np.array_equal(p0, p1) and not np.array_equal(p0, other_seed)
    assert abs(float(p0.std()) - 0.5) < 0.01 and abs(float(p0.mean())) < 0.01
