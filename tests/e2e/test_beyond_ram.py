"""Memory beyond one node's RAM (DESIGN §5): cached shards train exactly like resident ones, stay
within their budget, and a table larger than any process's budget is created without materialising it.

- A sync run whose table is 4x each shard's RAM budget (every partition served through the chunk
  cache, with constant eviction and write-back) ends with the same values as `--local`.
- Lazy creation: the driver writes only metadata; each ShardActor initialises its own partitions
  in parallel; a table 8x the budget leaves every process's RSS growth under that budget.
- A shard process driven with gathers and pushes over a table several times its budget keeps its
  RSS under budget + its measured baseline.
Sizes are scaled down to keep the suite fast (the ratios, not the absolute sizes, are what is tested).
"""

from __future__ import annotations

import os

import numpy as np
import psutil
import pytest
import ray

from model_workers.model import LanguageModel
from orchestration.distributed import train_distributed
from orchestration.placement import shard_env
from param_server.actor import ShardActor, ShardActorConfig
from param_server.client import Client
from param_server.partitions import partition_nbytes
from param_server.shard import ShardConfig
from storage.layout import TableSpec
from storage.table_store import create_table, open_table

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MB = 1 << 20


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def _peak_rss(pid: int) -> int:
    """The process's RSS high-water mark (Linux VmHWM), so a short spike is not missed."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_sync_run_with_the_table_4x_each_shards_budget_matches_local_training(ray_session, e2e, local_tiny_run,
                                                                              tmp_path):
    cfg = e2e.tiny_config(shards=2, workers=1, consistency="sync")
    (spec,) = LanguageModel(cfg.model).memory_tables()
    table_bytes = partition_nbytes(spec) * spec.num_partitions
    result = train_distributed(cfg, tmp_path, progress=False, shard_budget_bytes=table_bytes // 4,
                               on_trainer=lambda t: _check_cached(t))
    assert result.steps == e2e.STEPS
    e2e.assert_same_state(result.checkpoint, local_tiny_run)


def _check_cached(trainer) -> None:
    metrics = trainer.shard_metrics()
    assert all(m["cached_partitions"] == 2 and m["resident_partitions"] == 0 for m in metrics)


def _actor(spec: TableSpec, path, shard_id: int, partitions, budget: int):
    # the malloc settings every budgeted shard gets from its launcher (orchestration/placement.py)
    cls = ray.remote(ShardActor).options(num_cpus=0, max_concurrency=4,
                                         runtime_env={"env_vars": shard_env(budgeted=True)})
    return cls.remote(ShardActorConfig(shard_id=shard_id, table_paths={spec.name: str(path)},
                                       partitions=tuple(partitions), work_paths={spec.name: str(path)},
                                       initialize=True, shard=ShardConfig(ram_budget_bytes=budget)))


def test_a_table_8x_the_budget_is_created_lazily_without_any_process_passing_it(ray_session, tmp_path):
    budget = 8 * MB  # scaled down from 256 MB / 2 GB, same 8x ratio
    spec = TableSpec(name="big", rows=1 << 18, dim=64, num_partitions=16, optimizer="sgd", seed=3)
    assert partition_nbytes(spec) * spec.num_partitions >= 8 * budget
    me = os.getpid()
    before = _rss(me)
    store = create_table(tmp_path / "big", spec, initialize=False, target_chunk_bytes=256 * 1024)
    assert _rss(me) - before < budget
    empty = _actor(spec, tmp_path / "big", 9, [], budget)  # same code, no partitions: the baseline
    baseline = _peak_rss(ray.get(empty.pid.remote()))
    actors = [_actor(spec, tmp_path / "big", s, range(s, spec.num_partitions, 4), budget) for s in range(4)]
    actors.append(empty)
    try:
        pids = ray.get([a.pid.remote() for a in actors[:4]])  # returns once each has initialised its partitions
        metrics = ray.get([a.metrics.remote() for a in actors[:4]])
        assert all(m["cache_bytes"] + m["bytes_resident"] <= budget and m["cached_partitions"] >= 1 for m in metrics)
        # each shard held at most its budget plus one generated block (a 4 MB partition) beyond the baseline
        assert all(_peak_rss(pid) - baseline < budget + 8 * MB for pid in pids), [_peak_rss(p) - baseline
                                                                                 for p in pids]
        assert _rss(me) - before < budget
        # lazily written values are the deterministic per-partition initial values
        p = 5
        got = open_table(tmp_path / "big").read_rows(p, np.arange(10))["values"]
        from storage.layout import init_partition_values
        np.testing.assert_array_equal(got, init_partition_values(spec, p)[:10])
        address = ray.get(actors[1].address.remote())
        with Client([address]) as client:
            rows = np.arange(p, spec.rows, spec.num_partitions)[:10]
            np.testing.assert_array_equal(client.gather("big", rows), got.astype(np.float32))
        del store
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)


def test_a_shard_process_serving_a_table_4x_its_budget_stays_within_budget_plus_baseline(ray_session, tmp_path):
    budget = 8 * MB
    spec = TableSpec(name="rss", rows=1 << 17, dim=64, num_partitions=8, optimizer="adagrad", seed=1)
    assert partition_nbytes(spec) * spec.num_partitions >= 4 * budget
    create_table(tmp_path / "rss", spec, initialize=False, target_chunk_bytes=128 * 1024)
    empty = _actor(spec, tmp_path / "rss", 1, [], budget)  # same code, no partitions: the baseline
    actor = _actor(spec, tmp_path / "rss", 0, range(spec.num_partitions), budget)
    try:
        baseline = _peak_rss(ray.get(empty.pid.remote()))
        pid, address = ray.get([actor.pid.remote(), actor.address.remote()])
        rng = np.random.default_rng(0)
        with Client([address]) as client:
            for step in range(12):
                rows = rng.choice(spec.rows, 2048, replace=False)
                client.gather("rss", rows, min_step=step - 1 if step else None)
                client.push("rss", rows, rng.normal(size=(rows.size, spec.dim)).astype(np.float32), lr=0.1,
                            step=step)
        peak = _peak_rss(pid)
        m = ray.get(actor.metrics.remote())
        assert m["cache_evictions"] > 0 and m["cache_bytes"] <= budget
        # request buffers (2048 rows x 64 fp32 = 0.5 MB each way, a few copies) come on top of the cache
        assert peak < baseline + budget + 16 * MB, (peak - baseline) / MB
    finally:
        for a in (empty, actor):
            ray.kill(a, no_restart=True)
