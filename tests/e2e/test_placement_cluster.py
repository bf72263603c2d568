"""Placement on a simulated multi-node cluster (ray.cluster_utils.Cluster, DESIGN §1).

Two "memory nodes" (resource memory_shard, no CPUs) and one "compute node" (CPUs, model_worker):
shards must land only on memory nodes, the worker only on the compute node, and 4 shards with 1
worker must train exactly like `--local`. The cluster runs in a child process, because a process
can hold only one Ray connection and the rest of the suite shares the session's local Ray.
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
    from orchestration.config import load_config
    from orchestration.distributed import DistributedTrainer

    out = sys.argv[1]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"model_worker": 1}, "include_dashboard": False,
        "object_store_memory": 96 * 1024 * 1024, "node_ip_address": "127.0.0.1"})
    memory_nodes = [cluster.add_node(num_cpus=0, resources={"memory_shard": 2},
                                     object_store_memory=96 * 1024 * 1024, node_ip_address="127.0.0.1")
                    for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        cfg = load_config(preset="tiny", overrides=["train.max_steps=20", "train.eval_every=0",
                                                     "train.checkpoint_every=20"])
        cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, shards=4, workers=1,
                                                                   consistency="sync"))
        trainer = DistributedTrainer(cfg, out, address=cluster.address, progress=False)
        try:
            placement = trainer.placement()
            result = trainer.run()
        finally:
            trainer.close()
        head = cluster.head_node.node_id
        print(json.dumps({"placement": placement, "head": head,
                          "memory_nodes": [n.node_id for n in memory_nodes],
                          "checkpoint": str(result.checkpoint), "steps": result.steps}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_shards_land_on_memory_nodes_and_workers_on_compute_nodes(tmp_path, e2e, local_tiny_run):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_AUTH_TOKEN", None)
    done = subprocess.run([sys.executable, "-c", JOB, str(tmp_path / "run")], env=env, cwd=Path(__file__).parents[2],
                          capture_output=True, text=True, timeout=420, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    placement, memory_nodes = report["placement"], set(report["memory_nodes"])
    assert len(placement["shards"]) == 4 and set(placement["shards"]) <= memory_nodes
    assert len(set(placement["shards"])) == 2  # spread over both memory nodes (2 memory_shard units each)
    assert placement["workers"] == [report["head"]]
    assert report["steps"] == e2e.STEPS
    e2e.assert_same_state(Path(report["checkpoint"]), local_tiny_run)
