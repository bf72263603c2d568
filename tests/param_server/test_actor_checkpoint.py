"""ShardActor and checkpoints (docs/reliability.md §7): which checkpoint a shard loads, and that a
restarted one checks its own partitions against the manifest first. Built directly, without Ray."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from param_server import actor as actor_module
from param_server.actor import ShardActor, ShardActorConfig
from storage.checkpoint import file_digest, step_dir, write_manifest
from storage.errors import CheckpointError
from storage.layout import TableSpec
from storage.table_store import create_table, open_table

SPEC = TableSpec(name="mem", rows=32, dim=8, num_partitions=4, optimizer="adamw")


def _checkpoint(root: Path, step: int, seed: int) -> Path:
    """A complete checkpoint step-<step> under root holding table "mem" (values differ by seed)."""
    d = step_dir(root, step)
    store = create_table(d / "tables" / "mem", SPEC, initialize=False)
    rng = np.random.default_rng(seed)
    for p in range(SPEC.num_partitions):
        store.write_partition(p, {"values": rng.normal(size=(SPEC.rows_per_partition, SPEC.dim)).astype(np.float32)})
    write_manifest(d, {"tables": ["mem"]})
    return d


@pytest.fixture
def actors() -> Iterator[list[ShardActor]]:
    """Actors built by a test; stopped afterwards."""
    built: list[ShardActor] = []
    yield built
    for a in built:
        a.stop(0)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:16] = bytes(b ^ 0xFF for b in data[:16])
    path.write_bytes(bytes(data))


def test_a_fresh_shard_loads_the_checkpoint_it_was_given_not_the_newest(tmp_path, actors):
    root = tmp_path / "checkpoints"
    chosen, newer = _checkpoint(root, 10, seed=1), _checkpoint(root, 20, seed=2)
    a = ShardActor(ShardActorConfig(shard_id=0, table_paths={"mem": str(chosen / "tables" / "mem")},
                                    partitions=(0, 1, 2, 3), checkpoint_root=str(root)))
    actors.append(a)
    assert a.loaded_from == str(chosen)
    want = open_table(chosen / "tables" / "mem").read_partition(1)["values"]
    assert not np.array_equal(want, open_table(newer / "tables" / "mem").read_partition(1)["values"])
    np.testing.assert_array_equal(a.shard.export_partitions("mem")[1]["values"], want)


def test_a_restarted_shard_verifies_only_its_own_partitions(tmp_path, actors, monkeypatch):
    root = tmp_path / "checkpoints"
    _checkpoint(root, 10, seed=1)
    newest = _checkpoint(root, 20, seed=2)
    _flip(newest / "tables" / "mem" / "values" / "c" / "1" / "0" / "0")  # partition 1: shard 1's
    monkeypatch.setattr(actor_module, "_reconstructed", lambda: True)
    initial = tmp_path / "unused"  # the run's initial tables: present (a shard checks it can see them), never read
    initial.mkdir()
    initial = str(initial)

    ok = ShardActor(ShardActorConfig(shard_id=0, table_paths={"mem": initial}, partitions=(0, 2),
                                     checkpoint_root=str(root)))
    actors.append(ok)
    assert ok.restarted and ok.loaded_from == str(newest)  # its partitions are intact
    with pytest.raises(CheckpointError, match=r"tables/mem/values/c/1/0/0: sha256 mismatch"):
        ShardActor(ShardActorConfig(shard_id=1, table_paths={"mem": initial}, partitions=(1, 3),
                                    checkpoint_root=str(root)))


def test_save_returns_the_digests_of_the_chunks_it_wrote(tmp_path, actors):
    source = _checkpoint(tmp_path / "checkpoints", 10, seed=1)
    a = ShardActor(ShardActorConfig(shard_id=0, table_paths={"mem": str(source / "tables" / "mem")},
                                    partitions=(0, 2)))
    actors.append(a)
    target = step_dir(tmp_path / "out", 5)
    create_table(target / "tables" / "mem", SPEC, initialize=False)
    saved = a.save(str(target))
    assert saved["partitions"] == [0, 2]
    assert saved["files"] and all(rel.split("/")[4] in ("0", "2") for rel in saved["files"])
    assert not any(rel.endswith("zarr.json") for rel in saved["files"])
    for rel, digest in saved["files"].items():
        assert digest == file_digest(target / rel)
