"""Shards load partitions from and save them into Zarr table groups (DESIGN §5 checkpoint)."""

from __future__ import annotations

import numpy as np
import pytest

from param_server.errors import InvalidRequestError
from param_server.shard import Shard, ShardConfig
from storage.layout import TableSpec, init_partition_values
from storage.table_store import create_table, open_table


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_shards_save_and_a_third_loads_the_whole_table_back(tmp_path, dtype):
    spec = TableSpec(name="mem", rows=37, dim=6, dtype=dtype, num_partitions=4, optimizer="adamw")
    create_table(tmp_path / "src" / "mem", spec)
    a, b = Shard(ShardConfig(), shard_id=0), Shard(ShardConfig(), shard_id=1)
    try:
        a.load_table(open_table(tmp_path / "src" / "mem"), [0, 2])
        b.load_table(open_table(tmp_path / "src" / "mem"), [1, 3])
        assert a.owned_partitions("mem") == [0, 2] and b.owned_partitions("mem") == [1, 3]
        init = {p: init_partition_values(spec, p) for p in (0, 2)}  # row r at [r % 4, r // 4]
        want = np.stack([init[0][0], init[2][0], init[0][9]])
        np.testing.assert_array_equal(a.gather("mem", np.array([0, 2, 36])), want)
        a.push("mem", 0, 1, 0, 0.1, np.array([0, 2, 2]), np.ones((3, 6), np.float32))
        b.push("mem", 0, 1, 0, 0.1, np.array([1, 35]), np.ones((2, 6), np.float32))
        create_table(tmp_path / "ckpt" / "mem", spec, initialize=False)  # the checkpoint target
        a.save(tmp_path / "ckpt")
        b.save(tmp_path / "ckpt")
        expected = {**a.export_partitions("mem"), **b.export_partitions("mem")}
    finally:
        a.close()
        b.close()
    with Shard(ShardConfig()) as c:
        c.load_table(open_table(tmp_path / "ckpt" / "mem"), range(4))
        loaded = c.export_partitions("mem")
    assert sorted(loaded) == [0, 1, 2, 3]
    for p, arrays in expected.items():
        assert sorted(loaded[p]) == ["exp_avg", "exp_avg_sq", "step", "values"]
        for name, arr in arrays.items():
            assert loaded[p][name].dtype == arr.dtype
            np.testing.assert_array_equal(loaded[p][name], arr, err_msg=f"partition {p} {name}")
    assert loaded[0]["step"][0] == 1 and loaded[2]["step"][0] == 1 and loaded[1]["step"][1] == 0


def test_save_into_a_group_of_another_shape_is_refused(tmp_path):
    spec = TableSpec(name="mem", rows=16, dim=4, num_partitions=2, optimizer="sgd")
    create_table(tmp_path / "src" / "mem", spec)
    create_table(tmp_path / "ckpt" / "mem", TableSpec(name="mem", rows=16, dim=8, num_partitions=2), initialize=False)
    with Shard(ShardConfig()) as shard:
        shard.load_table(open_table(tmp_path / "src" / "mem"), [0, 1])
        with pytest.raises(InvalidRequestError):
            shard.save(tmp_path / "ckpt")
