"""Placement rules: shards on memory nodes, workers on GPUs or compute nodes (DESIGN §1)."""

from __future__ import annotations

import argparse

import pytest

from orchestration.cmd_cluster import up_command
from orchestration.distributed import _boundaries
from orchestration.errors import UsageError
from orchestration.placement import check_capacity, shard_options, worker_options


def test_shards_take_memory_shard_units_and_no_cpu_when_the_cluster_has_them():
    opts = shard_options({"CPU": 8, "memory_shard": 4}, max_restarts=5)
    assert opts["resources"] == {"memory_shard": 1} and opts["num_cpus"] == 0 and opts["max_restarts"] == 5


def test_shards_fall_back_to_a_cpu_without_memory_nodes():
    opts = shard_options({"CPU": 8})
    assert opts["num_cpus"] == 1 and "resources" not in opts


def test_workers_take_a_gpu_when_there_is_one_and_model_worker_units_when_declared():
    assert worker_options({"CPU": 8, "GPU": 2})["num_gpus"] == 1
    opts = worker_options({"CPU": 8, "model_worker": 1})
    assert opts["resources"] == {"model_worker": 1} and "num_gpus" not in opts


def test_capacity_check_names_what_is_missing():
    with pytest.raises(UsageError, match="memory_shard"):
        check_capacity({"CPU": 8, "memory_shard": 2}, shards=4, workers=1)
    with pytest.raises(UsageError, match="GPUs"):
        check_capacity({"CPU": 8, "GPU": 1}, shards=2, workers=2)
    with pytest.raises(UsageError, match="CPUs"):
        check_capacity({"CPU": 2}, shards=2, workers=1)
    check_capacity({"CPU": 1, "memory_shard": 4}, shards=4, workers=1)


def test_chunk_boundaries_hit_every_log_eval_and_checkpoint_step_and_the_end():
    assert _boundaries(0, 10, [4, 5, 0]) == [4, 5, 8, 10]
    assert _boundaries(5, 12, [5]) == [10, 12]
    assert _boundaries(10, 10, [3]) == []


def test_cluster_up_binds_loopback_by_default_and_declares_memory_shards():
    args = argparse.Namespace(host="127.0.0.1", port=6379, memory_shards=4, model_workers=0, address=None)
    cmd = up_command(args)
    assert "--head" in cmd and "--node-ip-address=127.0.0.1" in cmd
    assert '--resources={"memory_shard": 4}' in cmd
    join = up_command(argparse.Namespace(host="10.1.2.3", port=6379, memory_shards=0, model_workers=1,
                                         address="10.1.2.1:6379"))
    assert "--address=10.1.2.1:6379" in join and "--head" not in join
    # Ray refuses head-only flags on a joining node (tests/multihost runs both commands)
    assert not any(a.startswith(("--include-dashboard", "--port")) for a in join)
