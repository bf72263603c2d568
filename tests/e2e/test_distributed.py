"""Distributed training on Ray (DESIGN §1, §4.3, §5): sync equivalence, resharded resume, async.

One worker in sync mode must compute exactly what `ultramem train --local` computes, whatever the
shard count, because the same sparse optimizer code runs on the shards and in the LocalBackend and
every lookup waits for the previous step's pushes. These tests run the `tiny` preset on the
session's local Ray and compare the final checkpoints array by array.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from model_workers import checkpoint_io
from model_workers.trainer import LocalTrainer
from orchestration.config import RunConfig, load_config, to_dict
from orchestration.distributed import DistributedTrainer, train_distributed
from storage.checkpoint import table_path
from storage.table_store import open_table

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS = 20


def tiny(**cluster: object) -> RunConfig:
    cfg = load_config(preset="tiny", overrides=[f"train.max_steps={STEPS}", "train.checkpoint_every=10",
                                                "train.eval_every=0", "train.keep_checkpoints=0"])
    return dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, **cluster))


def final_state(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    dense = checkpoint_io.read_dense(ckpt)["model"]
    tables = {}
    for name in checkpoint_io.read_manifest(ckpt)["tables"]:
        store = open_table(table_path(ckpt, name))
        for p in range(store.spec.num_partitions):
            for key, arr in store.read_partition(p).items():
                tables[f"{name}/{p}/{key}"] = np.asarray(arr)
    return dense, tables


def assert_same_state(a: Path, b: Path) -> None:
    dense_a, tables_a = final_state(a)
    dense_b, tables_b = final_state(b)
    assert dense_a.keys() == dense_b.keys() and tables_a.keys() == tables_b.keys()
    for k in dense_a:
        torch.testing.assert_close(dense_a[k], dense_b[k], rtol=1e-5, atol=1e-6, msg=k)
    for k in tables_a:
        np.testing.assert_allclose(tables_a[k], tables_b[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    cfg = tiny()
    run_dir = tmp_path_factory.mktemp("local")
    trainer = LocalTrainer(cfg.model, cfg.train, cfg.data, run_dir, config=to_dict(cfg), progress=False)
    return trainer.run().checkpoint


@pytest.mark.parametrize("shards", [1, 3])
def test_one_sync_worker_matches_local_training_for_any_shard_count(ray_session, local_run, tmp_path, shards):
    result = train_distributed(tiny(shards=shards, workers=1, consistency="sync"), tmp_path, progress=False)
    assert result.steps == STEPS and result.checkpoint is not None
    assert checkpoint_io.read_manifest(result.checkpoint)["step"] == STEPS
    assert_same_state(result.checkpoint, local_run)
    _, final = final_state(result.checkpoint)  # ... and training really moved the remote values
    initial = open_table(tmp_path / "tables" / "mem0.values")
    moved = [not np.array_equal(final[f"mem0.values/{p}/values"], initial.read_partition(p)["values"])
             for p in range(initial.spec.num_partitions)]
    assert all(moved)


@pytest.mark.parametrize(("before", "after"), [(2, 3), (3, 1)])
def test_resume_with_another_shard_count_continues_the_same_run(ray_session, local_run, tmp_path, before, after):
    first = train_distributed(tiny(shards=before, consistency="sync"), tmp_path / "a", max_steps=10,
                              progress=False)
    assert first.steps == 10
    second = train_distributed(tiny(shards=after, consistency="sync"), tmp_path / "a", resume=first.checkpoint,
                               progress=False)
    assert second.steps == STEPS
    assert_same_state(second.checkpoint, local_run)


def test_async_training_with_bounded_staleness_learns_like_sync(ray_session, tmp_path):
    sync = train_distributed(tiny(consistency="sync"), tmp_path / "sync", progress=False)
    async_ = train_distributed(tiny(consistency="async", staleness=2), tmp_path / "async", progress=False)
    assert async_.steps == sync.steps == STEPS
    assert async_.staleness_bound == 2
    assert abs(async_.val_loss - sync.val_loss) / sync.val_loss < 0.05


def test_two_workers_train_with_ddp_and_keep_identical_dense_replicas(ray_session, tmp_path):
    trainer = DistributedTrainer(tiny(workers=2, consistency="sync"), tmp_path, progress=False)
    try:
        result = trainer.run(max_steps=6)
        states = trainer.call_workers("dense_state")
    finally:
        trainer.close()
    assert result.steps == 6
    for k, v in states[0]["model"].items():
        torch.testing.assert_close(v, states[1]["model"][k], msg=k)
