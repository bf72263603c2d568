"""Memory spread over many nodes (DESIGN §1, §5): a table ~3x one node's budget, 4 simulated memory nodes.

Four "memory nodes" (resource memory_shard = 1 each, no CPUs) and one compute node run in a
ray.cluster_utils.Cluster in a child process (a process holds one Ray connection; the suite shares
the session's local Ray). Each shard gets the node's RAM budget B and the value table is about 3B,
so no single node could hold it: the shards land one per node, each holds at most B of partition
data (RAM-resident bytes plus chunk-cache bytes, from its metrics), and sync training still
equals `--local`. (Per-process RSS against a budget is tested in test_beyond_ram.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

JOB = textwrap.dedent("""
    import dataclasses, json, os, sys
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.cluster_utils import Cluster
    from model_workers.model import LanguageModel
    from orchestration.config import load_config
    from orchestration.distributed import DistributedTrainer
    from param_server.partitions import partition_nbytes

    out = sys.argv[1]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"model_worker": 1}, "include_dashboard": False,
        "object_store_memory": 80 * 1024 * 1024, "node_ip_address": "127.0.0.1"})
    memory_nodes = [cluster.add_node(num_cpus=0, resources={"memory_shard": 1},
                                     object_store_memory=80 * 1024 * 1024, node_ip_address="127.0.0.1")
                    for _ in range(4)]
    cluster.wait_for_nodes()
    try:
        cfg = load_config(preset="tiny", overrides=["train.max_steps=20", "train.eval_every=0",
                                                     "train.checkpoint_every=20"])
        cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, shards=4, workers=1,
                                                                   consistency="sync"))
        (spec,) = LanguageModel(cfg.model).memory_tables()
        table = partition_nbytes(spec) * spec.num_partitions
        budget = table // 3  # the table is ~3 nodes' worth of RAM
        trainer = DistributedTrainer(cfg, out, address=cluster.address, progress=False, shard_budget_bytes=budget)
        try:
            placement = trainer.placement()
            result = trainer.run()
            metrics = trainer.shard_metrics()
        finally:
            trainer.close()
        print(json.dumps({"placement": placement, "memory_nodes": [n.node_id for n in memory_nodes],
                          "budget": budget, "table": table,
                          "held": [m["bytes_resident"] + m["cache_bytes"] for m in metrics],
                          "checkpoint": str(result.checkpoint), "steps": result.steps}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_a_table_3x_one_nodes_budget_trains_spread_over_4_memory_nodes(tmp_path, e2e, local_tiny_run):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_AUTH_TOKEN", None)
    done = subprocess.run([sys.executable, "-c", JOB, str(tmp_path / "run")], env=env, cwd=Path(__file__).parents[2],
                          capture_output=True, text=True, timeout=420, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["table"] >= 3 * report["budget"]
    assert sorted(report["placement"]["shards"]) == sorted(report["memory_nodes"])  # one shard per node
    assert all(0 < held <= report["budget"] for held in report["held"]), report["held"]
    assert report["steps"] == e2e.STEPS
    e2e.assert_same_state(Path(report["checkpoint"]), local_tiny_run)
