"""The coordinator's bookkeeping: partition assignment, map epochs, table registry."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestration.coordinator import Coordinator, ShardRecord, assign_partitions


@given(st.integers(1, 64).flatmap(lambda s: st.tuples(st.just(s), st.integers(s, 512))))
def test_assignment_covers_every_partition_with_balanced_blocks(shards_and_parts):
    shards, parts = shards_and_parts
    owner = assign_partitions(parts, shards)
    assert len(owner) == parts
    counts = [owner.count(s) for s in range(shards)]
    assert max(counts) - min(counts) <= 1 and min(counts) >= 1
    assert owner == sorted(owner)  # contiguous blocks


def test_more_shards_than_partitions_is_refused():
    with pytest.raises(ValueError, match="partitions"):
        assign_partitions(4, 8)


def test_installing_shards_bumps_the_epoch_and_publishes_addresses():
    coord = Coordinator(num_partitions=4)
    epoch = coord.set_shards([ShardRecord(0, "127.0.0.1:1", [0, 2]), ShardRecord(1, "127.0.0.1:2", [1, 3])])
    assert epoch == 1
    pmap = coord.partition_map()
    assert pmap["owner"] == [0, 1, 0, 1] and pmap["addresses"] == {0: "127.0.0.1:1", 1: "127.0.0.1:2"}
    assert coord.update_address(1, "127.0.0.1:9") == 2
    assert coord.addresses() == ["127.0.0.1:1", "127.0.0.1:9"]


def test_a_map_with_a_hole_or_a_double_owner_is_refused_and_keeps_the_old_one():
    coord = Coordinator(num_partitions=3)
    coord.set_shards([ShardRecord(0, "a", [0, 1, 2])])
    with pytest.raises(ValueError, match="no owner"):
        coord.set_shards([ShardRecord(0, "a", [0, 1])])
    with pytest.raises(ValueError, match="owned by shards"):
        coord.set_shards([ShardRecord(0, "a", [0, 1, 2]), ShardRecord(1, "b", [2])])
    assert coord.epoch == 1 and coord.partition_map()["owner"] == [0, 0, 0]


def test_a_table_name_keeps_its_spec():
    coord = Coordinator(num_partitions=4)
    spec = {"name": "mem0.values", "rows": 64, "dim": 8, "num_partitions": 4}
    coord.register_table(spec)
    coord.register_table(dict(spec))  # same spec again: fine
    with pytest.raises(ValueError, match="another spec"):
        coord.register_table({**spec, "dim": 16})
    with pytest.raises(ValueError, match="partitions"):
        coord.register_table({**spec, "name": "other", "num_partitions": 8})
