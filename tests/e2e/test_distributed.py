"""Distributed training on Ray (DESIGN §1, §4.3, §5): sync equivalence, resharded resume, async.

One worker in sync mode must compute exactly what `ultramem train --local` computes, whatever the
shard count, because the same sparse optimizer code runs on the shards and in the LocalBackend and
every lookup waits for the previous step's pushes. These tests run the `tiny` preset on the
session's local Ray and compare the final checkpoints array by array.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model_workers import checkpoint_io
from orchestration.distributed import DistributedTrainer, train_distributed
from storage.table_store import open_table

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.parametrize("shards", [1, 3])
def test_one_sync_worker_matches_local_training_for_any_shard_count(ray_session, e2e, local_tiny_run, tmp_path,
                                                                    shards):
    result = train_distributed(e2e.tiny_config(shards=shards, workers=1, consistency="sync"), tmp_path, progress=False)
    assert result.steps == e2e.STEPS and result.checkpoint is not None
    assert checkpoint_io.read_manifest(result.checkpoint)["step"] == e2e.STEPS
    e2e.assert_same_state(result.checkpoint, local_tiny_run)
    _, final = e2e.final_state(result.checkpoint)  # ... and training really moved the remote values
    initial = open_table(tmp_path / "tables" / "mem0.values")
    moved = [not np.array_equal(final[f"mem0.values/{p}/values"], initial.read_partition(p)["values"])
             for p in range(initial.spec.num_partitions)]
    assert all(moved)


@pytest.mark.parametrize(("before", "after"), [(2, 4), (4, 1)])
def test_resume_with_another_shard_count_continues_the_same_run(ray_session, e2e, local_tiny_run, tmp_path, before,
                                                               after):
    first = train_distributed(e2e.tiny_config(shards=before, consistency="sync"), tmp_path / "a", max_steps=10,
                              progress=False)
    assert first.steps == 10
    second = train_distributed(e2e.tiny_config(shards=after, consistency="sync"), tmp_path / "a",
                               resume=first.checkpoint, progress=False)
    assert second.steps == e2e.STEPS
    e2e.assert_same_state(second.checkpoint, local_tiny_run)


def test_async_training_with_bounded_staleness_learns_like_sync(ray_session, e2e, tmp_path):
    sync = train_distributed(e2e.tiny_config(consistency="sync"), tmp_path / "sync", progress=False)
    async_ = train_distributed(e2e.tiny_config(consistency="async", staleness=2), tmp_path / "async", progress=False)
    assert async_.steps == sync.steps == e2e.STEPS
    assert async_.staleness_bound == 2 and 0 <= async_.staleness_mean <= 2
    assert sync.staleness_mean == 0  # every lookup saw all of the previous step's pushes
    assert abs(async_.val_loss - sync.val_loss) / sync.val_loss < 0.05


def test_two_workers_train_with_ddp_and_keep_identical_dense_replicas(ray_session, e2e, tmp_path):
    trainer = DistributedTrainer(e2e.tiny_config(workers=2, consistency="sync"), tmp_path, progress=False)
    try:
        result = trainer.run(max_steps=6)
        states = trainer.call_workers("dense_state")
    finally:
        trainer.close()
    assert result.steps == 6
    # parameters, not buffers: running statistics are per rank until DDP broadcasts rank 0's
    # buffers at the start of the next forward
    from model_workers.model import LanguageModel

    params = dict(LanguageModel(e2e.tiny_config().model).named_parameters())
    assert params
    for k in params:
        torch.testing.assert_close(states[0]["model"][k], states[1]["model"][k], msg=k)


def test_a_killed_shard_is_restarted_by_ray_and_reloads_the_latest_checkpoint(ray_session, e2e, tmp_path):
    import os
    import signal
    import time

    import ray

    from param_server.client import Client

    trainer = DistributedTrainer(e2e.tiny_config(shards=2, consistency="sync"), tmp_path, progress=False)
    try:
        result = trainer.run(max_steps=10)
        before = ray.get(trainer.shards[0].info.remote())
        os.kill(before["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:  # calls fail while Ray notices the death and restarts the actor
            try:
                after = ray.get(trainer.shards[0].info.remote(), timeout=10)
                if after["pid"] != before["pid"]:
                    break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            assert time.monotonic() < deadline, "shard was not restarted"
            time.sleep(0.5)
        assert after["loaded_from"] == str(result.checkpoint)
        _, saved = e2e.final_state(result.checkpoint)
        rows = np.arange(64, dtype=np.int64)[np.arange(64) % 4 == after["partitions"][0]]
        with Client([after["address"]], config=trainer.client_config()) as client:
            got = client.gather("mem0.values", rows)
        p = after["partitions"][0]
        np.testing.assert_array_equal(got, saved[f"mem0.values/{p}/values"][: rows.size])
    finally:
        trainer.close()
