"""Tables we write are plain Zarr v3: zarr-python and TensorStore read them without our code (DESIGN §5)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
import zarr

from storage import TableSpec, create_table


@pytest.fixture
def written_table(tmp_path):
    """A float32 AdamW table with several chunks per partition and some state rows written.

    Returns (path, spec, full values [P, d_v], step per global row [P]) as our code wrote them.
    """
    spec = TableSpec("t", rows=53, dim=5, num_partitions=4, optimizer="adamw", seed=5)
    store = create_table(tmp_path / "t", spec, target_chunk_bytes=64)
    store.write_rows(
        3,
        np.array([0, 4, 7]),
        {"step": np.array([1, 2, 3], np.int32), "exp_avg": np.full((3, 5), 0.5, np.float32)},
    )
    values = np.zeros((spec.rows, spec.dim), np.float32)
    step = np.zeros(spec.rows, np.int32)
    for p in range(spec.num_partitions):
        part = store.read_partition(p)
        n = spec.valid_rows(p)
        values[p :: spec.num_partitions] = part["values"][:n]  # global rows p, p + NP, ...
        step[p :: spec.num_partitions] = part["step"][:n]
    assert step.sum() == 6
    return tmp_path / "t", spec, values, step


def test_plain_zarr_python_reads_spec_values_and_state(written_table):
    path, _spec, values, step = written_table
    group = zarr.open_group(path, mode="r")
    meta = group.attrs["ultramem"]
    assert (meta["rows"], meta["dim"], meta["num_partitions"], meta["dtype"]) == (53, 5, 4, "float32")
    v = group["values"]
    assert v.shape == (4, 14, 5) and v.dtype == np.float32
    rows = np.arange(meta["rows"])
    got = v[:][rows % meta["num_partitions"], rows // meta["num_partitions"]]
    assert np.array_equal(got, values)
    assert np.array_equal(group["step"][:][rows % 4, rows // 4], step)
    assert group["exp_avg"][3, 4].tolist() == [0.5] * 5
    assert group["values"].metadata.dimension_names == ("partition", "row", "dim")


def test_tensorstore_reads_the_same_arrays(written_table):
    path, spec, values, step = written_table
    for name, expected in (("values", values), ("step", step)):
        arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / name)}}).result()
        data = arr.read().result()
        rows = np.arange(spec.rows)
        assert np.array_equal(data[rows % 4, rows // 4], expected)
    values_store = ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "values")}}
    ).result()
    assert values_store.domain.labels == ("partition", "row", "dim")


def test_bfloat16_table_reads_as_uint16_bits_in_other_readers(tmp_path):
    spec = TableSpec("b", rows=12, dim=3, num_partitions=2, dtype="bfloat16", optimizer="sgd", seed=1)
    store = create_table(tmp_path / "b", spec)
    ours = store.read_partition(1)["values"]  # ml_dtypes.bfloat16 [R, d_v]
    group = zarr.open_group(tmp_path / "b", mode="r")
    assert group.attrs["ultramem"]["dtype"] == "bfloat16"
    assert group["values"].attrs["ultramem"]["dtype"] == "bfloat16"
    bits = group["values"][1]
    assert bits.dtype == np.uint16 and np.array_equal(bits, ours.view(np.uint16))
    floats = (bits.astype(np.uint32) << 16).view(np.float32)  # how a reader without ml_dtypes decodes
    assert np.array_equal(floats, ours.astype(np.float32))
    arr = ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "b" / "values")}}
    ).result()
    assert np.array_equal(arr[1].read().result(), bits)
    assert np.array_equal(bits.view(ml_dtypes.bfloat16), ours)
